"""How well the second stage recovers from a gross first-stage miss, on development images.

    .venv/bin/python benchmarks/stage2_recovery.py ../shared/hc18 --model CKPT [--model CKPT2 ...] [--out FILE]

Each image of the checkpoints' second-stage validation exams (development images neither stage trained
on; never a protocol test image) is refined from six fixed bad starts around its ground-truth ellipse
(20-35 % too small or too large, off-centre by up to 15 % of the short axis, wrong shape), the kind of
first-stage miss behind the gross errors on early heads. Per checkpoint it prints the mean HC error and
how many refinements end more than 8 mm off. The real first stage misses this badly on only a few
images in a hundred, so these starts are where a second stage's robustness can be compared at all.
Each image is also refined from its ground-truth ellipse itself: what a perfect first stage would give.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fetalhc import hc18
from fetalhc.geometry import Ellipse, fit_mask, fit_points
from fetalhc.pipeline import Measurer
from fetalhc.protocol import GROSS_MM, refiner_validation_images
from fetalhc.refine import refine_points

# (size factor, aspect factor, centre shift in x and y as fractions of the short semi-axis)
BAD_STARTS = ((0.75, 1.0, 0.0, 0.0), (1.35, 1.0, 0.0, 0.0), (0.8, 1.0, 0.15, 0.0), (1.25, 1.0, 0.0, -0.15),
              (0.85, 1.15, -0.1, 0.1), (1.2, 0.87, 0.1, 0.1))


def bad_start(gt: Ellipse, k: float, q: float, sx: float, sy: float) -> Ellipse:
    return Ellipse.make(gt.cx + sx * gt.b, gt.cy + sy * gt.b, gt.a * k * q, gt.b * k / q, gt.angle)


def hc_miss_mm(refiner, pixels, start: Ellipse, gt: Ellipse, pixel_mm: float) -> float:
    """HC error (mm) of the second stage refined from ``start`` against the ground truth ``gt``."""
    e = fit_points(refine_points(refiner, pixels, start)[0])
    return (e.perimeter - gt.perimeter) * pixel_mm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("--model", required=True, action="append", help="two-stage checkpoint (repeat to compare)")
    ap.add_argument("--out", help="JSON file for the figures")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recs = [r for r in hc18.read_records(args.hc18) if r.annotation is not None]
    names = [r.name for r in recs]
    measurers = [Measurer(p, "cpu") for p in args.model]
    try:
        chosen = set.intersection(*(set(refiner_validation_images(m.meta, names)) for m in measurers))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if any(m.model.fetalhc_refiner is None for m in measurers):
        print("every --model needs a second stage", file=sys.stderr)
        return 2
    errors = {m.version: [] for m in measurers}
    from_truth = {m.version: [] for m in measurers}
    for r in (r for r in recs if r.name in chosen):
        pixels = hc18.read_grey(r.image)
        gt = fit_mask(hc18.gt_mask(r, pixels.shape))[0]
        for m in measurers:
            ref = m.model.fetalhc_refiner
            from_truth[m.version].append(hc_miss_mm(ref, pixels, gt, gt, r.pixel_mm))
            errors[m.version] += [hc_miss_mm(ref, pixels, bad_start(gt, *b), gt, r.pixel_mm) for b in BAD_STARTS]
    report = {"images": len(chosen), "starts_per_image": len(BAD_STARTS), "models": {}}
    print(f"{len(chosen)} development validation images x {len(BAD_STARTS)} bad starts (and from the truth)")
    for version, errs in errors.items():
        a, t = np.abs(errs), np.abs(from_truth[version])
        report["models"][version] = {"adf_mm": float(a.mean()), "median_mm": float(np.median(a)),
                                     "over_8mm": int((a > GROSS_MM).sum()), "refinements": len(a),
                                     "from_truth": {"adf_mm": float(t.mean()), "p95_mm": float(np.percentile(t, 95)),
                                                    "worst_mm": float(t.max()), "over_8mm": int((t > GROSS_MM).sum())}}
        print(f"{version}: ADF {a.mean():.2f} mm, median {np.median(a):.2f}, > {GROSS_MM:.0f} mm: "
              f"{(a > GROSS_MM).sum()} of {len(a)}; from the truth: ADF {t.mean():.2f} mm, "
              f"p95 {np.percentile(t, 95):.2f}, worst {t.max():.2f}, > {GROSS_MM:.0f} mm: {(t > GROSS_MM).sum()}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
