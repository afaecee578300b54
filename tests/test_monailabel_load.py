"""Load and training safety: concurrent infers while MONAI Label's async train subprocess publishes a model;
a stopped training run keeps the served model and every saved label."""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from monailabel_support import app_client, make_studies, model_for_tests, wait_training

N_WORKERS = 24


@pytest.fixture
def env(tmp_path, tiny_run):
    ids = make_studies(tmp_path / "studies")
    mp = pytest.MonkeyPatch()
    client = app_client(mp, tmp_path / "studies", tmp_path / "model", model_for_tests(tiny_run),
                        train_batch_size=2)
    client.get("/info/")  # the app (and its model folder) is created on the first request
    yield {"client": client, "ids": ids, "published": tmp_path / "model" / "fetal_head.pt",
           "studies": tmp_path / "studies"}
    mp.undo()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_concurrent_infers_all_succeed_while_training_publishes(env):
    c, ids = env["client"], env["ids"]
    first = c.post(f"/infer/fetal_head?image={ids[0]}&output=json").json()["model_version"]
    r = c.post("/train/fetal_head", json={"max_epochs": 1, "publish": "always", "augment": False})
    assert r.status_code == 200 and r.json()["status"] in ("SUBMITTED", "RUNNING"), r.text

    def one(i):
        r = c.post(f"/infer/fetal_head?image={ids[i % len(ids)]}&output=json")
        return r.status_code, (r.json().get("model_version") if r.status_code == 200 else r.text)

    results, deadline = [], time.time() + 400
    with ThreadPoolExecutor(N_WORKERS) as pool:
        while time.time() < deadline:  # waves of concurrent requests until the new model is being served
            results += pool.map(one, range(len(results), len(results) + N_WORKERS))
            time.sleep(2)  # leave the training subprocess some CPU between the waves
            if c.get("/train/").json()["status"] not in ("SUBMITTED", "RUNNING") and results[-1][1] != first:
                break
    status = wait_training(c)
    assert status["status"] == "DONE", status
    assert len(results) >= 20
    assert [r for r in results if r[0] != 200] == []
    versions = [v for _, v in results]
    assert first in versions and versions[-1] != first  # old model, then the published one, no restart
    assert c.get("/info/").json()["train_stats"]["fetal_head"]["published"] is True


def test_stopped_training_keeps_the_served_model_and_the_labels(env):
    c = env["client"]
    model_before = _digest(env["published"])
    labels = sorted(p.name for p in (env["studies"] / "labels" / "final").iterdir())
    datastore_before = c.get("/datastore/?output=all").json()
    r = c.post("/train/fetal_head", json={"max_epochs": 50, "publish": "always"})
    assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while c.get("/info/").json()["train_stats"].get("fetal_head", {}).get("status") != "RUNNING":
        assert time.time() < deadline, "training did not start"
        time.sleep(0.5)
    stopped = c.delete("/train/").json()  # MONAI Label kills the train process (SIGKILL)
    assert stopped["status"] == "STOPPED"
    assert c.get("/info/").json()["train_stats"]["fetal_head"]["status"] == "STOPPED"
    assert _digest(env["published"]) == model_before
    assert sorted(p.name for p in (env["studies"] / "labels" / "final").iterdir()) == labels
    assert c.get("/datastore/?output=all").json() == datastore_before
    assert c.post(f"/infer/fetal_head?image={env['ids'][0]}&output=json").status_code == 200


def test_auto_train_after_n_new_final_labels(tmp_path, tiny_run, samples_dir):
    import cv2
    import numpy as np
    from fetalhc import hc18
    from monailabel.interfaces.utils.app import app_instance

    ids = make_studies(tmp_path / "studies", n_images=3, n_final=0)
    mp = pytest.MonkeyPatch()
    try:
        c = app_client(mp, tmp_path / "studies", tmp_path / "model", model_for_tests(tiny_run), auto_train_every=2)
        c.get("/info/")
        app_instance().server_mode(True)  # as under `monailabel start_server`: training as a subprocess
        records = {r.name: r for r in hc18.read_records(samples_dir)}
        replies = []
        for i in ids[:2]:  # the expert masks: final labels are validated as head masks
            ok, png = cv2.imencode(".png", hc18.gt_mask(records[f"{i}.png"]).astype(np.uint8))
            replies.append(c.put(f"/datastore/label?image={i}&tag=final", files={"label": ("l.png", png.tobytes())}))
        assert [r.status_code for r in replies] == [200, 200]
        assert replies[0].json()["auto_train"].startswith("1/2")
        assert replies[1].json()["auto_train"].startswith("started")
        deadline = time.time() + 60
        while c.get("/train/?check_if_running=true").status_code != 200:  # the subprocess is registered
            assert time.time() < deadline, c.get("/train/").json()
            time.sleep(0.2)
        assert c.delete("/train/").json()["status"] == "STOPPED"
    finally:
        mp.undo()
