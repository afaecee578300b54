"""The evaluation protocol: a fixed exam-grouped test set that no model may have seen."""
import csv
import json
import math
import subprocess
import sys

import pytest

from fetalhc import hc18
from fetalhc.protocol import (GROSS_MM, PROTOCOL_SEED, dev_folds, format_table, mean_interval, p95_interval,
                              protocol_split, protocol_summary, read_rows, refiner_validation_images, seen_exams,
                              seen_test_images)

NAMES = [f"{e:03d}_{k}HC.png" for e in range(1, 101) for k in ("", "2")[: 1 + e % 2]]


def test_split_is_fixed_exam_grouped_and_complete():
    a, b = protocol_split(NAMES), protocol_split(list(NAMES))
    assert a == b and sorted(a.dev + a.test) == sorted(NAMES)
    assert not a.test_exams & {hc18.exam_of(n) for n in a.dev}
    assert len(a.test_exams) == 20 and PROTOCOL_SEED == 20261201  # changing the seed would void past figures


def test_dev_folds_partition_the_development_exams():
    dev = protocol_split(NAMES).dev
    folds = dev_folds(dev, 5)
    held = [h for _, h in folds]
    assert sorted(sum(held, [])) == sorted(dev)
    for train, h in folds:
        assert not {hc18.exam_of(n) for n in train} & {hc18.exam_of(n) for n in h}
    with pytest.raises(ValueError):
        dev_folds(dev, 1)


def test_provenance_of_checkpoints():
    split = protocol_split(NAMES)
    t = sorted(split.test_exams)
    legacy = {"data": {"source": "HC18 hc18", "val_exams": t[:3]}}  # trained on the rest of HC18
    assert seen_test_images(legacy, split) == split.test
    clean = {"data": {"train_exams": ["001"], "val_exams": ["002"]}}
    assert seen_exams(clean, NAMES) == {"001", "002"}
    assert seen_test_images({"data": {"train_exams": [e for e in {hc18.exam_of(n) for n in split.dev}],
                                      "val_exams": []}}, split) == []
    assert seen_test_images({"data": {"train_exams": [t[0]], "val_exams": []}}, split)  # one test exam trained on
    assert seen_test_images({"data": {"train_exams": [], "val_exams": [t[0]]}}, split)  # chosen on it
    assert seen_test_images({"data": {"train_exams": ["001"], "val_exams": [], "init_data": legacy["data"]}},
                            split) == split.test  # fine-tuned from a model that saw everything
    assert seen_test_images({"data": {"source": "MONAI Label datastore final labels"}}, split) is None
    # a second stage trained on a teacher's pseudo-labels has seen what the teacher saw, also after a fine-tune
    taught = {"train_exams": ["001"], "val_exams": [], "pseudo_labels": {"images": 9, "teacher_seen_exams": [t[0]]}}
    clean_first = {"data": {"train_exams": ["001"], "val_exams": []}}
    assert seen_test_images({**clean_first, "refiner_data": taught}, split) == [
        n for n in split.test if hc18.exam_of(n) == t[0]]
    tuned = {"train_exams": ["001"], "val_exams": [], "init_data": taught}
    assert seen_test_images({**clean_first, "refiner_data": tuned}, split)
    unknown = {**taught, "pseudo_labels": {"images": 9, "teacher_seen_exams": None}}
    assert seen_test_images({**clean_first, "refiner_data": unknown}, split) is None


def _row(name, true, pred, qc_ok=True):
    return {"filename": name, "hc_true_mm": true, "hc_pred_mm": pred, "df_mm": pred - true, "adf_mm": abs(pred - true),
            "dice": 0.97, "hausdorff_mm": 1.0, "missed": 0, "qc_ok": qc_ok, "qc": "OK" if qc_ok else "x"}


