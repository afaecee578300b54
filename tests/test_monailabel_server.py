"""End to end: ``monailabel start_server --app monailabel_app`` on loopback, driven by MONAI Label's own
Python client: info -> infer (HC vs the HC18 CSV) -> save label -> train (run_sync) -> next sample.

Needs the shipped default model models/fetalhc_default.pt, and fails (does not skip) without it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelUtils

from fetalhc import hc18
from fetalhc.io import load_image
from monailabel_support import APP, DEFAULT_MODEL, ROOT, SAMPLES, free_port, make_studies, service

HC_TOLERANCE = 0.10  # relative, one image


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert DEFAULT_MODEL.is_file(), f"the shipped default model {DEFAULT_MODEL} is missing: this test needs it"
    root = tmp_path_factory.mktemp("server")
    ids = make_studies(root / "studies", n_images=8, n_final=3)
    port = free_port()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")]),
           "MONAILABEL_PYEXE": sys.executable, "PYTHONPATH": os.pathsep.join([str(APP), str(ROOT / "lib")]),
           "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    cmd = [str(bindir / "monailabel"), "start_server", "--app", str(APP), "--studies", str(root / "studies"),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "models", "fetal_head",
           "--conf", "model_dir", str(root / "model"), "--conf", "initial_model", str(DEFAULT_MODEL)]
    url = f"http://127.0.0.1:{port}"
    with service(cmd, root / "server.log", lambda: MONAILabelClient(url).info(), 180, env):
        yield {"url": url, "ids": ids, "root": root}


def _post(url: str, selector: str, body: dict) -> dict:
    status, response, _, _ = MONAILabelUtils.http_method("POST", url, selector, body)
    assert status == 200, response
    return json.loads(response)


def test_info_infer_save_train_next_sample(server, tmp_path):
    url, ids = server["url"], server["ids"]
    client = MONAILabelClient(url, tmpdir=str(tmp_path))

    info = client.info()
    model = info["models"]["fetal_head"]
    assert (model["type"], model["dimension"], model["labels"]) == ("segmentation", 2, {"fetal_head": 1})
    assert {"hc_uncertainty", "random", "first"} <= set(info["strategies"])

    records = {Path(r.name).stem: r for r in hc18.read_records(SAMPLES)}
    image = ids[3]
    result_file, res = client.infer("fetal_head", image, {})
    expected = records[image].hc_mm
    assert res["hc_mm"] == pytest.approx(expected, rel=HC_TOLERANCE), res
    assert res["spacing_source"].startswith("pixel CSV") and res["qc_ok"] in (True, False)
    mask = load_image(result_file).pixels
    assert mask.shape == (540, 800) and mask.max() == 1

    label = tmp_path / "label.nii.gz"  # the corrected label, as a Slicer single-slice volume
    gt = hc18.gt_mask(records[image]).astype(np.uint8)
    nib.save(nib.Nifti1Image(gt.T[:, :, None].copy(), np.eye(4)), label)
    saved = client.save_label(image, str(label), tag="final")
    assert saved["label"] == image
    assert client.datastore()["objects"][image]["labels"]["final"]["ext"] == ".nii.gz"

    published = server["root"] / "model" / "fetal_head.pt"
    before = published.read_bytes()
    stats = _post(url, "/train/fetal_head?run_sync=true", {"max_epochs": 1, "train_batch_size": 2, "refiner_iters": 12})
    assert stats["epoch"] == stats["total_epochs"] == 1 and stats["total_time"] and "best_metric" in stats
    assert stats["train_images"] + stats["val_images"] == 4
    assert stats["published"] == (published.read_bytes() != before), stats["publish_reason"]

    scoring = _post(url, "/scoring/hc_uncertainty?run_sync=true", {"max_samples": 2})
    assert scoring["executed"] == 2
    objects = client.datastore()["objects"]
    scores = {k: v["image"]["info"].get("hc_uncertainty") for k, v in objects.items() if "final" not in v["labels"]}
    nxt = client.next_sample("hc_uncertainty", {})
    scored = {k: s for k, s in scores.items() if s is not None}
    assert nxt["id"] == max(scored, key=scored.get) and nxt["id"] not in ids[:4]
