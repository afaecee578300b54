"""One-off, development images only: the shipped stage 2 (F), a wide-start one (W), the mean of their per-ray
distributions, and a first pass with W then two with F; each from the real stage-1 ellipse (dev-val ADF)
and from benchmarks/stage2_recovery.py's bad starts. Run from the repo root:

    .venv/bin/python models/protocol/stage2_robustness/compare_refiners.py runs/s2wide.pt
"""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from stage2_recovery import BAD_STARTS, bad_start  # noqa: E402

from fetalhc import hc18  # noqa: E402
from fetalhc.geometry import fit_mask, fit_points  # noqa: E402
from fetalhc.pipeline import Measurer, measure_image  # noqa: E402
from fetalhc.protocol import refiner_validation_images  # noqa: E402
from fetalhc.refine import Refiner, refine_points  # noqa: E402


class Mean(Refiner):
    def __init__(self, a: Refiner, b: Refiner):
        super().__init__(a.net)
        self.parts = (a, b)

    @torch.no_grad()
    def read(self, polar):
        return sum(r.read(polar) for r in self.parts) / 2


def with_passes(r: Refiner, n: int) -> Refiner:
    out = Refiner(r.net)
    out.cfg = replace(r.cfg, passes=n)
    return out


torch.set_num_threads(2)
shipped = Measurer("models/protocol/fetalhc_protocol.pt", "cpu")
F, W = shipped.model.fetalhc_refiner, Measurer(sys.argv[1], "cpu").model.fetalhc_refiner
W1, F2 = with_passes(W, 1), with_passes(F, 2)
ways = {"shipped": lambda p, e: refine_points(F, p, e)[0], "wide": lambda p, e: refine_points(W, p, e)[0],
        "mean of both": lambda p, e: refine_points(Mean(F, W), p, e)[0],
        "wide first pass": lambda p, e: refine_points(F2, p, fit_points(refine_points(W1, p, e)[0]))[0]}
recs = [r for r in hc18.read_records("../shared/hc18") if r.annotation is not None]
chosen = set(refiner_validation_images(shipped.meta, [r.name for r in recs]))
shipped.model.fetalhc_refiner = None  # stage 1 alone gives the real starts
real, bad = {k: [] for k in ways}, {k: [] for k in ways}
for r in (r for r in recs if r.name in chosen):
    px = hc18.read_grey(r.image)
    gt = fit_mask(hc18.gt_mask(r, px.shape))[0]
    start = measure_image(shipped.model, px, None).ellipse_px
    for k, way in ways.items():
        real[k].append((fit_points(way(px, start)).perimeter - gt.perimeter) * r.pixel_mm)
        bad[k] += [(fit_points(way(px, bad_start(gt, *b))).perimeter - gt.perimeter) * r.pixel_mm for b in BAD_STARTS]
for k in ways:
    a, b = np.abs(real[k]), np.abs(bad[k])
    print(f"{k:16s} dev-val ADF {a.mean():.3f} (> 8 mm: {(a > 8).sum()})  bad starts: ADF {b.mean():.2f}, "
          f"> 8 mm {(b > 8).sum()} of {len(b)}")
