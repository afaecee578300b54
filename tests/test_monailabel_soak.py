"""Bounded soak of a real ``monailabel start_server`` on 127.0.0.1 (no tokens: loopback only).

A fixed, seeded plan of mixed requests (good and bad infers, good and garbage final labels, reads, a
training run that publishes a model, remote clients) from a few threads, stopped at a fixed time limit.
Afterwards no file is lost (every acknowledged final label is the current one or a kept version, every
image is intact), none is left over (server temp folder, system temp folder, datastore), and the served
model is a complete one. The figures are printed (``pytest -s``) and quoted in monailabel_app/README.md.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests

from fetalhc import geometry, hc18
from fetalhc.model import load_model
from monailabel_support import DEFAULT_MODEL, SAMPLES, leftovers, make_studies, real_server, settled_leftovers

N_REQUESTS = 300
TIME_LIMIT_S = 150  # requests are sent until the plan is done or this limit is reached
TRAIN_AT = range(40, 44)  # four training requests at once: one run starts, the others get 429
WORKERS = 4
# kind: (weight, expected status)
MIX = {"infer id": (8, 200), "infer upload": (3, 200), "infer unknown id": (8, 404), "infer path": (8, 404),
       "infer corrupt upload": (8, 400), "infer bad option": (8, 400), "save final": (14, 200),
       "save garbage final": (9, 422), "save unknown image": (3, 404), "read": (24, 200),
       "remote client": (4, 403)}
EXPECTED = {**{k: s for k, (_, s) in MIX.items()}, "train": "200 once, else 429"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(pixels) -> bytes:
    return cv2.imencode(".png", np.asarray(pixels, np.uint8))[1].tobytes()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    assert DEFAULT_MODEL.is_file(), f"the shipped default model {DEFAULT_MODEL} is missing: this test needs it"
    root = tmp_path_factory.mktemp("soak")
    ids = make_studies(root / "studies", n_images=8, n_final=4)
    with real_server(root, root / "studies", train_batch_size=2) as s:
        s.update(ids=ids, studies=root / "studies")
        yield s


def _plan(ids, studies, rng: random.Random):
    records = {r.name: r for r in hc18.read_records(SAMPLES)}
    uploads = {i: (SAMPLES / f"{i}.png").read_bytes() for i in ids}
    kinds = [k for k, (w, _) in MIX.items() for _ in range(w)]
    plan = []
    for n in range(N_REQUESTS):
        kind = "train" if n in TRAIN_AT else rng.choice(kinds)
        i = rng.choice(ids)
        if kind == "train":
            req = ("POST", "/train/fetal_head", {"json": {"max_epochs": 1, "publish": "always", "augment": False}})
        elif kind == "infer id":
            req = ("POST", f"/infer/fetal_head?image={i}&output=json", {})
        elif kind == "infer upload":
            req = ("POST", "/infer/fetal_head?output=json", {"files": {"file": ("u.png", uploads[i])},
                                                              "data": {"params": '{"pixel_size_mm": 0.1}'}})
        elif kind == "infer unknown id":
            req = ("POST", f"/infer/fetal_head?image=nope_{n}", {})
        elif kind == "infer path":
            path = rng.choice([str(studies / f"{i}.png"), "/etc/hostname", f"../{i}", str(studies / "labels")])
            req = ("POST", "/infer/fetal_head", {"params": {"image": path}})
        elif kind == "infer corrupt upload":
            req = ("POST", "/infer/fetal_head", {"files": {"file": ("c.png", uploads[i][: rng.randint(100, 5000)])}})
        elif kind == "infer bad option":
            bad = rng.choice([{"pixel_size_mm": 0}, {"device": "cuda:7"}, {"score_threshold": 3}, {"ga_weeks": -2}])
            req = ("POST", f"/infer/fetal_head?image={i}", {"data": {"params": json.dumps(bad)}})
        elif kind == "save final":
            h, w = 540, 800  # a head-like ellipse, different every time
            a = rng.uniform(100, 200)
            e = geometry.Ellipse.make(w / 2 + rng.uniform(-40, 40), h / 2 + rng.uniform(-30, 30), a,
                                      a * rng.uniform(0.65, 0.95), rng.uniform(0, 3))
            data = png(geometry.ellipse_mask(e, (h, w)))
            req = ("PUT", f"/datastore/label?image={i}&tag=final",
                   {"files": {"label": ("l.png", data)}, "sha": sha(data)})
        elif kind == "save garbage final":
            data = rng.choice([png(np.zeros((540, 800))), uploads[i], png(hc18.gt_mask(records[f"{i}.png"]) * 7
                                                                          + (np.arange(800) % 3 == 0))])
            req = ("PUT", f"/datastore/label?image={i}&tag=final", {"files": {"label": ("g.png", data)}})
        elif kind == "save unknown image":
            req = ("PUT", f"/datastore/label?image=nope_{n}&tag=final",
                   {"files": {"label": ("l.png", png(hc18.gt_mask(records[f"{i}.png"])))}})
        elif kind == "read":
            labelled = rng.choice(ids[:4])  # these have a final label from the start
            paths = ["/info/", "/datastore/?output=all", f"/datastore/label?label={labelled}&tag=final",
                     f"/datastore/label/versions?image={i}", f"/datastore/image?image={i}"]
            req = ("GET", rng.choice(paths), {})
        elif kind == "remote client":  # through a reverse proxy on this host, no token configured
            req = ("GET", "/info/", {"headers": {"X-Forwarded-For": "203.0.113.7"}})
        plan.append((n, kind, i) + req)
    return plan


def _percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def test_soak_mixed_requests_nothing_lost_nothing_left_served_model_complete(srv):
    ids, studies, url = srv["ids"], srv["studies"], srv["url"]
    images_before = {i: sha((studies / f"{i}.png").read_bytes()) for i in ids}
    finals_before = {i: sha(p.read_bytes()) for i in ids if (p := studies / "labels" / "final" / f"{i}.png").exists()}
    systmp_before = set(leftovers(srv["systmp"]))
    plan = _plan(ids, studies, random.Random(11))
    results, lock = [], threading.Lock()
    t0 = time.time()

    def send(item):
        n, kind, image, method, path, kw = item
        if time.time() - t0 > TIME_LIMIT_S:
            return
        kw = dict(kw)
        digest = kw.pop("sha", None)
        start = time.perf_counter()
        try:
            r = requests.request(method, url + path, timeout=120, **kw)
            status, body = r.status_code, r.text
        except requests.RequestException as exc:
            status, body = f"{type(exc).__name__}", str(exc)
        latency = time.perf_counter() - start
        with lock:
            results.append({"n": n, "kind": kind, "image": image, "path": path, "status": status, "latency": latency,
                            "sha": digest, "body": body[:300], "end": time.time()})

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(send, plan))
    wall = time.time() - t0

    deadline = time.time() + 240  # the training run (1 epoch) must end and publish
    while (task := requests.get(f"{url}/train/", timeout=30).json()).get("status") in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline, "training did not finish"
        time.sleep(1)
    stats = requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["fetal_head"]

    # --- figures
    expected = EXPECTED
    by_kind = defaultdict(Counter)
    for r in results:
        by_kind[r["kind"]][r["status"]] += 1
    unexpected = [r for r in results if r["kind"] != "train" and r["status"] != expected[r["kind"]]]
    lat = [r["latency"] for r in results]
    infer_lat = [r["latency"] for r in results if r["kind"] in ("infer id", "infer upload")]
    tmp_left = settled_leftovers(srv["tmp"])
    sys_left = leftovers(srv["systmp"], systmp_before)
    stray = [str(p.relative_to(studies)) for p in studies.rglob("*") if p.name.endswith(".tmp")]
    print(f"\nSOAK: {len(results)}/{len(plan)} requests in {wall:.1f} s ({WORKERS} clients, limit {TIME_LIMIT_S} s), "
          f"unexpected answers: {len(unexpected)}")
    for kind in expected:
        if by_kind[kind]:
            print(f"  {kind:22s} expected {expected[kind]}: " + ", ".join(f"{s} x{c}" for s, c in sorted(
                by_kind[kind].items(), key=str)))
    print(f"  latency all: p50 {_percentile(lat, 50):.2f} s, p95 {_percentile(lat, 95):.2f} s; good infers "
          f"({len(infer_lat)}): p50 {_percentile(infer_lat, 50):.2f} s, p95 {_percentile(infer_lat, 95):.2f} s")
    print(f"  training: {task.get('status')}, published {stats.get('published')} ({stats.get('publish_reason')})")
    for r in unexpected:
        print(f"  UNEXPECTED {r['kind']}: {r['path']} -> {r['status']} {r['body'][:200]}")
    print(f"  files left over: server temp {len(tmp_left)}, system temp {len(sys_left)}, datastore .tmp {len(stray)}")

    assert len(results) >= N_REQUESTS // 2, f"only {len(results)} requests within {TIME_LIMIT_S} s"
    assert unexpected == [], [(r["kind"], r["path"], r["status"], r["body"]) for r in unexpected[:10]]
    assert task["status"] == "DONE" and stats["published"] is True, (task, stats)
    assert by_kind["train"] == Counter({200: 1, 429: len(TRAIN_AT) - 1})  # one run; the others refused, not queued

    # --- nothing lost: images intact; every acknowledged final label is the current one or a kept version
    assert {i: sha((studies / f"{i}.png").read_bytes()) for i in ids} == images_before
    objects = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    assert set(objects) == set(ids)
    for i in ids:
        acked = [r["sha"] for r in results if r["kind"] == "save final" and r["image"] == i and r["status"] == 200]
        must = set(acked) | ({finals_before[i]} if i in finals_before else set())
        folder = studies / "label_versions" / "final" / i
        kept = [sha(p.read_bytes()) for p in folder.glob("*.png")] if folder.is_dir() else []
        current = studies / "labels" / "final" / f"{i}.png"
        have = kept + ([sha(current.read_bytes())] if current.exists() else [])
        assert must <= set(have), f"{i}: lost {len(must - set(have))} acknowledged labels"
        assert len(have) == len(acked) + (i in finals_before), i  # one version per replaced label, no extras
        assert ("final" in objects[i]["labels"]) == current.exists()

    # --- nothing left over
    assert tmp_left == [] and sys_left == [] and stray == []
    label_files = {p.name for p in (studies / "labels" / "final").iterdir()}
    assert label_files == {f"{i}{o['labels']['final']['ext']}" for i, o in objects.items() if "final" in o["labels"]}

    # --- the served model is a complete one: it loads, and it is the run's checkpoint
    served = srv["model"] / "fetal_head.pt"
    load_model(served, "cpu")
    assert sha(served.read_bytes()) == sha(open(stats["candidate"], "rb").read())


def test_without_tokens_only_loopback_clients_are_served(srv):
    url = srv["url"]
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
    for path in ("/info/", "/", "/static/favicon.ico", f"/datastore/image?image={srv['ids'][0]}"):
        r = requests.get(url + path, headers={"X-Forwarded-For": "198.51.100.20"}, timeout=30)
        assert r.status_code == 403 and "loopback" in r.json()["detail"], (path, r.text)
    r = requests.delete(f"{url}/datastore/?id={srv['ids'][0]}", headers={"X-Forwarded-For": "198.51.100.20"})
    assert r.status_code == 403 and (srv["studies"] / f"{srv['ids'][0]}.png").exists()
