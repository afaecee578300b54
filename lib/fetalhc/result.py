"""The measurement result: one type from the pipeline, through the server's JSON, to the Slicer module.

numpy-only (with geometry, clinical and io it is the core the Slicer module shares with lib/):
:class:`Result` is what ``pipeline.measure_image`` returns (as ``pipeline.Measurement``, which adds the
mask), what the ``fetal_head`` infer task sends (:meth:`Result.to_dict`) and what Slicer reads back
(:meth:`Result.from_dict`). :func:`measure_points` / :func:`measure_region` are the one path from an outline
to a result (fit -> mm -> biometry -> GA -> centile, and the outline's QC), for the AI mask, a corrected label
and a clinician's edit of the mask or the ellipse in Slicer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .clinical import GestationalAge, biometry, hadlock_ga, hc_centile
from .geometry import Ellipse, ellipse_agreement, fit_points, region_boundary, touches_border
from .io import Spacing

OUTLINE_AI, OUTLINE_MASK, OUTLINE_ELLIPSE = "AI", "edited mask", "edited ellipse"
OUTLINE_SOURCES = (OUTLINE_AI, OUTLINE_MASK, OUTLINE_ELLIPSE)
PLAUSIBLE_HC_MM = (40.0, 400.0)  # HC18 spans 44-346 mm; beyond this the spacing is suspect
# Dice of the mask with its own fitted ellipse. A skull is an ellipse: a mask far from one (cut by its
# detection box, leaking into the body, half a head) gives an ellipse that measures something else.
MIN_ELLIPSE_AGREEMENT = 0.97
MIN_AXIS_RATIO = 0.55  # b/a; HC18 heads are rounder than this
# to_dict keys computed from the fields; from_dict recomputes them instead of storing them as extras
DERIVED = ("bpd_mm", "ofd_mm", "cephalic_index", "ga_text", "qc", "spacing_source")


@dataclass
class Result:
    ellipse_px: Ellipse | None = None
    ellipse_mm: Ellipse | None = None
    hc_mm: float | None = None
    hc_px: float | None = None
    ga: GestationalAge = field(default_factory=lambda: hadlock_ga(None))
    score: float | None = None  # detection score of the AI outline (None for a hand-drawn one)
    qc_ok: bool | None = None  # None: QC not run (an edited outline)
    qc_reasons: list[str] = field(default_factory=list)
    spacing: Spacing | None = None
    centile: dict | None = None
    model_version: str = ""
    latency_s: float = 0.0
    outline_source: str = OUTLINE_AI
    extra: dict = field(default_factory=dict)

    @property
    def qc_text(self) -> str:
        if self.qc_ok is None:
            return "; ".join(self.qc_reasons) or "not run"
        return "OK" if self.qc_ok else "; ".join(self.qc_reasons)

    def biometry(self) -> dict:
        return biometry(self.ellipse_mm)

    def to_dict(self) -> dict:
        """JSON-ready summary (no mask)."""
        sp = self.spacing
        return {
            "hc_mm": _r(self.hc_mm), "hc_px": _r(self.hc_px),
            "ellipse_px": _ell(self.ellipse_px), "ellipse_mm": _ell(self.ellipse_mm),
            **{k: _r(v) for k, v in self.biometry().items()},
            "ga_weeks": _r(self.ga.weeks), "ga_text": self.ga.text, "ga_valid": self.ga.valid,
            "ga_reason": self.ga.reason, "centile": self.centile,
            "score": None if self.score is None else round(float(self.score), 4), "qc_ok": self.qc_ok,
            "qc": self.qc_text, "qc_reasons": list(self.qc_reasons),
            "spacing_mm": [sp.row_mm, sp.col_mm] if sp else None,
            "spacing_source": sp.source if sp else None,
            "model_version": self.model_version, "latency_s": round(self.latency_s, 4),
            "outline_source": self.outline_source, **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        """The inverse of :meth:`to_dict` (keys it does not know are kept in ``extra``)."""
        d = dict(d)
        ell = {k: Ellipse(**d.pop(k)) if d.get(k) else d.pop(k, None) for k in ("ellipse_px", "ellipse_mm")}
        sp, source = d.pop("spacing_mm", None), d.get("spacing_source")
        ga = GestationalAge(d.pop("ga_weeks", None), bool(d.pop("ga_valid", False)), d.pop("ga_reason", "") or "")
        known = dict(hc_mm=d.pop("hc_mm", None), hc_px=d.pop("hc_px", None), score=d.pop("score", None),
                     qc_ok=d.pop("qc_ok", None), qc_reasons=list(d.pop("qc_reasons", None) or []),
                     centile=d.pop("centile", None), model_version=d.pop("model_version", "") or "",
                     latency_s=float(d.pop("latency_s", 0.0) or 0.0),
                     outline_source=d.pop("outline_source", OUTLINE_AI) or OUTLINE_AI)
        for k in DERIVED:
            d.pop(k, None)
        return cls(**ell, **known, ga=ga, spacing=Spacing(sp[0], sp[1], source or "unknown") if sp else None,
                   extra=d)


def measure_points(points_px: np.ndarray, spacing: Spacing | None, *, image_shape: tuple[int, int] | None = None,
                   region: np.ndarray | None = None, spacing_at: Callable[[float, float], Spacing | None] | None = None,
                   ga_weeks: float | None = None, outline_source: str = OUTLINE_MASK,
                   qc_reasons: list[str] | None = None) -> Result:
    """Fit an outline given as (x, y) pixel points; derive HC, BPD/OFD, GA and (GA known) the centile; QC it.

    The one path from an outline to a result, for the AI mask (``pipeline.measure_image``), a corrected
    label (``pipeline.measure_mask``) and an edit in Slicer. The millimetre ellipse is fitted to the points
    in mm (exact under anisotropic spacing). QC reasons, after any given in ``qc_reasons``: head cut by
    the border of an image of ``image_shape``; ``region`` (the mask the points outline) far from an
    ellipse; unusual shape; no spacing; implausible HC. ``spacing_at(x, y)`` picks the spacing at the
    head's centre (DICOM ultrasound regions). Raises ValueError when the points outline no ellipse.
    """
    pts = np.asarray(points_px, float)
    e_px = fit_points(pts)
    reasons, extra = list(qc_reasons or []), {}
    if image_shape is not None and touches_border(e_px, image_shape):
        reasons.append("head cut by the image border: HC extrapolated")
    if region is not None:
        agreement = ellipse_agreement(region, e_px)
        extra["mask_ellipse_dice"] = round(agreement, 4)
        reasons += agreement_reasons(agreement)
    if e_px.b / e_px.a < MIN_AXIS_RATIO:
        reasons.append(f"unusual head shape (axis ratio {e_px.b / e_px.a:.2f})")
    if spacing_at is not None:
        spacing = spacing_at(e_px.cx, e_px.cy) or spacing
    out = Result(ellipse_px=e_px, hc_px=e_px.perimeter, spacing=spacing, outline_source=outline_source, extra=extra)
    if spacing is None:
        reasons.append("pixel spacing unknown: no HC in mm")
    else:
        e_mm = fit_points(pts * [spacing.col_mm, spacing.row_mm])
        out.ellipse_mm, out.hc_mm = e_mm, e_mm.perimeter
        out.ga = hadlock_ga(out.hc_mm)
        lo, hi = PLAUSIBLE_HC_MM
        if not lo <= out.hc_mm <= hi:
            reasons.append(f"implausible HC {out.hc_mm:.0f} mm for spacing {spacing.col_mm:.3f} mm ({spacing.source})")
        if ga_weeks is not None and math.isfinite(ga_weeks):
            try:
                out.centile = hc_centile(out.hc_mm, ga_weeks)
            except ValueError as exc:
                reasons.append(str(exc))
    out.qc_ok, out.qc_reasons = not reasons, reasons
    return out


# Sonographers zoom so that the head fills the screen: on the development images of HC18 (ground truth),
# log HC(mm) = 6.970 + 0.925 log(pixel mm) with residuals from -0.80 to +0.34. An AI head far outside
# that (a mask over the whole amniotic sac, a fragment of the skull) is more likely the wrong object.
ZOOM_PRIOR = (6.970, 0.925)
ZOOM_RESIDUAL_RANGE = (-0.90, 0.40)


def zoom_reasons(hc_mm: float | None, spacing: Spacing | None) -> list[str]:
    """QC of an AI head's size against the image's zoom (its pixel spacing)."""
    if hc_mm is None or spacing is None:
        return []
    px = math.sqrt(spacing.row_mm * spacing.col_mm)
    expected = math.exp(ZOOM_PRIOR[0] + ZOOM_PRIOR[1] * math.log(px))
    r = math.log(hc_mm / expected)
    lo, hi = ZOOM_RESIDUAL_RANGE
    if r > hi:
        return [f"head unusually large for the zoom (HC {hc_mm:.0f} mm, {math.exp(r):.1f}x the usual at "
                f"{px:.3f} mm/pixel): the outline may hold more than the head"]
    if r < lo:
        return [f"head unusually small for the zoom (HC {hc_mm:.0f} mm, {math.exp(r):.2f}x the usual at "
                f"{px:.3f} mm/pixel): the outline may be part of the head only"]
    return []


def agreement_reasons(agreement: float) -> list[str]:
    """QC of a mask's Dice with its own fitted ellipse."""
    if agreement < MIN_ELLIPSE_AGREEMENT:
        return [f"mask not elliptical (Dice {agreement:.3f} with its ellipse): check the outline"]
    return []


def measure_region(region: np.ndarray, spacing: Spacing | None, *, soft: np.ndarray | None = None, **kw) -> Result:
    """:func:`measure_points` of a head region (one hole-filled component, bool), on its sub-pixel boundary
    (interpolated on the soft mask when given), with the border and ellipse-agreement checks."""
    return measure_points(region_boundary(region, soft), spacing, image_shape=region.shape, region=region, **kw)


def _r(v, nd=3):
    return None if v is None else round(float(v), nd)


def _ell(e: Ellipse | None) -> dict | None:
    return None if e is None else {k: round(v, 5) for k, v in e.as_dict().items()}
