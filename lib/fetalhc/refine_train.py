"""Training the outline refiner (:mod:`fetalhc.refine`) from ground-truth ellipses.

Inputs are made by perturbing each ground-truth ellipse the way first-stage ellipses miss it (size,
shape, centre, angle), so training needs no first-stage predictions, and a clinician's label (any head
mask) is a training sample. Validation runs on real first-stage ellipses. Progress and a resumable
state (``refiner_last.pt``) are written every ``eval_every`` steps.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from .data import small_head_weights
from .hc18 import read_grey
from .geometry import Ellipse, fit_mask, fit_points
from .refine import (OutlineNet, Refiner, RefinerConfig, inside_image, ray_crossings, ray_points, refine_points,
                     standardise, unwrap)


@dataclass
class RefineSample:
    pixels: np.ndarray  # uint8 (H, W)
    gt: Ellipse  # ground-truth head outline, pixels
    pixel_mm: float
    name: str = ""
    start: Ellipse | None = None  # a first-stage ellipse (validation only)
    spacing_known: bool = True

    @property
    def hc_mm(self) -> float | None:
        return self.gt.perimeter * self.pixel_mm if self.spacing_known else None


@dataclass
class RefineTrainConfig:
    iters: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 250
    seed: int = 0
    # first-stage misses, as log-normal / normal spreads relative to the head's size
    size_sd: float = 0.05
    aspect_sd: float = 0.03
    shift_sd: float = 0.03
    angle_sd: float = 0.1
    ema: float = 0.998  # the result is this exponential moving average of the weights (steadier than the last)
    wide_fraction: float = 0.0  # share of starts drawn with wide_scale x those spreads: stage 1's rare gross misses
    wide_scale: float = 3.0
    oversample_small: float = 1.0  # draw heads under data.SMALL_HEAD_MM this many times as often
    # draw each head in proportion to its HC in mm: the loss counts a miss in radial rows, a fixed share of
    # the head's size, while ADF counts it in mm, where a 300 mm head's row is five times a 60 mm head's
    size_weighted: bool = False
    polar_augment: bool = False  # also degrade the polar image as ultrasound hides a skull (see ``degrade``)

    def __post_init__(self):
        spreads = (self.size_sd, self.aspect_sd, self.shift_sd, self.angle_sd)
        if (not 0.0 <= self.wide_fraction <= 1.0 or self.wide_scale <= 0 or self.oversample_small < 1.0
                or min(spreads) <= 0):
            raise ValueError(f"second-stage training settings out of range: wide_fraction {self.wide_fraction} "
                             f"(0-1), wide_scale {self.wide_scale} (> 0), "
                             f"oversample_small {self.oversample_small} (>= 1), start spreads {spreads} (> 0)")


# The RefineTrainConfig fields that say which starts, heads and images the refiner learns from (kept by a
# fine-tune).
START_RECIPE = ("size_sd", "aspect_sd", "shift_sd", "angle_sd", "wide_fraction", "wide_scale", "oversample_small",
                "polar_augment", "size_weighted")


def perturb(gt: Ellipse, rng: np.random.Generator, c: RefineTrainConfig) -> Ellipse:
    w = c.wide_scale if c.wide_fraction and rng.random() < c.wide_fraction else 1.0
    k = math.exp(rng.normal(0, w * c.size_sd))
    q = math.exp(rng.normal(0, w * c.aspect_sd))
    dx, dy = rng.normal(0, w * c.shift_sd * gt.b, 2)
    return Ellipse.make(gt.cx + dx, gt.cy + dy, gt.a * k * q, gt.b * k / q, gt.angle + rng.normal(0, w * c.angle_sd))


def draw(samples: list[RefineSample], rng: np.random.Generator, tc: RefineTrainConfig) -> np.ndarray:
    """Indices of one batch: uniform, or small heads ``tc.oversample_small`` times as often, each head (also)
    in proportion to its HC when ``tc.size_weighted`` (a head of unknown size as one of the mean size)."""
    if tc.oversample_small == 1.0 and not tc.size_weighted:
        return rng.integers(0, len(samples), tc.batch_size)
    hc = [s.hc_mm for s in samples]
    w = np.array(small_head_weights(hc, tc.oversample_small))
    if tc.size_weighted:
        known = [h for h in hc if h is not None]
        w *= np.array([h if h is not None else (np.mean(known) if known else 1.0) for h in hc])
    return rng.choice(len(samples), tc.batch_size, p=w / w.sum())


def targets(start: Ellipse, gt: Ellipse, shape: tuple[int, int], cfg: RefinerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Target row (float) per ray and its weight: 0 where the crossing is outside the window or image."""
    s = ray_crossings(start, gt, cfg)
    lo, hi = 1 - cfg.span, 1 + cfg.span
    row = (s - lo) / (hi - lo) * (cfg.n_radii - 1)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(s) & (s >= lo) & (s <= hi) & inside_image(ray_points(start, s, cfg), shape)
    return np.where(ok, row, 0.0).astype(np.float32), ok.astype(np.float32)


