"""Two-stage checkpoints side by side on the development validation images (never a protocol test image).

    .venv/bin/python benchmarks/dev_compare.py ../shared/hc18 models/protocol/fetalhc_protocol.pt runs/new/two_stage.pt

For each checkpoint: its first stage alone and the whole pipeline (second stage, runner-up rule), on the
development images that chose the shipped model's settings (the exams its second stage validated on). This
is where a candidate's rule is checked before the protocol test set is scored once.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import HEADER, Timed, table_row  # noqa: E402

from fetalhc import hc18  # noqa: E402
from fetalhc.pipeline import Measurer  # noqa: E402
from fetalhc.protocol import measure_test_set, protocol_summary, refiner_validation_images  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("models", nargs="+", help="two-stage checkpoints; the first one's validation exams are used")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the summaries and per-image rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [r.name for r in hc18.read_records(args.hc18) if r.annotation is not None]
    measurers = [Measurer(m, "cpu") for m in args.models]
    val = refiner_validation_images(measurers[0].meta, names)
    print(f"{len(val)} development validation images", flush=True)
    lines, out = list(HEADER), {}
    for path, m in zip(args.models, measurers):
        refiner = m.model.fetalhc_refiner
        for label, ref in (("stage 1 alone", None), ("both stages + runner-up", refiner)):
            m.model.fetalhc_refiner = ref
            timed = Timed(m)
            rows = measure_test_set(timed, args.hc18, val)
            s = protocol_summary(rows)
            lat = sorted(timed.latency)[len(timed.latency) // 2]
            out[f"{path}: {label}"] = {**s, "latency_median_s": lat, "rows": rows}
            lines.append(table_row(f"{path} ({m.version}): {label}", s, lat))
            print(lines[-1], flush=True)
        m.model.fetalhc_refiner = refiner
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
