"""Training: from scratch or fine-tuning, CPU or CUDA (AMP), multi-GPU through torchrun (DDP).

Every epoch writes ``last.pt`` (resumable: optimizer, scheduler, epoch), keeps ``best.pt`` by validation
ADF, and appends to ``history.csv`` / ``history.json``. Only rank 0 validates and writes.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, WeightedRandomSampler

from .data import HeadDataset, Sample, collate, sample_hc_mm, seed_everything, small_head_weights
from .engine import train_one_epoch, validate
from .model import (CHECKPOINT_FORMAT, DEFAULT_CONFIG, attach_refiner, build_model, config_from_dict,
                    read_checkpoint, save_checkpoint, with_overrides)
from .transforms import Augment


@dataclass
class TrainConfig:
    out_dir: str
    model: str = DEFAULT_CONFIG
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 200
    mask_loss_weight: float = 1.0
    input_size: int | None = None  # override the config's input size
    init: str | None = None  # checkpoint to fine-tune from (weights only)
    resume: bool = False  # continue out_dir/last.pt (weights, optimizer, schedule, epoch)
    pretrained_backbone: bool = False
    augment: bool = True
    device: str | None = None
    amp: bool = True  # CUDA only
    workers: int = 0
    seed: int = 0
    score_threshold: float = 0.5
    half_best: bool = False  # store best.pt in float16 (half the size, same predictions to ~1e-3 mm)
    oversample_small: float = 1.0  # draw heads under data.SMALL_HEAD_MM this many times as often (early exams)
    data_summary: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.oversample_small < 1.0:
            raise ValueError(f"oversample_small {self.oversample_small}: needs >= 1 (1 = uniform)")


def _dist_info() -> tuple[int, int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def train_device(name: str | None, local_rank: int = 0) -> torch.device:
    """The device to train on: ``name`` (None: this process's GPU if any, else the CPU). A bare "cuda" means
    this process's GPU: ``torch.cuda.set_device`` needs an index (``--device cuda`` used to crash there)."""
    if not name:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def _schedule(optimizer, warmup: int, total: int):
    def factor(it):
        if it < warmup:
            return 0.001 + 0.999 * it / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup)))) * 0.99 + 0.01
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(cfg: TrainConfig, train_samples: list[Sample], val_samples: list[Sample],
        callback: Callable[[dict], None] | None = None, show_progress: bool = True,
        should_stop: Callable[[], bool] | None = None) -> dict:
    """Train and return {'best_metric', 'best_path', 'last_path', 'history', ...}."""
    rank, world, local_rank = _dist_info()
    seed_everything(cfg.seed + rank)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = train_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    start_epoch, history, best = 0, [], math.inf
    resume_blob = read_checkpoint(out / "last.pt") if cfg.resume and (out / "last.pt").exists() else None
    init_blob = read_checkpoint(cfg.init) if cfg.init and resume_blob is None else None
    if resume_blob or init_blob:
        model_cfg = config_from_dict((resume_blob or init_blob)["config"])
    else:
        kw = {"input_size": cfg.input_size} if cfg.input_size else {}
        model_cfg = with_overrides(cfg.model, mask_loss_weight=cfg.mask_loss_weight, **kw)
    model = build_model(model_cfg, pretrained_backbone=cfg.pretrained_backbone and not (resume_blob or init_blob))
    if resume_blob or init_blob:
        blob = resume_blob or init_blob
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
        attach_refiner(model, blob)  # a second stage carries over; validation measures with both stages
    model.to(device)

    ds = HeadDataset(train_samples, model_cfg.input_size, Augment() if cfg.augment else None, seed=cfg.seed)
    sampler = _sampler(cfg, ds, train_samples, world, rank)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=cfg.workers, drop_last=len(ds) > cfg.batch_size)
    train_model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None) \
        if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_iters = max(1, cfg.epochs * len(loader))
    scheduler = _schedule(optimizer, min(cfg.warmup_iters, total_iters // 5), total_iters)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    if resume_blob:
        optimizer.load_state_dict(resume_blob["optimizer"])
        scheduler.load_state_dict(resume_blob["scheduler"])
        start_epoch, history = resume_blob["epoch"] + 1, resume_blob.get("history", [])
        best = min([h["val_adf_mm"] for h in history if h.get("val_adf_mm") is not None], default=math.inf)

    # Which exams trained and chose this checkpoint (and the one it started from): the evaluation
    # protocol refuses to score a model on them.
    lineage = (resume_blob.get("data") or {}).get("init_data") if resume_blob else (init_blob or {}).get("data")
    meta = {"train_config": asdict(cfg), "data": {"train_images": len(train_samples),
            "val_images": len(val_samples), **cfg.data_summary,
            "train_exams": sorted({s.group for s in train_samples}),
            "val_exams": sorted({s.group for s in val_samples}), "init_data": lineage}}
    t_start = time.time() - sum(h.get("seconds", 0) for h in history)
    for epoch in range(start_epoch, cfg.epochs):
        if should_stop and should_stop():
            break
        t0 = time.time()
        ds.epoch = epoch
        if world > 1:
            sampler.set_epoch(epoch)
        losses = train_one_epoch(train_model, optimizer, loader, device, epoch, scheduler=scheduler, scaler=scaler,
                                 mask_loss_weight=model_cfg.mask_loss_weight, show_progress=show_progress and rank == 0)
        if rank != 0:
            continue
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in losses.items()}, "lr": optimizer.param_groups[0]["lr"]}
        summary = None
        if val_samples:
            _, summary = validate(model, val_samples, cfg.score_threshold)
            row.update(val_adf_mm=summary.get("adf_mm", {}).get("mean"), val_dice=summary.get("dice", {}).get("mean"),
                       val_hd_mm=summary.get("hausdorff_mm", {}).get("mean"), val_missed=summary["missed"])
        row["seconds"] = time.time() - t0
        history.append(row)
        metric = row.get("val_adf_mm")
        ckpt_meta = {**meta, "epoch": epoch, "history": history, "validation": summary}
        improved = metric is not None and metric < best
        if improved or not val_samples:
            best = metric if metric is not None else best
            save_checkpoint(out / "best.pt", model, half=cfg.half_best, **ckpt_meta)
        save_checkpoint(out / "last.pt", model, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), **ckpt_meta)
        _write_history(out, history)
        status = {**row, "epoch": epoch + 1, "total_epochs": cfg.epochs,
                  "best_metric": None if best == math.inf else best, "total_time": time.time() - t_start}
        if show_progress:
            print(_epoch_line(status), flush=True)
        if callback:
            callback(status)
    if world > 1:
        dist.barrier()
    return {"best_metric": None if best == math.inf else best, "best_path": str(out / "best.pt"),
            "last_path": str(out / "last.pt"), "history": history, "total_time": time.time() - t_start,
            "format": CHECKPOINT_FORMAT}


def _sampler(cfg: TrainConfig, ds, samples: list[Sample], world: int, rank: int):
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.oversample_small == 1.0:
        return DistributedSampler(ds, world, rank, seed=cfg.seed) if world > 1 else RandomSampler(ds, generator=gen)
    if world > 1:
        raise ValueError(f"oversample_small {cfg.oversample_small}: needs a single process (no DDP)")
    weights = small_head_weights([sample_hc_mm(s) for s in samples], cfg.oversample_small)
    # Same epoch length; small heads drawn more often (with replacement).
    return WeightedRandomSampler(weights, len(weights), replacement=True, generator=gen)


def _epoch_line(s: dict) -> str:
    val = (f" val ADF {s['val_adf_mm']:.2f} mm Dice {100 * s['val_dice']:.2f} %"
           if s.get("val_adf_mm") is not None else "")
    return (f"epoch {s['epoch']}/{s['total_epochs']} loss {s['train_loss']:.3f}{val} "
            f"({s['seconds']:.0f} s, total {s['total_time'] / 60:.1f} min)")


def _write_history(out: Path, history: list[dict]):
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    tmp = out / "history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "history.csv")
    (out / "history.json").write_text(json.dumps(history, indent=1))
