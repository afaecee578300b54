"""The measurement result: one type from the pipeline, through the server's JSON, to the Slicer module.

numpy-only (with geometry, clinical and io it is the core the Slicer module shares with lib/):
:class:`Result` is what ``pipeline.measure_image`` returns (as ``pipeline.Measurement``, which adds the
mask), what the ``fetal_head`` infer task sends (:meth:`Result.to_dict`) and what Slicer reads back
(:meth:`Result.from_dict`). :func:`measure_points` is the fit -> mm -> biometry -> GA -> centile path for an
outline given as points, used when a clinician edits the mask or the ellipse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .clinical import GestationalAge, biometry, hadlock_ga, hc_centile
from .geometry import Ellipse, fit_points
from .io import Spacing

OUTLINE_AI, OUTLINE_MASK, OUTLINE_ELLIPSE = "AI", "edited mask", "edited ellipse"
OUTLINE_SOURCES = (OUTLINE_AI, OUTLINE_MASK, OUTLINE_ELLIPSE)
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


def measure_points(points_px: np.ndarray, spacing: Spacing | None, *, ga_weeks: float | None = None,
                   outline_source: str = OUTLINE_MASK, qc_reasons: list[str] | None = None) -> Result:
    """Fit an outline given as (x, y) pixel points and derive HC, BPD/OFD, GA and (GA known) the centile.

    The millimetre ellipse is fitted to the points in mm (exact under anisotropic spacing), as in
    ``pipeline.measure_image``. Raises ValueError when the points outline no ellipse.
    """
    pts = np.asarray(points_px, float)
    e_px = fit_points(pts)
    out = Result(ellipse_px=e_px, hc_px=e_px.perimeter, spacing=spacing, outline_source=outline_source,
                 qc_ok=None, qc_reasons=list(qc_reasons or []))
    if spacing is None:
        return out
    e_mm = fit_points(pts * [spacing.col_mm, spacing.row_mm])
    out.ellipse_mm, out.hc_mm = e_mm, e_mm.perimeter
    out.ga = hadlock_ga(out.hc_mm)
    if ga_weeks is not None and math.isfinite(ga_weeks):
        try:
            out.centile = hc_centile(out.hc_mm, ga_weeks)
        except ValueError as exc:
            out.qc_reasons.append(str(exc))
    return out


def _r(v, nd=3):
    return None if v is None else round(float(v), nd)


def _ell(e: Ellipse | None) -> dict | None:
    return None if e is None else {k: round(v, 5) for k, v in e.as_dict().items()}
