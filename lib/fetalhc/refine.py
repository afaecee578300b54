"""Second stage: the skull outline at native resolution, one radius per angle in a polar unwrapping.

Mask R-CNN's mask is 28 x 28 cells however large the head: for a 300 mm head one cell is 3.4 mm across
(~11 mm of HC), against 1.4 % of the radius (0.68 mm) for one row of the polar unwrapping here, and
the expected row of a column falls between rows.
The refiner unwraps the full-resolution image around the first-stage ellipse ``e``: column ``k`` is the
ray from ``e``'s centre through ``e``'s point at parametric angle ``t_k``, row ``j`` the radial fraction
``s_j`` in [1 - span, 1 + span] of that point's distance. A small U-Net (circular along the angle)
gives, per column, a distribution over rows: where the outer skull edge, as HC18 annotators draw it,
crosses the ray. The expected row of each column is one outline point, and the ellipse is fitted to the
points that lie inside the image.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .geometry import Ellipse, fit_points, radial_residual


@dataclass(frozen=True)
class RefinerConfig:
    n_angles: int = 64
    n_radii: int = 64
    span: float = 0.45  # radial window: the first-stage radius x [1 - span, 1 + span] (0.45 beat 0.3, development)
    supersample: tuple = (2, 3)  # (radial, angular) samples averaged per polar cell: less speckle
    width: int = 16  # channels of the first level; doubled per level
    depth: int = 3  # U-Net levels; each one more halves the polar grid again and widens what a ray's reading sees
    passes: int = 3  # unwrap again around the refined ellipse (3 beat 1 and 2: benchmarks/refiner_settings.py)
    flip_average: bool = False  # also read the polar image mirrored along the angle (no gain on development images)
    # The reported HC blends in the first stage's (``blend_outline``): weight w, and k = its size bias on the
    # training images (median true HC / first-stage HC). w = 0: the second stage alone (checkpoints before it).
    stage1_weight: float = 0.0
    stage1_scale: float = 1.0

    def __post_init__(self):
        if (not 0 < self.span < 1 or self.passes < 1 or self.n_radii < 2 or self.n_angles < 8
                or not 2 <= self.depth <= 5 or not 0 <= self.stage1_weight < 1 or not 0.5 < self.stage1_scale < 2):
            raise ValueError(f"refiner settings out of range: span {self.span} (needs 0 < span < 1), passes "
                             f"{self.passes} (>= 1), {self.n_radii} radii (>= 2), {self.n_angles} angles (>= 8), "
                             f"depth {self.depth} (2-5), stage-1 weight {self.stage1_weight} (0 <= w < 1), "
                             f"stage-1 scale {self.stage1_scale} (0.5-2)")


def fractions(cfg: RefinerConfig) -> np.ndarray:
    return np.linspace(1.0 - cfg.span, 1.0 + cfg.span, cfg.n_radii)


def polar_grid(e: Ellipse, cfg: RefinerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) image coordinates of the supersampled polar grid, each (n_radii * sr, n_angles * sa)."""
    sr, sa = cfg.supersample
    step = 2 * cfg.span / (cfg.n_radii - 1)
    s = fractions(cfg)[:, None] + (np.arange(sr) - (sr - 1) / 2)[None] * step / sr
    t = 2 * math.pi * (np.arange(cfg.n_angles)[:, None] + (np.arange(sa) - (sa - 1) / 2)[None] / sa) / cfg.n_angles
    d = np.stack([np.cos(t.ravel()), np.sin(t.ravel())], 1) @ e.matrix().T  # (A * sa, 2) centre -> ellipse
    s = s.ravel()[:, None]
    return (e.cx + s * d[None, :, 0]).astype(np.float32), (e.cy + s * d[None, :, 1]).astype(np.float32)


