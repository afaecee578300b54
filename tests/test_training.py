import math

import numpy as np
import pytest
import torch

from fetalhc.data import hc18_samples
from fetalhc.model import CheckpointError, build_model, count_parameters, load_model, save_checkpoint
from fetalhc.pipeline import measure_image
from fetalhc.train import TrainConfig, fit


def test_two_epoch_training_lowers_loss_saves_reloads_predicts(tiny_run, samples_dir):
    hist = tiny_run["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    model, meta = load_model(tiny_run["best_path"])
    assert meta["config"]["input_size"] == 160
    assert meta["data"]["train_images"] == 4 and meta["validation"]["n"] == 2
    s = hc18_samples(samples_dir)[0]
    m = measure_image(model, s.image, s.spacing)
    assert m.mask.shape == s.image.shape and m.mask.dtype == np.uint8
    assert m.hc_mm is None or math.isfinite(m.hc_mm)
    assert m.qc_ok or m.qc_reasons
    assert (tiny_run["last_path"]) and (tiny_run["best_path"])


def test_resume_continues_from_last_epoch(tiny_run, samples_dir, tmp_path):
    import shutil
    from pathlib import Path
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_run["last_path"]).parent, run)
    samples = hc18_samples(samples_dir)
    cfg = TrainConfig(out_dir=str(run), epochs=3, batch_size=2, input_size=160, augment=False, resume=True)
    result = fit(cfg, samples[:4], samples[4:6], show_progress=False)
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert (run / "history.csv").read_text().count("\n") == 4


def test_fine_tune_from_checkpoint_keeps_its_config(tiny_run, samples_dir, tmp_path):
    samples = hc18_samples(samples_dir)
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=1, batch_size=2, init=tiny_run["best_path"], augment=True)
    result = fit(cfg, samples[:2], [], show_progress=False)
    _, meta = load_model(result["best_path"])
    assert meta["config"]["input_size"] == 160  # from the checkpoint, not the config default


def test_slim_config_is_small_and_thesis_config_builds():
    assert 5e6 < count_parameters(build_model("mobilenet_v3_fpn")) < 9e6
    r50 = build_model("resnet50_fpn")
    assert r50.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    # Trainable normalisation everywhere: no frozen identity statistics when training from scratch.
    from torchvision.ops import FrozenBatchNorm2d
    assert not any(isinstance(mod, FrozenBatchNorm2d) for mod in r50.modules())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="not a FetalHC checkpoint"):
        load_model(other)
    good = save_checkpoint(tmp_path / "slim.pt", build_model("mobilenet_v3_fpn"), half=True)
    with pytest.raises(CheckpointError, match="holds a 'mobilenet_v3_fpn' model"):
        load_model(good, expect_config="resnet50_fpn")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_model(truncated)
    model, meta = load_model(good)  # half precision loads back as float32
    assert next(model.parameters()).dtype == torch.float32 and meta["version"].startswith("slim-")


def test_oversample_small_draws_small_heads_k_times_as_often(tmp_path):
    from fetalhc.data import SMALL_HEAD_MM, Sample, sample_hc_mm
    from fetalhc.geometry import Ellipse, ellipse_mask
    from fetalhc.io import Spacing
    from fetalhc.train import _sampler

    def sample(radius_px, spacing):
        m = ellipse_mask(Ellipse(100, 100, radius_px, radius_px * 0.8, 0.0), (200, 200)).astype(bool)
        return Sample("x", np.zeros((200, 200), np.uint8), m, spacing, "g")

    mm = Spacing(0.2, 0.2, "test")
    small, large, unknown = sample(50, mm), sample(90, mm), sample(50, None)  # ~57 mm, ~102 mm, no spacing
    assert sample_hc_mm(small) < SMALL_HEAD_MM < sample_hc_mm(large) and sample_hc_mm(unknown) is None
    samples = [small, large, unknown]
    cfg = TrainConfig(out_dir=str(tmp_path), oversample_small=3.0)
    sampler = _sampler(cfg, samples, samples, 1, 0)
    draws = [i for _ in range(400) for i in sampler]  # one epoch per pass, as the DataLoader does
    counts = np.bincount(draws, minlength=3)
    assert len(draws) == 1200 and 2.5 < counts[0] / counts[1] < 3.5 and 0.8 < counts[2] / counts[1] < 1.25
    with pytest.raises(ValueError, match="oversample_small"):
        TrainConfig(out_dir=str(tmp_path), oversample_small=0.5)
    with pytest.raises(ValueError, match="single process"):
        _sampler(cfg, samples, samples, 2, 0)


def test_train_device_gives_cuda_an_index():
    # `fetalhc train --device cuda` crashed in torch.cuda.set_device, which needs an index (found on a GPU).
    from fetalhc.train import train_device
    assert train_device("cuda", 1) == torch.device("cuda", 1)
    assert train_device("cuda:0", 3) == torch.device("cuda", 0)
    assert train_device("cpu", 2) == torch.device("cpu")
    assert train_device(None, 0) == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def test_480_config_scales_the_320_anchors_with_the_input():
    from fetalhc.model import CONFIGS
    small, large = CONFIGS["mobilenet_v3_fpn"], CONFIGS["mobilenet_v3_fpn_480"]
    k = large.input_size / small.input_size
    assert large.anchor_sizes == tuple(tuple(round(a * k) for a in lvl) for lvl in small.anchor_sizes)
    assert (large.fpn_channels, large.mask_head_layers) == (small.fpn_channels, small.mask_head_layers)


def test_combine_stages_takes_another_checkpoints_second_stage(tiny_run, default_model, tmp_path):
    from fetalhc.model import combine_stages
    out = combine_stages(tiny_run["best_path"], default_model, tmp_path / "two.pt")
    model, meta = load_model(out)
    shipped, shipped_meta = load_model(default_model)
    assert model.fetalhc_config.input_size == 160  # the tiny run's first stage ...
    assert meta["data"]["train_images"] == 4
    assert meta["refiner_data"] == shipped_meta["refiner_data"]  # ... with the shipped second stage and its provenance
    assert model.fetalhc_refiner.cfg == shipped.fetalhc_refiner.cfg
    a, b = model.fetalhc_refiner.net.state_dict(), shipped.fetalhc_refiner.net.state_dict()
    assert all(torch.equal(a[k].float(), b[k].float()) for k in b)
    with pytest.raises(CheckpointError, match="no second stage"):
        combine_stages(tiny_run["best_path"], tiny_run["best_path"], tmp_path / "none.pt")


def test_slim_resnet18_config_fits_the_size_budget_and_detects_at_three_strides():
    # The 25 MB file budget (issue 10) in float16: ResNet18's 512-wide last stage alone would break it.
    model = build_model("resnet18_slim_fpn").eval()
    assert 2 * count_parameters(model) < 21e6
    assert model.backbone.body.layer4[0].conv1.out_channels == 256
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 160, 224))
    assert [f.shape[-1] for f in feats.values()] == [28, 14, 7, 4]  # strides 8/16/32 + the max-pool level
    assert all(f.shape[1] == 128 for f in feats.values())
    with pytest.raises(ValueError, match="no ImageNet weights"):  # not silently random
        build_model("resnet18_slim_fpn", pretrained_backbone=True)
