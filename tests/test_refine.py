"""The second stage (fetalhc.refine): polar geometry, training targets, training/resume, checkpoints, QC."""
import math

import numpy as np
import pytest
import torch

from fetalhc.data import Sample
from fetalhc.geometry import Ellipse, ellipse_mask, fit_points, radial_residual
from fetalhc.model import build_model, load_model, save_checkpoint
from fetalhc.protocol import seen_exams
from fetalhc.refine import (OutlineNet, Refiner, RefinerConfig, blend_outline, ray_crossings, ray_points,
                            refine_points, refine_qc, unwrap)
from fetalhc.refine_train import RefineSample, RefineTrainConfig, _orient, loss_fn, targets, train_refiner
from fetalhc.result import measure_points

CFG = RefinerConfig()


def ring_image(e: Ellipse, shape=(300, 400), seed=0) -> np.ndarray:
    """A bright skull-like band just inside ellipse ``e`` on speckle."""
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 10, shape)
    inner = Ellipse(e.cx, e.cy, e.a * 0.93, e.b * 0.93, e.angle)
    img[ellipse_mask(e, shape) & ~ellipse_mask(inner, shape)] += 150
    return np.clip(img, 0, 255).astype(np.uint8)


def test_rays_cross_a_scaled_ellipse_where_expected():
    e = Ellipse.make(200, 150, 90, 60, 0.4)
    for k in (0.8, 1.0, 1.2):
        target = Ellipse.make(200, 150, 90 * k, 60 * k, 0.4)
        s = ray_crossings(e, target, CFG)
        assert np.allclose(s, k)
        assert np.allclose(radial_residual(target, ray_points(e, s, CFG)), 0, atol=1e-9)
    shifted = Ellipse.make(215, 140, 95, 58, 0.5)
    pts = ray_points(e, ray_crossings(e, shifted, CFG), CFG)
    assert np.abs(radial_residual(shifted, pts)).max() < 1e-9
    assert np.isnan(ray_crossings(e, Ellipse.make(600, 150, 20, 20, 0), CFG)).all()  # centre outside: no target


def test_targets_are_rows_of_the_window_and_zero_weight_outside_image_or_window():
    gt = Ellipse.make(200, 150, 90, 60, 0.0)
    start = Ellipse.make(200, 150, 99, 66, 0.0)  # 10 % too large
    row, w = targets(start, gt, (300, 400), CFG)
    expect = (1 / 1.1 - (1 - CFG.span)) / (2 * CFG.span) * (CFG.n_radii - 1)
    assert w.all() and np.allclose(row, expect, atol=1e-4)
    cut = Ellipse.make(200, 40, 90, 60, 0.0)  # top of the head outside a 300-row image
    _, w = targets(cut, cut, (300, 400), CFG)
    assert 0 < w.sum() < CFG.n_angles
    _, w = targets(start, Ellipse.make(200, 150, 180, 120, 0.0), (300, 400), CFG)  # twice as large: off-window
    assert w.sum() == 0


def test_unwrap_is_standardised_and_reads_the_ring_at_its_radius():
    e = Ellipse.make(200, 150, 90, 60, 0.3)
    p = unwrap(ring_image(e), e, CFG)
    assert p.shape == (CFG.n_radii, CFG.n_angles) and abs(p.mean()) < 1e-4 and abs(p.std() - 1) < 1e-2
    rows = np.argmax(p, 0)  # the bright band lies just inside s = 1
    s = np.linspace(1 - CFG.span, 1 + CFG.span, CFG.n_radii)[rows]
    assert np.median(s) == pytest.approx(0.965, abs=0.04)


def test_flips_and_rotations_move_the_ellipse_with_the_image():
    e = Ellipse.make(150, 110, 90, 60, 0.3)
    img = ring_image(e)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(24):
        px, e2 = _orient(img, e, rng)
        seen.add(px.shape)
        p = unwrap(px, e2, CFG)
        s = np.linspace(1 - CFG.span, 1 + CFG.span, CFG.n_radii)[np.argmax(p, 0)]
        assert np.median(s) == pytest.approx(0.965, abs=0.04)
    assert seen == {(300, 400), (400, 300)}


def test_loss_is_lowest_at_the_target_row():
    row = torch.full((1, CFG.n_angles), 20.0)
    w = torch.ones(1, CFG.n_angles)
    r = torch.arange(CFG.n_radii, dtype=torch.float32)[None, :, None].expand(1, -1, CFG.n_angles)
    at = loss_fn(-(r - 20.0) ** 2, row, w)
    off = loss_fn(-(r - 26.0) ** 2, row, w)
    assert at < off
    assert loss_fn(torch.zeros(1, CFG.n_radii, CFG.n_angles), row, torch.zeros_like(w)) == 0  # nothing to learn


