"""The evaluation protocol: an accuracy figure only from images that chose nothing.

A fixed, exam-grouped part of the labelled HC18 images (``TEST_FRACTION`` of the examinations, drawn
with ``PROTOCOL_SEED``) is the *protocol test set*. No training run, checkpoint choice, QC threshold or
other setting may see it; everything else (the *development* images) is free for training, validation
and tuning, e.g. by exam-grouped folds (:func:`dev_folds`). Checkpoints record which exams they trained
and chose on, and :func:`seen_test_images` refuses a model that saw any protocol test image.

The report gives the HC18 challenge metrics (ADF, DF, Dice, Hausdorff), mean ± sd, median, p95 and
worst, the same by ground-truth head size, and how many gross errors (> ``GROSS_MM``) QC let through.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hc18
from .evaluate import compare, summarise
from .geometry import fit_mask
from .io import Spacing

PROTOCOL_SEED = 20261201  # fixed before any model was trained under the protocol; never change it
TEST_FRACTION = 0.2
GROSS_MM = 8.0  # an error a clinician must not miss
SIZE_BINS = ((0.0, 100.0), (100.0, 200.0), (200.0, math.inf))  # ground-truth HC, mm


@dataclass(frozen=True)
class ProtocolSplit:
    dev: list[str]  # image names free for training, validation and tuning
    test: list[str]  # image names that choose nothing

    @property
    def test_exams(self) -> set[str]:
        return {hc18.exam_of(n) for n in self.test}


def protocol_split(names: list[str]) -> ProtocolSplit:
    """The fixed exam-grouped test set among ``names`` (HC18 image names) and the development rest."""
    exams = sorted({hc18.exam_of(n) for n in names})
    random.Random(PROTOCOL_SEED).shuffle(exams)
    test_exams = set(exams[:round(len(exams) * TEST_FRACTION)])
    return ProtocolSplit([n for n in names if hc18.exam_of(n) not in test_exams],
                         [n for n in names if hc18.exam_of(n) in test_exams])


def dev_folds(dev: list[str], k: int = 5, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Exam-grouped k folds of the development images: (train, held-out) per fold."""
    if k < 2:
        raise ValueError("k-fold needs k >= 2")
    exams = sorted({hc18.exam_of(n) for n in dev})
    random.Random(seed).shuffle(exams)
    fold_of = {e: i % k for i, e in enumerate(exams)}
    return [([n for n in dev if fold_of[hc18.exam_of(n)] != f], [n for n in dev if fold_of[hc18.exam_of(n)] == f])
            for f in range(k)]


def seen_exams(meta: dict, all_names: list[str]) -> set[str] | None:
    """Exams a checkpoint trained on or was chosen on; None when its provenance is unknown.

    New checkpoints list ``train_exams`` and ``val_exams``, under ``init_data`` what the checkpoint they
    were fine-tuned from saw, and under ``pseudo_labels`` what the teacher of their pseudo-labels saw;
    ``refiner_data`` is the same for the second stage. Older ones trained on all of HC18 except
    ``val_exams``, and were chosen on ``val_exams``: every exam counts as seen.
    """
    if meta.get("refiner_data"):  # a second stage trained and validated on its own exams
        first = seen_exams({k: v for k, v in meta.items() if k != "refiner_data"}, all_names)
        second = seen_exams({"data": meta["refiner_data"]}, all_names)
        return None if first is None or second is None else first | second
    data = meta.get("data") or {}
    if "train_exams" in data:
        seen = set(data["train_exams"]) | set(data.get("val_exams", []))
    elif str(data.get("source", "")).startswith("HC18"):
        return {hc18.exam_of(n) for n in all_names}
    else:
        return None
    pseudo = data.get("pseudo_labels")
    if pseudo:  # trained on a teacher's outlines: what the teacher saw counts too
        if pseudo.get("teacher_seen_exams") is None:
            return None
        seen |= set(pseudo["teacher_seen_exams"])
    if data.get("init_data") is not None:  # fine-tuned: what the starting checkpoint saw counts too
        earlier = seen_exams({"data": data["init_data"]}, all_names)
        return None if earlier is None else seen | earlier
    return seen


def seen_test_images(meta: dict, split: ProtocolSplit) -> list[str] | None:
    seen = seen_exams(meta, split.dev + split.test)
    return None if seen is None else [n for n in split.test if hc18.exam_of(n) in seen]


