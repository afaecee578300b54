"""The shipped default model: a regression guard on the shipped samples (not the accuracy claim,
which is in models/README.md), and the pipeline's behaviour around spacing."""
import numpy as np
import pytest

from fetalhc import hc18
from fetalhc.dicomgen import write_us_dicom
from fetalhc.io import Spacing, load_image
from fetalhc.pipeline import Measurer


@pytest.fixture(scope="module")
def measurer(default_model):
    return Measurer(default_model, "cpu")


def test_default_model_measures_shipped_samples(measurer, samples_dir):
    errors, flagged = {}, {}
    for r in hc18.read_records(samples_dir):
        img = load_image(r.image, pixel_csv=samples_dir / hc18.TRAIN_CSV)
        m = measurer.measure(img.pixels, img.spacing)
        assert m.hc_mm is not None, (r.name, m.qc_reasons)
        errors[r.name] = m.hc_mm - r.hc_mm
        if not m.qc_ok:
            assert m.qc_reasons, r.name
            flagged[r.name] = m.qc_reasons
    # the shipped model (trained on all 798 images, these included) on these clean images: mean 1.4 mm,
    # worst 2.4 mm (507_HC), one flag (011_HC); the previous default 1.4 / 2.5 mm, the protocol model 1.6 /
    # 3.3 mm (745_HC). Worst bound 5.5 mm until session 15.
    assert len(errors) == 8 and np.mean(np.abs(list(errors.values()))) <= 2.0, errors
    assert all(abs(e) <= 4.0 for e in errors.values()), errors
    assert len(flagged) <= 1, flagged


def test_same_picture_same_hc_from_each_dicom_spacing_source(measurer, samples_dir, tmp_path):
    rec = hc18.read_records(samples_dir)[2]
    pixels = hc18.read_grey(rec.image)
    sp = (rec.pixel_mm, rec.pixel_mm)
    hcs = {}
    for cal in ("pixel_spacing", "imager_pixel_spacing", "us_region"):
        img = load_image(write_us_dicom(tmp_path / f"{cal}.dcm", pixels, sp, calibration=cal))
        m = measurer.measure(img.pixels, img.spacing, spacing_at=img.spacing_at)
        hcs[cal] = m.hc_mm
        assert m.spacing.row_mm == pytest.approx(rec.pixel_mm, rel=1e-6)
    assert max(hcs.values()) - min(hcs.values()) < 1e-6, hcs
    assert abs(hcs["us_region"] - rec.hc_mm) <= 3.0


def test_unknown_spacing_gives_pixels_only_with_reason(measurer, samples_dir):
    rec = hc18.read_records(samples_dir)[3]
    m = measurer.measure(hc18.read_grey(rec.image), None)
    assert m.hc_mm is None and m.ellipse_mm is None and not m.ga.valid
    assert m.hc_px == pytest.approx(rec.hc_mm / rec.pixel_mm, rel=0.03)
    assert "pixel spacing unknown" in m.qc_text
    d = m.to_dict()
    assert d["hc_mm"] is None and d["spacing_source"] is None and d["ellipse_px"]["a"] > 0


def test_anisotropic_spacing_uses_the_mm_fit(measurer, samples_dir):
    rec = hc18.read_records(samples_dir)[3]
    px = hc18.read_grey(rec.image)
    iso = measurer.measure(px, Spacing(rec.pixel_mm, rec.pixel_mm, "test"))
    aniso = measurer.measure(px, Spacing(rec.pixel_mm * 1.5, rec.pixel_mm, "test"))
    assert aniso.ellipse_mm.perimeter == pytest.approx(aniso.ellipse_px.to_mm((rec.pixel_mm * 1.5, rec.pixel_mm)).perimeter, rel=5e-3)
    assert aniso.hc_mm > iso.hc_mm * 1.1


