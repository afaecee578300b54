"""Ablation on the evaluation protocol's test set: each step of the pipeline, its accuracy and CPU cost.

    .venv/bin/python benchmarks/ablation.py ../shared/hc18 --model CKPT --out models/protocol/ablation

``CKPT`` is a two-stage checkpoint trained under the protocol (``fetalhc train --protocol`` then
``fetalhc train-refiner --protocol``). The steps are fixed in advance, and every setting in them was
chosen on development images; this script only reports them on the test set (it refuses a model that
saw any test exam). Rows: the first stage alone; with the second stage, one pass, then each further pass
up to the checkpoint's own setting; then the shipped pipeline, which adds the runner-up rule
(``fetalhc.pipeline.measure_image``). Latency is the pipeline's own (image in memory -> HC)
on ``--threads`` threads.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fetalhc import hc18
from fetalhc.pipeline import Measurer
from fetalhc.protocol import measure_test_set, protocol_split, protocol_summary, seen_test_images


HEADER = ("| step | ADF mean ± sd (mm) | median | p95 | worst | DF mean | Dice (%) | HD (mm) | > 8 mm (QC passed) "
          "| QC flagged | latency median (s) |", "|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(label: str, s: dict, latency_s: float) -> str:
    """One ablation row from a :func:`fetalhc.protocol.protocol_summary` and the median latency."""
    o = s["overall"]
    hd = f"{o['hausdorff_mm']['mean']:.2f}" if "hausdorff_mm" in o else "–"  # absent when every head was missed
    return (f"| {label} | {o['adf_mm']['mean']:.2f} ± {o['adf_mm']['sd']:.2f} | {o['adf_mm']['median']:.2f} | "
            f"{o['adf_mm']['p95']:.2f} | {o['adf_mm']['worst']:.2f} | {o['df_mm']['mean']:+.2f} | "
            f"{100 * o['dice']['mean']:.2f} | {hd} | {s['gross_errors']} "
            f"({s['gross_errors_qc_passed']}) | {100 * s['qc_flagged_fraction']:.1f} % | {latency_s:.3f} |")


class Timed:
    """A Measurer that keeps each measurement's pipeline latency."""

    def __init__(self, measurer, **options):
        self.m, self.latency, self.options = measurer, [], options

    def measure(self, *a, **kw):
        out = self.m.measure(*a, **kw, **self.options)
        self.latency.append(out.latency_s)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [r.name for r in hc18.read_records(args.hc18) if r.annotation is not None]
    split = protocol_split(names)
    measurer = Measurer(args.model, "cpu")
    seen = seen_test_images(measurer.meta, split)
    if seen is None or seen:
        print(f"refused: {args.model} saw protocol test images or has no provenance", file=sys.stderr)
        return 2
    refiner = measurer.model.fetalhc_refiner
    if refiner is None:
        print(f"{args.model} has no second stage", file=sys.stderr)
        return 2
    shipped = refiner.cfg.passes
    steps = [("stage 1: Mask R-CNN + ellipse fit (exact mask paste)", None, False),
             ("+ stage 2: polar outline refiner, 1 pass", 1, False)]
    steps += [(f"+ stage 2, {p} passes", p, False) for p in range(2, shipped + 1)]
    steps += [("+ runner-up detection when the best fails QC (shipped)", shipped, True)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = list(HEADER)
    results = {}
    for label, passes, runner_up in steps:
        if passes is not None:
            refiner.cfg = replace(refiner.cfg, passes=passes)
        measurer.model.fetalhc_refiner = None if passes is None else refiner
        timed = Timed(measurer, runner_up=runner_up)
        rows = measure_test_set(timed, args.hc18, split.test)
        s = protocol_summary(rows)
        lat = float(np.median(timed.latency))
        results[label] = {**s, "latency_median_s": lat}
        lines.append(table_row(label, s, lat))
        with open(out / f"rows_{len(results)}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(lines[-1], flush=True)
    table = (f"Protocol test set: {len(split.test)} images of {len(split.test_exams)} exams, model "
             f"{measurer.version}\n\n" + "\n".join(lines) + "\n")
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