def _ring_samples(n=6):
    out = []
    for i in range(n):
        e = Ellipse.make(200 + 5 * i, 150 - 3 * i, 80 + 4 * i, 60 + 2 * i, 0.2 * i)
        out.append(RefineSample(ring_image(e, seed=i), e, 0.2, f"ring{i}"))
    return out


def test_training_learns_the_ring_and_resumes_from_its_state(tmp_path):
    torch.manual_seed(0)
    cfg = RefinerConfig(width=8)
    tc = RefineTrainConfig(iters=120, batch_size=8, lr=5e-3, eval_every=60, ema=0.9)
    train = _ring_samples()
    val = [RefineSample(s.pixels, s.gt, s.pixel_mm, s.name, Ellipse.make(s.gt.cx + 4, s.gt.cy, s.gt.a * 1.08,
                                                                          s.gt.b * 1.08, s.gt.angle)) for s in train]
    stops = iter([False] * 60 + [True])  # interrupted after the first saved state
    first = train_refiner(train, val, tmp_path, cfg, tc, progress=None, should_stop=lambda: next(stops))
    assert [h["step"] for h in first["history"]] == [60] and (tmp_path / "refiner_last.pt").is_file()
    res = train_refiner(train, val, tmp_path, cfg, tc, resume=True, progress=None)
    h = res["history"]
    assert [r["step"] for r in h] == [60, 120]
    # the first stage is 8 % too large here; the refiner must find the ring
    assert h[-1]["val_adf_mm"] < 0.5 * h[-1]["val_stage1_adf_mm"], h


def test_mirror_averaging_makes_the_reading_mirror_symmetric():
    torch.manual_seed(0)
    net = OutlineNet(RefinerConfig(width=8))
    x = torch.from_numpy(unwrap(ring_image(Ellipse.make(200, 150, 90, 60, 0.3), seed=3),
                                Ellipse.make(205, 148, 95, 57, 0.35), net.cfg))
    plain, averaged = Refiner(net), Refiner(net)
    averaged.cfg = RefinerConfig(width=8, flip_average=True)
    assert not torch.allclose(plain.read(x.flip(-1)), plain.read(x).flip(-1), atol=1e-4)  # untrained: asymmetric
    assert torch.allclose(averaged.read(x.flip(-1)), averaged.read(x).flip(-1), atol=1e-6)
    assert torch.allclose(averaged.read(x).sum(0), torch.ones(net.cfg.n_angles), atol=1e-5)


def test_depth_sets_the_unet_levels_and_a_checkpoint_without_it_loads_as_three_levels():
    torch.manual_seed(0)
    x = torch.from_numpy(unwrap(ring_image(Ellipse.make(200, 150, 90, 60, 0.3)), Ellipse.make(205, 148, 95, 57, 0.35),
                                CFG))
    old = Refiner(OutlineNet(RefinerConfig(width=8)))
    blob = old.to_blob()
    del blob["config"]["depth"]  # written before depth was a setting
    again = Refiner.from_blob(blob)  # strict load: the same layers as before
    assert again.cfg.depth == 3 and torch.equal(again.read(x), old.read(x))
    deep = Refiner(OutlineNet(RefinerConfig(width=8, depth=4)))
    assert len(deep.net.enc) == 4 and len(deep.net.dec) == 3
    assert torch.equal(Refiner.from_blob(deep.to_blob()).read(x), deep.read(x))
    odd = OutlineNet(RefinerConfig(width=8, depth=4, n_radii=60, n_angles=50))  # not a multiple of 8
    assert odd(torch.zeros(1, 1, 60, 50)).shape == (1, 60, 50)
    for bad in (1, 6):
        with pytest.raises(ValueError, match=f"depth {bad}"):
            RefinerConfig(depth=bad)


def test_checkpoint_carries_both_stages_and_the_pipeline_uses_them(tmp_path):
    torch.manual_seed(0)
    model = build_model()
    model.fetalhc_refiner = Refiner(OutlineNet(RefinerConfig(width=8)))
    path = save_checkpoint(tmp_path / "m.pt", model, half=True, data={"train_exams": ["1"], "val_exams": []},
                           refiner_data={"train_exams": ["2"], "val_exams": ["3"]})
    loaded, meta = load_model(path)
    assert loaded.fetalhc_refiner is not None and meta["refiner_config"]["width"] == 8
    e = Ellipse.make(200, 150, 90, 60, 0.3)
    img = ring_image(e)
    a, _ = refine_points(loaded.fetalhc_refiner, img, e)
    b, _ = refine_points(model.fetalhc_refiner, img, e)
    assert np.abs(a - b).max() < 0.05  # float16 storage
    assert seen_exams(meta, ["1_HC.png", "2_HC.png", "3_HC.png", "4_HC.png"]) == {"1", "2", "3"}


