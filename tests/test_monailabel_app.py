"""The FetalHC MONAI Label app through MONAI Label's REST API (FastAPI TestClient, real app and model)."""
from __future__ import annotations

import hashlib
import json
import re

import cv2
import nibabel as nib
import nrrd
import numpy as np
import pytest
from requests_toolbelt.multipart.decoder import MultipartDecoder

from fetalhc import hc18
from fetalhc.io import load_image
from fetalhc.model import DEFAULT_CONFIG, load_model
from monailabel_support import DEFAULT_MODEL, SAMPLES, app_client, make_studies, model_for_tests

GOOD_MODEL = DEFAULT_MODEL.is_file()
needs_good_model = pytest.mark.skipif(not GOOD_MODEL, reason="needs the trained default model")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("mlapp")
    ids = make_studies(root / "studies")
    mp = pytest.MonkeyPatch()
    client = app_client(mp, root / "studies", root / "model", model_for_tests(tiny_run), max_epochs=1,
                        train_batch_size=2)
    yield {"client": client, "root": root, "ids": ids, "published": root / "model" / "fetal_head.pt"}
    mp.undo()


def infer(client, image="", params=None, file=None):
    """Default (multipart) infer response -> (result JSON, label bytes, label file name)."""
    kw = {"data": {"params": json.dumps(params or {})}}
    if file:
        kw["files"] = {"file": (file.name, file.read_bytes())}
    r = client.post(f"/infer/fetal_head?image={image}", **kw)
    assert r.status_code == 200, r.text
    parts = {re.search(rb'name="(\w+)"', p.headers[b"Content-Disposition"]).group(1).decode(): p
             for p in MultipartDecoder(r.content, r.headers["content-type"]).parts}
    name = re.search(rb'filename="([^"]+)"', parts["image"].headers[b"Content-Disposition"]).group(1).decode()
    return json.loads(parts["params"].text), parts["image"].content, name


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_info_lists_the_task_its_options_and_strategies(env):
    info = env["client"].get("/info/").json()
    m = info["models"]["fetal_head"]
    assert (m["type"], m["dimension"], m["labels"]) == ("segmentation", 2, {"fetal_head": 1})
    assert {"score_threshold", "ga_weeks", "pixel_size_mm"} <= set(m["config"])
    assert {"hc_uncertainty", "random", "first"} <= set(info["strategies"])
    assert "hc_uncertainty" in info["scoring"]
    assert {"max_epochs", "from_scratch", "publish", "multi_gpu", "gpus"} <= set(info["trainers"]["fetal_head"]["config"])
    assert info["trainers"]["fetal_head"]["config"]["model_config"] == DEFAULT_CONFIG  # from scratch: the shipped one
    assert env["published"].is_file()  # the initial model was copied into the app's model folder


def test_infer_png_from_datastore_with_csv_sidecar(env, tmp_path):
    res, label, name = infer(env["client"], "459_HC", {"ga_weeks": 20})
    for key in ("hc_mm", "ellipse_px", "ellipse_mm", "ga_weeks", "score", "qc_ok", "qc_reasons", "spacing_source",
                "model_version", "latency_s"):
        assert key in res
    assert res["spacing_source"].startswith("pixel CSV") and res["model_version"].startswith("fetal_head-")
    assert name.endswith(".png")
    (tmp_path / name).write_bytes(label)
    mask = load_image(tmp_path / name).pixels
    assert mask.shape == (540, 800) and set(np.unique(mask)) <= {0, 1}
    if GOOD_MODEL:
        expected = {r.name: r.hc_mm for r in hc18.read_records(SAMPLES)}["459_HC.png"]
        assert abs(res["hc_mm"] - expected) < 0.1 * expected, res
        assert mask.sum() > 1000 and res["centile"] is not None


def test_infer_slicer_volumes_nifti_and_nrrd_in_nrrd_out(env, tmp_path):
    img = cv2.imread(str(SAMPLES / "011_HC.png"), cv2.IMREAD_GRAYSCALE)
    nii = tmp_path / "slice.nii.gz"  # Slicer's single-slice volume: i = columns, j = rows, k = 1
    nib.save(nib.Nifti1Image(img.T[:, :, None].copy(), np.diag([0.15, 0.15, 1.0, 1.0])), nii)
    res, label, name = infer(env["client"], params={"result_extension": ".nrrd", "result_dtype": "uint8"}, file=nii)
    assert res["spacing_source"] == "NIfTI header" and res["spacing_mm"] == pytest.approx([0.15, 0.15])
    assert name.endswith(".nrrd")
    (tmp_path / name).write_bytes(label)
    assert load_image(tmp_path / name).pixels.shape == img.shape
    vol = tmp_path / "slice.nrrd"
    nrrd.write(str(vol), img.T[:, :, None].copy(), {"space directions": np.diag([0.12, 0.12, 1.0]),
                                                   "space": "left-posterior-superior"})
    res2, _, name2 = infer(env["client"], file=vol)
    assert res2["spacing_source"] == "NRRD header" and name2.endswith(".nrrd")
    if res["hc_mm"] and res2["hc_mm"]:
        assert res2["hc_mm"] == pytest.approx(res["hc_mm"] * 0.12 / 0.15, rel=1e-3)