def test_summary_counts_gross_errors_qc_passed_and_bins():
    rows = [_row("a", 80, 82), _row("b", 63, 164, qc_ok=True), _row("c", 150, 151), _row("d", 250, 262, qc_ok=False),
            _row("e", 300, 301)]
    s = protocol_summary(rows)
    assert s["gross_errors"] == 2 and s["gross_errors_qc_passed"] == 1 and s["gross_files_qc_passed"] == ["b"]
    assert s["qc_flagged"] == 1 and s["qc_flagged_fraction"] == pytest.approx(0.2)
    assert [b["n"] for b in s["by_head_size"].values()] == [2, 1, 2]
    assert s["by_head_size"]["> 200 mm"]["df_median_mm"] == pytest.approx(6.5)
    assert s["overall"]["adf_mm"]["worst"] == pytest.approx(101)
    table = format_table(s, "t")
    assert "| < 100 mm | 2 |" in table and f"errors > {GROSS_MM:.0f} mm: 2, of which QC passed 1" in table
    q = s["qc_passed_adf_mm"]  # a, b, c, e: the flagged 12 mm error of d is left out, b's 101 mm is not
    assert s["qc_passed"] == 4 and q["worst"] == pytest.approx(101) and q["mean"] == pytest.approx(26.25)
    assert "ADF of the 4 results QC passed (shown without a flag): 26.25 ± " in table and "worst 101.00." in table
    lo, hi = s["adf_mean_ci95_mm"]
    assert 1 <= lo < s["overall"]["adf_mm"]["mean"] < hi <= 101 and s["exams"] == 5
    assert s["dice_mean_ci95"] == pytest.approx([0.97, 0.97])  # every image the same: no spread
    assert f"bootstrap over the 5 exams: ADF {lo:.2f}–{hi:.2f} mm" in table
    p_lo, p_hi = s["adf_p95_ci95_mm"]
    assert p_lo <= s["overall"]["adf_mm"]["p95"] <= p_hi <= 101
    assert f"of ADF's p95: {p_lo:.2f}–{p_hi:.2f} mm" in table


