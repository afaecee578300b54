"""How sure is a measurement? Test-time augmentation (TTA) of the whole pipeline.

The image is measured as it is and flipped / rotated (:data:`VIEWS`); each view's head mask is mapped
back to the original orientation. Disagreement between the views is the uncertainty of the measurement
itself, not of single pixels:

* ``hc_spread``: (max - min) / mean of the HC over the views that found a head (relative, so the same
  for mm and for pixels when the spacing is unknown);
* ``dice_disagreement``: 1 - mean pairwise Dice of the back-mapped masks (a view that finds no head
  has an empty mask, so a head found in only some views is maximally uncertain);
* ``low_score``: 1 - the lowest detection score over the views.

``uncertainty = hc_spread + dice_disagreement + 0.5 * low_score``: about 0.05 when every view finds the
same head with a high score, 0.5 when no view finds a head (consistent, but no confident detection),
above 1 when a head is found in some views only or the HCs disagree.
Used by the MONAI Label scoring method and by ``benchmarks/active_learning.py``.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from .geometry import dice
from .io import Spacing
from .pipeline import measure_image

# name -> (image -> view, view mask -> original orientation, swaps rows and columns)
VIEWS: dict[str, tuple[Callable, Callable, bool]] = {
    "identity": (lambda a: a, lambda m: m, False),
    "hflip": (lambda a: a[:, ::-1], lambda m: m[:, ::-1], False),
    "vflip": (lambda a: a[::-1], lambda m: m[::-1], False),
    "rot90": (lambda a: np.rot90(a, 1), lambda m: np.rot90(m, -1), True),
}
SCORE_WEIGHT = 0.5


def _view_spacing(spacing: Spacing | None, swap: bool) -> Spacing | None:
    if spacing is None or not swap:
        return spacing
    return Spacing(spacing.col_mm, spacing.row_mm, spacing.source)


def measurement_uncertainty(model, pixels: np.ndarray, spacing: Spacing | None, *,
                            score_threshold: float = 0.5, views: tuple[str, ...] = tuple(VIEWS)) -> dict:
    """TTA disagreement of one image's measurement; JSON-ready dict with ``uncertainty`` (higher = less sure)."""
    if len(views) < 2:
        raise ValueError("test-time augmentation needs at least two views")
    per_view, masks, hcs, scores = {}, [], [], []
    for name in views:
        forward, back, swap = VIEWS[name]
        m = measure_image(model, np.ascontiguousarray(forward(pixels)), _view_spacing(spacing, swap),
                          score_threshold=score_threshold)
        hc = m.hc_mm if spacing is not None else m.hc_px
        per_view[name] = {"hc": None if hc is None else round(float(hc), 3), "score": round(float(m.score), 4)}
        masks.append(np.ascontiguousarray(back(m.mask)).astype(bool))
        scores.append(float(m.score))
        if hc is not None:
            hcs.append(float(hc))
    found = len(hcs)
    hc_spread = (max(hcs) - min(hcs)) / (sum(hcs) / found) if found else 0.0
    dices = [dice(a, b) for a, b in itertools.combinations(masks, 2)]
    dice_mean = float(np.mean(dices))
    low_score = 1.0 - min(scores)
    unit = "mm" if spacing is not None else "px"
    return {
        "uncertainty": round(hc_spread + (1.0 - dice_mean) + SCORE_WEIGHT * low_score, 5),
        "hc_spread": round(hc_spread, 5),
        f"hc_mean_{unit}": round(float(np.mean(hcs)), 3) if found else None,
        f"hc_range_{unit}": round(max(hcs) - min(hcs), 3) if found else None,
        "dice_mean": round(dice_mean, 5),
        "score_min": round(min(scores), 4),
        "views_with_head": found,
        "n_views": len(views),
        "unit": unit,
        "views": per_view,
    }
