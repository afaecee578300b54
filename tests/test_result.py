"""fetalhc.result: the one result type shared by the pipeline, the server's JSON and the Slicer module."""
import json
import math

import numpy as np
import pytest

from fetalhc import clinical, result
from fetalhc.geometry import Ellipse, ellipse_mask, fit_mask, largest_component, region_boundary
from fetalhc.io import Spacing


def test_measure_points_matches_fit_mask_and_clinical():
    e = Ellipse.make(200.4, 150.2, 120.0, 90.0, 0.6)
    mask = ellipse_mask(e, (300, 400))
    sp = Spacing(0.15, 0.12, "test")
    r = result.measure_points(region_boundary(largest_component(mask)), sp, ga_weeks=24.0)
    px, mm = fit_mask(mask, sp.as_tuple())
    assert r.hc_px == pytest.approx(px.perimeter, rel=1e-12) and r.hc_mm == pytest.approx(mm.perimeter, rel=1e-12)
    assert r.ga.weeks == pytest.approx(clinical.hadlock_ga(mm.perimeter).weeks)
    assert r.centile == pytest.approx(clinical.hc_centile(mm.perimeter, 24.0))
    bio = r.biometry()
    assert bio["bpd_mm"] == pytest.approx(2 * mm.b) and bio["ofd_mm"] == pytest.approx(2 * mm.a)
    assert r.outline_source == result.OUTLINE_MASK and r.qc_ok is True and r.qc_reasons == []
    with pytest.raises(ValueError):
        result.measure_points(np.zeros((3, 2)), sp)


def test_outline_qc_is_the_same_for_every_outline():
    """The checks the server runs on the AI mask run on a corrected label and on a Slicer edit too."""
    sp = Spacing(0.15, 0.15, "t")
    cut = ellipse_mask(Ellipse.make(40.0, 150.0, 120.0, 90.0, 0.0), (300, 400))  # runs off the left edge
    r = result.measure_region(cut, sp)
    assert not r.qc_ok and any("cut by the image border" in q for q in r.qc_reasons)
    square = np.zeros((300, 400), bool)
    square[50:250, 100:300] = True  # a head outline is an ellipse, not a square
    r = result.measure_region(square, sp)
    assert not r.qc_ok and any("not elliptical" in q for q in r.qc_reasons) and r.extra["mask_ellipse_dice"] < 0.97
    flat = Ellipse.make(200.0, 150.0, 150.0, 40.0, 0.0)
    r = result.measure_points(flat.points(100), sp, image_shape=(300, 400), outline_source=result.OUTLINE_ELLIPSE)
    assert any("unusual head shape" in q for q in r.qc_reasons) and "mask_ellipse_dice" not in r.extra
    r = result.measure_region(ellipse_mask(Ellipse.make(200.0, 150.0, 120.0, 90.0, 0.0), (300, 400)), None)
    assert r.hc_mm is None and r.qc_reasons == ["pixel spacing unknown: no HC in mm"]
    r = result.measure_region(ellipse_mask(Ellipse.make(200.0, 150.0, 120.0, 90.0, 0.0), (300, 400)),
                              Spacing(2.0, 2.0, "wrong calibration"))
    assert any("implausible HC" in q for q in r.qc_reasons)


def test_centile_outside_the_standard_is_a_reason_not_an_error():
    e = Ellipse.make(200, 150, 120, 90, 0.0)
    r = result.measure_points(e.points(200), Spacing(0.15, 0.15, "t"), ga_weeks=10.0)
    assert r.centile is None and any("INTERGROWTH" in q for q in r.qc_reasons)


def test_to_dict_from_dict_round_trip_through_json():
    e = Ellipse.make(200.4, 150.2, 120.0, 90.0, 0.6)
    r = result.measure_points(e.points(100), Spacing(0.15, 0.12, "DICOM PixelSpacing"), ga_weeks=24.0,
                              outline_source=result.OUTLINE_ELLIPSE)
    r.score, r.qc_ok, r.qc_reasons, r.model_version = 0.91, False, ["head cut by the image border"], "v1"
    r.extra = {"mask_ellipse_dice": 0.98, "image_shape": [300, 400]}
    d = json.loads(json.dumps(r.to_dict()))
    back = result.Result.from_dict(d)
    assert back.to_dict() == d
    assert back.spacing == Spacing(0.15, 0.12, "DICOM PixelSpacing") and back.extra == r.extra
    assert back.qc_text == "head cut by the image border" and back.outline_source == "edited ellipse"
    assert math.isclose(d["cephalic_index"], 100 * d["bpd_mm"] / d["ofd_mm"], rel_tol=1e-3)
    empty = result.Result.from_dict({"hc_mm": None, "qc_ok": False, "qc_reasons": ["no head found"]})
    assert empty.ellipse_px is None and empty.to_dict()["ga_text"].startswith("n/a")


def test_zoom_qc_passes_hc18_heads_and_flags_a_head_far_too_large_or_small_for_the_zoom(samples_dir):
    import csv

    from fetalhc.result import zoom_reasons

    with open(samples_dir / "training_set_pixel_size_and_HC.csv") as f:
        for row in csv.DictReader(f):
            px, hc = float(row["pixel size(mm)"]), float(row["head circumference (mm)"])
            assert zoom_reasons(hc, Spacing(px, px, "csv")) == [], row["filename"]
    small_head_px = Spacing(0.06, 0.06, "csv")  # zoomed in on a ~65 mm first-trimester head
    assert "unusually large" in zoom_reasons(164.0, small_head_px)[0]  # a mask over the whole sac
    assert "unusually small" in zoom_reasons(60.0, Spacing(0.19, 0.19, "csv"))[0]  # a fragment of a term head
    assert zoom_reasons(None, small_head_px) == [] and zoom_reasons(100.0, None) == []
