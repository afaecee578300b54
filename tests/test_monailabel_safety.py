"""Issue 11: the server on a hospital network. Each test drives a real ``monailabel start_server`` (tokens
configured) over HTTP: nothing lost, nothing leaked, no one in who should not be.

Needs the shipped default model; the tests run in file order (the training test last, its subprocess
writes to the system temp folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import psutil
import pytest
import requests

from fetalhc import geometry, hc18
from fetalhc.dicomgen import write_us_dicom
from monailabel_support import DEFAULT_MODEL, SAMPLES, leftovers, make_studies, real_server, settled_leftovers

API, ADMIN = "user-token-0123456789abcdef", "admin-token-0123456789abcdef"
STALE_RUNS = 4  # "killed" run folders from earlier, beyond keep_runs


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    assert DEFAULT_MODEL.is_file(), f"the shipped default model {DEFAULT_MODEL} is missing: this test needs it"
    root = tmp_path_factory.mktemp("safety")
    studies = root / "studies"
    ids = make_studies(studies, n_images=8, n_final=3)
    # What a crash leaves: a half-written label copy, a stale upload folder, killed training runs.
    (studies / "labels" / "final" / f".{ids[0]}.png.x1y2.tmp").write_bytes(b"half")
    (root / "model" / "tmp" / "req-stale").mkdir(parents=True)
    (root / "model" / "tmp" / "req-stale" / "tmpupload.png").write_bytes(b"x" * 1000)
    (root / "model" / "tmp" / "not-ours.txt").write_text("an admin's file: never removed")
    for i in range(STALE_RUNS):
        (root / "model" / "runs" / f"20200101_00000{i}_000000").mkdir(parents=True)
        (root / "model" / "runs" / f"20200101_00000{i}_000000" / "last.pt").write_bytes(b"partial")
    (root / "token").write_text(ADMIN + "\n")
    env = {"FETALHC_API_TOKEN": API, "FETALHC_ADMIN_TOKEN_FILE": str(root / "token")}
    with real_server(root, studies, env=env, keep_runs=2) as s:
        s.update(ids=ids, studies=studies, root=root)
        yield s


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def call(srv, method, path, token=API, **kw):
    return requests.request(method, srv["url"] + path, headers=_h(token) if token else {}, timeout=120, **kw)


def png_bytes(pixels) -> bytes:
    return cv2.imencode(".png", np.asarray(pixels, np.uint8))[1].tobytes()


def gt_png(image_id) -> bytes:
    rec = {r.name: r for r in hc18.read_records(SAMPLES)}[f"{image_id}.png"]
    return png_bytes(hc18.gt_mask(rec))


def ellipse_png(shape=(540, 800), scale=1.0) -> bytes:
    h, w = shape
    return png_bytes(geometry.ellipse_mask(geometry.Ellipse.make(w / 2, h / 2, scale * w / 4, scale * h / 5, 0.3),
                                           (h, w)))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_documented_start_commands_bind_loopback():
    from monailabel_support import ROOT

    for readme in (ROOT / "monailabel_app" / "README.md", ROOT / "README.md", ROOT / "sample-apps" / "README.md"):
        text = readme.read_text().replace("\\\n", " ")
        commands = [line for line in text.splitlines() if "start_server" in line and "--app" in line]
        for line in commands:
            assert "--host 127.0.0.1" in line, (readme.name, line)
    assert "--host\", \"127.0.0.1\"" in (ROOT / "sample-apps" / "run_session.py").read_text()


def test_start_removes_what_a_crash_left(srv):
    assert not list((srv["studies"] / "labels" / "final").glob(".*.tmp"))
    # the stale upload folder is gone, nothing else touched (settled: the readiness probe's own folder goes
    # right after its answer)
    assert settled_leftovers(srv["tmp"]) == ["not-ours.txt"]
    (srv["tmp"] / "not-ours.txt").unlink()


def test_every_route_needs_a_token_and_admin_routes_the_admin_token(srv):
    for path in ("/info/", "/", "/docs", "/openapi.json", "/favicon.ico", "/static/favicon.ico",
                 "/datastore/?output=all", "/no/such/route"):
        r = call(srv, "GET", path, token=None)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
        assert call(srv, "GET", path, token="wrong-token-0123456789").status_code == 401, path
    assert call(srv, "GET", "/info/").status_code == 200
    assert call(srv, "GET", "/info/", token=ADMIN).status_code == 200  # the admin token works everywhere
    image = srv["ids"][0]
    admin_only = [("DELETE", f"/datastore/?id={image}"), ("DELETE", f"/datastore/image?id={image}"),
                  ("DELETE", f"/datastore/label?id={image}&tag=final"), ("GET", "/datastore/dataset"),
                  ("GET", "/logs/"), ("POST", "/train/fetal_head"), ("DELETE", "/train/"),
                  ("PUT", "/model/fetal_head"), ("GET", "/model/fetal_head"), ("POST", "/batch/infer/fetal_head")]
    for method, path in admin_only:
        r = call(srv, method, path)
        assert r.status_code == 403 and "admin token" in r.json()["detail"], (method, path, r.text)
    objects = call(srv, "GET", "/datastore/?output=all").json()["objects"]
    assert image in objects and "final" in objects[image]["labels"]  # nothing was deleted
    assert call(srv, "GET", "/logs/?lines=5", token=ADMIN).status_code == 200


def test_rejected_and_accepted_uploads_leave_nothing_behind(srv):
    before = leftovers(srv["systmp"])
    rng = np.random.default_rng(0)
    junk = b"\x89PNG\r\n\x1a\n" + rng.bytes(20 << 20)  # 20 MB of noise named .png
    good = (SAMPLES / "459_HC.png").read_bytes()
    ids = srv["ids"]
    replies = [
        call(srv, "POST", "/infer/fetal_head", files={"file": ("big.png", junk)}),
        call(srv, "POST", "/infer/fetal_head", files={"file": ("x.png", good)}, data={"params": "{not json"}),
        call(srv, "POST", "/infer/fetal_head", files={"file": ("x.png", good)},
             data={"params": json.dumps({"pixel_size_mm": 0})}),
        call(srv, "PUT", "/datastore/image?image=junk", files={"file": ("big.png", junk)}),
        call(srv, "PUT", f"/datastore/label?image={ids[1]}&tag=final", files={"label": ("l.png", junk)}),
        call(srv, "PUT", f"/datastore/label?image={ids[1]}&tag=final", files={"label": ("l.png", good)}),
        call(srv, "PUT", "/datastore/label?image=no_such&tag=final", files={"label": ("l.png", gt_png(ids[1]))}),
    ]
    assert [r.status_code for r in replies] == [413, 400, 400, 413, 413, 422, 404], [r.text for r in replies]
    assert "JSON" in replies[1].json()["detail"]
    ok = [call(srv, "POST", "/infer/fetal_head", files={"file": ("x.png", good)},
               data={"params": json.dumps({"pixel_size_mm": 0.1})}),
          call(srv, "POST", f"/infer/fetal_head?image={ids[2]}"),
          call(srv, "POST", f"/infer/fetal_head?image={ids[2]}&output=image"),
          call(srv, "GET", "/datastore/dataset", token=ADMIN)]
    assert [r.status_code for r in ok] == [200] * 4, [r.text[:200] for r in ok]
    assert ok[3].content[:2] == b"PK"  # the zip export
    assert settled_leftovers(srv["tmp"]) == []
    assert leftovers(srv["systmp"], set(before)) == []
    assert "junk" not in call(srv, "GET", "/datastore/?output=all").json()["objects"]


def test_final_label_is_validated_and_every_replaced_one_is_kept(srv, tmp_path):
    image = srv["ids"][1]
    final = srv["studies"] / "labels" / "final" / f"{image}.png"
    original = final.read_bytes()
    us = (SAMPLES / f"{image}.png").read_bytes()
    dcm = write_us_dicom(tmp_path / "us.dcm", cv2.imread(str(SAMPLES / f"{image}.png"), cv2.IMREAD_GRAYSCALE),
                         (0.1, 0.1)).read_bytes()
    two_blobs = cv2.imdecode(np.frombuffer(ellipse_png(scale=0.5), np.uint8), cv2.IMREAD_GRAYSCALE)
    cv2.circle(two_blobs, (40, 40), 15, 1, -1)
    garbage = {"all zero": ("z.png", png_bytes(np.zeros((540, 800))), "empty mask"),
               "the ultrasound image": ("us.png", us, "not a binary mask"),
               "a DICOM image": ("us.dcm", dcm, "not a binary mask"),
               "two blobs": ("b.png", png_bytes(two_blobs), "more than one region"),
               "a thin line": ("t.png", png_bytes(np.pad(np.ones((4, 600)), ((268, 268), (100, 100)))),
                               "not elliptical")}
    for what, (name, data, reason) in garbage.items():
        r = call(srv, "PUT", f"/datastore/label?image={image}&tag=final", files={"label": (name, data)})
        assert r.status_code == 422 and reason in r.json()["detail"], (what, r.status_code, r.text)
        assert final.read_bytes() == original, what
    assert call(srv, "GET", f"/datastore/label/versions?image={image}").json()["versions"] == []

    first, second = ellipse_png(scale=0.9), ellipse_png(scale=1.1)
    for data in (first, second):
        r = call(srv, "PUT", f"/datastore/label?image={image}&tag=final", files={"label": ("l.png", data)})
        assert r.status_code == 200, r.text
    assert final.read_bytes() == second
    image_mode = stat.S_IMODE((srv["studies"] / f"{image}.png").stat().st_mode)
    assert stat.S_IMODE(final.stat().st_mode) == image_mode  # not 0600
    listed = call(srv, "GET", f"/datastore/label/versions?image={image}").json()
    assert [v["sha256"] for v in listed["versions"]] == [sha(original), sha(first)]
    oldest = listed["versions"][0]["version"]
    got = call(srv, "GET", f"/datastore/label/version?image={image}&version={oldest}")
    assert got.status_code == 200 and got.content == original

    r = call(srv, "PUT", f"/datastore/label/restore?image={image}&version={oldest}")
    assert r.status_code == 200 and r.json()["restored"] == oldest, r.text
    assert final.read_bytes() == original
    listed = call(srv, "GET", f"/datastore/label/versions?image={image}").json()
    assert [v["sha256"] for v in listed["versions"]] == [sha(original), sha(first), sha(second)]  # none lost
    assert call(srv, "PUT", f"/datastore/label/restore?image={image}&version=nope").status_code == 404

    # An admin delete keeps the label too.
    assert call(srv, "DELETE", f"/datastore/label?id={image}&tag=final", token=ADMIN).status_code == 200
    assert not final.exists()
    listed = call(srv, "GET", f"/datastore/label/versions?image={image}").json()
    assert listed["versions"][-1]["sha256"] == sha(original) and listed["current"] is None


def test_infer_accepts_only_ids_and_the_request_upload(srv):
    other = srv["tmp"] / "other.png"  # readable files the server could reach by path
    other.write_bytes((SAMPLES / "459_HC.png").read_bytes())
    sys_other = srv["systmp"] / "other.png"
    sys_other.write_bytes(other.read_bytes())
    datastore_file = srv["studies"] / f"{srv['ids'][0]}.png"
    try:
        for image in (str(other), str(sys_other), str(datastore_file), str(srv["studies"] / "nothing.png"),
                      "/etc/hostname", "../studies/x", "no_such_image", str(srv["studies"] / "labels")):
            r = call(srv, "POST", f"/infer/fetal_head?output=json", params={"image": image})
            assert r.status_code == 404 and r.json()["detail"] == (
                f"unknown image id {image!r}: use an id from the datastore or upload the file"), (image, r.text)
            r = call(srv, "POST", "/infer/fetal_head?output=json", data={"params": json.dumps({"image": image})},
                     files={"file": ("x.png", b"\x89PNG")})  # an image path smuggled in the params
            assert r.status_code in (400, 404) and "hc_mm" not in r.text, (image, r.text)
    finally:
        other.unlink(missing_ok=True)
        sys_other.unlink(missing_ok=True)


def test_out_of_range_options_are_4xx(srv):
    image = srv["ids"][0]
    for params, word in [({"pixel_size_mm": 0}, "pixel_size_mm"), ({"pixel_size_mm": -1}, "pixel_size_mm"),
                         ({"device": "cuda:7"}, "unknown device"), ({"device": "tpu"}, "unknown device"),
                         ({"score_threshold": 2}, "score_threshold"), ({"ga_weeks": 0}, "ga_weeks"),
                         ({"frame": -1}, "frame"), ({"result_extension": ".exe"}, "result_extension")]:
        r = call(srv, "POST", f"/infer/fetal_head?image={image}&output=json", data={"params": json.dumps(params)})
        assert r.status_code == 400 and word in r.json()["detail"], (params, r.text)
    r = call(srv, "PUT", "/datastore/image?image=zero_spacing",
             files={"file": ("z.png", (SAMPLES / "459_HC.png").read_bytes())},
             data={"params": json.dumps({"pixel_size_mm": 0})})
    assert r.status_code == 400 and "pixel_size_mm" in r.json()["detail"], r.text
    for params, word in [({"max_epochs": 0}, "max_epochs"), ({"device": "cuda:7"}, "unknown device"),
                         ({"learning_rate": 5}, "learning_rate"), ({"val_split": 1.5}, "val_split"),
                         ({"publish": "sometimes"}, "publish"), ({"model_config": "nope"}, "model_config"),
                         ({"from_scratch": "maybe"}, "from_scratch"), ({"train_batch_size": 0}, "train_batch_size")]:
        r = call(srv, "POST", "/train/fetal_head", token=ADMIN, json=params)
        assert r.status_code == 400 and word in r.json()["detail"], (params, r.text)
    assert call(srv, "GET", "/train/").status_code == 404  # none of them started a run


def _train_processes(srv):
    return [p for p in psutil.Process(srv["proc"].pid).children(recursive=True)
            if "monailabel.interfaces.utils.app" in " ".join(p.cmdline())]


def test_one_training_at_a_time_killed_run_failed_nothing_starts_by_itself(srv):
    runs = srv["model"] / "runs"
    params = {"max_epochs": 50, "publish": "always"}
    with ThreadPoolExecutor(2) as pool:  # both sent before the first run's subprocess exists
        replies = list(pool.map(lambda _: call(srv, "POST", "/train/fetal_head", token=ADMIN, json=params), range(2)))
    assert sorted(r.status_code for r in replies) == [200, 429], [r.text for r in replies]
    job = next(r.json() for r in replies if r.status_code == 200)
    busy = next(r.json() for r in replies if r.status_code == 429)
    assert busy["job_id"] == job["id"] and job["id"] in busy["detail"]
    r = call(srv, "POST", "/train/fetal_head?enqueue=true", token=ADMIN, json=params)
    assert r.status_code == 429 and r.json()["job_id"] == job["id"]  # enqueue does not queue either

    deadline = time.time() + 120
    while call(srv, "GET", "/info/").json()["train_stats"].get("fetal_head", {}).get("status") != "RUNNING":
        assert time.time() < deadline, "training did not start"
        time.sleep(0.5)
    procs = _train_processes(srv)
    assert len(procs) == 1
    for p in procs[0].children(recursive=True) + procs:
        os.kill(p.pid, signal.SIGKILL)  # the worker dies (OOM killer, an admin's kill -9)
    deadline = time.time() + 30
    while call(srv, "GET", "/train/").json()["status"] in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert call(srv, "GET", "/train/").json()["status"] == "ERROR"
    stats = call(srv, "GET", "/info/").json()["train_stats"]["fetal_head"]
    assert stats["status"] == "ERROR" and "ended without finishing" in stats["error"]
    time.sleep(5)  # nothing was queued, so nothing starts by itself
    assert _train_processes(srv) == []
    assert [t["id"] for t in call(srv, "GET", "/train/?all=true").json()] == [job["id"]]
    assert len([p for p in runs.iterdir() if p.is_dir()]) <= 2  # keep_runs, killed runs included

    r = call(srv, "POST", "/train/fetal_head", token=ADMIN, json=params)  # the gate is open again
    assert r.status_code == 200, r.text
    deadline = time.time() + 60
    while call(srv, "GET", "/train/?check_if_running=true").status_code != 200:  # its subprocess exists
        assert time.time() < deadline
        time.sleep(0.3)
    assert call(srv, "DELETE", "/train/", token=ADMIN).json()["status"] == "STOPPED"
    assert call(srv, "GET", "/info/").json()["train_stats"]["fetal_head"]["status"] in ("STOPPED", "ERROR")
