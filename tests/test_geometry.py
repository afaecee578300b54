import math

import numpy as np
import pytest

from fetalhc.geometry import (Ellipse, boundary_points, dice, ellipse_agreement, ellipse_mask, fit_mask, fit_points, hausdorff,
                              largest_component, numeric_perimeter, ramanujan_perimeter, touches_border)


@pytest.mark.parametrize("a,b", [(1, 1), (100, 80), (250, 200), (50, 20), (10, 9.99)])
def test_ramanujan_matches_numeric_integral(a, b):
    assert ramanujan_perimeter(a, b) == pytest.approx(numeric_perimeter(a, b), rel=2e-5)
    assert ramanujan_perimeter(a, a) == pytest.approx(2 * math.pi * a, rel=1e-12)


def test_ellipse_normalises_axes_and_angle():
    e = Ellipse.make(0, 0, 3, 5, 0.2)
    assert (e.a, e.b) == (5, 3)
    assert e.angle == pytest.approx(0.2 + math.pi / 2)
    assert 0 <= Ellipse.make(0, 0, 5, 3, -0.3).angle < math.pi


@pytest.mark.parametrize("angle", [0.0, 0.4, 1.3, 2.9])
def test_fit_recovers_synthetic_ellipse_isotropic(angle):
    true = Ellipse.make(400.3, 270.6, 210.0, 160.0, angle)
    mask = ellipse_mask(true, (540, 800))
    px, mm = fit_mask(mask, (0.15, 0.15))
    assert px.perimeter == pytest.approx(true.perimeter, rel=5e-3)
    assert mm.perimeter == pytest.approx(true.perimeter * 0.15, rel=5e-3)
    assert (px.cx, px.cy) == pytest.approx((true.cx, true.cy), abs=0.3)
    assert math.cos(2 * (px.angle - true.angle)) > 0.999


def test_fit_in_mm_with_anisotropic_spacing():
    # A circle of radius 20 mm, imaged with dx = 0.1 mm and dy = 0.2 mm, is an ellipse in pixels.
    spacing = (0.2, 0.1)  # (row, col)
    circle_px = Ellipse.make(300, 200, 20 / 0.1, 20 / 0.2, 0.0)
    mask = ellipse_mask(circle_px, (400, 600))
    px, mm = fit_mask(mask, spacing)
    assert mm.perimeter == pytest.approx(2 * math.pi * 20, rel=5e-3)
    assert mm.b / mm.a > 0.99
    # Scaling the pixel perimeter by one factor would be badly wrong here.
    assert abs(px.perimeter * 0.1 - 2 * math.pi * 20) > 20
    # The exact linear map of the pixel ellipse agrees with the mm fit.
    assert px.to_mm(spacing).perimeter == pytest.approx(mm.perimeter, rel=5e-3)


def test_scaling_roundtrip_rotated():
    e = Ellipse.make(10, 20, 30, 12, 0.7)
    back = e.scaled(0.3, 0.7).scaled(1 / 0.3, 1 / 0.7)
    assert (back.cx, back.cy, back.a, back.b) == pytest.approx((e.cx, e.cy, e.a, e.b), rel=1e-9)
    assert back.angle == pytest.approx(e.angle, abs=1e-9)


def test_fit_is_robust_to_holes_blobs_and_border():
    true = Ellipse.make(300, 200, 150, 120, 0.3)
    mask = ellipse_mask(true, (400, 600))
    mask[180:220, 280:320] = False  # hole inside the head
    mask[10:20, 10:20] = True  # small blob elsewhere
    px, _ = fit_mask(mask)
    assert px.perimeter == pytest.approx(true.perimeter, rel=5e-3)
    # Head running off the right border: the fit extrapolates from the visible arc.
    shifted = Ellipse.make(520, 200, 150, 120, 0.3)
    cut = ellipse_mask(shifted, (400, 600))
    px, _ = fit_mask(cut)
    assert px.perimeter == pytest.approx(shifted.perimeter, rel=1e-2)
    assert touches_border(px, (400, 600)) and not touches_border(true, (400, 600))


def test_soft_mask_subpixel_boundary():
    true = Ellipse.make(100.25, 80.75, 60.3, 45.1, 0.5)
    yy, xx = np.mgrid[0:160, 0:200].astype(float)
    u = (xx - true.cx) * math.cos(true.angle) + (yy - true.cy) * math.sin(true.angle)
    v = -(xx - true.cx) * math.sin(true.angle) + (yy - true.cy) * math.cos(true.angle)
    r = np.sqrt((u / true.a) ** 2 + (v / true.b) ** 2)
    soft = 1 / (1 + np.exp((r - 1) * 40))  # smooth edge at exactly the ellipse
    px, _ = fit_mask(soft >= 0.5, None, soft)
    assert px.perimeter == pytest.approx(true.perimeter, rel=1e-3)


