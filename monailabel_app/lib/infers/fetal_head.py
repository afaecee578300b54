"""Infer task ``fetal_head``: one call of the FetalHC pipeline (``Measurer.measure``) per request.

Input: the image path MONAI Label resolved (datastore file, upload, or DICOM series folder).
Output: the head mask as a uint8 label in the input's geometry, and the measurement JSON.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from fetalhc.io import save_label_like
from fetalhc.model import CheckpointError
from fetalhc.pipeline import Measurer
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list

from lib.inputs import check_device, http_error, load_input, number, pixel_size, result_path

logger = logging.getLogger(__name__)
NO_SPACING = ("no pixel spacing: the image carries no calibration. Set pixel_size_mm (request option or the "
              "image's datastore info) or list the file in the pixel CSV sidecar")


class FetalHeadInfer(InferTask):
    def __init__(self, model_path, labels: dict, pixel_csv=None, score_threshold: float = 0.5):
        super().__init__(
            type=InferType.SEGMENTATION, labels=labels, dimension=2,
            description="Fetal head mask, ellipse and head circumference (mm) with GA and QC (FetalHC Mask R-CNN)",
            config={
                "score_threshold": score_threshold,  # below it the QC flags a low detection score
                "ga_weeks": "",  # known gestational age (weeks): adds the INTERGROWTH-21st HC centile
                "pixel_size_mm": "",  # for PNG/JPG without calibration (else image info / pixel CSV)
                "frame": 0,  # frame of a multi-frame (cine) DICOM
                "store_sr": False,  # DICOMweb datastore: also store the measurement in PACS as a DICOM SR
                "device": device_list(),
            })
        self.model_path = str(model_path)
        self.pixel_csv = pixel_csv
        self._measurers: dict[str, Measurer] = {}
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        return Path(self.model_path).is_file()

    def get_path(self, validate=True):
        return self.model_path if self.is_valid() or not validate else None

    def measurer(self, device: str) -> Measurer:
        """One Measurer per device; each reloads by itself when a new model is published."""
        with self._lock:
            if device not in self._measurers:
                try:
                    self._measurers[device] = Measurer(self.model_path, device)
                except CheckpointError as exc:
                    raise http_error(503, f"no usable model: {exc}") from None
            return self._measurers[device]

    def __call__(self, request):
        t0 = time.perf_counter()
        req = {**self._config, **request}
        path = req.get("image")
        if not isinstance(path, str) or not path:
            raise http_error(400, "fetal_head needs an image id or an uploaded image file")
        # Options first: a bad one is a 400 before any work.
        spacing_mm = pixel_size(req, req.get("image_info"))
        frame = number(req.get("frame"), "frame", 0, 1e6, integer=True) or 0
        threshold = number(req.get("score_threshold"), "score_threshold", 0.0, 1.0)
        ga = number(req.get("ga_weeks"), "ga_weeks", 1.0, 45.0)
        device = check_device(req.get("device"))
        # The studies' pixel CSV lists datastore images only; an upload carries its own calibration.
        from_datastore = req.get("image_info") is not None
        img = load_input(path, pixel_size=spacing_mm, pixel_csv=self.pixel_csv if from_datastore else None,
                         frame=frame)
        measurer = self.measurer(device)
        try:
            m = measurer.measure(img.pixels, img.spacing, spacing_at=img.spacing_at,
                                 score_threshold=0.5 if threshold is None else threshold, ga_weeks=ga)
        except CheckpointError as exc:
            raise http_error(503, f"no usable model: {exc}") from None
        out = result_path(img, req)
        save_label_like(m.mask, img, out)
        result = m.to_dict()
        result.update(
            image_shape=list(img.pixels.shape), input_format=img.meta.get("format"),
            spacing_reason=None if img.spacing else NO_SPACING, input_warnings=list(img.warnings),
            label_names=self.labels, latencies={"infer": round(m.latency_s, 4),
                                                "total": round(time.perf_counter() - t0, 4)})
        logger.info(f"fetal_head: {path} -> HC {result['hc_mm']} mm, QC {result['qc']} ({result['model_version']})")
        return out, result
