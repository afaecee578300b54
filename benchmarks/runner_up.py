"""The runner-up rule (``fetalhc.pipeline.measure_image``) on development images: which images it switches
and what that does to their error.

    .venv/bin/python benchmarks/runner_up.py ../shared/hc18 --model CKPT [--all-dev] [--out FILE]

By default the images are the checkpoint's validation exams (development images neither stage trained on;
never a protocol test image). ``--all-dev`` adds the development images the model trained on: more
flagged images to look at, though a model fits its training images better than new ones. The rule only
touches images whose best detection fails QC, and a switched result stays flagged, so the figures here
are about the value shown on flagged images, not about what QC lets through.
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
from fetalhc.io import Spacing
from fetalhc.pipeline import Measurer
from fetalhc.protocol import protocol_split, refiner_validation_images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("--model", required=True)
    ap.add_argument("--all-dev", action="store_true", help="all development images, trained-on ones too")
    ap.add_argument("--out", help="JSON file for the per-image rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = Measurer(args.model, "cpu")
    recs = [r for r in hc18.read_records(args.hc18) if r.annotation is not None]
    names = [r.name for r in recs]
    try:
        keep = set(protocol_split(names).dev if args.all_dev else refiner_validation_images(m.meta, names))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    rows = []
    for r in (r for r in recs if r.name in keep):
        pixels, spacing = hc18.read_grey(r.image), Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV")
        plain = m.measure(pixels, spacing, runner_up=False)
        if plain.qc_ok:  # the rule cannot change it
            rows.append({"name": r.name, "flagged": False})
            continue
        ruled = m.measure(pixels, spacing)
        err = [None if x.hc_mm is None else x.hc_mm - r.hc_mm for x in (plain, ruled)]
        rows.append({"name": r.name, "flagged": True, "hc_true_mm": r.hc_mm, "err_best_mm": err[0],
                     "err_ruled_mm": err[1], "switched": "runner_up_of" in ruled.extra, "qc_best": plain.qc_text})
    flagged = [x for x in rows if x["flagged"]]
    switched = [x for x in flagged if x["switched"]]
    for x in switched:
        print(f"{x['name']:14s} HC {x['hc_true_mm']:6.1f} mm  error {x['err_best_mm']:+7.2f} -> "
              f"{x['err_ruled_mm']:+7.2f} mm")
    summary = {"images": len(rows), "flagged": len(flagged), "switched": len(switched),
               "switched_better": sum(abs(x["err_ruled_mm"]) < abs(x["err_best_mm"]) for x in switched),
               "flagged_adf_best_mm": _adf(flagged, "err_best_mm"),
               "flagged_adf_ruled_mm": _adf(flagged, "err_ruled_mm")}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "model": m.version, "all_dev": args.all_dev, "rows": rows},
                                             indent=1))
    return 0


def _adf(rows: list[dict], key: str) -> float | None:
    errs = [abs(x[key]) for x in rows if x[key] is not None]
    return float(np.mean(errs)) if errs else None


if __name__ == "__main__":
    sys.exit(main())