def test_too_small_or_empty_mask_is_an_error():
    with pytest.raises(ValueError):
        fit_mask(np.zeros((50, 50), bool))
    with pytest.raises(ValueError):
        fit_points(np.zeros((3, 2)))
    assert len(boundary_points(np.zeros((5, 5), bool))) == 0
    assert not largest_component(np.zeros((5, 5), bool)).any()


def test_dice_and_hausdorff():
    e = Ellipse.make(50, 50, 30, 20, 0.0)
    m = ellipse_mask(e, (100, 100))
    assert dice(m, m) == 1.0
    assert dice(m, np.zeros_like(m)) == 0.0
    assert hausdorff(e, e) == pytest.approx(0.0, abs=1e-9)
    moved = Ellipse.make(53, 50, 30, 20, 0.0)
    assert hausdorff(e, moved) == pytest.approx(3.0, abs=0.05)


def test_ellipse_agreement_flags_a_mask_cut_by_its_box():
    e = Ellipse.make(300, 220, 160, 120, 0.2)
    whole = ellipse_mask(e, (480, 640))
    px, _ = fit_mask(whole)
    assert ellipse_agreement(whole, px) > 0.995
    # Cut by the image border: the ellipse is compared inside the image only, so no penalty.
    cut = ellipse_mask(Ellipse.make(560, 220, 160, 120, 0.2), (480, 640))
    assert ellipse_agreement(cut, fit_mask(cut)[0]) > 0.99
    # A mask clipped by a too-small detection box (straight sides, as in HC18 753_HC).
    boxed = whole.copy()
    boxed[:, :200] = False
    boxed[:, 400:] = False
    assert ellipse_agreement(boxed, fit_mask(boxed)[0]) < 0.97


def test_numpy_geometry_matches_opencv(samples_dir):
    """geometry.py is numpy-only (it runs in 3D Slicer); where OpenCV exists it must agree with it."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for k in range(120):
        m = rng.random((40, 60)) < rng.uniform(0.3, 0.7)
        if k % 2:
            m = cv2.blur(m.astype(np.float32), (5, 5)) > 0.5  # blobs with holes
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        expected = np.zeros(m.shape, np.uint8)
        if n > 1:
            comp = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
            contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(expected, contours, -1, 1, thickness=cv2.FILLED)
        assert np.array_equal(largest_component(m), expected.astype(bool)), k
    for ring_file in sorted(samples_dir.glob("*_Annotation.png")):
        ring = cv2.imread(str(ring_file), cv2.IMREAD_GRAYSCALE) > 127
        r, c = np.nonzero(ring)
        pts = np.stack([c, r], 1).astype(float)
        origin = pts.mean(0)
        (cx, cy), (w, h), deg = cv2.fitEllipse((pts - origin).astype(np.float32))
        ours = fit_points(pts)
        assert ours.perimeter == pytest.approx(Ellipse.make(0, 0, w / 2, h / 2, 0).perimeter, rel=1e-6)
        assert (ours.cx, ours.cy) == pytest.approx((cx + origin[0], cy + origin[1]), abs=1e-3)


def test_fit_rejects_points_that_are_no_ellipse():
    with pytest.raises(ValueError, match="ellipse"):
        fit_points(np.stack([np.arange(10.0), 2 * np.arange(10.0)], 1))  # a line


def test_weighted_fit_ignores_zero_weight_points_and_equals_the_plain_fit_with_equal_weights():
    e = Ellipse.make(120.0, 90.0, 60.0, 40.0, 0.4)
    pts = e.points(64)
    wild = np.vstack([pts, [[300.0, 300.0], [10.0, 200.0]]])  # two outliers
    w = np.r_[np.ones(64), 0.0, 0.0]
    got = fit_points(wild, w)
    assert got.perimeter == pytest.approx(e.perimeter, rel=1e-9) and (got.cx, got.cy) == pytest.approx((120, 90))
    assert abs(fit_points(wild).perimeter - e.perimeter) > 1.0  # unweighted, they pull the fit
    plain, equal = fit_points(pts), fit_points(pts, np.full(64, 3.0))
    assert equal.as_dict() == pytest.approx(plain.as_dict())
    with pytest.raises(ValueError, match="one finite weight"):
        fit_points(pts, np.ones(3))