def test_stage_blend_scales_the_outline_to_the_blended_perimeter():
    e = Ellipse.make(200, 150, 90, 60, 0.3)
    pts = e.points(64)
    first_hc = 0.9 * e.perimeter  # a first stage 10 % short
    assert np.allclose(blend_outline(RefinerConfig(), first_hc, pts, e), pts)  # w = 0: the second stage alone
    blended = fit_points(blend_outline(RefinerConfig(stage1_weight=0.3, stage1_scale=1.01), first_hc, pts, e))
    assert blended.perimeter == pytest.approx(0.7 * e.perimeter + 0.3 * 1.01 * first_hc, rel=1e-9)
    assert (blended.cx, blended.cy, blended.angle) == pytest.approx((e.cx, e.cy, e.angle))
    assert blended.b / blended.a == pytest.approx(e.b / e.a)  # the same shape, resized
    for bad in ({"stage1_weight": 1.0}, {"stage1_weight": -0.1}, {"stage1_scale": 3.0}):
        with pytest.raises(ValueError, match="stage-1"):
            RefinerConfig(**bad)
    blob = Refiner(OutlineNet(RefinerConfig(width=8))).to_blob()
    for k in ("stage1_weight", "stage1_scale"):
        del blob["config"][k]  # written before the blend existed: read as before
    assert Refiner.from_blob(blob).cfg.stage1_weight == 0.0


def test_pipeline_reports_the_blended_hc_and_qc_reads_the_second_stage_alone():
    from fetalhc.io import Spacing
    from fetalhc.pipeline import _refined
    from fetalhc.result import measure_region

    torch.manual_seed(0)
    e = Ellipse.make(200, 150, 90, 60, 0.3)
    img = ring_image(e)
    first = measure_region(ellipse_mask(Ellipse.make(204, 151, 84, 56, 0.3), img.shape), Spacing(0.1, 0.1, "test"))
    plain = Refiner(OutlineNet(RefinerConfig(width=8)))
    blend = plain.with_blend(0.3, 1.02)
    assert plain.cfg.stage1_weight == 0.0 and blend.net.enc is plain.net.enc  # same weights, own config
    a, _ = _refined(plain, img, first.spacing, first, [], {})
    b, _ = _refined(blend, img, first.spacing, first, [], {})
    assert b.extra["stage2_hc_px"] == pytest.approx(a.hc_px, abs=0.01) and b.extra["stage1_weight"] == 0.3
    assert b.hc_px == pytest.approx(0.7 * a.hc_px + 0.3 * 1.02 * first.hc_px, rel=1e-4)
    assert b.hc_mm == pytest.approx(b.hc_px * 0.1, rel=1e-6)
    assert {k: b.extra[k] for k in ("stage_change", "outline_confidence", "outline_residual")} == \
        {k: a.extra[k] for k in ("stage_change", "outline_confidence", "outline_residual")}
    assert b.qc_reasons == a.qc_reasons


def test_refine_qc_flags_stage_disagreement_and_irregular_outlines():
    def qc(first, pts, conf):
        return refine_qc(first, fit_points(pts), pts, conf)

    e = Ellipse.make(200, 150, 90, 60, 0.3)
    first = measure_points(e.points(64), None)
    same = qc(first, e.points(64), np.ones(64))
    assert same["reasons"] == [] and abs(same["extra"]["stage_change"]) < 1e-3
    big = Ellipse.make(200, 150, 90 * 1.3, 60 * 1.3, 0.3)
    assert any("disagree" in r for r in qc(first, big.points(64), np.ones(64))["reasons"])
    noisy = e.points(64) * (1 + 0.15 * np.random.default_rng(0).standard_normal((64, 1)) * [[1, 0]]) + [[0, 0]]
    assert any("irregular" in r for r in qc(first, noisy, np.ones(64))["reasons"])
    assert any("unclear" in r for r in qc(first, e.points(64), np.full(64, 0.1))["reasons"])


