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

import sys

import cv2
import numpy as np
import pytest
import requests

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




# A few second-stage steps per training request keep the suite fast; the full fine-tune is benchmarked.
TEST_CONF = {"refiner_iters": 12}


def app_env(studies, model_dir: Path, initial_model: Path, extra_settings: dict | None = None, **conf) -> dict:
    """Settings and environment for an in-process app (and its train/scoring subprocesses)."""
    from monailabel.config import settings

    values = {
        "MONAI_LABEL_APP_DIR": str(APP), "MONAI_LABEL_STUDIES": str(studies),
        "MONAI_LABEL_APP_CONF": {"models": "fetal_head", "model_dir": str(model_dir),
                                 "initial_model": str(initial_model),
                                 **{k: str(v) for k, v in {**TEST_CONF, **conf}.items()}},
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
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    cfg = app_env(studies, model_dir, initial_model, extra_settings, **conf)
    for k, v in cfg["settings"].items():
        mp.setattr(settings, k, v)
    for k, v in cfg["env"].items():
        mp.setenv(k, v)
    mp.syspath_prepend(str(APP))
    clear_cache()
    # A loopback client, as a workstation's own Slicer: the app serves only loopback without tokens.
    client = TestClient(app, client=("127.0.0.1", 50000))
    # The app (and its middleware: tokens, per-request temp folders) exists before the first real request,
    # as under `monailabel start_server`, which creates it at start-up.
    app_instance()
    return client


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


@contextlib.contextmanager
def real_server(root: Path, studies: Path, *, env: dict | None = None, host: str = "127.0.0.1", **conf):
    """``monailabel start_server --app monailabel_app`` on a free port, with its own TMPDIR (``root/systmp``,
    to check that nothing is left in the system temp folder) and ``model_dir`` = ``root/model``.
    Yields {"url", "proc", "model", "tmp", "systmp", "log"}; the token env (if any) goes in ``env``."""
    port = free_port()
    bindir = Path(sys.executable).parent
    systmp = root / "systmp"
    systmp.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MONAI_LABEL_", "FETALHC_"))}
    full_env.update({"PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")]), "TMPDIR": str(systmp),
                     "MONAILABEL_PYEXE": sys.executable,
                     "PYTHONPATH": os.pathsep.join([str(APP), str(ROOT / "lib")]),
                     "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
                     **(env or {})})
    conf = {"models": "fetal_head", "model_dir": str(root / "model"), "initial_model": str(DEFAULT_MODEL),
            **TEST_CONF, **conf}
    cmd = [str(bindir / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies),
           "--host", host, "--port", str(port)] + [x for k, v in conf.items() for x in ("--conf", k, str(v))]
    url = f"http://127.0.0.1:{port}"
    token = full_env.get("FETALHC_ADMIN_TOKEN") or full_env.get("FETALHC_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def ready():
        requests.get(f"{url}/info/", headers=headers, timeout=5).raise_for_status()

    with service(cmd, root / "server.log", ready, 240, full_env) as proc:
        yield {"url": url, "proc": proc, "model": root / "model", "tmp": root / "model" / "tmp",
               "systmp": systmp, "log": root / "server.log", "port": port}


def leftovers(folder: Path, before: set | None = None) -> list[str]:
    """Files and folders under ``folder`` (minus ``before``), as relative paths.

    os.walk, not rglob: the server may remove a request folder while we list it,
    and a folder that vanishes mid-walk is simply no longer a leftover."""
    found = set()
    for top, dirs, files in os.walk(folder):  # errors (vanished folders) are skipped
        found.update(os.path.relpath(os.path.join(top, n), folder) for n in dirs + files)
    return sorted(found - (before or set()))


def settled_leftovers(folder: Path, before: set | None = None, timeout: float = 10.0) -> list[str]:
    """``leftovers`` once the server has removed the folders of requests that already answered.

    The server removes a request's folder right after sending its response, so a client that has its
    answer (the readiness probe included) can still see the folder for a moment. A folder that stays
    past ``timeout`` is returned, so a real leftover still fails the test."""
    deadline = time.time() + timeout
    found = leftovers(folder, before)
    while any(p.startswith("req-") for p in found) and time.time() < deadline:
        time.sleep(0.1)
        found = leftovers(folder, before)
    return found
