"""Shared set-up for the MONAI Label app tests: a studies folder of shipped HC18 samples, and the real
FetalHC app behind FastAPI's TestClient, configured the way MONAI Label's own endpoint tests do it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "monailabel_app"
SAMPLES = ROOT / "sample-data" / "hc18"
DEFAULT_MODEL = ROOT / "models" / "fetalhc_default.pt"
HC18_CSV = "training_set_pixel_size_and_HC.csv"


def make_studies(folder: Path, n_images: int = 8, n_final: int = 4) -> list[str]:
    """PNG studies + the HC18 pixel-size CSV sidecar; ground-truth masks as final labels of the first few."""
    from fetalhc import hc18

    records = hc18.read_records(SAMPLES)[:n_images]
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for r in records:
        shutil.copy(r.image, folder / r.name)
    for r in records[:n_final]:
        cv2.imwrite(str(folder / "labels" / "final" / r.name), hc18.gt_mask(r).astype(np.uint8))
    shutil.copy(SAMPLES / HC18_CSV, folder / HC18_CSV)
    return [Path(r.name).stem for r in records]


def model_for_tests(tiny_run) -> Path:
    """The shipped default model when present; else the tiny trained run of conftest (flow still tested,
    but assertions that need a good model are skipped by the callers)."""
    return DEFAULT_MODEL if DEFAULT_MODEL.is_file() else Path(tiny_run["best_path"])




def app_env(studies, model_dir: Path, initial_model: Path, extra_settings: dict | None = None, **conf) -> dict:
    """Settings and environment for an in-process app (and its train/scoring subprocesses)."""
    from monailabel.config import settings

    values = {
        "MONAI_LABEL_APP_DIR": str(APP), "MONAI_LABEL_STUDIES": str(studies),
        "MONAI_LABEL_APP_CONF": {"models": "fetal_head", "model_dir": str(model_dir),
                                 "initial_model": str(initial_model), **{k: str(v) for k, v in conf.items()}},
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False, "MONAI_LABEL_AUTO_UPDATE_SCORING": False,
        "MONAI_LABEL_TRACKING_ENABLED": False, "MONAI_LABEL_SESSIONS": False, **(extra_settings or {}),
    }
    env = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v)
           for k, v in {**settings.model_dump(), **values}.items() if v is not None}
    env["PYTHONPATH"] = os.pathsep.join([str(APP), str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])
    return {"settings": values, "env": env}


def app_client(mp: pytest.MonkeyPatch, studies, model_dir: Path, initial_model: Path,
               extra_settings: dict | None = None, **conf):
    """TestClient on monailabel.app with the FetalHC app (no mocks); undo with ``mp.undo()``."""
    from fastapi.testclient import TestClient
    from monailabel.app import app
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    cfg = app_env(studies, model_dir, initial_model, extra_settings, **conf)
    for k, v in cfg["settings"].items():
        mp.setattr(settings, k, v)
    for k, v in cfg["env"].items():
        mp.setenv(k, v)
    mp.syspath_prepend(str(APP))
    clear_cache()
    return TestClient(app)


def wait_training(client, timeout: float = 300) -> dict:
    """Poll MONAI Label's train status until the async task ends."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get("/train/").json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(1)
    raise TimeoutError(f"training still running after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(cmd: list[str], log_path: Path, ready, timeout: float, env: dict | None = None):
    """Run a server process (own process group) until ``ready()`` stops raising; stop it afterwards."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                ready()
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
