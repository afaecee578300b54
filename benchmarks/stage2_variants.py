"""Ways of reading and fitting the second stage's outline, tried on development images only.

    .venv/bin/python benchmarks/stage2_variants.py ../shared/hc18 models/protocol/fetalhc_protocol.pt \
        --ensemble-with runs/r18s/two_stage_b.pt

Each checkpoint's first stage gives its best detection's ellipse once; the second stage then runs from it in
each variant. The shipped reading (the expected radius per ray, an unweighted fit, 3 passes) against:
- the fit weighted by each ray's confidence (or its square): a ray that is unsure moves the ellipse less;
- the median of each ray's distribution instead of its mean;
- three starts (the first-stage ellipse scaled 0.96 / 1 / 1.04), their points pooled;
- the last pass read from the penultimate ellipse scaled 0.96 / 1 / 1.04, pooled;
- with ``--ensemble-with``: the mean of this and another checkpoint's second-stage distributions;
- more samples averaged per polar column (``--supersample R A``, e.g. 2 12 against the trained 2 3): a
  column of a large head spans ~10 px of skull per angular sample, so three thin rays alias its speckle.
``--only`` picks variants by a word of their label.
HC error against the ground truth, best detection only (the runner-up rule is left out: it switched no
development image of the shipped model). The images are the first checkpoint's second-stage validation
exams, never a protocol test image.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fetalhc import hc18
from fetalhc.evaluate import compare, summarise
from fetalhc.geometry import Ellipse, fit_mask, fit_points
from fetalhc.io import Spacing
from fetalhc.pipeline import Measurer, measure_image
from fetalhc.protocol import GROSS_MM, SIZE_BINS, refiner_validation_images
from fetalhc.refine import fractions, ray_confidence, ray_points, unwrap, visible

SCALES = (0.96, 1.0, 1.04)


def radius(prob: torch.Tensor, s: np.ndarray, how: str) -> np.ndarray:
    """Radial fraction per ray: the mean of its distribution over rows (as shipped) or its median."""
    if how == "mean":
        return (prob.numpy() * s[:, None]).sum(0)
    c = prob.numpy().cumsum(0)
    j = np.clip((c < 0.5).sum(0), 1, len(s) - 1)
    cols = np.arange(c.shape[1])
    lo, hi = c[j - 1, cols], c[j, cols]
    return s[j - 1] + (0.5 - lo) / np.maximum(hi - lo, 1e-9) * (s[1] - s[0])


def outline(refiners, pixels, e: Ellipse, how: str, supersample=None):
    """Visible points and their confidences, read from ``e`` by the mean of the refiners' distributions."""
    cfg = refiners[0].cfg
    polar = torch.from_numpy(unwrap(pixels, e, dataclasses.replace(cfg, supersample=supersample or cfg.supersample)))
    prob = sum(r.read(polar) for r in refiners) / len(refiners)
    pts = ray_points(e, radius(prob, fractions(cfg), how), cfg)
    return visible(pts, ray_confidence(prob, cfg).numpy(), pixels.shape)


def refined(refiners, pixels, start: Ellipse, how="mean", weight_power=0, starts=(1.0,), last_scales=(1.0,),
            supersample=None) -> Ellipse:
    def fit(pts, conf):
        return fit_points(pts, conf ** weight_power if weight_power else None)

    pooled = []
    for k in starts:
        e = Ellipse.make(start.cx, start.cy, start.a * k, start.b * k, start.angle)
        for _ in range(refiners[0].cfg.passes - 1):
            e = fit(*outline(refiners, pixels, e, how, supersample))
        for k2 in last_scales:
            pooled.append(outline(refiners, pixels, Ellipse.make(e.cx, e.cy, e.a * k2, e.b * k2, e.angle), how,
                                  supersample))
    return fit(np.concatenate([p for p, _ in pooled]), np.concatenate([c for _, c in pooled]))


def first_ellipse(model, pixels, spacing: Spacing) -> Ellipse | None:
    """The pipeline's first-stage ellipse of the best detection (second stage detached, no runner-up)."""
    refiner, model.fetalhc_refiner = model.fetalhc_refiner, None
    try:
        return measure_image(model, pixels, spacing, runner_up=False).ellipse_px
    finally:
        model.fetalhc_refiner = refiner


