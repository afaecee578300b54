"""The active-learning benchmark runs end to end (tiny, on the shipped samples) and writes its report."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_active_learning_benchmark_smoke(samples_dir, tmp_path):
    out = tmp_path / "al"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "active_learning.py"), str(samples_dir), "--out", str(out),
           "--start", "3", "--step", "1", "--rounds", "1", "--epochs", "1", "--init-epochs", "1",
           "--seeds", "0", "1", "--threads", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    # Per seed: the shared start row, then one round per strategy; both seeds start from different images.
    assert [(r["seed"], r["strategy"]) for r in rows] == [
        (s, k) for s in (0, 1) for k in ("start", "hc_uncertainty", "random")]
    starts = [r["added"] for r in rows if r["strategy"] == "start"]
    assert starts[0] != starts[1] and all(len(s) == 3 for s in starts)
    assert all(r["labelled"] == 4 for r in rows if r["round"] == 1)
    assert not set(res["validation"]) & {n for r in rows for n in r["added"]}  # no validation image labelled
    assert [m["seeds"] for m in res["mean"]] == [2, 2, 2]
    assert (out / "active_learning.png").stat().st_size > 1000
    assert "mean val ADF" in (out / "results.md").read_text()


def test_agreement_benchmark_finds_silent_disagreements(samples_dir, default_model, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from agreement import compare

    a = [{"filename": f"{i}.png", "hc_mm": 150.0, "qc_ok": True, "latency_s": 0.1} for i in range(4)]
    b = [dict(r) for r in a]
    b[0]["hc_mm"], b[1]["hc_mm"], b[1]["qc_ok"], b[2]["hc_mm"] = 160.0, 170.0, False, None
    s = compare(a, b)
    assert s["with_hc"] == [4, 3] and s["flagged_fraction"] == [0.0, 0.25]
    assert s["over_8mm"] == 2 and s["over_8mm_both_qc_passed"] == ["0.png"]  # 1.png is flagged: not silent
    assert s["abs_diff_median_mm"] == 10.0

    out = tmp_path / "agreement.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "agreement.py"), str(samples_dir), str(default_model),
           str(default_model), "--split", "training", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    s = json.loads(out.read_text())["summary"]
    assert s["images"] == 8 and s["with_hc"] == [8, 8] and s["abs_diff_median_mm"] == 0.0  # a model agrees with itself
    assert "median 0.00 mm" in run.stdout


def test_shared_error_splits_what_checkpoints_share_from_what_they_do_not(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shared_error import read_runs, shared_error

    shared = [2.0, -1.0, 3.0, -4.0]  # the image's part: both checkpoints get it
    own = [0.5, 0.5, -0.5, 1.0]  # the checkpoint's part: opposite signs, so the consensus is ``shared``
    hc = [80.0, 150.0, 150.0, 250.0]

    def rows(sign):
        return [{"filename": f"{i}.png", "df_mm": s + sign * o, "hc_true_mm": h}
                for i, (s, o, h) in enumerate(zip(shared, own, hc))]

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"m0.pt: both stages + runner-up": {"rows": rows(1)},
                             "m0.pt: stage 1 alone": {"rows": rows(9)}}))
    b.write_text(json.dumps({"m0.pt: both stages + runner-up": {"rows": rows(7)},  # seen in a.json already
                             "m1.pt: both stages + runner-up": {"rows": rows(-1)}}))
    runs = read_runs([str(a), str(b)])
    assert list(runs) == ["m0.pt", "m1.pt"] and runs["m0.pt"]["0.png"]["df_mm"] == 2.5
    s = shared_error(runs)
    every = s["bins"]["all"]
    assert every["adf_consensus"] == 2.5 and every["strays"] == 0.625  # mean |shared|, mean |own|
    assert every["adf_each"] == [2.125, 2.875]
    assert s["bins"]["> 200 mm"]["images"] == 1 and s["bins"]["> 200 mm"]["adf_consensus"] == 4.0
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shared_error.py"), str(a)]  # one checkpoint: nothing to compare
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "at least two checkpoints" in run.stderr
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"m2.pt: both stages + runner-up": {"overall": {}}}))  # no per-image rows
    run = subprocess.run(cmd[:-1] + [str(a), str(old)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "no per-image rows" in run.stderr and "Traceback" not in run.stderr
