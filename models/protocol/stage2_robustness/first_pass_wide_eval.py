# temporary dev-only experiment: first pass with one refiner (coarse), later passes with another (fine)
import sys, numpy as np, torch
from dataclasses import replace
from fetalhc import hc18
from fetalhc.io import Spacing
from fetalhc.geometry import fit_mask, fit_points
from fetalhc.pipeline import Measurer
from fetalhc.protocol import refiner_validation_images
from fetalhc.refine import refine_points
sys.path.insert(0, 'benchmarks')
from stage2_recovery import BAD_STARTS, bad_start
torch.set_num_threads(2)
fine_m = Measurer('models/fetalhc_default.pt', 'cpu'); coarse_m = Measurer(sys.argv[1], 'cpu')
F, C = fine_m.model.fetalhc_refiner, coarse_m.model.fetalhc_refiner
recs = [r for r in hc18.read_records('../shared/hc18') if r.annotation is not None]
chosen = set(refiner_validation_images(fine_m.meta, [r.name for r in recs]))
F1 = type(F)(F.net); F1.cfg = replace(F.cfg, passes=1); F1._s = F._s
C1 = type(C)(C.net); C1.cfg = replace(C.cfg, passes=1); C1._s = C._s
F2 = type(F)(F.net); F2.cfg = replace(F.cfg, passes=2); F2._s = F._s
def combo(pixels, start, n_coarse=1):
    e = start
    for _ in range(n_coarse):
        e = fit_points(refine_points(C1, pixels, e)[0])
    return fit_points(refine_points(F2, pixels, e)[0])
def plain(R, pixels, start):
    return fit_points(refine_points(R, pixels, start)[0])
fine_m.model.fetalhc_refiner = None
res = {k: [] for k in ['fine', 'coarse', 'combo']}; rec = {k: [] for k in res}
for r in (r for r in recs if r.name in chosen):
    px = hc18.read_grey(r.image); gt = fit_mask(hc18.gt_mask(r, px.shape))[0]
    s1 = fine_m.model and __import__('fetalhc.pipeline', fromlist=['x']).measure_image(fine_m.model, px, None).ellipse_px
    for k, f in [('fine', lambda p, s: plain(F, p, s)), ('coarse', lambda p, s: plain(C, p, s)), ('combo', combo)]:
        res[k].append((f(px, s1).perimeter - gt.perimeter) * r.pixel_mm)
        for b in BAD_STARTS:
            rec[k].append((f(px, bad_start(gt, *b)).perimeter - gt.perimeter) * r.pixel_mm)
for k in res:
    a, b = np.abs(res[k]), np.abs(rec[k])
    print(f"{k:7s} dev-val ADF {a.mean():.3f} (>8mm {int((a>8).sum())})   recovery ADF {b.mean():.2f} >8mm {int((b>8).sum())}/{len(b)}")