def test_rows_read_back_give_the_same_report(tmp_path):
    rows = [_row("001_HC.png", 80, 82), _row("002_HC.png", 250, 262, qc_ok=False), _row("003_HC.png", 150, 151)]
    rows.append({**_row("004_HC.png", 90, 0), "hc_pred_mm": None, "adf_mm": 90.0, "df_mm": -90.0, "dice": 0.0,
                 "hausdorff_mm": math.nan, "missed": 1, "qc_ok": False})  # a missed head, as compare() gives it
    with open(tmp_path / "protocol_rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    back = read_rows(tmp_path / "protocol_rows.csv")
    assert back[1]["qc_ok"] is False and back[3]["missed"] == 1 and math.isnan(back[3]["hc_pred_mm"])
    assert json.dumps(protocol_summary(back)) == json.dumps(protocol_summary(rows))
    assert format_table(protocol_summary(back), "t") == format_table(protocol_summary(rows), "t")
    # not the rows at all, or too few of their columns
    for text in ("name,hc\n1,2\n", "filename,hc_true_mm,adf_mm,qc_ok\n001_HC.png,80,2,True\n"):
        (tmp_path / "other.csv").write_text(text)
        with pytest.raises(ValueError, match="not the protocol_rows.csv"):
            read_rows(tmp_path / "other.csv")


def test_mean_interval_resamples_whole_exams():
    # exam 001 has three images with error 10, exam 002 one with error 0: resampling images would give
    # means between 0 and 10 in quarters; resampling exams gives only 0, 7.5 (3 of 4 images) or 10.
    rows = [_row(n, 100, 100 + e) for n, e in (("001_HC.png", 10), ("001_2HC.png", 10), ("001_3HC.png", 10),
                                                 ("002_HC.png", 0))]
    lo, hi = mean_interval(rows, "adf_mm", n=4000)
    assert lo == 0.0 and hi == 10.0
    assert mean_interval(rows, "adf_mm", n=4000) == [lo, hi]  # seeded
    assert mean_interval([], "adf_mm") is None
    # the p95 of a resample is 0 (exam 002 twice) or 10 (exam 001 in it, 3 of its 4 or all images)
    assert p95_interval(rows, "adf_mm", n=4000) == [0.0, 10.0]
    assert p95_interval([], "adf_mm") is None


def run(*args):
    p = subprocess.run([sys.executable, "-m", "fetalhc.cli", "protocol", *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_cli_refuses_a_model_that_saw_the_test_images(default_model, samples_dir, tmp_path):
    code, out, err = run(samples_dir, "--model", default_model)
    assert code == 2 and "not be an accuracy estimate" in err and "Traceback" not in err
    code, out, err = run(samples_dir, "--model", default_model, "--worst", "3")  # nowhere to write them
    assert code == 2 and "give --out" in err and "Traceback" not in err
    code, out, err = run(samples_dir, "--model", default_model, "--allow-seen", "--out", tmp_path,
                         "--split-out", tmp_path / "split.json")
    assert code == 0, err
    assert "NOT an accuracy estimate" in out and "| ADF (mm) |" in out
    split = json.loads((tmp_path / "split.json").read_text())
    summary = json.loads((tmp_path / "protocol_summary.json").read_text())
    assert summary["overall"]["n"] == len(split["test"]) > 0
    assert summary["overall"]["adf_mm"]["mean"] < 3.0 and math.isfinite(summary["overall"]["dice"]["mean"])
    assert (tmp_path / "protocol_rows.csv").read_text().count("\n") == len(split["test"]) + 1


def test_cli_scores_a_model_trained_without_the_test_exams(tiny_run, samples_dir, tmp_path):
    """A checkpoint whose record shows only development exams is scored, and the table is not marked."""
    from fetalhc.model import load_model, save_checkpoint
    split = protocol_split([r.name for r in hc18.read_records(samples_dir)])
    model, _ = load_model(tiny_run["best_path"])
    dev_exams = sorted({hc18.exam_of(n) for n in split.dev})
    clean = save_checkpoint(tmp_path / "clean.pt", model, data={"train_exams": dev_exams[:-1], "val_exams": dev_exams[-1:]})
    code, out, err = run(samples_dir, "--model", clean, "--out", tmp_path / "report", "--worst", "1")
    assert code == 0, err
    assert "Protocol test set" in out and "NOT an accuracy estimate" not in out
    assert len(list((tmp_path / "report" / "worst").glob("*.jpg"))) == min(1, len(split.test))
    # re-tabulated from its rows, without the model: the same report
    first = (tmp_path / "report" / "protocol_summary.json").read_text()
    code, out2, err = run(samples_dir, "--rows", tmp_path / "report", "--out", tmp_path / "again")
    assert code == 0, err
    assert (tmp_path / "again" / "protocol_summary.json").read_text() == first and out2 == out
    code, _, err = run(samples_dir, "--rows", tmp_path / "report", "--model", clean)
    assert code == 2 and "without --model" in err and "Traceback" not in err
    lines = (tmp_path / "report" / "protocol_rows.csv").read_text().splitlines()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "protocol_rows.csv").write_text("\n".join(lines[:-1]) + "\n")  # one test image short
    code, _, err = run(samples_dir, "--rows", tmp_path / "cut")
    assert code == 2 and "does not hold the" in err and "Traceback" not in err
    leaky = save_checkpoint(tmp_path / "leaky.pt", model, data={"train_exams": dev_exams, "val_exams": [hc18.exam_of(split.test[0])]})
    code, out, err = run(samples_dir, "--model", leaky)
    assert code == 2 and f"1 of the {len(split.test)} protocol test images" in err


def test_refiner_validation_images_are_the_second_stages_exams_never_test_images():
    names = [f"{i:03d}_HC.png" for i in range(200)]
    split = protocol_split(names)
    val = [hc18.exam_of(n) for n in split.dev[:5]]
    leaked = hc18.exam_of(split.test[0])  # a record that (wrongly) lists a test exam: still never returned
    chosen = refiner_validation_images({"refiner_data": {"val_exams": val + [leaked]}}, names)
    assert chosen == [n for n in names if hc18.exam_of(n) in set(val)] and split.test[0] not in chosen
    with pytest.raises(ValueError, match="no validation exams"):
        refiner_validation_images({"data": {"val_exams": val}}, names)  # a first-stage record only
