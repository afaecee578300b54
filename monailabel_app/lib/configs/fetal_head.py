"""Task config ``fetal_head``: where the served model lives, and the infer/train/active-learning tasks over it.

Conf options (``--conf key value``): model_dir, initial_model, pixel_csv, score_threshold, max_epochs,
train_batch_size, learning_rate, val_split, publish, refiner_iters, keep_runs, auto_train_every (see README.md).
"""
from __future__ import annotations

import logging
from pathlib import Path

from fetalhc.pipeline import default_model_path
from monailabel.interfaces.config import TaskConfig

from lib.activelearning.hc_uncertainty import HCUncertainty, HCUncertaintyScoring
from lib.infers.fetal_head import FetalHeadInfer
from lib.inputs import number
from lib.publish import ensure_initial_model
from lib.trainers.fetal_head import POLICIES, FetalHeadTrain

logger = logging.getLogger(__name__)
TRAIN_OPTIONS = {"max_epochs": int, "train_batch_size": int, "learning_rate": float, "val_split": float,
                 "publish": str, "refiner_iters": int}


class FetalHeadConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict, planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.labels = {"fetal_head": 1}
        self.path = Path(model_dir) / f"{name}.pt"
        initial = Path(conf.get("initial_model") or default_model_path())
        ensure_initial_model(initial, self.path)
        self.pixel_csv = conf.get("pixel_csv") or self._find_pixel_csv(kwargs.get("studies"))
        self.score_threshold = number(conf.get("score_threshold"), "score_threshold", 0, 1) or 0.5

    @staticmethod
    def _find_pixel_csv(studies) -> str | None:
        """A pixel-size CSV sidecar in the studies folder (HC18 style: filename, pixel size(mm))."""
        if not studies or str(studies).startswith(("http://", "https://")) or not Path(studies).is_dir():
            return None
        found = sorted(Path(studies).glob("*pixel_size*.csv"))
        if found:
            logger.info(f"pixel CSV sidecar: {found[0]}")
        return str(found[0]) if found else None

    def infer(self):
        return {self.name: FetalHeadInfer(self.path, self.labels, self.pixel_csv, self.score_threshold)}

    def trainer(self):
        overrides = {k: t(self.conf[k]) for k, t in TRAIN_OPTIONS.items() if self.conf.get(k)}
        if "publish" in overrides:
            overrides["publish"] = [overrides["publish"]] + [p for p in POLICIES if p != overrides["publish"]]
        return FetalHeadTrain(Path(self.model_dir), self.path, self.pixel_csv,
                              keep_runs=_keep_runs(self.conf.get("keep_runs")), score_threshold=self.score_threshold,
                              **overrides)

    def strategy(self):
        return {"hc_uncertainty": HCUncertainty()}

    def scoring_method(self):
        return {"hc_uncertainty": HCUncertaintyScoring(self.path, self.pixel_csv, self.score_threshold)}


def _keep_runs(value) -> int:
    n = number(value, "keep_runs", 0, 1000, integer=True)
    return 3 if n is None else n
