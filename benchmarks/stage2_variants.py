"""Ways of reading and fitting the second stage's outline, tried on development images only.

    .venv/bin/python benchmarks/stage2_variants.py ../shared/hc18 models/protocol/fetalhc_protocol.pt \
        --ensemble-with runs/r18s/two_stage_b.pt

Each checkpoint's first stage gives its best detection's ellipse once; the second stage then runs from it in
each variant. The shipped reading (the expected radius per ray, an unweighted fit, 3 passes) against:
- the fit weighted by each ray's confidence (or its square): a ray that is unsure moves the ellipse less;
- the median of each ray's distribution instead of its mean;
- three starts (the first-stage ellipse scaled 0.96 / 1 / 1.04), their points pooled;
- the last pass read from the penultimate ellipse scaled 0.96 / 1 / 1.04, pooled;
- with ``--ensemble-with``: the mean of this and another checkpoint's second-stage distributions.
HC error against the ground truth, best detection only (the runner-up rule is left out: it switched no
development image of the shipped model). The images are the first checkpoint's second-stage validation
exams, never a protocol test image.
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
from fetalhc.geometry import Ellipse, fit_points, largest_component
from fetalhc.io import Spacing
from fetalhc.pipeline import Measurer, candidates
from fetalhc.protocol import refiner_validation_images
from fetalhc.refine import fractions, inside_image, ray_points, unwrap
from fetalhc.result import measure_region

SCALES = (0.96, 1.0, 1.04)


def readout(prob: np.ndarray, s: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Radial fraction per ray and its confidence (probability mass within 2 rows of the peak)."""
    rows = np.arange(len(s))[:, None]
    conf = (prob * (np.abs(rows - prob.argmax(0)[None]) <= 2)).sum(0)
    if how == "median":
        c = prob.cumsum(0)
        j = np.clip((c < 0.5).sum(0), 1, len(s) - 1)
        cols = np.arange(prob.shape[1])
        lo, hi = c[j - 1, cols], c[j, cols]
        return s[j - 1] + (0.5 - lo) / np.maximum(hi - lo, 1e-9) * (s[1] - s[0]), conf
    return (prob * s[:, None]).sum(0), conf


def outline(refiners, pixels, e: Ellipse, how: str):
    """Points inside the image and their confidences, read from ``e`` by the mean of the refiners' distributions."""
    cfg = refiners[0].cfg
    polar = torch.from_numpy(unwrap(pixels, e, cfg))
    prob = sum(r.read(polar) for r in refiners).numpy() / len(refiners)
    s, conf = readout(prob, fractions(cfg), how)
    pts = ray_points(e, s, cfg)
    inside = inside_image(pts, pixels.shape)
    return (pts[inside], conf[inside]) if inside.sum() >= 8 else (pts, conf)


def refined(refiners, pixels, start: Ellipse, how="mean", weight_power=0, starts=(1.0,), last_scales=(1.0,)) -> Ellipse:
    def fit(pts, conf):
        return fit_points(pts, conf ** weight_power if weight_power else None)

    pooled = []
    for k in starts:
        e = Ellipse.make(start.cx, start.cy, start.a * k, start.b * k, start.angle)
        for _ in range(refiners[0].cfg.passes - 1):
            e = fit(*outline(refiners, pixels, e, how))
        for k2 in last_scales:
            pooled.append(outline(refiners, pixels, Ellipse.make(e.cx, e.cy, e.a * k2, e.b * k2, e.angle), how))
    return fit(np.concatenate([p for p, _ in pooled]), np.concatenate([c for _, c in pooled]))


def first_ellipse(model, pixels, pixel_mm) -> Ellipse | None:
    for soft, _ in candidates(model, pixels)[:1]:
        if (soft >= 0.5).sum() >= 20:
            return measure_region(largest_component(soft >= 0.5), Spacing(pixel_mm, pixel_mm, "HC18 CSV"),
                                  soft=soft).ellipse_px
    return None


def summary(err: list[float]) -> dict:
    e = np.array(err)
    a = np.abs(e)
    return {"n": len(e), "adf_mm": float(a.mean()), "median_mm": float(np.median(a)), "p95_mm": float(np.percentile(a, 95)),
            "worst_mm": float(a.max()), "df_mm": float(e.mean()), "over_8mm": int((a > 8).sum()), "over_4mm": int((a > 4).sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("models", nargs="+", help="two-stage checkpoints; the first one's validation exams are used")
    ap.add_argument("--ensemble-with", help="another two-stage checkpoint whose second stage is averaged in")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = [r for r in hc18.read_records(args.hc18) if r.annotation is not None]
    measurers = [Measurer(m, "cpu") for m in args.models]
    val = set(refiner_validation_images(measurers[0].meta, [r.name for r in records]))
    images = [(r, hc18.read_grey(r.image)) for r in records if r.name in val]
    gt = [(hc18.gt_ellipse(r).perimeter * r.pixel_mm) for r, _ in images]
    other = Measurer(args.ensemble_with, "cpu").model.fetalhc_refiner if args.ensemble_with else None
    variants = {"shipped: mean radius, plain fit": {},
                "fit weighted by ray confidence": {"weight_power": 1},
                "fit weighted by confidence squared": {"weight_power": 2},
                "median radius": {"how": "median"},
                "three starts x 0.96 / 1 / 1.04, pooled": {"starts": SCALES},
                "last pass from three scales, pooled": {"last_scales": SCALES}}
    lines = ["| first stage | second stage reading | ADF (mm) | median | p95 | worst | DF | > 8 mm | > 4 mm |",
             "|---|---|---|---|---|---|---|---|---|"]
    out = {}
    for path, m in zip(args.models, measurers):
        starts = [first_ellipse(m.model, px, r.pixel_mm) for r, px in images]
        if any(s is None for s in starts):
            print(f"{path}: no head on {sum(s is None for s in starts)} images; they are left out", file=sys.stderr)
        runs = {k: ([m.model.fetalhc_refiner], v) for k, v in variants.items()}
        if other is not None:
            runs[f"mean of its and {args.ensemble_with}'s distributions"] = ([m.model.fetalhc_refiner, other], {})
        stage1 = [s.perimeter * r.pixel_mm - g for s, (r, _), g in zip(starts, images, gt) if s is not None]
        rows = {"stage 1 alone": summary(stage1)}
        for label, (refs, kw) in runs.items():
            rows[label] = summary([refined(refs, px, s, **kw).perimeter * r.pixel_mm - g
                                   for s, (r, px), g in zip(starts, images, gt) if s is not None])
        for label, s in rows.items():
            lines.append(f"| {path} | {label} | {s['adf_mm']:.3f} | {s['median_mm']:.2f} | {s['p95_mm']:.2f} | "
                         f"{s['worst_mm']:.2f} | {s['df_mm']:+.2f} | {s['over_8mm']} | {s['over_4mm']} |")
            print(lines[-1], flush=True)
        out[path] = rows
    print(f"\n{len(images)} development validation images\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