def refiner_validation_images(meta: dict, names: list[str]) -> list[str]:
    """The development images a two-stage checkpoint validated its second stage on (where its settings and
    QC thresholds are chosen); never a protocol test image. Raises when the checkpoint lists none."""
    val_exams = set((meta.get("refiner_data") or {}).get("val_exams") or [])
    test = set(protocol_split(names).test)
    chosen = [n for n in names if hc18.exam_of(n) in val_exams and n not in test]
    if not chosen:
        raise ValueError("the checkpoint lists no validation exams (train it with `fetalhc train-refiner --protocol`)")
    return chosen


def measure_test_set(measurer, root: str | Path, names: list[str], score_threshold: float = 0.5,
                     progress=None) -> list[dict]:
    """Per-image metrics and QC of the pipeline (``Measurer.measure``) against HC18 ground truth."""
    keep = set(names)
    rows = []
    for r in (r for r in hc18.read_records(root) if r.name in keep and r.annotation is not None):
        img = hc18.read_grey(r.image)
        gt = hc18.gt_mask(r, img.shape)
        spacing = Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV")
        _, gt_mm = fit_mask(gt, spacing.as_tuple())
        m = measurer.measure(img, spacing, score_threshold=score_threshold)
        rows.append({"filename": r.name, "pixel_mm": r.pixel_mm, **compare(m.ellipse_mm, gt_mm, m.ellipse_px, gt),
                     "score": round(m.score, 4), "qc_ok": m.qc_ok, "qc": m.qc_text})
        if progress:
            progress(len(rows))
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """The per-image rows of an earlier run (``protocol_rows.csv``), typed as :func:`measure_test_set` gives
    them, so a report can be re-tabulated without scoring the test set again."""
    def number(v: str) -> float:
        return float(v) if v not in ("", "None") else math.nan

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"filename", "hc_true_mm", "df_mm", "adf_mm", "dice", "hausdorff_mm", "missed", "qc_ok"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{path}: not the protocol_rows.csv of `fetalhc protocol --out`")
    text = ("filename", "qc")
    return [{k: v if k in text else (v == "True" if k == "qc_ok" else (int(v) if k == "missed" else number(v)))
             for k, v in r.items()} for r in rows]


def size_bins() -> list[tuple[float, float, str]]:
    """The head-size bins of every report: (lowest HC, highest HC, label), in mm."""
    return [(lo, hi, f"< {hi:.0f} mm" if lo == 0 else (f"> {lo:.0f} mm" if hi == math.inf else f"{lo:.0f}-{hi:.0f} mm"))
            for lo, hi in SIZE_BINS]