def summary(rows: list[dict]) -> dict:
    """The challenge metrics of :func:`fetalhc.evaluate.summarise`, how many errors exceed 8 and 4 mm, and the
    mean error of heads over 200 mm (where the second stages differ most)."""
    large = [r["adf_mm"] for r in rows if r["hc_true_mm"] >= SIZE_BINS[-1][0]]
    return {**summarise(rows), "over_8mm": sum(r["adf_mm"] > GROSS_MM for r in rows),
            "over_4mm": sum(r["adf_mm"] > 4 for r in rows), "adf_over_200mm": float(np.mean(large)) if large else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hc18")
    ap.add_argument("models", nargs="+", help="two-stage checkpoints; the first one's validation exams are used")
    ap.add_argument("--ensemble-with", help="another two-stage checkpoint whose second stage is averaged in")
    ap.add_argument("--supersample", type=int, nargs=2, metavar=("R", "A"),
                    help="also read with R x A samples averaged per polar cell")
    ap.add_argument("--only", nargs="+", help="run only the variants whose label holds one of these words")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.supersample and min(args.supersample) < 1:
        ap.error(f"--supersample needs two counts >= 1, got {args.supersample[0]} {args.supersample[1]}")
    torch.set_num_threads(args.threads)
    records = [r for r in hc18.read_records(args.hc18) if r.annotation is not None]
    measurers = [Measurer(m, "cpu") for m in args.models]
    val = set(refiner_validation_images(measurers[0].meta, [r.name for r in records]))
    images = []
    for r in (r for r in records if r.name in val):
        pixels, spacing = hc18.read_grey(r.image), Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV")
        gt = hc18.gt_mask(r, pixels.shape)
        images.append((pixels, spacing, gt, fit_mask(gt, spacing.as_tuple())[1]))
    other = Measurer(args.ensemble_with, "cpu").model.fetalhc_refiner if args.ensemble_with else None
    variants = {"shipped: mean radius, plain fit": {},
                "fit weighted by ray confidence": {"weight_power": 1},
                "fit weighted by confidence squared": {"weight_power": 2},
                "median radius": {"how": "median"},
                "three starts x 0.96 / 1 / 1.04, pooled": {"starts": SCALES},
                "last pass from three scales, pooled": {"last_scales": SCALES}}
    if args.supersample:
        variants[f"{args.supersample[0]} x {args.supersample[1]} samples per polar cell"] = {
            "supersample": tuple(args.supersample)}
    if args.only:
        variants = {k: v for k, v in variants.items() if k.startswith("shipped") or any(w in k for w in args.only)}
    lines = ["| first stage | second stage reading | ADF (mm) | median | p95 | worst | DF | Dice (%) | > 8 mm "
             "| > 4 mm | ADF > 200 mm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    out = {}

    def rows_of(ellipses):
        return [compare(e.to_mm(sp.as_tuple()), gt_mm, e, gt) for e, (_, sp, gt, gt_mm) in zip(ellipses, images)]

    for path, m in zip(args.models, measurers):
        starts = [first_ellipse(m.model, px, sp) for px, sp, _, _ in images]
        if any(s is None for s in starts):  # compare() needs an ellipse; a missed head would need HC 0
            raise SystemExit(f"{path}: no head on {sum(s is None for s in starts)} development images")
        runs = {k: ([m.model.fetalhc_refiner], v) for k, v in variants.items()}
        if other is not None:
            runs[f"mean of its and {args.ensemble_with}'s distributions"] = ([m.model.fetalhc_refiner, other], {})
        rows = {"stage 1 alone": summary(rows_of(starts))}
        for label, (refs, kw) in runs.items():
            rows[label] = summary(rows_of([refined(refs, px, s, **kw) for s, (px, _, _, _) in zip(starts, images)]))
        for label, s in rows.items():
            a = s["adf_mm"]
            lines.append(f"| {path} | {label} | {a['mean']:.3f} | {a['median']:.2f} | {a['p95']:.2f} | "
                         f"{a['worst']:.2f} | {s['df_mm']['mean']:+.2f} | {100 * s['dice']['mean']:.2f} | "
                         f"{s['over_8mm']} | {s['over_4mm']} | "
                         f"{'–' if s['adf_over_200mm'] is None else format(s['adf_over_200mm'], '.2f')} |")
            print(lines[-1], flush=True)
        out[path] = rows
    print(f"\n{len(images)} development validation images\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
