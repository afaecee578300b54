"""Training samples (image + head mask + spacing) from HC18 or any image/label pairs, and the torch Dataset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import hc18
from .geometry import fit_mask
from .io import Spacing, load_image
from .pipeline import to_tensor
from .transforms import Augment, make_target, resize_long_side


@dataclass
class Sample:
    name: str
    image: np.ndarray  # uint8 grey, full resolution
    mask: np.ndarray  # bool, same shape
    spacing: Spacing | None
    group: str  # examination: samples of one group never straddle the split


def hc18_samples(root: str | Path, names: list[str] | None = None) -> list[Sample]:
    """Labelled HC18 images with ground-truth masks filled from the fitted annotation ellipse."""
    recs = hc18.read_records(root)
    if names is not None:
        keep = set(names)
        recs = [r for r in recs if r.name in keep]
    out = []
    for r in recs:
        img = hc18.read_grey(r.image)
        out.append(Sample(r.name, img, hc18.gt_mask(r, img.shape),
                          Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV"), r.exam))
    return out


def pair_sample(image_path: str | Path, label_path: str | Path, spacing: Spacing | None = None,
                group: str | None = None) -> Sample:
    """A sample from an image and its label file (any format ``load_image`` reads; label > 0 = head)."""
    img = load_image(image_path)
    lab = load_image(label_path)
    if lab.pixels.shape != img.pixels.shape:
        raise ValueError(f"label {label_path} is {lab.pixels.shape}, image {image_path} is {img.pixels.shape}")
    name = Path(image_path).name
    return Sample(name, img.pixels, lab.pixels > 0, spacing or img.spacing, group or hc18.exam_of(name))


SMALL_HEAD_MM = 100.0  # the smallest size bin: first-trimester heads, where the gross errors are


def sample_hc_mm(s: Sample) -> float | None:
    """HC (mm) of a sample's label (its fitted ellipse); None without spacing or a usable mask."""
    if s.spacing is None or s.mask.sum() < 20:
        return None
    try:
        return fit_mask(s.mask, (s.spacing.row_mm, s.spacing.col_mm))[1].perimeter
    except ValueError:
        return None


def small_head_weights(hc_mm: list[float | None], factor: float) -> list[float]:
    """Sampling weights: ``factor`` for heads under SMALL_HEAD_MM, 1 for the rest and for unknown sizes."""
    return [factor if h is not None and h < SMALL_HEAD_MM else 1.0 for h in hc_mm]


class HeadDataset(Dataset):
    """Samples pre-scaled once to the model's input size; augmented on the fly when ``augment`` is set."""

    def __init__(self, samples: list[Sample], input_size: int, augment: Augment | None = None, seed: int = 0):
        self.items = []
        for s in samples:
            img, mask, scale = resize_long_side(s.image, s.mask, input_size)
            self.items.append((img, mask, scale))
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, mask, scale = self.items[i]
        if self.augment is not None:
            # Seeded per (epoch, index): reproducible and independent of worker scheduling.
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img, mask = self.augment(img, mask, rng, scale)
        return to_tensor(img).contiguous(), make_target(mask)


def collate(batch):
    return tuple(zip(*batch))


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    return hc18.grouped_split(samples, lambda s: s.group, val_fraction, seed)


def seed_everything(seed: int):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
