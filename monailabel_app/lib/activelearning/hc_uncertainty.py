"""Active learning by the uncertainty of the measurement itself.

``HCUncertaintyScoring`` (scoring method): for every unlabelled image, the TTA disagreement of HC and mask
plus low detection score (``fetalhc.uncertainty.measurement_uncertainty``), stored in the image's datastore
info (``hc_uncertainty`` and details) together with the model version that produced it; an image is
re-scored when a new model is published.

``HCUncertainty`` (strategy): the most uncertain unlabelled image not yet served by this strategy; when all
have been served, the one served longest ago. Images not scored yet rank after scored ones.
"""
from __future__ import annotations

import logging
import time

from fastapi import HTTPException
from fetalhc.model import CheckpointError, load_model
from fetalhc.uncertainty import measurement_uncertainty
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.utils.others.generic import name_to_device, strtobool

from lib.inputs import load_input, number, pixel_size

logger = logging.getLogger(__name__)
KEY = "hc_uncertainty"


class HCUncertaintyScoring(ScoringMethod):
    def __init__(self, model_path, pixel_csv=None, score_threshold: float = 0.5):
        super().__init__("TTA disagreement of HC and head mask (flips, 90° rotation) plus low detection score")
        self.model_path, self.pixel_csv, self.score_threshold = model_path, pixel_csv, score_threshold

    def info(self):
        return {"description": self.description, "config": {"max_samples": 0, "force": False}}

    def __call__(self, request, datastore: Datastore):
        t0 = time.time()
        try:
            model, meta = load_model(self.model_path, name_to_device(request.get("device")))
        except CheckpointError as exc:
            logger.warning(f"{KEY} scoring skipped: {exc}")
            return {"error": str(exc)}
        version, force = meta["version"], strtobool(str(request.get("force", False)))
        reload = getattr(datastore, "reload", None)
        if reload:
            reload()
        todo = [i for i in sorted(datastore.get_unlabeled_images())
                if force or datastore.get_image_info(i).get(f"{KEY}_model") != version]
        limit = number(request.get("max_samples"), "max_samples", 0, 1e9, integer=True)
        todo = todo[:limit] if limit else todo
        failed = {}
        for image_id in todo:
            info = datastore.get_image_info(image_id)
            try:
                img = load_input(datastore.get_image_uri(image_id), pixel_size=pixel_size({}, info),
                                 pixel_csv=self.pixel_csv)
            except HTTPException as exc:
                failed[image_id] = exc.detail
                continue
            u = measurement_uncertainty(model, img.pixels, img.spacing, score_threshold=self.score_threshold)
            datastore.update_image_info(image_id, {KEY: u["uncertainty"], f"{KEY}_detail": u,
                                                   f"{KEY}_model": version, f"{KEY}_ts": int(time.time())})
        summary = {"model_version": version, "executed": len(todo) - len(failed), "failed": failed,
                   "latency": round(time.time() - t0, 3)}
        logger.info(f"{KEY} scoring: {summary}")
        return summary


class HCUncertainty(Strategy):
    def __init__(self):
        super().__init__("Most uncertain HC measurement (TTA disagreement + low score) not yet served")

    def __call__(self, request, datastore: Datastore):
        reload = getattr(datastore, "reload", None)
        if reload:
            reload()
        strategy = request.get("strategy", KEY)
        rows = []
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            served = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            rows.append((image_id, info.get(KEY), served))
        if not rows:
            return None
        fresh = [r for r in rows if not r[2]]
        if fresh:  # most uncertain first; unscored after scored; ties by id
            image_id, score, _ = min(fresh, key=lambda r: (r[1] is None, -(r[1] or 0.0), r[0]))
        else:
            image_id, score, _ = min(rows, key=lambda r: (r[2], r[0]))
        logger.info(f"{strategy}: selected {image_id} (uncertainty {score}, {len(fresh)} not yet served)")
        return {"id": image_id, KEY: score}
