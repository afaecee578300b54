"""The second stage's inference settings, compared on development images (how they were chosen).

    .venv/bin/python benchmarks/refiner_settings.py ../shared/hc18 --model CKPT [--out DIR]

``CKPT`` is a two-stage checkpoint trained under the protocol. The images are its validation exams
(development images that neither stage trained on; never protocol test images, which this script
refuses to read). For each setting (number of passes, mirror averaging) it prints the protocol's figures
on those images; the shipped setting is the one with the lowest mean ADF here, fixed before the test set
is scored.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from fetalhc import hc18
from fetalhc.pipeline import Measurer
from fetalhc.protocol import measure_test_set, protocol_summary, refiner_validation_images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--passes", default="1,2,3")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = Measurer(args.model, "cpu")
    refiner = m.model.fetalhc_refiner
    if refiner is None:
        print(f"{args.model} has no second stage", file=sys.stderr)
        return 2
    names = [r.name for r in hc18.read_records(args.hc18) if r.annotation is not None]
    try:
        chosen = refiner_validation_images(m.meta, names)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    base = refiner.cfg
    results = []
    print(f"{len(chosen)} development validation images, model {m.version}")
    print("| passes | mirror average | ADF mean ± sd (mm) | median | p95 | worst | Dice (%) | QC flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for passes, flip in itertools.product([int(p) for p in args.passes.split(",")], (False, True)):
        refiner.cfg = replace(base, passes=passes, flip_average=flip)
        s = protocol_summary(measure_test_set(m, args.hc18, chosen))
        o = s["overall"]
        results.append({"passes": passes, "flip_average": flip, **s})
        print(f"| {passes} | {'yes' if flip else 'no'} | {o['adf_mm']['mean']:.3f} ± {o['adf_mm']['sd']:.2f} | "
              f"{o['adf_mm']['median']:.2f} | {o['adf_mm']['p95']:.2f} | {o['adf_mm']['worst']:.2f} | "
              f"{100 * o['dice']['mean']:.2f} | {100 * s['qc_flagged_fraction']:.1f} % |", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "refiner_settings.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