def mean_interval(rows: list[dict], key: str, n: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % interval of the mean of ``key`` by a bootstrap over examinations (images of one exam resampled
    together: they share a fetus and a sonographer, so they are not independent)."""
    return exam_bootstrap(rows, key, None, n, seed)


def p95_interval(rows: list[dict], key: str, n: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % interval of the 95th percentile of ``key``, by the same bootstrap over examinations."""
    return exam_bootstrap(rows, key, 95.0, n, seed)


def exam_bootstrap(rows: list[dict], key: str, percentile: float | None, n: int, seed: int) -> list[float] | None:
    """2.5th and 97.5th percentiles, over ``n`` resamples of whole exams, of the mean of ``key`` (or of its
    ``percentile``-th percentile)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        v = float(r[key])
        if math.isfinite(v):
            groups.setdefault(hc18.exam_of(r["filename"]), []).append(v)
    if not groups:
        return None
    pick = np.random.default_rng(seed).integers(0, len(groups), (n, len(groups)))
    values = list(groups.values())
    if percentile is None:
        sums = np.array([sum(v) for v in values])
        counts = np.array([len(v) for v in values])
        stats = sums[pick].sum(1) / counts[pick].sum(1)
    else:
        stats = np.array([np.percentile(np.concatenate([values[i] for i in row]), percentile) for row in pick])
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def protocol_summary(rows: list[dict]) -> dict:
    """Overall and per-head-size metrics, the 95 % intervals of mean ADF and Dice and of ADF's p95, and what
    QC caught."""
    gross = [r for r in rows if r["adf_mm"] > GROSS_MM]
    flagged = [r for r in rows if not r["qc_ok"]]
    bins = {}
    for lo, hi, label in size_bins():
        sel = [r for r in rows if lo <= r["hc_true_mm"] < hi]
        bins[label] = summarise(sel) if sel else {"n": 0}
        if sel:
            bins[label]["df_median_mm"] = float(np.median([r["df_mm"] for r in sel]))
    exams = {hc18.exam_of(r["filename"]) for r in rows}
    passed = [r for r in rows if r["qc_ok"] and not r["missed"]]
    return {"overall": summarise(rows), "by_head_size": bins, "exams": len(exams),
            # what a clinician is shown without a flag; the targets stay on every image
            "qc_passed": len(passed), "qc_passed_adf_mm": summarise(passed).get("adf_mm") if passed else None,
            "adf_mean_ci95_mm": mean_interval(rows, "adf_mm"), "dice_mean_ci95": mean_interval(rows, "dice"),
            "adf_p95_ci95_mm": p95_interval(rows, "adf_mm"),
            "gross_errors": len(gross), "gross_errors_qc_passed": sum(r["qc_ok"] for r in gross),
            "qc_flagged": len(flagged), "qc_flagged_fraction": len(flagged) / max(len(rows), 1),
            "gross_files_qc_passed": [r["filename"] for r in gross if r["qc_ok"]]}


def format_table(s: dict, title: str) -> str:
    """Markdown table of a :func:`protocol_summary`."""
    o = s["overall"]
    lines = [f"### {title}", "", "| | mean ± sd | median | p95 | worst |", "|---|---|---|---|---|"]
    for key, label, k in (("adf_mm", "ADF (mm)", 1), ("df_mm", "DF (mm)", 1), ("dice", "Dice (%)", 100),
                          ("hausdorff_mm", "Hausdorff (mm)", 1)):
        if key in o:
            m = o[key]
            p = " (5th pct.)" if key == "dice" else ""
            lines.append(f"| {label} | {m['mean'] * k:.2f} ± {m['sd'] * k:.2f} | {m['median'] * k:.2f} | "
                         f"{m['p95'] * k:.2f}{p} | {m['worst'] * k:.2f} |")
    adf, dice, p95 = s.get("adf_mean_ci95_mm"), s.get("dice_mean_ci95"), s.get("adf_p95_ci95_mm")
    if adf and dice:  # how far the figures could move on other exams like these
        lines += ["", f"95 % interval of the mean, bootstrap over the {s['exams']} exams: "
                      f"ADF {adf[0]:.2f}–{adf[1]:.2f} mm, Dice {100 * dice[0]:.2f}–{100 * dice[1]:.2f} %"
                      + (f"; of ADF's p95: {p95[0]:.2f}–{p95[1]:.2f} mm." if p95 else ".")]
    lines += ["", f"{o['n']} images, {o['missed']} without a detected head; errors > {GROSS_MM:.0f} mm: "
                  f"{s['gross_errors']}, of which QC passed {s['gross_errors_qc_passed']}; QC flagged "
                  f"{s['qc_flagged']} ({100 * s['qc_flagged_fraction']:.1f} %).", ""]
    q = s.get("qc_passed_adf_mm")
    if q:
        lines += [f"ADF of the {s['qc_passed']} results QC passed (shown without a flag): {q['mean']:.2f} ± "
                  f"{q['sd']:.2f} mm, median {q['median']:.2f}, p95 {q['p95']:.2f}, worst {q['worst']:.2f}.", ""]
    lines += ["| ground-truth HC | images | ADF mean ± sd (mm) | median | p95 | worst | DF median (mm) | Dice (%) "
              "| Hausdorff (mm) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, b in s["by_head_size"].items():
        if b["n"]:
            a = b["adf_mm"]
            lines.append(f"| {label} | {b['n']} | {a['mean']:.2f} ± {a['sd']:.2f} | {a['median']:.2f} | "
                         f"{a['p95']:.2f} | {a['worst']:.2f} | {b['df_median_mm']:+.2f} | "
                         f"{100 * b['dice']['mean']:.2f} | "
                         f"{b.get('hausdorff_mm', {'mean': math.nan})['mean']:.2f} |")  # NaN: every head missed
        else:
            lines.append(f"| {label} | 0 |" + " – |" * 7)
    return "\n".join(lines) + "\n"