def _orient(pixels: np.ndarray, e: Ellipse, rng: np.random.Generator) -> tuple[np.ndarray, Ellipse]:
    """The thesis's flips and 90-degree rotations, applied to the image and its ellipse."""
    if rng.random() < 0.5:  # horizontal flip
        pixels, e = pixels[:, ::-1], Ellipse.make(pixels.shape[1] - 1 - e.cx, e.cy, e.a, e.b, math.pi - e.angle)
    if rng.random() < 0.5:  # vertical flip
        pixels, e = pixels[::-1], Ellipse.make(e.cx, pixels.shape[0] - 1 - e.cy, e.a, e.b, -e.angle)
    for _ in range(int(rng.integers(0, 4))):  # np.rot90: (x, y) -> (y, W - 1 - x)
        pixels, e = np.rot90(pixels), Ellipse.make(e.cy, pixels.shape[1] - 1 - e.cx, e.a, e.b, e.angle - math.pi / 2)
    return np.ascontiguousarray(pixels), e


def degrade(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A polar image in grey levels, degraded the ways ultrasound hides a skull: another grey response
    (gamma), an acoustic shadow over a sector of rays (half the time) and speckle (half the time). The
    target outline stays where it was, so the network learns to carry it through, as an annotator does.
    (Standardisation undoes a plain gain, so the thesis's intensity scaling alone changes little here.)"""
    p = 255.0 * (np.clip(p, 0.0, 255.0) / 255.0) ** math.exp(rng.uniform(-0.4, 0.4))
    n = p.shape[1]
    if rng.random() < 0.5:
        cols = (int(rng.integers(n)) + np.arange(max(1, int(rng.uniform(0.05, 0.3) * n)))) % n
        p[:, cols] *= rng.uniform(0.2, 0.8)
    if rng.random() < 0.5:
        p = p * (1.0 + rng.normal(0.0, rng.uniform(0.05, 0.3), p.shape))
    return p.astype(np.float32)


def make_batch(samples: list[RefineSample], rng: np.random.Generator, cfg: RefinerConfig, tc: RefineTrainConfig):
    xs, rows, ws = [], [], []
    for i in draw(samples, rng, tc):
        s = samples[i]
        pixels, gt = _orient(s.pixels, s.gt, rng)
        start = perturb(gt, rng, tc)
        gain = rng.uniform(0.8, 1.5)  # the thesis's intensity augmentation
        img = np.minimum(pixels.astype(np.float32) * gain, 255.0)
        x = unwrap(img, start, cfg, standardised=not tc.polar_augment)
        if tc.polar_augment:
            x = standardise(degrade(x, rng))
        if rng.random() < 0.5:  # blur, in the polar image (cheaper than blurring the whole frame)
            x = standardise(cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.5), borderType=cv2.BORDER_REFLECT))
        xs.append(x)
        r, w = targets(start, gt, pixels.shape, cfg)
        rows.append(r)
        ws.append(w)
    return (torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(ws)))


