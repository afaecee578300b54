"""One-off, development images only: for each image the shipped model flags, measure it again with a
wide-start stage 2 in place of the shipped one and take that result when it passes QC. Run from the repo root:

    .venv/bin/python models/protocol/stage2_robustness/second_opinion_eval.py runs/s2wide.pt
"""
import sys

import numpy as np
import torch

from fetalhc import hc18
from fetalhc.io import Spacing
from fetalhc.pipeline import Measurer
from fetalhc.protocol import protocol_split, refiner_validation_images

torch.set_num_threads(2)
m = Measurer("models/protocol/fetalhc_protocol.pt", "cpu")
shipped, wide = m.model.fetalhc_refiner, Measurer(sys.argv[1], "cpu").model.fetalhc_refiner
recs = [r for r in hc18.read_records("../shared/hc18") if r.annotation is not None]
names = [r.name for r in recs]
val, dev = set(refiner_validation_images(m.meta, names)), set(protocol_split(names).dev)
rows = []  # (in dev-val, error shipped, error with the second opinion)
for r in (r for r in recs if r.name in dev):
    px, sp = hc18.read_grey(r.image), Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV")
    m.model.fetalhc_refiner = shipped
    a = m.measure(px, sp, runner_up=False)
    if a.qc_ok:
        continue
    m.model.fetalhc_refiner = wide
    b = m.measure(px, sp, runner_up=False)
    rows.append((r.name in val, a.hc_mm - r.hc_mm, (b if b.qc_ok else a).hc_mm - r.hc_mm, b.qc_ok))
for tag, sel in (("dev-val", [x for x in rows if x[0]]), ("all dev", rows)):
    before, after = np.abs([x[1] for x in sel]), np.abs([x[2] for x in sel])
    print(f"{tag} flagged {len(sel)}: wide passes QC on {sum(x[3] for x in sel)}; ADF of the flagged images "
          f"{before.mean():.2f} -> {after.mean():.2f} mm; > 8 mm {(before > 8).sum()} -> {(after > 8).sum()}")
