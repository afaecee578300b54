"""Train task ``fetal_head``: ``fetalhc.train.fit`` on the datastore's final labels, then publish the new
model only if it completed, loads, and is no worse than the serving model on the same validation images.

Progress goes to ``<model_dir>/train_stats.json`` every epoch, in MONAI Label's convention: ``epoch``,
``total_epochs``, ``best_metric`` (validation Dice of the best-ADF epoch, 0..1, which the Slicer plugin
shows as "accuracy"), ``best_adf_mm``, ``current_time`` while running and ``total_time`` once finished.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import torch
from fastapi import HTTPException
from fetalhc.data import Sample, split_samples
from fetalhc.engine import validate
from fetalhc.hc18 import exam_of
from fetalhc.io import Spacing
from fetalhc.model import CONFIGS, DEFAULT_CONFIG, CheckpointError, load_model
from fetalhc.refine_train import RefineTrainConfig, refine_checkpoint
from fetalhc.train import TrainConfig, fit
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.utils import processes, tasks
from monailabel.utils.others.generic import device_list

from lib.inputs import check_device, http_error, load_input, number, pixel_size
from lib.publish import publish

logger = logging.getLogger(__name__)
PIXEL_UNITS = "pixels (image without calibration)"
POLICIES = ("if_better", "always")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("1", "0", "true", "false", "yes", "no", "on", "off", "y", "n", "t", "f"):
        raise http_error(400, f"{name} must be true or false, got {value!r}")
    return text in ("1", "true", "yes", "on", "y", "t")


def _default(value, default):
    return default if value is None else value


def check_request(req: dict) -> dict:
    """Every train option parsed and range-checked (400 with the reason), before any process starts."""
    policy = req["publish"][0] if isinstance(req["publish"], list) else str(req["publish"])
    if policy not in POLICIES:
        raise http_error(400, f"publish must be one of {', '.join(POLICIES)}, got {policy!r}")
    if str(req["model_config"]) not in CONFIGS:
        raise http_error(400, f"model_config must be one of {', '.join(CONFIGS)}, got {req['model_config']!r}")
    gpus = str(req.get("gpus") or "all")
    if gpus != "all" and not all(g.strip().isdigit() for g in gpus.split(",")):
        raise http_error(400, f"gpus must be 'all' or GPU numbers like '0,1', got {gpus!r}")
    return {
        "policy": policy, "device": check_device(req.get("device")), "gpus": gpus,
        "epochs": number(req["max_epochs"], "max_epochs", 1, 10000, integer=True),
        "batch_size": number(req["train_batch_size"], "train_batch_size", 1, 256, integer=True),
        "lr": number(req["learning_rate"], "learning_rate", 1e-7, 1.0),
        "val_split": number(req["val_split"], "val_split", 0.0, 0.9) or 0.0,
        "seed": _default(number(req["seed"], "seed", 0, 2 ** 31 - 1, integer=True), 0),
        "score_threshold": _default(number(req["score_threshold"], "score_threshold", 0.0, 1.0), 0.5),
        "from_scratch": _flag(req["from_scratch"], "from_scratch"), "augment": _flag(req["augment"], "augment"),
        "multi_gpu": _flag(req.get("multi_gpu", True), "multi_gpu"),
        "refiner_iters": number(req.get("refiner_iters", 0), "refiner_iters", 0, 100000, integer=True) or 0,
        "refiner_lr": number(req.get("refiner_lr", 5e-4), "refiner_lr", 1e-7, 1.0)}


class StatsWriter:
    """fit() callback (rank 0): one atomic JSON per epoch. A class, so that DDP workers can pickle it."""

    def __init__(self, path: Path, base: dict):
        self.path, self.base, self.best_dice = Path(path), base, None

    def __call__(self, s: dict):
        if s.get("val_adf_mm") is not None and s["val_adf_mm"] == s.get("best_metric"):
            self.best_dice = s.get("val_dice")
        logger.info(f"epoch {s['epoch']}/{s['total_epochs']}: loss {s.get('train_loss', 0):.3f}, validation ADF "
                    f"{s.get('val_adf_mm')} (best {s.get('best_metric')}), Dice {s.get('val_dice')}")
        write_json(self.path, {
            **self.base, "status": "RUNNING", "epoch": s["epoch"], "total_epochs": s["total_epochs"],
            "best_metric": self.best_dice or 0.0, "best_adf_mm": s.get("best_metric"),
            "val_adf_mm": s.get("val_adf_mm"), "val_dice": s.get("val_dice"), "train_loss": s.get("train_loss"),
            "current_time": _clock(s["total_time"]), "current_time_s": round(s["total_time"], 1)})

    def refiner_step(self, r: dict):
        state = json.loads(self.path.read_text()) if self.path.is_file() else {**self.base}
        write_json(self.path, {**state, "status": "RUNNING", "stage": "refiner", "refiner_step": r["step"],
                               "refiner_val_adf": r.get("val_adf_mm")})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, devices: list[str], port: int, cfg: TrainConfig, train, val, writer: StatsWriter):
    """One torch.multiprocessing.spawn worker; fit() joins the process group from these variables."""
    os.environ.update(WORLD_SIZE=str(len(devices)), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port))
    fit(dataclasses.replace(cfg, device=devices[rank]), train, val,
        callback=writer if rank == 0 else None, show_progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class FetalHeadTrain(TrainTask):
    def __init__(self, model_dir: Path, published: Path, pixel_csv=None, keep_runs: int = 3, **defaults):
        super().__init__("Fine-tune (or train from scratch) the FetalHC Mask R-CNN on the final labels")
        self.model_dir, self.published, self.pixel_csv, self.keep_runs = Path(model_dir), published, pixel_csv, keep_runs
        self.stats_path = self.model_dir / "train_stats.json"
        self._running = False  # a run in this process (run_sync, or inside the train subprocess)
        self._config = {
            "max_epochs": 10, "train_batch_size": 4, "learning_rate": 3e-4,  # fine-tuning rate; 1e-3 from scratch
            "val_split": 0.2, "from_scratch": False, "augment": True,
            "publish": list(POLICIES),  # always: still only a completed, loadable checkpoint
            "score_threshold": 0.5, "seed": 0, "model_config": DEFAULT_CONFIG,
            "multi_gpu": True, "gpus": "all", "device": device_list(),
            # second stage (outline refiner) steps after the Mask R-CNN epochs; 0 keeps it unchanged.
            # ~2000 when it starts from scratch, a few hundred to fine-tune
            "refiner_iters": 300, "refiner_lr": 5e-4, **defaults}

    def config(self):
        return self._config

    def stats(self):
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not self._running and not processes("train"):
            # The run ended without writing its end: stopped over the API (MONAI Label's task says STOPPED),
            # else killed or crashed (or the server restarted under it): a failed run.
            last = (tasks("train") or [{}])[-1]
            if last.get("status") == "STOPPED":
                stats["status"] = "STOPPED"
            else:
                stats.update(status="ERROR", published=False,
                             error="the training process ended without finishing (killed, crashed, or the server "
                                   "restarted); the served model is unchanged")
        return stats

    def _samples(self, datastore) -> tuple[list[Sample], list[dict]]:
        samples, skipped = [], []
        for image_id in sorted(datastore.get_labeled_images()):
            image = datastore.get_image_uri(image_id)
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            frame = datastore.get_label_info(image_id, DefaultLabelTag.FINAL).get("frame") or 0  # cine labels
            try:
                img = load_input(image, pixel_size=pixel_size({}, datastore.get_image_info(image_id)),
                                 pixel_csv=self.pixel_csv, frame=int(frame))
                lab = load_input(label)
                if lab.pixels.shape != img.pixels.shape:
                    raise http_error(422, f"label is {lab.pixels.shape}, image is {img.pixels.shape}")
            except HTTPException as exc:
                logger.warning(f"training skips {image_id}: {exc.detail}")
                skipped.append({"image": image_id, "reason": exc.detail})
                continue
            name = Path(img.path).name
            samples.append(Sample(name, img.pixels, lab.pixels > 0, img.spacing, exam_of(image_id)))
        return samples, skipped

    def check_request(self, request: dict) -> dict:
        return check_request({**self._config, **request})

    @staticmethod
    def _gpus(opts: dict) -> list[str]:
        """CUDA devices for DDP (MONAI Label's async launcher already narrowed CUDA_VISIBLE_DEVICES to
        ``gpus``); empty for a single device."""
        if not torch.cuda.is_available() or not opts["multi_gpu"]:
            return []
        gpus = opts["gpus"]
        ids = list(range(torch.cuda.device_count())) if gpus == "all" else [int(g) for g in gpus.split(",")]
        return [f"cuda:{i}" for i in ids] if len(ids) > 1 else []

    def __call__(self, request, datastore):
        req = {**self._config, **request}
        opts = check_request(req)
        t0 = time.time()
        self._cleanup_runs(keep=self.keep_runs - 1)  # killed runs never reached the cleanup at their end
        samples, skipped = self._samples(datastore)
        if not samples:
            raise http_error(409, "no usable final labels in the datastore: save labels with tag 'final' first"
                                  + (f" (skipped: {skipped})" if skipped else ""))
        train, val = split_samples(samples, opts["val_split"], opts["seed"])
        # Validation needs a spacing; images without one are validated in pixels (ADF in px).
        val = [s if s.spacing else dataclasses.replace(s, spacing=Spacing(1.0, 1.0, PIXEL_UNITS)) for s in val]
        init = None if opts["from_scratch"] or not self.published.is_file() else str(self.published)
        policy, device = opts["policy"], opts["device"]
        run_id = datetime.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        cfg = TrainConfig(
            out_dir=str(self.model_dir / "runs" / run_id), model=str(req["model_config"]),
            epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"], init=init,
            augment=opts["augment"], device=device, seed=opts["seed"], score_threshold=opts["score_threshold"],
            data_summary={"source": "MONAI Label datastore final labels", "skipped": skipped})
        base = {"run_id": run_id, "start_ts": int(t0), "total_epochs": cfg.epochs, "train_images": len(train),
                "val_images": len(val), "fine_tune_from": init, "device": device, "skipped": skipped}
        writer = StatsWriter(self.stats_path, base)
        write_json(self.stats_path, {**base, "status": "RUNNING", "epoch": 0, "best_metric": 0.0,
                                     "current_time": _clock(0)})
        gpus = self._gpus(opts)
        self._running = True
        try:
            if gpus:
                torch.multiprocessing.spawn(_ddp_worker, args=(gpus, _free_port(), cfg, train, val, writer),
                                            nprocs=len(gpus))
            else:
                fit(cfg, train, val, callback=writer, show_progress=False)
            self._refine(Path(cfg.out_dir), train, val, opts, writer)
            decision = self._decide(Path(cfg.out_dir), val, policy, device, cfg.score_threshold)
        except Exception as exc:
            write_json(self.stats_path, {**self.stats(), "status": "ERROR", "error": f"{type(exc).__name__}: {exc}",
                                         "published": False, "total_time": _clock(time.time() - t0)})
            raise
        finally:
            self._running = False
        stats = {**self.stats(), **decision, "status": "DONE", "gpus": gpus,
                 "total_time": _clock(time.time() - t0), "total_time_s": round(time.time() - t0, 1)}
        stats.pop("current_time", None), stats.pop("current_time_s", None)
        write_json(self.stats_path, stats)
        self._cleanup_runs()
        return stats

    def _refine(self, run_dir: Path, train, val, opts: dict, writer: "StatsWriter"):
        """Second stage: fine-tune the checkpoint's outline refiner (train one from scratch when it has none)
        on the same labels, into the candidate, which is then validated with both stages."""
        if not opts["refiner_iters"] or not (run_dir / "best.pt").is_file():
            return
        tc = RefineTrainConfig(iters=opts["refiner_iters"], lr=opts["refiner_lr"], seed=opts["seed"],
                               eval_every=max(1, opts["refiner_iters"] // 4))
        refine_checkpoint(run_dir / "best.pt", run_dir / "best.pt", train, val, run_dir / "refiner", tc=tc,
                          progress=writer.refiner_step, device=opts["device"],
                          data_summary={"source": "MONAI Label datastore final labels"})

    def _decide(self, run_dir: Path, val: list[Sample], policy: str, device: str, threshold: float) -> dict:
        """Publish only a completed, loadable checkpoint that is no worse than the serving one."""
        candidate = run_dir / "best.pt"
        try:
            model, _ = load_model(candidate, device)
        except CheckpointError as exc:
            return {"published": False, "publish_reason": f"no usable checkpoint from this run: {exc}"}
        out: dict = {"published": False, "candidate": str(candidate), "publish_policy": policy}
        if not val and policy != "always":
            out["publish_reason"] = ("not validated, not published: no validation images (needs final labels of "
                                     "at least two examinations; train with publish=always to override)")
            return out
        if val:
            out["candidate_val_adf"] = validate(model, val, threshold)[1]["adf_mm"]["mean"]
            out["serving_val_adf"] = self._serving_adf(val, device, threshold)
        unit = "px" if any(s.spacing.source == PIXEL_UNITS for s in val) else "mm"
        cand, cur = out.get("candidate_val_adf"), out.get("serving_val_adf")
        if policy == "always":
            out["publish_reason"] = "publish=always"
        elif cur is not None and cand > cur:
            out["publish_reason"] = (f"kept the serving model: validation ADF {cand:.2f} {unit} of the new model is "
                                     f"worse than {cur:.2f} {unit} of the serving one on the same {len(val)} images")
            return out
        else:
            out["publish_reason"] = (f"validation ADF {cand:.2f} {unit}" +
                                     (f" <= serving {cur:.2f} {unit}" if cur is not None else " (no serving model)"))
        publish(candidate, self.published)
        out["published"] = True
        return out

    def _serving_adf(self, val, device, threshold) -> float | None:
        if not self.published.is_file():
            return None
        try:
            model, _ = load_model(self.published, device)
        except CheckpointError as exc:
            logger.warning(f"serving model is unusable and will be replaced: {exc}")
            return None
        return validate(model, val, threshold)[1]["adf_mm"]["mean"]

    def _cleanup_runs(self, keep: int | None = None):
        """Keep the newest ``keep`` (default keep_runs) run folders; the served model is a copy."""
        keep = self.keep_runs if keep is None else keep
        runs = sorted(p for p in (self.model_dir / "runs").glob("*") if p.is_dir())
        for old in runs[:max(0, len(runs) - max(0, keep))] if self.keep_runs > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
