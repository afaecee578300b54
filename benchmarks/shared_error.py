"""How much of the error is the model's and how much the image's: pipelines read side by side, per image.

    .venv/bin/python benchmarks/shared_error.py models/protocol/stage2_*/dev_compare.json

Reads the "both stages" rows that ``benchmarks/dev_compare.py --json`` wrote (development validation images
only), keeps each checkpoint once, and prints the correlation of their signed errors, each one's ADF, the
ADF of their per-image mean (the consensus) and how far each strays from it. Errors the pipelines share are
where more seeds, ensembles or second-stage variants cannot help; what they do not share is the part they
can. Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fetalhc.protocol import size_bins


def read_runs(paths: list[str]) -> dict[str, dict[str, dict]]:
    """checkpoint -> filename -> row, each checkpoint once (the first file that has it)."""
    runs: dict[str, dict[str, dict]] = {}
    for path in paths:
        for key, block in json.loads(Path(path).read_text()).items():
            ckpt, _, kind = key.partition(": ")
            if kind.startswith("both stages") and ckpt not in runs:
                if "rows" not in block:
                    raise ValueError(f"{path}: '{key}' has no per-image rows (written by an older dev_compare.py)")
                runs[ckpt] = {r["filename"]: r for r in block["rows"]}
    return runs


def shared_error(runs: dict[str, dict[str, dict]]) -> dict:
    """Per head-size bin: each checkpoint's ADF, the consensus's ADF and the mean |each - consensus|."""
    names = list(runs)
    files = sorted(set.intersection(*(set(r) for r in runs.values()))) if runs else []
    if len(names) < 2 or not files:
        raise ValueError("need at least two checkpoints scored on the same images")
    err = np.array([[runs[n][f]["df_mm"] for f in files] for n in names])  # (checkpoints, images), signed
    hc = np.array([runs[names[0]][f]["hc_true_mm"] for f in files])
    consensus = err.mean(0)
    bins = {}
    for lo, hi, label in [(0, np.inf, "all")] + size_bins():
        m = (hc >= lo) & (hc < hi)
        bins[label] = {"images": int(m.sum()), "adf_each": np.abs(err[:, m]).mean(1).tolist(),
                       "adf_consensus": float(np.abs(consensus[m]).mean()),
                       "strays": float(np.abs(err[:, m] - consensus[m]).mean())}
    return {"checkpoints": names, "images": len(files), "correlation": np.corrcoef(err).tolist(), "bins": bins}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="dev_compare.py --json files")
    args = ap.parse_args()
    try:
        s = shared_error(read_runs(args.json))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(f"{len(s['checkpoints'])} checkpoints, {s['images']} development validation images\n")
    for i, n in enumerate(s["checkpoints"]):
        print(f"[{i}] {n}")
    print("\ncorrelation of signed errors:")
    print("\n".join("   " + " ".join(f"{c:5.2f}" for c in row) for row in s["correlation"]))
    ids = "".join(f"{'[' + str(i) + ']':>7s}" for i in range(len(s["checkpoints"])))
    print(f"\n{'ADF (mm)':17s}{ids}  consensus  |each - consensus|")
    for label, b in s["bins"].items():
        each = "".join(f"{v:7.2f}" for v in b["adf_each"])
        print(f"{label:11s}{b['images']:4d}  {each}  {b['adf_consensus']:9.2f}  {b['strays']:17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
