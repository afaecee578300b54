"""Where the second stage's QC thresholds come from: their distribution on development images.

    .venv/bin/python benchmarks/qc_calibration.py ../shared/hc18 --model CKPT [--out DIR]

``CKPT`` is a two-stage checkpoint trained under the protocol. The images are its validation exams
(development images that neither stage trained on; never protocol test images). For each QC figure of
``fetalhc.refine.refine_qc`` (stage disagreement, outline confidence, outline residual) it prints the
percentiles and the threshold rule used in ``fetalhc/refine.py``: flag what is beyond the 98th percentile
(2nd for the confidence) of these images, rounded outward — an outlier rule, because these images hold
no gross error to aim at. Also prints how many of them each rule and the whole QC flag.
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
from fetalhc.protocol import refiner_validation_images
from fetalhc.refine import MAX_OUTLINE_RESIDUAL, MAX_STAGE_CHANGE, MIN_OUTLINE_CONFIDENCE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = Measurer(args.model, "cpu")
    recs = [r for r in hc18.read_records(args.hc18) if r.annotation is not None]
    try:
        keep = set(refiner_validation_images(m.meta, [r.name for r in recs]))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    chosen = [r for r in recs if r.name in keep]
    rows = []
    for r in chosen:
        out = m.measure(hc18.read_grey(r.image), Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV"))
        if out.hc_mm is None:
            continue
        rows.append({"name": r.name, "err_mm": out.hc_mm - r.hc_mm, "qc_ok": out.qc_ok, "qc": out.qc_reasons,
                     **{k: out.extra[k] for k in ("stage_change", "outline_confidence", "outline_residual")}})
    change = np.abs([x["stage_change"] for x in rows])
    conf = np.array([x["outline_confidence"] for x in rows])
    resid = np.array([x["outline_residual"] for x in rows])
    report = {
        "images": len(rows), "errors_over_8mm": sum(abs(x["err_mm"]) > 8 for x in rows),
        "stage_change_abs": {"p50": float(np.median(change)), "p98": float(np.percentile(change, 98)),
                             "max": float(change.max()), "threshold": MAX_STAGE_CHANGE},
        "outline_confidence": {"p2": float(np.percentile(conf, 2)), "p50": float(np.median(conf)),
                               "min": float(conf.min()), "threshold": MIN_OUTLINE_CONFIDENCE},
        "outline_residual": {"p50": float(np.median(resid)), "p98": float(np.percentile(resid, 98)),
                             "max": float(resid.max()), "threshold": MAX_OUTLINE_RESIDUAL},
        "flagged": {"stage_change": int((change > MAX_STAGE_CHANGE).sum()),
                    "outline_confidence": int((conf < MIN_OUTLINE_CONFIDENCE).sum()),
                    "outline_residual": int((resid > MAX_OUTLINE_RESIDUAL).sum()),
                    "any_qc": sum(not x["qc_ok"] for x in rows)},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "qc_calibration.json").write_text(json.dumps({**report, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
