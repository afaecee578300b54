"""HC18 challenge metrics: absolute difference (ADF) and difference (DF) of HC in mm, Dice, Hausdorff in mm."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from . import hc18
from .geometry import Ellipse, dice, ellipse_mask, hausdorff

SUBMISSION_HEADER = ["filename", "center_x_mm", "center_y_mm", "semi_axes_a_mm", "semi_axes_b_mm", "angle_rad"]


def compare(pred_mm: Ellipse | None, gt_mm: Ellipse, pred_px: Ellipse | None, gt_mask: np.ndarray) -> dict:
    """Per-image metrics. A missed head counts as HC 0 (ADF = true HC) and Dice 0, as the challenge scores it."""
    gt_hc = gt_mm.perimeter
    if pred_mm is None or pred_px is None:
        return {"hc_true_mm": gt_hc, "hc_pred_mm": 0.0, "df_mm": -gt_hc, "adf_mm": gt_hc, "dice": 0.0,
                "hausdorff_mm": math.nan, "missed": 1}
    hc = pred_mm.perimeter
    return {"hc_true_mm": gt_hc, "hc_pred_mm": hc, "df_mm": hc - gt_hc, "adf_mm": abs(hc - gt_hc),
            "dice": dice(ellipse_mask(pred_px, gt_mask.shape), gt_mask), "hausdorff_mm": hausdorff(pred_mm, gt_mm),
            "missed": 0}


def summarise(rows: list[dict]) -> dict:
    """mean, sd, median, p95 and worst of each metric (worst = max, or min for Dice)."""
    out = {"n": len(rows), "missed": int(sum(r["missed"] for r in rows))}
    for key in ("adf_mm", "df_mm", "dice", "hausdorff_mm"):
        v = np.array([r[key] for r in rows], float)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            continue
        worst = v.min() if key == "dice" else (v[np.argmax(np.abs(v))] if key == "df_mm" else v.max())
        out[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "median": float(np.median(v)),
                    "p95": float(np.percentile(v, 5 if key == "dice" else 95)), "worst": float(worst)}
    return out


def format_summary(s: dict) -> str:
    lines = [f"n = {s['n']} images, {s['missed']} without a detected head"]
    for key, label, k in (("adf_mm", "ADF (mm)", 1), ("df_mm", "DF (mm)", 1), ("dice", "Dice (%)", 100),
                          ("hausdorff_mm", "Hausdorff (mm)", 1)):
        if key in s:
            m = s[key]
            lines.append(f"{label:15s} {m['mean'] * k:7.2f} ± {m['sd'] * k:5.2f}   median {m['median'] * k:6.2f}"
                         f"   p95 {m['p95'] * k:6.2f}   worst {m['worst'] * k:6.2f}")
    return "\n".join(lines)


def read_submission(path: str | Path) -> dict[str, Ellipse | None]:
    """Ellipses (mm) by file name; a listed file with empty fields has no measurement (a miss)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(SUBMISSION_HEADER) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not an HC18 submission CSV (missing columns {sorted(missing)})")
        out = {}
        for row in reader:
            vals = [row[k] for k in SUBMISSION_HEADER[1:]]
            if any(v in ("", None) for v in vals):
                out[row["filename"]] = None
                continue
            cx, cy, a, b, ang = map(float, vals)
            out[row["filename"]] = Ellipse.make(cx, cy, a, b, ang)
    return out


def submission_row(name: str, e: Ellipse | None) -> list:
    if e is None:
        return [name, "", "", "", "", ""]
    return [name, f"{e.cx:.6f}", f"{e.cy:.6f}", f"{e.a:.6f}", f"{e.b:.6f}", f"{e.angle:.6f}"]


def evaluate_submission(pred_csv: str | Path, hc18_dir: str | Path, names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Score an HC18 submission CSV against the annotated images of ``hc18_dir``."""
    preds = read_submission(pred_csv)
    recs = [r for r in hc18.read_records(hc18_dir) if r.annotation is not None]
    wanted = set(names) if names is not None else set(preds)
    recs = [r for r in recs if r.name in wanted]
    if not recs:
        raise ValueError(f"no annotated image of {hc18_dir} is named in {pred_csv}")
    rows = []
    for r in recs:
        shape = hc18.read_grey(r.image).shape
        gt_px = hc18.gt_ellipse(r)
        sp = (r.pixel_mm, r.pixel_mm)
        pred_mm = preds.get(r.name)
        row = compare(pred_mm, gt_px.to_mm(sp), pred_mm.to_px(sp) if pred_mm else None,
                      hc18.gt_mask(r, shape))
        rows.append({"filename": r.name, **row})
    return rows, summarise(rows)
