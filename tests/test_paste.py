"""Mask pasting: a mask cut from a head and pasted back lands where the head was (no size bias)."""
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import roi_align

from fetalhc.geometry import Ellipse, ellipse_mask, fit_mask
from fetalhc.model import detect, load_model, paste_mask
from fetalhc.pipeline import to_tensor
from fetalhc.transforms import make_target, resize_long_side

M = 28  # the mask head's output size


def _round_trip(true: Ellipse, shape=(540, 800)):
    """Training target of a head (roi_align on the resized mask, as torchvision cuts it) and its box."""
    gt = ellipse_mask(true, shape)
    _, small, _ = resize_long_side(np.zeros(shape, np.uint8), gt, 320)
    box = make_target(small)["boxes"]
    target = roi_align(torch.from_numpy(small.astype(np.float32))[None, None], [box], (M, M), 1.0)[0, 0]
    return gt, small.shape, box[0], target


@pytest.mark.parametrize("true", [Ellipse.make(400.3, 270.6, 210.0, 160.0, 0.4),
                                  Ellipse.make(300.8, 250.2, 90.0, 70.0, 2.1),
                                  Ellipse.make(420.5, 260.1, 330.0, 240.0, 0.0)])
def test_pasted_target_reproduces_the_head(true):
    gt, resized, box, target = _round_trip(true)
    soft = paste_mask(target, box, resized, gt.shape).numpy()
    fit, _ = fit_mask(soft >= 0.5, None, soft)
    assert fit.a == pytest.approx(true.a, abs=0.35) and fit.b == pytest.approx(true.b, abs=0.35)
    assert (fit.cx, fit.cy) == pytest.approx((true.cx, true.cy), abs=0.35)
    assert fit.perimeter == pytest.approx(true.perimeter, abs=1.5)  # pixels; 28 bins limit the rest


def test_torchvision_paste_is_biased_and_ours_is_not():
    """What the custom paste removes: torchvision's paste grows the head by about a pixel and shifts it."""
    true = Ellipse.make(400.3, 270.6, 210.0, 160.0, 0.4)
    gt, resized, box, target = _round_trip(true)
    ratio = torch.tensor([gt.shape[1] / resized[1], gt.shape[0] / resized[0]] * 2)
    tv = paste_masks_in_image(target[None, None], box[None] * ratio, gt.shape)[0, 0].numpy()
    ours = paste_mask(target, box, resized, gt.shape).numpy()
    tv_fit, _ = fit_mask(tv >= 0.5, None, tv)
    our_fit, _ = fit_mask(ours >= 0.5, None, ours)
    assert tv_fit.perimeter - true.perimeter > 1.5 > abs(our_fit.perimeter - true.perimeter)
    assert np.hypot(tv_fit.cx - true.cx, tv_fit.cy - true.cy) > 0.8 > np.hypot(our_fit.cx - true.cx, our_fit.cy - true.cy)


def test_paste_handles_a_box_at_and_beyond_the_border():
    mask = torch.ones(M, M)
    soft = paste_mask(mask, (-30.0, -20.0, 100.0, 90.0), (216, 320), (540, 800))
    assert soft.shape == (540, 800) and soft[0, 0] == pytest.approx(1.0) and soft[-1, -1] == 0
    assert paste_mask(mask, (400.0, 300.0, 420.0, 320.0), (216, 320), (540, 800)).sum() == 0  # off the image


def test_detect_matches_torchvision_forward_except_the_paste(default_model, samples_dir):
    from fetalhc.hc18 import read_grey
    model, _ = load_model(default_model)
    image = to_tensor(read_grey(samples_dir / "507_HC.png"))
    with torch.no_grad():
        ref = model([image])[0]
    ours = detect(model, image)
    assert torch.allclose(ours["scores"], ref["scores"]) and torch.allclose(ours["boxes"], ref["boxes"], atol=1e-3)
    assert ours["masks"].shape == ref["masks"].shape
