"""Model-card figures for a checkpoint: validation metrics, 10 worst cases with overlays, training curves.

    .venv/bin/python scripts/model_report.py CKPT HC18_DIR --history runs/default/history.csv [runs/stage2/history.csv] \
        --out models/report

Validation = the held-out exams of the exam-grouped split recorded in the checkpoint (seed, fraction).
Writes val_predictions.csv (HC18 submission format), val_metrics.csv/json, worst/*.png, training_curves.png,
and training_history.csv (the --history files in order, epochs numbered on, a ``stage`` column: a run
fine-tuned from the previous one's checkpoint is the next stage).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fetalhc import hc18  # noqa: E402
from fetalhc.evaluate import SUBMISSION_HEADER, evaluate_submission, format_summary, submission_row  # noqa: E402
from fetalhc.io import load_image  # noqa: E402
from fetalhc.overlay import render  # noqa: E402
from fetalhc.pipeline import Measurer  # noqa: E402


def join_histories(paths: list[Path], out_csv: Path) -> list[dict]:
    rows = []
    for stage, path in enumerate(paths, 1):
        for r in csv.DictReader(open(path)):
            rows.append({"stage": stage, **r, "epoch": len(rows)})
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def plot_history(rows: list[dict], out_png: Path):
    ep = [int(r["epoch"]) + 1 for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_loss", "total"), ("train_loss_mask", "mask"), ("train_loss_classifier", "box cls"),
                       ("train_loss_objectness", "RPN obj")):
        ax[0].plot(ep, [float(r[key]) for r in rows], label=label)
    ax[0].set(title="training loss", xlabel="epoch", yscale="log")
    ax[0].legend()
    ax[1].plot(ep, [float(r["val_adf_mm"]) for r in rows], "o-")
    ax[1].set(title="validation ADF (mm)", xlabel="epoch", yscale="log")
    ax[2].plot(ep, [100 * float(r["val_dice"]) for r in rows], "o-")
    ax[2].set(title="validation Dice (%)", xlabel="epoch")
    for a in ax:
        a.grid(alpha=0.3)
        for prev, r in zip(rows, rows[1:]):  # restarts (fine-tuning stages)
            if r["stage"] != prev["stage"]:
                a.axvline(int(r["epoch"]) + 0.5, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("hc18")
    ap.add_argument("--history", nargs="+", help="history.csv of each training stage, in order")
    ap.add_argument("--out", default="models/report")
    args = ap.parse_args()
    for path in [args.checkpoint, *(args.history or [])]:
        if not Path(path).is_file():
            ap.error(f"no such file: {path}")
    out = Path(args.out)
    (out / "worst").mkdir(parents=True, exist_ok=True)
    for old in (out / "worst").glob("*.png"):  # a previous model's worst cases
        old.unlink()
    measurer = Measurer(args.checkpoint, "cpu")
    data = measurer.meta.get("data", {})
    recs = {r.name: r for r in hc18.read_records(args.hc18)}
    _, val = hc18.exam_split(sorted(recs), data.get("val_fraction", 0.2), data.get("split_seed", 0))
    csv_path = Path(args.hc18) / hc18.TRAIN_CSV
    results, t0 = {}, time.perf_counter()
    with open(out / "val_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUBMISSION_HEADER)
        for name in val:
            img = load_image(recs[name].image, pixel_csv=csv_path)
            m = measurer.measure(img.pixels, img.spacing)
            results[name] = (img, m)
            w.writerow(submission_row(name, m.ellipse_mm))
    per_image = (time.perf_counter() - t0) / len(val)
    rows, summary = evaluate_submission(out / "val_predictions.csv", args.hc18, val)
    summary.update(model=measurer.version, images=len(val), exams=len({hc18.exam_of(n) for n in val}),
                   seconds_per_image=per_image)
    with open(out / "val_metrics.csv", "w", newline="") as f:
        dw = csv.DictWriter(f, fieldnames=list(rows[0]))
        dw.writeheader()
        dw.writerows(rows)
    worst = sorted(rows, key=lambda r: -r["adf_mm"])[:10]
    summary["worst"] = [{k: r[k] for k in ("filename", "hc_true_mm", "hc_pred_mm", "adf_mm", "dice")} for r in worst]
    for r in worst:
        img, m = results[r["filename"]]
        pic = render(img.pixels, m, f"{r['filename']}  true HC {r['hc_true_mm']:.1f} mm (red)",
                     truth=hc18.gt_ellipse(recs[r["filename"]]))
        cv2.imwrite(str(out / "worst" / r["filename"]), pic)
    (out / "val_summary.json").write_text(json.dumps(summary, indent=1))
    if args.history:
        rows = join_histories([Path(h) for h in args.history], out / "training_history.csv")
        plot_history(rows, out / "training_curves.png")
    print(format_summary(summary))
    print(f"{per_image:.3f} s/image; worst: " + ", ".join(f"{r['filename']} {r['adf_mm']:.1f} mm" for r in worst))


if __name__ == "__main__":
    main()
