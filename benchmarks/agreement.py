"""Two checkpoints on the same unlabelled images: where their HCs differ, and what QC says about it.

    .venv/bin/python benchmarks/agreement.py ../shared/hc18 models/protocol/fetalhc_protocol.pt \
        models/fetalhc_default.pt --json agreement.json

Label-free, so it estimates no accuracy. It guards a model that no labelled image can check (one trained
on every label) against a broken or drifting run: the HC18 test set (335 images, spacing from its CSV, no
labels) measured by both. An image where both pass QC and the HCs differ by more than 8 mm holds a silent
gross error in at least one of them.
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
from fetalhc.protocol import GROSS_MM


def measure_all(measurer: Measurer, records) -> list[dict]:
    rows = []
    for r in records:
        m = measurer.measure(hc18.read_grey(r.image), Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV"))
        rows.append({"filename": r.name, "hc_mm": m.hc_mm, "qc_ok": m.qc_ok, "qc": m.qc_text,
                     "latency_s": m.latency_s})
    return rows


def compare(a: list[dict], b: list[dict]) -> dict:
    """Counts, flag rates and |HC difference| of two models' rows on the same images (``b`` against ``a``)."""
    both = [(x, y) for x, y in zip(a, b) if x["hc_mm"] is not None and y["hc_mm"] is not None]
    diff = np.array([y["hc_mm"] - x["hc_mm"] for x, y in both])
    silent = [x["filename"] for (x, y), d in zip(both, diff) if x["qc_ok"] and y["qc_ok"] and abs(d) > GROSS_MM]
    n = len(a)
    return {"images": n, "with_hc": [sum(r["hc_mm"] is not None for r in rows) for rows in (a, b)],
            "flagged_fraction": [sum(not r["qc_ok"] for r in rows) / max(n, 1) for rows in (a, b)],
            "abs_diff_median_mm": float(np.median(np.abs(diff))) if len(diff) else None,
            "abs_diff_p95_mm": float(np.percentile(np.abs(diff), 95)) if len(diff) else None,
            "diff_mean_mm": float(diff.mean()) if len(diff) else None,
            "over_8mm": int((np.abs(diff) > GROSS_MM).sum()), "over_8mm_both_qc_passed": silent,
            "latency_median_s": [float(np.median([r["latency_s"] for r in rows])) for rows in (a, b)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18", help="HC18 folder")
    ap.add_argument("reference", help="checkpoint compared against")
    ap.add_argument("candidate")
    ap.add_argument("--split", default="test", choices=("test", "training"),
                    help="which HC18 images (default: the unlabelled test set)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the summary and per-image rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = hc18.read_records(args.hc18, args.split)
    rows = {}
    for path in (args.reference, args.candidate):
        m = Measurer(path, "cpu")
        rows[path] = measure_all(m, records)
        print(f"{path} ({m.version}): {len(records)} images measured", flush=True)
    s = compare(rows[args.reference], rows[args.candidate])
    print(f"HC given: {s['with_hc'][0]} / {s['with_hc'][1]} of {s['images']}; flagged: "
          f"{100 * s['flagged_fraction'][0]:.1f} % / {100 * s['flagged_fraction'][1]:.1f} %")
    print(f"|HC candidate - HC reference|: median {s['abs_diff_median_mm']:.2f} mm, p95 {s['abs_diff_p95_mm']:.2f} mm, "
          f"mean signed {s['diff_mean_mm']:+.2f} mm; > {GROSS_MM:.0f} mm on {s['over_8mm']} images, "
          f"{len(s['over_8mm_both_qc_passed'])} with both QC-passed {s['over_8mm_both_qc_passed']}")
    print(f"pipeline latency median: {s['latency_median_s'][0]:.3f} / {s['latency_median_s'][1]:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