def loss_fn(logits: torch.Tensor, row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a Gaussian (sd 1 row) around the target row, plus the expected row's L1."""
    r = torch.arange(logits.shape[1], dtype=torch.float32, device=logits.device)[None, :, None]
    target = torch.exp(-0.5 * (r - row[:, None]) ** 2)
    target = target / target.sum(1, keepdim=True)
    logp = logits.log_softmax(1)
    ce = -(target * logp).sum(1)
    expected = (logp.exp() * r).sum(1)
    per_ray = ce + 0.1 * (expected - row).abs()
    return (per_ray * weight).sum() / weight.sum().clamp(min=1.0)


def evaluate_refiner(refiner: Refiner, val: list[RefineSample]) -> dict:
    """HC error (mm) of the refined ellipse and of the first stage's, on first-stage starts."""
    ref, base = [], []
    for s in val:
        e = fit_points(refine_points(refiner, s.pixels, s.start)[0])
        gt_hc = s.gt.perimeter * s.pixel_mm
        ref.append(e.perimeter * s.pixel_mm - gt_hc)
        base.append(s.start.perimeter * s.pixel_mm - gt_hc)
    ref, base = np.array(ref), np.array(base)
    return {"n": len(val), "adf_mm": float(np.abs(ref).mean()), "df_mm": float(ref.mean()),
            "p95_mm": float(np.percentile(np.abs(ref), 95)) if len(ref) else math.nan,
            "stage1_adf_mm": float(np.abs(base).mean()), "stage1_df_mm": float(base.mean())}


def train_refiner(train: list[RefineSample], val: list[RefineSample], out_dir: str | Path,
                  cfg: RefinerConfig = RefinerConfig(), tc: RefineTrainConfig = RefineTrainConfig(), *,
                  init: Refiner | None = None, resume: bool = False,
                  progress: Callable[[dict], None] | None = print, should_stop: Callable[[], bool] | None = None,
                  device: str | None = None) -> dict:
    """Train; returns {'refiner', 'history', 'seconds'}. The last state is the result (no checkpoint
    choice on validation: the schedule is fixed in advance)."""
    if not train:
        raise ValueError("no usable training outlines for the second stage")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    net = OutlineNet(cfg)
    if init is not None:
        net.load_state_dict(init.net.state_dict())
    device = torch.device(device or "cpu")
    net.to(device)
    ema = copy.deepcopy(net).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.iters, pct_start=0.1)
    step, history, spent = 0, [], 0.0
    state_path = out / "refiner_last.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        if st["sched"]["total_steps"] != tc.iters:  # the one-cycle schedule is planned for its length
            raise ValueError(f"{state_path} was planned for {st['sched']['total_steps']} steps, not {tc.iters}: "
                             "resume with the same number of steps")
        if st.get("config", asdict(cfg)) != asdict(cfg):
            raise ValueError(f"{state_path} was trained with refiner settings {st['config']}, not {asdict(cfg)}: "
                             "resume with the same settings")
        net.load_state_dict(st["net"]); opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        ema.load_state_dict(st["ema"])
        step, history, spent = st["step"], st["history"], st["seconds"]
        rng = np.random.default_rng([tc.seed, step])
    t0, running = time.time() - spent, []
    while step < tc.iters and not (should_stop and should_stop()):
        net.train()
        if init is not None:  # fine-tuning on a few labels: keep the learnt BatchNorm statistics
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        x, row, w = (t.to(device) for t in make_batch(train, rng, cfg, tc))
        loss = loss_fn(net(x), row, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        _update_ema(ema, net, min(tc.ema, 1.0 - 1.0 / step))  # early steps: plain average
        running.append(loss.item())
        if step % tc.eval_every == 0 or step == tc.iters:
            rec = {"step": step, "loss": float(np.mean(running)), "seconds": time.time() - t0}
            running = []
            if init is None:  # fine-tuning keeps the learnt statistics (see above)
                _recalibrate_bn(ema, train, cfg, tc, device)
            if val:
                rec.update({f"val_{k}": v for k, v in evaluate_refiner(Refiner(ema), val).items()})
            history.append(rec)
            tmp = state_path.with_suffix(".tmp")
            torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step,
                        "history": history, "seconds": rec["seconds"], "config": asdict(cfg)}, tmp)
            os.replace(tmp, state_path)
            if progress:
                progress(rec)
    return {"refiner": Refiner(ema.cpu()), "history": history, "seconds": time.time() - t0}