def test_unknown_spacing_gives_pixels_and_a_reason(env, tmp_path):
    png = tmp_path / "uncalibrated.png"
    png.write_bytes((SAMPLES / "011_HC.png").read_bytes())
    res, label, _ = infer(env["client"], file=png)
    assert res["hc_mm"] is None and res["spacing_source"] is None and "pixel_size_mm" in res["spacing_reason"]
    assert "pixel spacing unknown" in res["qc"] and not res["qc_ok"]
    if GOOD_MODEL:
        assert res["hc_px"] > 100 and res["ellipse_px"] is not None
    res_mm, _, _ = infer(env["client"], params={"pixel_size_mm": 0.2}, file=png)
    if res_mm["hc_px"]:
        assert res_mm["hc_mm"] == pytest.approx(res_mm["hc_px"] * 0.2, rel=2e-3)


def test_no_head_is_an_empty_mask_and_a_qc_reason(env, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((300, 400), np.uint8))  # a blank frame
    res, label, name = infer(env["client"], params={"pixel_size_mm": 0.1}, file=blank)
    (tmp_path / name).write_bytes(label)
    assert load_image(tmp_path / name).pixels.shape == (300, 400)
    if GOOD_MODEL:
        assert res["qc_ok"] is False and "no head found" in res["qc"] and res["hc_mm"] is None
        assert load_image(tmp_path / name).pixels.max() == 0


def test_bad_input_is_4xx_and_leaves_the_datastore_intact(env, tmp_path):
    c = env["client"]
    before = c.get("/datastore/?output=all").json()
    studies = env["root"] / "studies"
    files_before = {p: digest(p) for p in studies.rglob("*") if p.is_file() and p.suffix == ".png"}
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((SAMPLES / "011_HC.png").read_bytes()[:2000])
    huge = tmp_path / "huge.png"  # a 100000 x 100000 PNG header: must be refused before decoding
    import struct
    import zlib
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100001)) + chunk(b"IEND", b""))
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.ones((10, 10), np.uint8))

    def put_image(image_id, f):
        return c.put(f"/datastore/image?image={image_id}", files={"file": (f.name, f.read_bytes())})

    def put_label(image_id, f, tag="final"):
        return c.put(f"/datastore/label?image={image_id}&tag={tag}", files={"label": (f.name, f.read_bytes())})

    cases = {
        "non-image upload": (put_image("notes", text), 415, "unsupported"),
        "non-image infer": (c.post("/infer/fetal_head?output=json", files={"file": ("n.txt", b"hello")}), 400, ""),
        "corrupt image": (put_image("corrupt", corrupt), 400, "corrupt"),
        "corrupt infer": (c.post("/infer/fetal_head", files={"file": ("c.png", corrupt.read_bytes())}), 400, "corrupt"),
        "huge image": (put_image("huge", huge), 413, "too large"),
        "huge infer": (c.post("/infer/fetal_head", files={"file": ("h.png", huge.read_bytes())}), 413, "too large"),
        "wrong-shape label": (put_label("083_2HC", small), 422, "10 x 10"),
        "label for unknown id": (put_label("no_such_image", small), 404, "unknown image id"),
        "infer unknown id": (c.post("/infer/fetal_head?image=no_such_image"), 404, "unknown image id"),
        "id with /": (put_image("a/b", small), 400, "invalid image id"),
        # infer: a path or a bad id gets the same answer as an unknown id (nothing told about what exists)
        "id with ..": (c.post("/infer/fetal_head?image=../../etc/passwd"), 404, "unknown image id"),
        "absolute path as id": (c.post("/infer/fetal_head?image=/etc/hostname"), 404, "unknown image id"),
        "label tag with /": (put_label("083_2HC", small, tag="../x"), 400, "invalid label tag"),
        "existing id": (put_image("011_HC", small), 409, "already exists"),
        "remove unknown": (c.delete("/datastore/image?id=no_such_image"), 404, "unknown image id"),
        # an unknown id must not fall back to some file of the server's working folder
        "download unknown": (c.get("/datastore/image?image=no_such_image"), 404, "Image NOT Found"),
        "download path": (c.get("/datastore/image?image=../main.py"), 400, "invalid image id"),
        "bad option": (c.post("/infer/fetal_head?image=011_HC", data={"params": '{"score_threshold": "high"}'}),
                       400, "score_threshold"),
    }
    for what, (r, status, text_in) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        assert text_in in r.json()["detail"], (what, r.text)
        assert "/tmp" not in r.json()["detail"], (what, r.text)  # no server paths in messages
    assert c.get("/datastore/?output=all").json() == before
    assert {p: digest(p) for p in studies.rglob("*") if p.is_file() and p.suffix == ".png"} == files_before


