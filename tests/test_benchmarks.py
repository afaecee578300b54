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