def unwrap(pixels: np.ndarray, e: Ellipse, cfg: RefinerConfig, standardised: bool = True) -> np.ndarray:
    """Polar image (n_radii, n_angles), float32, standardised (or in the image's grey levels); outside the
    image reads as 0 before that."""
    gx, gy = polar_grid(e, cfg)
    sr, sa = cfg.supersample
    p = cv2.remap(np.ascontiguousarray(pixels, np.float32), gx, gy, cv2.INTER_LINEAR,
                  borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    p = p.reshape(cfg.n_radii, sr, cfg.n_angles, sa).mean((1, 3))
    return standardise(p) if standardised else p


def standardise(p: np.ndarray) -> np.ndarray:
    return ((p - p.mean()) / (p.std() + 1e-3)).astype(np.float32)


def ray_directions(e: Ellipse, cfg: RefinerConfig) -> np.ndarray:
    """(n_angles, 2): from ``e``'s centre to its point at each column's parametric angle."""
    t = 2 * math.pi * np.arange(cfg.n_angles) / cfg.n_angles
    return np.stack([np.cos(t), np.sin(t)], 1) @ e.matrix().T


def ray_points(e: Ellipse, s: np.ndarray, cfg: RefinerConfig) -> np.ndarray:
    """(x, y) of radial fraction ``s[k]`` on ray ``k`` (the column centres)."""
    return np.array([e.cx, e.cy]) + np.asarray(s, float)[:, None] * ray_directions(e, cfg)


def inside_image(pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    with np.errstate(invalid="ignore"):  # NaN points are outside
        return (pts[:, 0] >= 0) & (pts[:, 1] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] <= h - 1)


def visible(pts: np.ndarray, conf: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The points inside the image and their confidences; all of them when fewer than 8 are inside."""
    inside = inside_image(pts, shape)
    return (pts[inside], conf[inside]) if inside.sum() >= 8 else (pts, conf)


# ray_confidence counts the probability within this radial fraction of the peak: 2 rows of the default
# grid (64 rows over +-45 %), the same distance on any grid, so that one QC threshold fits every grid.
CONFIDENCE_BAND = 0.0286


def ray_confidence(prob: torch.Tensor, cfg: RefinerConfig) -> torch.Tensor:
    """Per column of a distribution over rows (R, A): the probability mass within ``CONFIDENCE_BAND`` of its peak."""
    band = round(CONFIDENCE_BAND * (cfg.n_radii - 1) / (2 * cfg.span))
    rows = torch.arange(prob.shape[0])[:, None]
    return (prob * ((rows - prob.argmax(0)[None]).abs() <= band)).sum(0)


def ray_crossings(e: Ellipse, target: Ellipse, cfg: RefinerConfig) -> np.ndarray:
    """Radial fraction where each ray of ``e`` leaves ``target`` (NaN where its centre is outside it)."""
    d = ray_directions(e, cfg)
    inv = np.linalg.inv(target.matrix())
    p = inv @ np.array([e.cx - target.cx, e.cy - target.cy])
    q = d @ inv.T
    qq, pq, pp = (q * q).sum(1), q @ p, p @ p
    disc = pq * pq - qq * (pp - 1.0)
    with np.errstate(invalid="ignore"):
        s = (-pq + np.sqrt(disc)) / qq
    return np.where((disc > 0) & (pp < 1.0), s, np.nan)


def _block(cin, cout):
    # circular padding along the angle (width), zeros along the radius (height)
    return nn.Sequential(CircularConv(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         CircularConv(cout, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CircularConv(nn.Conv2d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=0, bias=False)

    def forward(self, x):
        x = F.pad(F.pad(x, (1, 1, 0, 0), mode="circular"), (0, 0, 1, 1))
        return super().forward(x)


class OutlineNet(nn.Module):
    """U-Net of ``cfg.depth`` levels on the polar image: logits (B, n_radii, n_angles), softmax over the radius."""

    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        ch = [cfg.width * 2 ** i for i in range(cfg.depth)]  # channels per level
        self.cfg = cfg
        self.enc = nn.ModuleList([_block(cin, cout) for cin, cout in zip([1] + ch[:-1], ch)])
        self.dec = nn.ModuleList([_block(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(cfg.depth - 1))])
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x):  # x: (B, 1, R, A)
        skips = []
        for i, blk in enumerate(self.enc):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for blk, skip in zip(self.dec, reversed(skips[:-1])):
            x = blk(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.head(x)[:, 0]


class Refiner:
    """A trained :class:`OutlineNet` with its config; ``outline`` turns a first-stage ellipse into points."""

    def __init__(self, net: OutlineNet):
        self.net, self.cfg = net.eval(), net.cfg
        self._s = torch.from_numpy(fractions(self.cfg)).float()

    @torch.no_grad()
    def outline(self, pixels: np.ndarray, e: Ellipse) -> tuple[np.ndarray, np.ndarray]:
        """Outline points (n_angles, 2) and each point's confidence (``ray_confidence``)."""
        prob = self.read(torch.from_numpy(unwrap(pixels, e, self.cfg)))
        s = (prob * self._s[:, None]).sum(0)
        return ray_points(e, s.numpy(), self.cfg), ray_confidence(prob, self.cfg).numpy()

    @torch.no_grad()
    def read(self, polar: torch.Tensor) -> torch.Tensor:
        """Per-column distribution over rows (R, A) of a polar image (R, A)."""
        x = polar[None, None]
        if self.cfg.flip_average:  # the mirror image of the head, read and mirrored back: a second opinion
            x = torch.cat([x, x.flip(-1)])
        prob = self.net(x.to(next(self.net.parameters()).device)).softmax(1).cpu()  # (B, R, A)
        return (prob[0] + prob[1].flip(-1)) / 2 if self.cfg.flip_average else prob[0]

    def to_blob(self, half: bool = False) -> dict:
        state = {k: v.half() if half and v.is_floating_point() else v for k, v in self.net.state_dict().items()}
        return {"config": asdict(self.cfg), "state_dict": state}

    def with_blend(self, weight: float, scale: float) -> "Refiner":
        """The same weights with the stage blend set (``blend_outline``); this refiner is left as it is."""
        net = copy.copy(self.net)  # shares the parameters, not the config
        net.cfg = replace(self.cfg, stage1_weight=float(weight), stage1_scale=float(scale))
        return Refiner(net)

    def describe(self) -> dict:
        return {**asdict(self.cfg), "parameters": sum(p.numel() for p in self.net.parameters())}

    @classmethod
    def from_blob(cls, blob: dict) -> "Refiner":
        c = dict(blob["config"])
        c["supersample"] = tuple(c["supersample"])
        net = OutlineNet(RefinerConfig(**c))
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
        return cls(net)


def refine_points(refiner: Refiner, pixels: np.ndarray, start: Ellipse) -> tuple[np.ndarray, np.ndarray]:
    """Outline points inside the image and their confidences, after ``cfg.passes`` passes from ``start``
    (each pass re-centres the polar unwrapping on the previous pass's ellipse)."""
    e = start
    for k in range(refiner.cfg.passes):
        pts, conf = visible(*refiner.outline(pixels, e), pixels.shape)  # a head cut by the border: its visible part
        if k + 1 < refiner.cfg.passes:
            e = fit_points(pts)
    return pts, conf


def blend_outline(cfg: RefinerConfig, first_hc_px: float, pts: np.ndarray, e: Ellipse) -> np.ndarray:
    """The refined outline ``pts`` (fitted by ``e``) scaled about ``e``'s centre so that its perimeter is
    (1 - w) x the second stage's + w x k x the first stage's (``cfg.stage1_weight``, ``cfg.stage1_scale``).

    Why try it: the first stage reads the whole head at 320 px, the second the edge ray by ray, and their HC
    errors correlate only ~0.3 on the development images that chose the first stage's epoch. Off by default
    (w = 0): on fresh exams it gained nothing and imported a first-stage miss below QC's threshold
    (models/protocol/stage_blend/). Scaling the points, not just the number, keeps the mask, overlay and
    BPD/OFD consistent with the HC.
    """
    w = cfg.stage1_weight
    if w == 0:
        return pts
    f = 1.0 - w + w * cfg.stage1_scale * first_hc_px / e.perimeter
    centre = np.array([e.cx, e.cy])
    return centre + f * (np.asarray(pts, float) - centre)


# QC of the two stages together. Each threshold is the 98th percentile (2nd for the confidence), rounded
# outward, of its figure on the 133 development validation images of the protocol model (neither stage
# trained on them; no protocol test image): benchmarks/qc_calibration.py. Those images hold no gross
# error to aim at, so this is an outlier rule: flag what a good measurement rarely looks like.
MAX_STAGE_CHANGE = 0.07  # |HC refined / HC first stage - 1|: the stages disagree about the head (p98 0.063)
MIN_OUTLINE_CONFIDENCE = 0.74  # median per-ray probability mass near the chosen radius (p2 0.741)
MAX_OUTLINE_RESIDUAL = 0.009  # RMS radial misfit of the points to their ellipse, relative to it (p98 0.0088)


def refine_qc(first, e: Ellipse, pts: np.ndarray, conf: np.ndarray) -> dict:
    """QC reasons and figures for a refined outline ``pts`` (fitted by ``e``) of a first-stage result ``first``."""
    change = e.perimeter / first.hc_px - 1.0
    confidence = float(np.median(conf))
    residual = float(np.sqrt(np.mean(radial_residual(e, pts) ** 2)))
    reasons = []
    if abs(change) > MAX_STAGE_CHANGE:
        reasons.append(f"the two stages disagree: refined HC {100 * change:+.0f} % from the first stage's")
    if confidence < MIN_OUTLINE_CONFIDENCE:
        reasons.append(f"skull outline unclear (confidence {confidence:.2f})")
    if residual > MAX_OUTLINE_RESIDUAL:
        reasons.append(f"outline irregular ({100 * residual:.1f} % radial misfit to its ellipse)")
    return {"reasons": reasons, "extra": {"stage1_hc_px": round(first.hc_px, 2), "stage_change": round(change, 4),
                                          "outline_confidence": round(confidence, 3),
                                          "outline_residual": round(residual, 4)}}
