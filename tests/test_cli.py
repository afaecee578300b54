"""The `fetalhc` command end to end, as a user runs it (subprocess, real files)."""
import csv
import json
import subprocess
import sys

import pytest

from fetalhc import hc18
from fetalhc.evaluate import SUBMISSION_HEADER, submission_row


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "fetalhc.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_measure_writes_table_overlay_and_submission_csv(tiny_run, samples_dir, tmp_path):
    img = samples_dir / "507_HC.png"
    code, out, err = run("measure", img, "--pixel-csv", samples_dir / "training_set_pixel_size_and_HC.csv",
                         "--model", tiny_run["best_path"], "--out", tmp_path)
    assert code == 0, err
    assert "507_HC.png" in out and "pixel CSV" in out
    rows = list(csv.reader(open(tmp_path / "predictions.csv")))
    assert rows[0] == SUBMISSION_HEADER and rows[1][0] == "507_HC.png"
    assert (tmp_path / "507_HC_overlay.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "measurements.json").read_text())
    assert res[0]["spacing_source"].startswith("pixel CSV") and res[0]["model_version"].startswith("best-")


def test_measure_refuses_millimetres_without_spacing(tiny_run, samples_dir, tmp_path):
    code, out, err = run("measure", samples_dir / "011_HC.png", "--model", tiny_run["best_path"], "--out", tmp_path)
    assert code == 1
    assert "no pixel spacing" in out and "--pixel-size" in out
    assert "Traceback" not in out + err
    code, out, _ = run("measure", samples_dir / "011_HC.png", "--pixels-only", "--model", tiny_run["best_path"],
                       "--out", tmp_path)
    assert code == 0 and "spacing" not in out.split("\n")[1].lower().replace("spacing source", "")


def test_bad_inputs_give_clear_errors_and_keep_going(tiny_run, samples_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    good = samples_dir / "399_HC.png"
    code, out, err = run("measure", bad, tmp_path / "missing.png", good, "--pixel-size", "0.14",
                         "--model", tiny_run["best_path"], "--out", tmp_path / "o")
    assert code == 1
    assert "notes.png" in out and "missing.png" in out and "ERROR" in out
    assert "Traceback" not in out + err
    assert "399_HC.png" in open(tmp_path / "o" / "predictions.csv").read()  # the good file was measured


def test_missing_or_corrupt_model_is_a_clear_error(samples_dir, tmp_path):
    code, _, err = run("measure", samples_dir / "011_HC.png", "--pixel-size", "0.1", "--model", tmp_path / "no.pt")
    assert code == 2 and "no model available" in err and "Traceback" not in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    code, _, err = run("measure", samples_dir / "011_HC.png", "--pixel-size", "0.1", "--model", junk)
    assert code == 2 and "not a readable model checkpoint" in err


def test_evaluate_scores_a_perfect_submission(samples_dir, tmp_path):
    pred = tmp_path / "pred.csv"
    with open(pred, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUBMISSION_HEADER)
        for r in hc18.read_records(samples_dir):
            sp = (r.pixel_mm, r.pixel_mm)
            w.writerow(submission_row(r.name, hc18.gt_ellipse(r).to_mm(sp)))
    code, out, err = run("evaluate", pred, samples_dir, "--out", tmp_path / "rows.csv")
    assert code == 0, err
    summary = json.loads((tmp_path / "rows.json").read_text())
    assert summary["n"] == 8 and summary["missed"] == 0
    assert summary["adf_mm"]["mean"] < 1e-3 and summary["dice"]["mean"] > 0.999
    assert summary["hausdorff_mm"]["worst"] < 0.05
    assert "ADF (mm)" in out


def test_evaluate_counts_a_missing_prediction_as_a_miss(samples_dir, tmp_path):
    pred = tmp_path / "pred.csv"
    recs = hc18.read_records(samples_dir)[:2]
    with open(pred, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUBMISSION_HEADER)
        w.writerow(submission_row(recs[0].name, hc18.gt_ellipse(recs[0]).to_mm((recs[0].pixel_mm,) * 2)))
        w.writerow(submission_row(recs[1].name, None))
    code, out, _ = run("evaluate", pred, samples_dir)
    assert code == 0 and "1 without a detected head" in out


def test_split_and_coco_commands(samples_dir, tmp_path):
    code, out, _ = run("split", samples_dir, "--val-fraction", "0.25", "--out", tmp_path / "split.json")
    assert code == 0
    split = json.loads((tmp_path / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == sorted(r.name for r in hc18.read_records(samples_dir))
    code, out, _ = run("export-coco", samples_dir, tmp_path / "coco.json")
    assert code == 0 and "8 images, 8 annotations" in out


def test_train_command_smoke(samples_dir, tmp_path):
    code, out, err = run("train", "--hc18", samples_dir, "--out", tmp_path, "--epochs", "1", "--limit", "2",
                         "--batch-size", "2", "--input-size", "128", "--no-augment")
    assert code == 0, err
    assert (tmp_path / "best.pt").exists() and (tmp_path / "history.csv").exists()
    assert "best validation ADF" in out
    code, out, err = run("train", "--hc18", samples_dir, "--out", tmp_path / "os", "--epochs", "1", "--limit", "4",
                         "--batch-size", "2", "--input-size", "128", "--no-augment", "--oversample-small", "3")
    assert code == 0, err
    from fetalhc.model import read_checkpoint
    assert read_checkpoint(tmp_path / "os" / "best.pt")["train_config"]["oversample_small"] == 3.0
    code, out, err = run("train", "--hc18", samples_dir, "--out", tmp_path / "bad", "--epochs", "1",
                         "--oversample-small", "0.5")
    assert code == 2 and "oversample_small 0.5" in err and "Traceback" not in err
    code, out, err = run("train", "--hc18", samples_dir, "--out", tmp_path / "cfg", "--config", "nosuch")
    assert code == 2 and "unknown --config 'nosuch'" in err and "mobilenet_v3_fpn_480" in err
    assert not (tmp_path / "cfg").exists()


def test_train_refiner_adds_a_second_stage_resumes_and_fine_tunes(tiny_run, samples_dir, tmp_path):
    from fetalhc.model import load_model, read_checkpoint
    from fetalhc.protocol import seen_exams

    out = tmp_path / "two_stage.pt"
    base = ["train-refiner", "--hc18", samples_dir, "--model", tiny_run["best_path"], "--out", out,
            "--batch-size", "4", "--threads", "1"]
    code, text, err = run(*base, "--iters", "4", "--span", "0.4")
    assert code == 0, err
    assert "step 4/4" in text and "both stages ->" in text
    model, meta = load_model(out)
    assert model.fetalhc_refiner is not None and meta["refiner_config"]["passes"] == 3  # the default
    assert meta["refiner_config"]["span"] == 0.4
    first = read_checkpoint(tiny_run["best_path"])["data"]
    assert meta["refiner_data"]["train_exams"] == first["train_exams"]  # the first stage's own split
    names = [r.name for r in hc18.read_records(samples_dir)]
    assert seen_exams(meta, names) >= set(first["train_exams"])
    code, text, err = run(*base, "--iters", "4", "--span", "0.4", "--resume")  # complete: nothing to redo
    assert code == 0, err
    assert "step" not in text and "both stages ->" in text
    code, text, err = run(*base, "--iters", "8", "--resume")
    assert code == 2 and "resume with the same number of steps" in err
    code, text, err = run(*base, "--iters", "4", "--resume")  # another window than the saved state's
    assert code == 2 and "resume with the same settings" in err
    code, text, err = run(*base, "--iters", "4", "--span", "1.2")
    assert code == 2 and "needs 0 < span < 1" in err and "Traceback" not in err
    code, text, err = run(*base, "--iters", "4", "--wide-fraction", "1.5")
    assert code == 2 and "wide_fraction 1.5" in err and "Traceback" not in err
    code, text, err = run(*base, "--iters", "4", "--start-spread", "0")
    assert code == 2 and "start spreads" in err and "Traceback" not in err
    code, text, err = run(*base, "--iters", "4", "--depth", "9")
    assert code == 2 and "depth 9 (2-5)" in err and "Traceback" not in err
    code, text, err = run(*base, "--iters", "4", "--radii", "1")
    assert code == 2 and "1 radii (>= 2)" in err and "Traceback" not in err
    code, text, err = run(*base, "--iters", "2", "--wide-fraction", "0.5", "--oversample-small", "2",
                          "--start-spread", "0.5", "--depth", "2", "--polar-augment", "--radii", "48",
                          "--size-weighted", "--out", tmp_path / "wide.pt")
    assert code == 0, err
    assert read_checkpoint(tmp_path / "wide.pt")["refiner"]["config"]["depth"] == 2
    assert read_checkpoint(tmp_path / "wide.pt")["refiner"]["config"]["n_radii"] == 48
    tc = read_checkpoint(tmp_path / "wide.pt")["refiner_data"]["train_config"]
    assert tc["wide_fraction"] == 0.5 and tc["oversample_small"] == 2.0 and tc["polar_augment"] and tc["size_weighted"]
    assert (tc["size_sd"], tc["aspect_sd"], tc["shift_sd"], tc["angle_sd"]) == (0.025, 0.015, 0.015, 0.05)
    code, text, err = run(*base[:4], tmp_path / "wide.pt", "--out", tmp_path / "wide_tuned.pt", "--iters", "2",
                          "--batch-size", "2")  # a fine-tune keeps the checkpoint's start recipe
    assert code == 0, err
    tuned = read_checkpoint(tmp_path / "wide_tuned.pt")
    tc = tuned["refiner_data"]["train_config"]
    assert tc["wide_fraction"] == 0.5 and tc["oversample_small"] == 2.0 and tc["iters"] == 2 and tc["size_weighted"]
    assert tuned["refiner"]["config"]["depth"] == 2 and tc["polar_augment"]  # and its network and images
    assert tc["size_sd"] == 0.025
    code, text, err = run(*base[:4], out, "--out", tmp_path / "tuned.pt", "--iters", "2", "--batch-size", "2")
    assert code == 0, err
    assert read_checkpoint(tmp_path / "tuned.pt")["refiner_data"]["init_data"]["train_images"] == 4


def test_train_refiner_with_pseudo_labels_records_the_teacher(tiny_run, samples_dir, default_model, tmp_path):
    """Unlabelled test-set images outlined by a two-stage teacher join the training; what the teacher saw
    counts as seen by the student, and a --protocol student refuses a teacher that saw protocol test exams."""
    import shutil

    from fetalhc.model import read_checkpoint
    from fetalhc.protocol import seen_exams

    root = tmp_path / "hc18"
    shutil.copytree(samples_dir, root / "training_set")
    shutil.move(root / "training_set" / hc18.TRAIN_CSV, root / hc18.TRAIN_CSV)
    (root / "test_set").mkdir()
    with open(root / hc18.TEST_CSV, "w", newline="") as f:  # two unlabelled images, as HC18's test set
        f.write("filename,pixel size(mm)\n")
        for i, name in enumerate(("507_HC.png", "011_HC.png")):
            shutil.copy(samples_dir / name, root / "test_set" / f"{i:03d}_HC.png")
            f.write(f"{i:03d}_HC.png,{hc18.read_records(samples_dir)[0].pixel_mm}\n")
    base = ["train-refiner", "--hc18", root, "--model", tiny_run["best_path"], "--iters", "2", "--batch-size", "2",
            "--threads", "1"]
    code, text, err = run(*base, "--out", tmp_path / "t.pt", "--teacher", default_model)
    assert code == 2 and "add --pseudo-labels" in err and "Traceback" not in err
    code, text, err = run(*base, "--out", tmp_path / "t.pt", "--pseudo-labels")  # tiny_run has no second stage
    assert code == 2 and "no second stage" in err and "Traceback" not in err
    code, text, err = run(*base, "--out", tmp_path / "t.pt", "--pseudo-labels", "--teacher", default_model,
                          "--protocol")
    assert code == 2 and "saw protocol test exams" in err and "Traceback" not in err
    assert not (tmp_path / "t.pt").exists()
    code, text, err = run(*base, "--out", tmp_path / "t.pt", "--pseudo-labels", "--teacher", default_model)
    assert code == 0, err
    pseudo = read_checkpoint(tmp_path / "t.pt")["refiner_data"]["pseudo_labels"]
    assert pseudo["of"] == 2 and 1 <= pseudo["images"] <= 2 and pseudo["teacher"].startswith("fetalhc_default-")
    assert f"pseudo-labels: {pseudo['images']} of 2" in err
    names = [r.name for r in hc18.read_records(root)]
    student = seen_exams(read_checkpoint(tmp_path / "t.pt"), names)
    teacher = seen_exams(read_checkpoint(default_model), names)  # all 798 images' exams
    assert teacher <= student and {hc18.exam_of(n) for n in names} <= teacher
    assert not teacher <= seen_exams(read_checkpoint(tiny_run["best_path"]), names)  # the teacher's added


def test_blend_stages_calibrates_on_the_images_the_second_stage_trained_on(samples_dir, default_model, tmp_path,
                                                                          monkeypatch, capsys):
    from fetalhc import cli, refine_train
    from fetalhc.io import load_image
    from fetalhc.model import load_model, read_checkpoint
    from fetalhc.pipeline import Measurer

    out = tmp_path / "blended.pt"
    assert cli.main(["blend-stages", str(default_model), "--hc18", str(samples_dir), "--weight", "0.3",
                     "--out", str(out)]) == 2  # 8 shipped images: too few for the median
    assert "at least 20" in capsys.readouterr().err and not out.exists()
    assert cli.main(["blend-stages", str(default_model), "--hc18", str(samples_dir), "--weight", "1.5",
                     "--out", str(out)]) == 2
    assert "stage-1 weight 1.5" in capsys.readouterr().err and not out.exists()
    code, _, err = run("train-refiner", "--hc18", samples_dir, "--model", default_model, "--out", out,
                       "--stage1-weight", "1.5")  # refused before any training
    assert code == 2 and "stage-1 weight 1.5" in err and not out.exists()
    monkeypatch.setattr(refine_train, "MIN_SCALE_IMAGES", 4)
    assert cli.main(["blend-stages", str(default_model), "--hc18", str(samples_dir), "--weight", "0.3",
                     "--out", str(out)]) == 0
    blend = read_checkpoint(out)["refiner_data"]["stage_blend"]
    assert blend["images"] == 8 and blend["weight"] == 0.3 and 0.97 < blend["scale"] < 1.03
    cfg = load_model(out)[0].fetalhc_refiner.cfg
    assert (cfg.stage1_weight, cfg.stage1_scale) == (0.3, blend["scale"])
    assert str(read_checkpoint(out)["state_dict"]["roi_heads.box_head.fc6.weight"].dtype) == "torch.float16"
    rec = hc18.read_records(samples_dir)[0]
    img = load_image(rec.image, pixel_csv=samples_dir / hc18.TRAIN_CSV)
    m = Measurer(out, "cpu").measure(img.pixels, img.spacing)
    x = m.extra
    assert m.hc_px == pytest.approx(0.7 * x["stage2_hc_px"] + 0.3 * blend["scale"] * x["stage1_hc_px"], rel=1e-3)
    plain = tmp_path / "plain.pt"
    assert cli.main(["blend-stages", str(out), "--hc18", str(samples_dir), "--weight", "0", "--out", str(plain)]) == 0
    assert Measurer(plain, "cpu").measure(img.pixels, img.spacing).hc_px == pytest.approx(x["stage2_hc_px"], abs=0.01)


def test_export_model_halves_and_drops_optimizer(tiny_run, tmp_path):
    from fetalhc.model import load_model, read_checkpoint
    code, out, err = run("export-model", tiny_run["last_path"], tmp_path / "small.pt")
    assert code == 0, err
    blob = read_checkpoint(tmp_path / "small.pt")
    assert "optimizer" not in blob and blob["state_dict"]["roi_heads.box_head.fc6.weight"].dtype.is_floating_point
    assert str(blob["state_dict"]["roi_heads.box_head.fc6.weight"].dtype) == "torch.float16"
    assert (tmp_path / "small.pt").stat().st_size < 0.6 * open(tiny_run["last_path"], "rb").seek(0, 2)
    model, meta = load_model(tmp_path / "small.pt")
    assert meta["history"] and meta["source"].startswith("last-")
    code, out, err = run("export-model", tmp_path / "small.pt", tmp_path / "again.pt")  # an exported file
    assert code == 0, err
    assert load_model(tmp_path / "again.pt")[1]["source"].startswith("small-")


def test_train_under_torchrun_ddp_on_cpu(samples_dir, tmp_path):
    """Two DDP processes (gloo on CPU) through torchrun, as multi-GPU training runs with NCCL."""
    import os
    import shutil
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "fetalhc.cli", "train", "--hc18", str(samples_dir),
                        "--out", str(tmp_path), "--epochs", "1", "--limit", "4", "--batch-size", "1",
                        "--input-size", "128", "--device", "cpu", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("best validation ADF") == 1  # rank 0 only
    assert (tmp_path / "best.pt").exists() and (tmp_path / "history.csv").read_text().count("\n") == 2
