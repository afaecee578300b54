"""The measurement pipeline: grey image + spacing -> head mask -> ellipse -> HC (mm) -> GA + QC.

Stage 1, Mask R-CNN, finds the head and a first ellipse; stage 2 (``fetalhc.refine``, when the checkpoint
has one) places the outline at full resolution around it. ``measure_image`` is the one function behind the
CLI, the MONAI Label infer task, validation during training and the tests.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .geometry import ellipse_mask, fit_points, largest_component
from .io import Spacing
from .model import CheckpointError, detect, load_model
from .refine import blend_outline, refine_points, refine_qc
from .result import (OUTLINE_AI, OUTLINE_MASK, Result, agreement_reasons, measure_points, measure_region,
                     zoom_reasons)

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "fetalhc_default.pt"
MIN_SCORE = 0.2  # below this a detection is noise (a blank frame scores ~0.07), not a head


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
def candidates(model, pixels: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Head detections, best first: (soft mask at full resolution, score) each."""
    device = next(model.parameters()).device
    out = detect(model, to_tensor(pixels).to(device))
    order = out["scores"].argsort(descending=True).tolist()
    return [(out["masks"][i, 0].float().cpu().numpy(), float(out["scores"][i])) for i in order]


def measure_image(model, pixels: np.ndarray, spacing: Spacing | None, *,
                  spacing_at: Callable[[float, float], Spacing | None] | None = None,
                  score_threshold: float = 0.5, ga_weeks: float | None = None,
                  model_version: str = "", runner_up: bool = True) -> Measurement:
    """Measure one 2-D grey image. Without a known spacing no millimetre value is produced.

    When the best detection fails QC and ``runner_up`` is set, the next detections (score at least
    ``score_threshold``) are measured too, and the first that passes every check is reported instead,
    still flagged, with the reason: on an early scan the best box can hold the whole amniotic sac while
    the head is the next one. The flag stays, so a switch can never make a silent error.
    """
    t0 = time.perf_counter()
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"expected a non-empty 2-D grey image, got shape {pixels.shape}")
    found = candidates(model, pixels)
    score = found[0][1] if found else 0.0
    empty = Measurement(mask=np.zeros(pixels.shape, np.uint8), score=score, spacing=spacing, qc_ok=False,
                        model_version=model_version)
    if not found or score < MIN_SCORE or (found[0][0] >= 0.5).sum() < 20:
        return _finish(empty, ["no head found"], t0)
    kw = dict(spacing_at=spacing_at, ga_weeks=ga_weeks, outline_source=OUTLINE_AI)
    try:
        best = _measure_detection(model, pixels, spacing, *found[0], score_threshold, kw, model_version)
    except ValueError as exc:
        return _finish(empty, [f"no head found ({exc})"], t0)

    def others():  # measured only when asked for
        for soft, other in found[1:] if runner_up else []:
            if other < score_threshold:
                return
            try:
                yield _measure_detection(model, pixels, spacing, soft, other, score_threshold, kw, model_version)
            except ValueError:
                continue

    chosen, reasons = pick_detection(best, others())
    return _finish(chosen, reasons, t0)


def pick_detection(best: Measurement, runner_ups: Iterable[Measurement]) -> tuple[Measurement, list[str]]:
    """The measurement to report and its QC reasons: ``best`` unless it fails QC and a runner-up passes
    every check; that one is reported, flagged with why (a switch must never make a silent error)."""
    if best.qc_reasons:
        for alt in runner_ups:
            if not alt.qc_reasons:
                alt.extra["runner_up_of"] = {"score": best.score, "hc_px": best.hc_px,
                                             "qc_reasons": list(best.qc_reasons)}
                return alt, [f"the best detection failed QC ({'; '.join(best.qc_reasons)}); this is the next one "
                             f"(score {alt.score:.2f}), which passes: confirm it is the head"]
    return best, list(best.qc_reasons)


def _measure_detection(model, pixels: np.ndarray, spacing: Spacing | None, soft: np.ndarray, score: float,
                       score_threshold: float, kw: dict, model_version: str) -> Measurement:
    """One detection measured with both stages and every QC reason; ValueError when it holds no head."""
    if (soft >= 0.5).sum() < 20:
        raise ValueError("mask too small")
    binary = largest_component(soft >= 0.5)
    low = [f"low detection score {score:.2f} < {score_threshold:.2f}"] if score < score_threshold else []
    res = measure_region(binary, spacing, soft=soft, qc_reasons=low, **kw)
    refiner = getattr(model, "fetalhc_refiner", None)
    if refiner is not None:
        res, binary = _refined(refiner, pixels, spacing, res, low, kw)
    res.qc_reasons += zoom_reasons(res.hc_mm, res.spacing)
    return _with_mask(res, binary, score=score, model_version=model_version)


def _refined(refiner, pixels: np.ndarray, spacing: Spacing | None, first: Result, reasons: list[str],
             kw: dict) -> tuple[Result, np.ndarray]:
    """The second stage's outline from the first stage's ellipse, with the QC of both stages; the mask
    returned is the refined ellipse, so that re-measuring it (Slicer, a saved label) gives the same HC."""
    pts, conf = refine_points(refiner, pixels, first.ellipse_px)
    e = fit_points(pts)
    stage_qc = refine_qc(first, e, pts, conf)  # QC reads the second stage's own outline, before the blend
    res = measure_points(blend_outline(refiner.cfg, first.hc_px, pts, e), spacing, image_shape=pixels.shape,
                         qc_reasons=reasons + agreement_reasons(first.extra["mask_ellipse_dice"]), **kw)
    res.qc_reasons += stage_qc["reasons"]  # _finish sets qc_ok from the reasons
    res.extra.update(mask_ellipse_dice=first.extra["mask_ellipse_dice"], **stage_qc["extra"],
                     stage2_hc_px=round(e.perimeter, 2), stage1_weight=refiner.cfg.stage1_weight)
    return res, ellipse_mask(res.ellipse_px, pixels.shape)


def measure_mask(mask: np.ndarray, spacing: Spacing | None, *,
                 spacing_at: Callable[[float, float], Spacing | None] | None = None,
                 model_version: str = "") -> Measurement:
    """The measurement of a given mask (a clinician's corrected label): the same outline path and QC as
    :func:`measure_image`, without a detection score."""
    t0 = time.perf_counter()
    binary = largest_component(np.asarray(mask) > 0)
    try:
        res = measure_region(binary, spacing, spacing_at=spacing_at, outline_source=OUTLINE_MASK)
    except ValueError as exc:
        return _finish(Measurement(mask=binary.astype(np.uint8), spacing=spacing, outline_source=OUTLINE_MASK,
                                   model_version=model_version), [f"no head in the mask ({exc})"], t0)
    return _finish(_with_mask(res, binary, model_version=model_version), res.qc_reasons, t0)


def _with_mask(res: Result, mask: np.ndarray, **kw) -> Measurement:
    """``res`` with its mask (``kw`` sets other fields)."""
    return Measurement(**{**{f.name: getattr(res, f.name) for f in fields(Result)}, **kw}, mask=mask.astype(np.uint8))


def _finish(m: Measurement, reasons: list[str], t0: float) -> Measurement:
    m.qc_ok, m.qc_reasons, m.latency_s = not reasons, list(reasons), time.perf_counter() - t0
    return m


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
