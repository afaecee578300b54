"""The measurement pipeline: grey image + spacing -> head mask -> ellipse -> HC (mm) -> GA + QC.

``measure_image`` is the one function behind the CLI, the MONAI Label infer task, validation during
training and the tests.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .clinical import hadlock_ga, hc_centile
from .geometry import ellipse_agreement, fit_mask, fit_points, largest_component, region_boundary, touches_border
from .io import Spacing
from .model import CheckpointError, detect, load_model
from .result import Result

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "fetalhc_default.pt"
MIN_SCORE = 0.2  # below this a detection is noise (a blank frame scores ~0.07), not a head
PLAUSIBLE_HC_MM = (40.0, 400.0)  # HC18 spans 44-346 mm; beyond this the spacing is suspect
# Dice of the mask with its own fitted ellipse. A skull is an ellipse: a mask far from one (cut by its
# detection box, leaking into the body, half a head) gives an ellipse that measures something else.
MIN_ELLIPSE_AGREEMENT = 0.97


def default_model_path() -> Path:
    return Path(os.environ.get("FETALHC_MODEL") or DEFAULT_MODEL)


@dataclass
class Measurement(Result):
    """A pipeline result with its head mask (the JSON of :meth:`Result.to_dict` leaves the mask out)."""
    mask: np.ndarray | None = None  # uint8 (H, W), 1 = fetal head


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 grey (H, W) -> float (3, H, W) in [0, 1]; grey replicated for 3-channel backbones."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
    return t.expand(3, *t.shape)


@torch.no_grad()
def predict(model, pixels: np.ndarray) -> tuple[np.ndarray | None, float]:
    """Best head detection: (soft mask at full resolution or None, score)."""
    device = next(model.parameters()).device
    out = detect(model, to_tensor(pixels).to(device))
    if len(out["scores"]) == 0:
        return None, 0.0
    i = int(out["scores"].argmax())
    return out["masks"][i, 0].float().cpu().numpy(), float(out["scores"][i])


def measure_image(model, pixels: np.ndarray, spacing: Spacing | None, *,
                  spacing_at: Callable[[float, float], Spacing | None] | None = None,
                  score_threshold: float = 0.5, ga_weeks: float | None = None,
                  model_version: str = "") -> Measurement:
    """Measure one 2-D grey image. Without a known spacing no millimetre value is produced."""
    t0 = time.perf_counter()
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"expected a non-empty 2-D grey image, got shape {pixels.shape}")
    soft, score = predict(model, pixels)
    reasons: list[str] = []
    result = dict(mask=np.zeros(pixels.shape, np.uint8), ellipse_px=None, ellipse_mm=None, hc_mm=None,
                  hc_px=None, ga=hadlock_ga(None), score=score, spacing=spacing, model_version=model_version)
    if soft is None or score < MIN_SCORE or (soft >= 0.5).sum() < 20:
        reasons.append("no head found")
        return _finish(result, reasons, t0)
    binary = largest_component(soft >= 0.5)
    pts = region_boundary(binary, soft)  # once: the pixel and the mm fits share the same boundary
    try:
        ell_px = fit_points(pts)
    except ValueError as exc:
        reasons.append(f"no head found ({exc})")
        return _finish(result, reasons, t0)
    agreement = ellipse_agreement(binary, ell_px)
    result.update(mask=binary.astype(np.uint8), ellipse_px=ell_px, hc_px=ell_px.perimeter,
                  extra={"mask_ellipse_dice": round(agreement, 4)})
    if score < score_threshold:
        reasons.append(f"low detection score {score:.2f} < {score_threshold:.2f}")
    if touches_border(ell_px, pixels.shape):
        reasons.append("head cut by the image border: HC extrapolated")
    if agreement < MIN_ELLIPSE_AGREEMENT:
        reasons.append(f"mask not elliptical (Dice {agreement:.3f} with its ellipse): check the outline")
    if ell_px.b / ell_px.a < 0.55:
        reasons.append(f"unusual head shape (axis ratio {ell_px.b / ell_px.a:.2f})")
    if spacing_at is not None:
        spacing = spacing_at(ell_px.cx, ell_px.cy) or spacing
        result["spacing"] = spacing
    if spacing is None:
        reasons.append("pixel spacing unknown: no HC in mm")
        return _finish(result, reasons, t0)
    ell_mm = fit_points(pts * [spacing.col_mm, spacing.row_mm])
    hc = ell_mm.perimeter
    result.update(ellipse_mm=ell_mm, hc_mm=hc, ga=hadlock_ga(hc))
    lo, hi = PLAUSIBLE_HC_MM
    if not lo <= hc <= hi:
        reasons.append(f"implausible HC {hc:.0f} mm for spacing {spacing.col_mm:.3f} mm ({spacing.source})")
    if ga_weeks is not None:
        try:
            result["centile"] = hc_centile(hc, ga_weeks)
        except ValueError as exc:
            reasons.append(str(exc))
    return _finish(result, reasons, t0)


def measure_mask(mask: np.ndarray, spacing: Spacing | None, *,
                 spacing_at: Callable[[float, float], Spacing | None] | None = None,
                 model_version: str = "") -> Measurement:
    """The measurement of a given mask (a clinician's corrected label): the same ellipse fit, HC and GA as
    :func:`measure_image`, with the checks that apply to a mask nobody scored."""
    t0 = time.perf_counter()
    binary = largest_component(np.asarray(mask) > 0)
    result = dict(mask=binary.astype(np.uint8), ellipse_px=None, ellipse_mm=None, hc_mm=None, hc_px=None,
                  ga=hadlock_ga(None), score=1.0, spacing=spacing, model_version=model_version)
    try:
        ell_px, _ = fit_mask(binary)
        if spacing_at is not None:
            spacing = spacing_at(ell_px.cx, ell_px.cy) or spacing
            result["spacing"] = spacing
        ell_px, ell_mm = fit_mask(binary, spacing.as_tuple() if spacing else None)
    except ValueError as exc:
        return _finish(result, [f"no head in the mask ({exc})"], t0)
    agreement = ellipse_agreement(binary, ell_px)
    result.update(ellipse_px=ell_px, hc_px=ell_px.perimeter, extra={"mask_ellipse_dice": round(agreement, 4)})
    reasons = []
    if touches_border(ell_px, binary.shape):
        reasons.append("head cut by the image border: HC extrapolated")
    if agreement < MIN_ELLIPSE_AGREEMENT:
        reasons.append(f"mask not elliptical (Dice {agreement:.3f} with its ellipse): check the outline")
    if ell_mm is None:
        reasons.append("pixel spacing unknown: no HC in mm")
        return _finish(result, reasons, t0)
    hc = ell_mm.perimeter
    result.update(ellipse_mm=ell_mm, hc_mm=hc, ga=hadlock_ga(hc))
    if not PLAUSIBLE_HC_MM[0] <= hc <= PLAUSIBLE_HC_MM[1]:
        reasons.append(f"implausible HC {hc:.0f} mm for spacing {spacing.col_mm:.3f} mm ({spacing.source})")
    return _finish(result, reasons, t0)


def _finish(result: dict, reasons: list[str], t0: float) -> Measurement:
    return Measurement(**result, qc_ok=not reasons, qc_reasons=reasons, latency_s=time.perf_counter() - t0)


class Measurer:
    """A loaded model plus the pipeline; reloads when the checkpoint file changes (new model published)."""

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None):
        self.path = Path(checkpoint) if checkpoint else default_model_path()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._lock = threading.Lock()
        self._stamp = None
        self.model = None
        self.meta: dict = {}
        self._reload_if_changed()

    def _reload_if_changed(self):
        if not self.path.is_file():
            raise CheckpointError(
                f"no model available: {self.path} does not exist. Pass --model CKPT, set FETALHC_MODEL, "
                "or train one with `fetalhc train`.")
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self.model, self.meta = load_model(self.path, self.device)
                self._stamp = stamp

    @property
    def version(self) -> str:
        return self.meta.get("version", "")

    def measure(self, pixels: np.ndarray, spacing: Spacing | None, **kw) -> Measurement:
        self._reload_if_changed()
        model = self.model  # keep a reference: a concurrent reload swaps the attribute, not this object
        return measure_image(model, pixels, spacing, model_version=self.version, **kw)
