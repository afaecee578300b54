import numpy as np
import pytest

from fetalhc.data import hc18_samples
from fetalhc.io import Spacing
from fetalhc.model import load_model
from fetalhc.uncertainty import VIEWS, measurement_uncertainty


def test_views_map_masks_back_to_the_original_orientation():
    a = np.arange(12).reshape(3, 4)
    for forward, back, swap in VIEWS.values():
        assert np.array_equal(back(forward(a)), a)
        assert forward(a).shape == (a.shape[::-1] if swap else a.shape)


def test_uncertainty_of_a_measurement(tiny_run, samples_dir):
    model, _ = load_model(tiny_run["best_path"])
    s = hc18_samples(samples_dir)[0]
    u = measurement_uncertainty(model, s.image, Spacing(0.1, 0.15, "test"))
    assert u["n_views"] == 4 and u["unit"] == "mm" and 0 <= u["dice_mean"] <= 1 and u["uncertainty"] >= 0
    assert set(u["views"]) == set(VIEWS)
    px = measurement_uncertainty(model, s.image, None, views=("identity", "hflip"))
    assert px["unit"] == "px" and px["n_views"] == 2
    with pytest.raises(ValueError):
        measurement_uncertainty(model, s.image, None, views=("identity",))