def test_wide_starts_and_small_head_oversampling_in_training_batches():
    from fetalhc.refine_train import draw, perturb
    gt = Ellipse.make(200, 150, 90, 60, 0.4)
    rng = np.random.default_rng(0)
    sizes = lambda tc: np.log([perturb(gt, rng, tc).a / gt.a for _ in range(4000)])  # noqa: E731
    plain, wide = sizes(RefineTrainConfig()), sizes(RefineTrainConfig(wide_fraction=0.2, wide_scale=3.0))
    assert 0.04 < plain.std() < 0.07  # size sd 0.05, aspect 0.03
    assert (np.abs(plain) > 0.25).mean() < 0.001 < 0.02 < (np.abs(wide) > 0.25).mean()  # a heavier tail only
    small = RefineSample(np.zeros((10, 10), np.uint8), Ellipse.make(5, 5, 100, 80, 0), 0.1)  # ~57 mm
    large = RefineSample(np.zeros((10, 10), np.uint8), Ellipse.make(5, 5, 300, 250, 0), 0.1)  # ~173 mm
    unknown = RefineSample(np.zeros((10, 10), np.uint8), small.gt, 1.0, spacing_known=False)
    tc = RefineTrainConfig(batch_size=6000, oversample_small=2.0)
    counts = np.bincount(draw([small, large, unknown], rng, tc), minlength=3)
    assert 1.8 < counts[0] / counts[1] < 2.2 and 0.9 < counts[2] / counts[1] < 1.1
    # size-weighted: in proportion to HC (173 / 57 mm), the unknown head as one of the mean size (115 mm)
    hc = [s.hc_mm for s in (small, large)]
    counts = np.bincount(draw([small, large, unknown], rng, RefineTrainConfig(batch_size=20000, size_weighted=True)),
                         minlength=3)
    assert abs(counts[1] / counts[0] - hc[1] / hc[0]) < 0.25 and abs(counts[2] / counts[0] - np.mean(hc) / hc[0]) < 0.2
    counts = np.bincount(draw([small, large], rng, RefineTrainConfig(batch_size=20000, size_weighted=True,
                                                                     oversample_small=2.0)), minlength=2)
    assert abs(counts[1] / counts[0] - hc[1] / hc[0] / 2) < 0.15  # the two weightings multiply
    with pytest.raises(ValueError, match="out of range"):
        RefineTrainConfig(wide_fraction=1.5)
    with pytest.raises(ValueError, match="start spreads"):
        RefineTrainConfig(size_sd=0.0)


def test_degraded_training_images_keep_the_ring_darken_a_sector_and_stay_standardised():
    from fetalhc.refine_train import degrade, make_batch
    e = Ellipse.make(200, 150, 90, 60, 0.3)
    raw = unwrap(ring_image(e), e, CFG, standardised=False)
    assert np.allclose(unwrap(ring_image(e), e, CFG), (raw - raw.mean()) / (raw.std() + 1e-3), atol=1e-5)
    profile = raw.mean(1)
    ring = set(np.flatnonzero(profile > (profile.max() + profile.min()) / 2).tolist())  # the skull's rows
    shadows = 0
    for seed in range(30):
        q = degrade(raw.copy(), np.random.default_rng(seed))
        assert q.shape == raw.shape and q.dtype == np.float32 and np.isfinite(q).all()
        assert int(q.mean(1).argmax()) in ring  # the skull stays where the target says
        col = q.mean(0)
        shadows += col.min() < 0.85 * np.median(col)
    assert 5 < shadows < 25  # about half of them
    samples = [RefineSample(ring_image(e, seed=k), e, 0.2) for k in range(3)]
    x, row, w = make_batch(samples, np.random.default_rng(0), CFG,
                           RefineTrainConfig(batch_size=4, polar_augment=True))
    assert x.shape == (4, 1, CFG.n_radii, CFG.n_angles) and torch.isfinite(x).all()
    assert torch.allclose(x.mean((1, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(x.std((1, 2, 3)), torch.ones(4), atol=0.02)


def test_ray_confidence_counts_the_same_radial_band_on_any_grid():
    from fetalhc.refine import fractions, ray_confidence
    confidences = []
    for cfg in (RefinerConfig(), RefinerConfig(n_radii=128)):
        s = torch.from_numpy(fractions(cfg)).float()[:, None]
        prob = torch.exp(-0.5 * ((s - 1.0) / 0.02) ** 2).expand(-1, 4)  # the same head edge, sd 2 % of the radius
        confidences.append(ray_confidence(prob / prob.sum(0), cfg))
    assert torch.allclose(confidences[0], confidences[1], atol=0.03), confidences
    assert 0.85 < float(confidences[0][0]) < 0.95  # the peak row +-2 rows (+-4): ~1.8 sd either side