def test_blank_image_finds_no_head_and_implausible_spacing_is_flagged(measurer, samples_dir):
    for shape in ((540, 800), (300, 400)):
        m = measurer.measure(np.zeros(shape, np.uint8), Spacing(0.1, 0.1, "test"))
        assert m.hc_mm is None and "no head found" in m.qc_text and m.mask.sum() == 0
    rec = hc18.read_records(samples_dir)[3]
    m = measurer.measure(hc18.read_grey(rec.image), Spacing(2.0, 2.0, "wrong calibration"))
    assert not m.qc_ok and any("implausible HC" in r for r in m.qc_reasons)


def test_known_ga_adds_centile(measurer, samples_dir):
    rec = hc18.read_records(samples_dir)[2]
    m = measurer.measure(hc18.read_grey(rec.image), Spacing(rec.pixel_mm, rec.pixel_mm, "test"), ga_weeks=20.0)
    assert m.centile is not None and 0 <= m.centile["centile"] <= 100


def test_default_model_has_both_stages_and_its_mask_remeasures_to_its_hc(measurer, samples_dir):
    from fetalhc.pipeline import measure_mask

    assert measurer.model.fetalhc_refiner is not None and measurer.meta["refiner_config"]["parameters"] > 0
    rec = hc18.read_records(samples_dir)[4]
    spacing = Spacing(rec.pixel_mm, rec.pixel_mm, "test")
    m = measurer.measure(hc18.read_grey(rec.image), spacing)
    assert {"stage1_hc_px", "stage_change", "outline_confidence", "outline_residual", "mask_ellipse_dice"} <= set(m.extra)
    # the mask sent to Slicer / saved as a label is the reported ellipse: re-measuring it changes nothing
    assert measure_mask(m.mask, spacing).hc_mm == pytest.approx(m.hc_mm, rel=2e-3)


def test_runner_up_only_replaces_a_failed_best_and_stays_flagged():
    from fetalhc.geometry import Ellipse, ellipse_mask
    from fetalhc.pipeline import measure_mask, pick_detection

    sp = Spacing(0.15, 0.15, "test")
    good = measure_mask(ellipse_mask(Ellipse(200, 150, 90, 70, 0.3), (300, 400)), sp)
    bad = measure_mask(ellipse_mask(Ellipse(200, 150, 90, 70, 0.3), (300, 400)) |
                       ellipse_mask(Ellipse(300, 150, 60, 20, 0.0), (300, 400)), sp)  # leaked: not elliptical
    assert good.qc_ok and not bad.qc_ok
    good.score, bad.score = 0.8, 0.95
    assert pick_detection(good, iter([bad])) == (good, [])  # a passing best is never replaced
    chosen, reasons = pick_detection(bad, iter([bad, good]))
    assert chosen is good and len(reasons) == 1 and "best detection failed QC" in reasons[0]
    assert "not elliptical" in reasons[0] and chosen.extra["runner_up_of"]["score"] == 0.95
    chosen, reasons = pick_detection(bad, iter([]))  # nobody better: the best, with its own reasons
    assert chosen is bad and reasons == bad.qc_reasons


def test_runner_up_leaves_a_passing_measurement_alone(measurer, samples_dir):
    rec = [r for r in hc18.read_records(samples_dir) if r.name == "507_HC.png"][0]
    img = load_image(rec.image, pixel_csv=samples_dir / hc18.TRAIN_CSV)
    with_rule, without = (measurer.measure(img.pixels, img.spacing, runner_up=u) for u in (True, False))
    assert with_rule.qc_ok and with_rule.hc_mm == without.hc_mm and "runner_up_of" not in with_rule.extra


def test_training_defaults_are_the_shipped_first_stage(measurer, tmp_path):
    """`fetalhc train` (through TrainConfig) and the MONAI Label trainer's from-scratch config (tested with the
    app) default to the shipped model's first stage: a retraining without --config repeats its recipe."""
    from fetalhc.model import DEFAULT_CONFIG
    from fetalhc.train import TrainConfig

    assert measurer.meta["config"]["name"] == DEFAULT_CONFIG == TrainConfig(out_dir=str(tmp_path)).model
