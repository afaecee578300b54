"""The thesis' augmentations, applied to image and mask together; boxes are re-derived from the mask."""
from __future__ import annotations

import cv2
import numpy as np
import torch


def resize_long_side(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Scale so the long side is ``size`` (images are pre-scaled once; the model's own resize is then a no-op)."""
    h, w = img.shape
    s = size / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return img, mask.astype(bool), 1.0
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR) >= 0.5
    return img, mask, s


class Augment:
    """50 % horizontal and 50 % vertical flip, a random rotation by 0/90/180/270°, intensity x U[0.8, 1.5],
    Gaussian blur sigma ~ U[0, 5] (in original-image pixels, scaled with the image)."""

    def __init__(self, flip: float = 0.5, rot90: bool = True, intensity=(0.8, 1.5), blur_sigma=(0.0, 5.0)):
        self.flip, self.rot90, self.intensity, self.blur_sigma = flip, rot90, intensity, blur_sigma

    def __call__(self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scale: float = 1.0):
        if rng.random() < self.flip:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if rng.random() < self.flip:
            img, mask = img[::-1], mask[::-1]
        if self.rot90:
            k = int(rng.integers(4))
            img, mask = np.rot90(img, k), np.rot90(mask, k)
        img = np.ascontiguousarray(img, dtype=np.float32)
        if self.intensity:
            img = img * rng.uniform(*self.intensity)
        if self.blur_sigma:
            sigma = rng.uniform(*self.blur_sigma) * scale
            if sigma > 0.1:
                img = cv2.GaussianBlur(img, (0, 0), sigma)
        return np.clip(img, 0, 255).astype(np.uint8), np.ascontiguousarray(mask)


def make_target(mask: np.ndarray) -> dict:
    """Mask R-CNN target for one head (or none when the mask is empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
                "masks": torch.zeros((0, *mask.shape), dtype=torch.uint8)}
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    return {"boxes": box, "labels": torch.ones((1,), dtype=torch.int64),
            "masks": torch.from_numpy(mask.astype(np.uint8))[None]}
