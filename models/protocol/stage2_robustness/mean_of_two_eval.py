# temporary dev-only experiment: average the per-ray distributions of several refiners
import sys, numpy as np, torch
from fetalhc import hc18
from fetalhc.geometry import fit_mask, fit_points
from fetalhc.pipeline import Measurer, measure_image
from fetalhc.protocol import refiner_validation_images
from fetalhc.refine import refine_points, Refiner
sys.path.insert(0, 'benchmarks')
from stage2_recovery import BAD_STARTS, bad_start
torch.set_num_threads(2)
ms = [Measurer(p, 'cpu') for p in sys.argv[1:]]
Rs = [m.model.fetalhc_refiner for m in ms]
class Ens(Refiner):
    def __init__(self, rs): super().__init__(rs[0].net); self.rs = rs
    @torch.no_grad()
    def read(self, polar): return sum(r.read(polar) for r in self.rs) / len(self.rs)
E_ = Ens(Rs)
recs = [r for r in hc18.read_records('../shared/hc18') if r.annotation is not None]
chosen = set(refiner_validation_images(ms[0].meta, [r.name for r in recs]))
m0 = ms[0].model; m0.fetalhc_refiner = None
cands = {**{f"m{i}": R for i, R in enumerate(Rs)}, "ens": E_}
res = {k: [] for k in cands}; rec = {k: [] for k in cands}
for r in (r for r in recs if r.name in chosen):
    px = hc18.read_grey(r.image); gt = fit_mask(hc18.gt_mask(r, px.shape))[0]
    s1 = measure_image(m0, px, None).ellipse_px
    for k, R in cands.items():
        res[k].append((fit_points(refine_points(R, px, s1)[0]).perimeter - gt.perimeter) * r.pixel_mm)
        for b in BAD_STARTS:
            rec[k].append((fit_points(refine_points(R, px, bad_start(gt, *b))[0]).perimeter - gt.perimeter) * r.pixel_mm)
for k in res:
    a, b = np.abs(res[k]), np.abs(rec[k])
    print(f"{k:5s} dev-val ADF {a.mean():.3f} (>8mm {int((a>8).sum())}, without it {np.sort(a)[:-1].mean():.3f})  recovery ADF {b.mean():.2f} >8mm {int((b>8).sum())}/{len(b)}")
