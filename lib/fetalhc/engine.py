"""One training epoch and one validation pass (shaped after torchvision's detection references)."""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from .data import Sample
from .evaluate import compare, summarise
from .geometry import fit_mask
from .pipeline import measure_image


def train_one_epoch(model, optimizer, loader, device, epoch: int, *, scheduler=None, scaler=None,
                    mask_loss_weight: float = 1.0, show_progress: bool = True) -> dict:
    model.train()
    sums: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_progress, dynamic_ncols=True)
    for images, targets in bar:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
            losses = model(images, targets)
            losses["loss_mask"] = losses["loss_mask"] * mask_loss_weight
            loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}: {({k: v.item() for k, v in losses.items()})}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n += 1
        for k, v in {"loss": loss, **losses}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{sums['loss'] / n:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def validate(model, samples: list[Sample], score_threshold: float = 0.5) -> tuple[list[dict], dict]:
    """Full-resolution pipeline on each validation image; HC18 metrics against the ground-truth mask."""
    model.eval()
    rows = []
    t0 = time.perf_counter()
    for s in samples:
        sp = s.spacing.as_tuple()
        _, gt_mm = fit_mask(s.mask, sp)
        m = measure_image(model, s.image, s.spacing, score_threshold=score_threshold)
        row = compare(m.ellipse_mm, gt_mm, m.ellipse_px, s.mask)
        rows.append({"filename": s.name, "score": m.score, "qc": m.qc_text, **row})
    summary = summarise(rows)
    summary["seconds_per_image"] = (time.perf_counter() - t0) / max(len(samples), 1)
    return rows, summary