def test_upload_with_spacing_info_and_save_a_slicer_label(env, tmp_path):
    c = env["client"]
    png = tmp_path / "new_HC.png"
    png.write_bytes((SAMPLES / "083_2HC.png").read_bytes())
    r = c.put("/datastore/image?image=new_HC", files={"file": (png.name, png.read_bytes())},
              data={"params": json.dumps({"pixel_size_mm": 0.11})})
    assert r.status_code == 200 and r.json() == {"image": "new_HC"}
    res, _, _ = infer(c, "new_HC")
    assert res["spacing_source"] == "--pixel-size" and res["spacing_mm"] == [0.11, 0.11]
    rec = {r.name: r for r in hc18.read_records(SAMPLES)}["083_2HC.png"]
    label = tmp_path / "label.nrrd"  # as Slicer exports a labelmap of the single-slice volume
    nrrd.write(str(label), hc18.gt_mask(rec).astype(np.uint8).T[:, :, None].copy(), {"space": "left-posterior-superior"})
    done = c.get("/datastore/?output=stats").json()["completed"]
    r = c.put("/datastore/label?image=new_HC&tag=final", files={"label": (label.name, label.read_bytes())})
    assert r.status_code == 200, r.text
    assert c.get("/datastore/?output=stats").json()["completed"] == done + 1
    saved = env["root"] / "studies" / "labels" / "final" / "new_HC.nrrd"
    assert saved.is_file() and load_image(saved).pixels.sum() == hc18.gt_mask(rec).sum()
    nii = tmp_path / "vol_HC.nii.gz"  # a NIfTI image in the folder datastore: spacing from its header
    img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    nib.save(nib.Nifti1Image(img.T[:, :, None].copy(), np.diag([0.13, 0.13, 1.0, 1.0])), nii)
    assert c.put("/datastore/image?image=vol_HC", files={"file": (nii.name, nii.read_bytes())}).status_code == 200
    res, _, name = infer(c, "vol_HC")
    assert res["spacing_source"] == "NIfTI header" and name.endswith(".nii.gz")
    assert c.delete("/datastore/image?id=vol_HC").status_code == 200


def test_scoring_persists_uncertainty_and_strategy_serves_most_uncertain_first(env):
    c = env["client"]
    r = c.post("/scoring/hc_uncertainty?run_sync=true", json={"max_samples": 3})
    assert r.status_code == 200 and r.json()["executed"] == 3, r.text
    unlabeled = [i for i in env["ids"][4:]]
    scores = {i: c.get(f"/datastore/image/info?image={i}").json().get("hc_uncertainty") for i in unlabeled}
    scored = {i: s for i, s in scores.items() if s is not None}
    assert len(scored) == 3 and all(s >= 0 for s in scored.values())
    detail = c.get(f"/datastore/image/info?image={next(iter(scored))}").json()["hc_uncertainty_detail"]
    assert detail["n_views"] == 4 and 0 <= detail["dice_mean"] <= 1
    first = c.post("/activelearning/hc_uncertainty", json={}).json()
    assert first["id"] == max(scored, key=scored.get)
    second = c.post("/activelearning/hc_uncertainty", json={}).json()
    assert second["id"] != first["id"] and second["id"] in unlabeled
    assert c.post("/activelearning/first", json={}).json()["id"] == sorted(unlabeled)[0]
    assert c.post("/activelearning/random", json={}).json()["id"] in unlabeled


def test_sync_training_reports_progress_and_publishes_only_a_no_worse_model(env):
    c = env["client"]
    before = digest(env["published"])
    r = c.post("/train/fetal_head?run_sync=true", json={"max_epochs": 1, "augment": False})
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["epoch"] == stats["total_epochs"] == 1 and stats["total_time"] and "best_metric" in stats
    assert stats["train_images"] + stats["val_images"] == 5 and stats["status"] == "DONE"
    assert stats["stage"] == "refiner" and stats["refiner_step"] == 12  # both stages were fine-tuned
    candidate, _ = load_model(stats["candidate"])
    assert candidate.fetalhc_refiner is not None
    assert c.get("/info/").json()["train_stats"]["fetal_head"]["total_time"] == stats["total_time"]
    if stats["published"]:
        assert stats["candidate_val_adf"] <= stats["serving_val_adf"] and digest(env["published"]) != before
    else:
        assert "kept the serving model" in stats["publish_reason"] and digest(env["published"]) == before
