# temporary dev-only check: for images the shipped model flags, a second opinion from the wide-start refiner
import sys, json, numpy as np, torch
from fetalhc import hc18
from fetalhc.io import Spacing
from fetalhc.pipeline import Measurer
from fetalhc.protocol import protocol_split, refiner_validation_images
torch.set_num_threads(2)
m = Measurer('models/fetalhc_default.pt', 'cpu'); wide = Measurer(sys.argv[1], 'cpu').model.fetalhc_refiner
ship = m.model.fetalhc_refiner
recs = [r for r in hc18.read_records('../shared/hc18') if r.annotation is not None]
names = [r.name for r in recs]
val = set(refiner_validation_images(m.meta, names)); dev = set(protocol_split(names).dev)
rows = []
for r in (r for r in recs if r.name in dev):
    px, sp = hc18.read_grey(r.image), Spacing(r.pixel_mm, r.pixel_mm, "csv")
    m.model.fetalhc_refiner = ship
    a = m.measure(px, sp, runner_up=False)
    if a.qc_ok: continue
    m.model.fetalhc_refiner = wide
    b = m.measure(px, sp, runner_up=False)
    rows.append((r.name, r.name in val, r.hc_mm, a.hc_mm - r.hc_mm, b.hc_mm - r.hc_mm, b.qc_ok))
for x in rows: print(x)
for tag, sel in (("dev-val", [x for x in rows if x[1]]), ("all dev", rows)):
    used = [x for x in sel if x[5]]
    print(tag, "flagged", len(sel), "wide passes QC on", len(used),
          "ADF flagged shipped %.2f -> with rule %.2f" % (np.mean([abs(x[3]) for x in sel]), np.mean([abs(x[4] if x[5] else x[3]) for x in sel])),
          ">8mm %d -> %d" % (sum(abs(x[3]) > 8 for x in sel), sum(abs(x[4] if x[5] else x[3]) > 8 for x in sel)))
