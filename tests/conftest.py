"""Shared fixtures: shipped HC18 samples (always present) and the full HC18 folder (optional)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-data" / "hc18"
SHARED_HC18 = ROOT.parent / "shared" / "hc18"
DEFAULT_MODEL = ROOT / "models" / "fetalhc_default.pt"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def shared_hc18() -> Path:
    if not (SHARED_HC18 / "training_set_pixel_size_and_HC.csv").exists():
        pytest.skip("full HC18 data not present at ../shared/hc18")
    return SHARED_HC18


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, samples_dir):
    """A real two-epoch CPU training run on four shipped images (small input size to keep CI fast)."""
    from fetalhc.data import hc18_samples
    from fetalhc.train import TrainConfig, fit

    samples = hc18_samples(samples_dir)
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(out_dir=str(out), epochs=2, batch_size=2, input_size=160, augment=False, lr=1e-3)
    result = fit(cfg, samples[:4], samples[4:6], show_progress=False)
    return result


@pytest.fixture(scope="session")
def default_model() -> Path:
    assert DEFAULT_MODEL.is_file(), f"the shipped default model {DEFAULT_MODEL} is missing"
    return DEFAULT_MODEL