@torch.no_grad()
def _update_ema(ema: OutlineNet, net: OutlineNet, decay: float):
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):  # BatchNorm statistics: the current ones
        be.copy_(b)


@torch.no_grad()
def _recalibrate_bn(net: OutlineNet, samples: list[RefineSample], cfg: RefinerConfig, tc: RefineTrainConfig,
                    device, batches: int = 16):
    """BatchNorm statistics of the averaged weights themselves: the live network's, copied each step, do
    not match them, which shifts the outline in or out between evaluations."""
    rng = np.random.default_rng([tc.seed, 1])  # the same batches every time
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    net.train()
    for _ in range(batches):
        net(make_batch(samples, rng, cfg, tc)[0].to(device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    net.eval()


def refine_samples(samples, with_start_from=None) -> list[RefineSample]:
    """:class:`fetalhc.data.Sample` (image + head mask) -> refiner samples; ``with_start_from`` (a first-stage
    model) adds each image's first-stage ellipse, and drops images where it finds no head."""
    from .pipeline import measure_image
    out = []
    for s in samples:
        try:
            gt = fit_mask(s.mask)[0]
        except ValueError:  # an empty or degenerate label teaches the outline nothing
            continue
        start = None
        if with_start_from is not None:
            start = measure_image(with_start_from, s.image, None).ellipse_px
            if start is None:
                continue
        out.append(RefineSample(s.image, gt, s.spacing.col_mm if s.spacing else 1.0, s.name, start,
                                spacing_known=s.spacing is not None))
    return out


def pseudo_samples(teacher, records) -> list[RefineSample]:
    """Unlabelled images (:class:`fetalhc.hc18.Record`) outlined by a two-stage ``teacher`` model: its
    ellipse becomes the target where its QC passed; images it flags or misses are left out."""
    from .io import Spacing
    from .pipeline import measure_image
    out = []
    for r in records:
        pixels = read_grey(r.image)
        res = measure_image(teacher, pixels, Spacing(r.pixel_mm, r.pixel_mm, "pixel CSV"))
        if res.qc_ok and res.ellipse_px is not None:
            out.append(RefineSample(pixels, res.ellipse_px, r.pixel_mm, f"pseudo:{r.name}"))
    return out


# The stage blend's weight for a new second stage (fetalhc.refine.blend_outline): off until a trial adopts it
# (models/protocol/stage_blend/).
STAGE1_WEIGHT = 0.0
MIN_SCALE_IMAGES = 20  # k is a median over images: with fewer, a training leaves the blend as it was


def blend_stages(model, refiner: Refiner, samples, weight: float) -> tuple[Refiner, dict]:
    """``refiner`` with the stage blend: ``weight``, and k = the median of true HC / first-stage HC of
    ``model``'s first stage on ``samples`` (labelled Samples: the second stage's training images). With
    fewer than MIN_SCALE_IMAGES usable images ``refiner`` is returned as it is (a fine-tune on a few labels
    keeps the checkpoint's blend; a new second stage stays unblended). Weight 0 turns it off, with no
    calibration run."""
    if weight == 0:
        return refiner.with_blend(0.0, 1.0), {"weight": 0.0, "scale": 1.0, "images": 0}
    attached, model.fetalhc_refiner = getattr(model, "fetalhc_refiner", None), None  # the first stage alone
    try:
        starts = refine_samples(samples, with_start_from=model)
    finally:
        model.fetalhc_refiner = attached
    if len(starts) < MIN_SCALE_IMAGES:
        return refiner, {"weight": refiner.cfg.stage1_weight, "scale": refiner.cfg.stage1_scale,
                         "images": len(starts), "kept": True}
    scale = round(float(np.median([s.gt.perimeter / s.start.perimeter for s in starts])), 5)
    return refiner.with_blend(weight, scale), {"weight": weight, "scale": scale, "images": len(starts)}


def refine_checkpoint(ckpt_in: str | Path, ckpt_out: str | Path, train, val, work_dir: str | Path, *,
                      cfg: RefinerConfig | None = None, tc: RefineTrainConfig = RefineTrainConfig(),
                      fine_tune: bool = True, resume: bool = False, progress=print, should_stop=None,
                      data_summary: dict | None = None, device: str | None = None,
                      pseudo: list[RefineSample] | None = None, pseudo_info: dict | None = None,
                      stage1_weight: float | None = None) -> dict:
    """Train the second stage for the first-stage checkpoint ``ckpt_in`` on ``train`` (Samples, plus any
    ``pseudo``-labelled :class:`RefineSample`) and write both stages to ``ckpt_out``. ``fine_tune`` starts
    from ``ckpt_in``'s refiner when it has one (and keeps its config). Validation (``val``) starts from the
    first stage's own ellipses. The stage blend is then calibrated on ``train`` (:func:`blend_stages`) with
    ``stage1_weight`` (default: a fine-tune's own, else STAGE1_WEIGHT)."""
    from .model import attach_refiner, load_model, read_checkpoint, save_checkpoint, stored_half
    blob = read_checkpoint(ckpt_in)
    model, _ = load_model(ckpt_in)
    init = model.fetalhc_refiner if fine_tune else None
    model.fetalhc_refiner = None  # validation starts from the first stage alone
    cfg = init.cfg if init is not None else (cfg or RefinerConfig())
    if init is not None:  # a fine-tune also keeps the checkpoint's start perturbations and sampling
        prior = (blob.get("refiner_data") or {}).get("train_config") or {}
        tc = replace(tc, **{k: prior[k] for k in START_RECIPE if k in prior})
    result = train_refiner(refine_samples(train) + list(pseudo or []), refine_samples(val, with_start_from=model),
                           work_dir, cfg, tc,
                           init=init, resume=resume, progress=progress, should_stop=should_stop, device=device)
    weight = stage1_weight if stage1_weight is not None else init.cfg.stage1_weight if init else STAGE1_WEIGHT
    model.fetalhc_refiner, blend = blend_stages(model, result["refiner"], train, weight)
    meta = {k: v for k, v in blob.items() if k not in ("format", "config", "state_dict", "refiner",
                                                      "optimizer", "scheduler")}
    lineage = (blob.get("refiner_data") or {}) if fine_tune and init is not None else {}
    meta["refiner_data"] = {**(data_summary or {}), "train_images": len(train), "val_images": len(val),
                            "train_exams": sorted({s.group for s in train}), "val_exams": sorted({s.group for s in val}),
                            # not in train_exams (they are no HC18 training exam); their teacher's exams count
                            "pseudo_labels": pseudo_info if pseudo else None,
                            "init_data": lineage or None, "train_config": asdict(tc), "stage_blend": blend,
                            "history": result["history"],
                            "seconds": round(result["seconds"], 1)}
    half = stored_half(blob)
    save_checkpoint(ckpt_out, model, half=half, **meta)
    return {**result, "refiner": model.fetalhc_refiner, "stage_blend": blend, "path": str(ckpt_out)}
