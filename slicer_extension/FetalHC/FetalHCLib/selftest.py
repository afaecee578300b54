"""Scenarios run both by pytest on slicer-core (tests/test_slicer_*.py) and by FetalHCTest inside Slicer."""
from __future__ import annotations

import numpy as np

from . import files, nodes
from .logic import DEFAULT_MODEL, FetalHCLogic
from .shared import geometry, result as fresult

# i (columns) runs to -R, j (rows) to -S, k to +A: flipped, permuted and left-handed (det -1)
FLIPPED_DIRECTIONS = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
AGREEMENT = 0.005  # curve length vs HC, relative
SHAPE, SPACING_MM, ELLIPSE = (540, 800), (0.15, 0.12), (400.3, 270.6, 210.0, 160.0, 0.4)


def flipped_ijk_to_ras(spacing_mm: tuple[float, float], origin=(12.5, -30.0, 7.0)) -> np.ndarray:
    """IJK->RAS with flipped, permuted axes and anisotropic spacing (row_mm, col_mm)."""
    m = np.eye(4)
    m[:3, :3] = FLIPPED_DIRECTIONS @ np.diag([spacing_mm[1], spacing_mm[0], 1.0])
    m[:3, 3] = origin
    return m


def synthetic_volume(scene, shape=SHAPE, spacing_mm=SPACING_MM, ellipse=ELLIPSE):
    """A known head (ellipse) on a volume with a flipped, anisotropic IJK->RAS: (volume, mask, truth)."""
    truth = geometry.Ellipse.make(*ellipse)
    mask = geometry.ellipse_mask(truth, shape).astype(np.uint8)
    pixels = np.full(shape, 40, np.uint8)
    pixels[mask > 0] = 120
    volume = nodes.add_volume(scene, pixels, "FetalHC synthetic", ijk_to_ras_matrix=flipped_ijk_to_ras(spacing_mm))
    volume.SetAttribute(nodes.ATTR_SPACING_SOURCE, "synthetic test geometry")
    return volume, mask, truth


def show_synthetic_ai(logic: FetalHCLogic, volume, mask):
    """The synthetic head shown as if the server had found it (score 1, QC OK)."""
    region = geometry.largest_component(mask)
    res = fresult.measure_points(geometry.region_boundary(region), nodes.volume_spacing(volume),
                                 ga_weeks=logic.known_ga(), outline_source=fresult.OUTLINE_AI)
    res.score, res.qc_ok, res.model_version = 1.0, True, "synthetic"
    return logic.accept_ai(volume, res, mask)


def trim(mask: np.ndarray, truth, fraction: float = 0.1) -> np.ndarray:
    """The clinician erases the right ``fraction`` of the head."""
    x0, _, x1, _ = truth.bounding_box()
    edited = mask.copy()
    edited[:, int(x1 - fraction * (x1 - x0)):] = 0
    return edited


def scale_curve(volume, factor: float) -> None:
    """The clinician drags the curve's points outward (about its centre) by ``factor``."""
    curve = volume.GetNodeReference(nodes.REF_CURVE)
    n = curve.GetNumberOfControlPoints()
    ras = np.array([curve.GetNthControlPointPositionWorld(i) for i in range(n)])
    centre = ras.mean(0)
    for i in range(n):
        curve.SetNthControlPointPositionWorld(i, *(centre + factor * (ras[i] - centre)))


def live_case(logic: FetalHCLogic, scene, wait=None, revert=None):
    """AI result -> edit the mask -> drag the curve -> revert. ``wait()`` lets the debounce run (Slicer:
    process Qt events; headless: logic.flush); ``revert(volume)`` is "Revert to AI result" (Slicer: the
    button). Returns every stage's Result and the masks."""
    wait = wait or logic.flush
    revert = revert or logic.revert_to_ai
    volume, mask, truth = synthetic_volume(scene)
    ai = show_synthetic_ai(logic, volume, mask)
    exported = nodes.segment_mask(volume)
    edited = trim(exported, truth)
    nodes.set_head_segment(volume, edited)  # as the Segment Editor would
    wait()
    after_mask = logic.current_result(volume)
    scale_curve(volume, 1.05)
    wait()
    after_curve = logic.current_result(volume)
    mask_after_curve = nodes.segment_mask(volume)
    submitted = logic.outline_mask(volume)
    reverted = revert(volume)
    return {"volume": volume, "truth_hc_mm": truth.to_mm(SPACING_MM).perimeter, "mask": mask, "ai": ai,
            "exported": exported, "edited": edited, "after_mask": after_mask, "after_curve": after_curve,
            "mask_after_curve": mask_after_curve, "submitted_after_curve": submitted, "reverted": reverted,
            "mask_after_revert": nodes.segment_mask(volume)}


def check_live_case(case, check) -> None:
    """The assertions shared by pytest and FetalHCTest (``check(condition, message)``)."""
    ai, m, c, r = case["ai"], case["after_mask"], case["after_curve"], case["reverted"]
    check(abs(ai.hc_mm / case["truth_hc_mm"] - 1) < 0.005, "AI HC matches the true HC")
    check(agreement(ai) < AGREEMENT, "curve length equals HC")
    check(np.array_equal(case["exported"], case["mask"]), "segment holds the AI mask")
    check(m.outline_source == fresult.OUTLINE_MASK and m.hc_mm < ai.hc_mm, "mask edit lowers the HC")
    check(agreement(m) < AGREEMENT, "curve follows the edited mask")
    check(c.outline_source == fresult.OUTLINE_ELLIPSE and abs(c.hc_mm / (1.05 * m.hc_mm) - 1) < 2e-3,
          "curve drag scales the HC")
    check(np.array_equal(case["mask_after_curve"], case["edited"]), "a curve drag leaves the edited mask alone")
    check(abs(case["submitted_after_curve"].sum() / (1.05 ** 2 * case["edited"].sum()) - 1) < 0.03,
          "submit sends the edited ellipse")
    check(r.outline_source == fresult.OUTLINE_AI and abs(r.hc_mm - ai.hc_mm) < 2e-3, "revert restores the AI HC")
    check(np.array_equal(case["mask_after_revert"], case["mask"]), "revert restores the AI mask")


def server_case(logic: FetalHCLogic, image_path: str, model: str = DEFAULT_MODEL, manual_mm: float | None = None):
    """Connect, load an image file, Segment head against a live server; returns summary, volume, result."""
    summary = logic.connect()
    volume, _ = logic.prepare(files.load_image_volume(logic.scene, image_path), manual_mm=manual_mm)
    return {"summary": summary, "volume": volume, "result": logic.segment(volume, model)}


def agreement(res) -> float:
    """Relative difference between the curve length and the HC shown."""
    return abs(res.extra["curve_length_mm"] - res.hc_mm) / res.hc_mm
