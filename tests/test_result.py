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
    assert r.outline_source == result.OUTLINE_MASK and r.qc_ok is None
    with pytest.raises(ValueError):
        result.measure_points(np.zeros((3, 2)), sp)


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
