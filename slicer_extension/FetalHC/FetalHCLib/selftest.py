"""Scenarios run both by pytest on slicer-core (tests/test_slicer_*.py) and by FetalHCTest inside Slicer."""
from __future__ import annotations

import numpy as np

from . import core, logic
from .flow import DEFAULT_MODEL, Flow, prepare

# i (columns) runs to -R, j (rows) to -S, k to +A: flipped, permuted and left-handed (det -1)
FLIPPED_DIRECTIONS = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
AGREEMENT = 0.005  # curve length vs HC, relative


def flipped_ijk_to_ras(spacing_mm: tuple[float, float], origin=(12.5, -30.0, 7.0)) -> np.ndarray:
    """IJK->RAS with flipped, permuted axes and anisotropic spacing (row_mm, col_mm)."""
    m = np.eye(4)
    m[:3, :3] = FLIPPED_DIRECTIONS @ np.diag([spacing_mm[1], spacing_mm[0], 1.0])
    m[:3, 3] = origin
    return m


def synthetic_case(scene, shape=(540, 800), spacing_mm=(0.15, 0.12), ellipse=(400.3, 270.6, 210.0, 160.0, 0.4)):
    """A known ellipse on a volume with a flipped IJK->RAS: segment, curve, table, then an edit and Recompute.

    Returns the volume, the true HC (mm, Ramanujan on the exact millimetre ellipse), the shown result and
    the result after erasing the right 10 % of the head in the segment and recomputing.
    """
    geometry = core.load()[0]
    truth = geometry.Ellipse.make(*ellipse)
    mask = geometry.ellipse_mask(truth, shape).astype(np.uint8)
    pixels = np.full(shape, 40, np.uint8)
    pixels[mask > 0] = 120
    volume = logic.add_volume(scene, pixels, "FetalHC synthetic", ijk_to_ras_matrix=flipped_ijk_to_ras(spacing_mm))
    volume.SetAttribute(logic.ATTR_SPACING_SOURCE, "synthetic test geometry")
    spacing = logic.volume_spacing(volume)
    shown = logic.apply_result(volume, {**logic.measure(mask, spacing), "score": 1.0, "qc_ok": True, "qc": "OK",
                                        "model_version": "synthetic"}, mask)
    exported = logic.segment_mask(volume)
    edited = exported.copy()
    x0, _, x1, _ = truth.bounding_box()
    edited[:, int(x1 - 0.1 * (x1 - x0)):] = 0  # the clinician trims the head
    logic.set_head_segment(volume, edited)
    recomputed = logic.recompute(volume, "segment")
    return {"volume": volume, "truth_hc_mm": truth.to_mm(spacing_mm).perimeter, "shown": shown,
            "mask": mask, "exported": exported, "edited": edited, "recomputed": recomputed, "spacing": spacing}


def server_case(scene, url: str, image_path: str, model: str = DEFAULT_MODEL, manual_mm: float | None = None):
    """Connect, load an image file, Segment head against a live server; returns flow, volume, result."""
    flow = Flow(scene, url)
    summary = flow.connect()
    volume, _ = prepare(logic.load_image_volume(scene, image_path), manual_mm=manual_mm)
    return {"flow": flow, "summary": summary, "volume": volume, "result": flow.segment(volume, model)}


def agreement(result: dict) -> float:
    """Relative difference between the curve length and the HC shown."""
    return abs(result["curve_length_mm"] - result["hc_mm"]) / result["hc_mm"]
