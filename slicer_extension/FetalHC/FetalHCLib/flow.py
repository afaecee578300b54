"""The FetalHC workflow against a MONAI Label server: connect, segment, recompute, submit, next image, train.

Each server step is split so that a GUI can run the network part in a worker thread and keep the MRML
part on the main thread: ``*_request`` (MRML, main thread) -> ``client.<call>`` (network, any thread)
-> ``apply_*`` (MRML, main thread). The one-call methods (:meth:`Flow.segment`, ...) chain the three
and are what the tests and the Slicer self-test use.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import logic
from .client import DEFAULT_URL, InferResult, MonaiLabelClient, ServerError

DEFAULT_MODEL = "fetal_head"
DEFAULT_STRATEGY = "hc_uncertainty"
LABEL_EXTENSION = ".nrrd"  # asked for with the infer param "result_extension" (monailabel_app/lib/inputs.py)


@dataclass
class InferRequest:
    volume: object  # the grey 2-D input volume the result goes onto
    model: str
    image_id: str | None = None
    file: str | None = None
    params: dict = field(default_factory=dict)

    def call(self, client: MonaiLabelClient) -> InferResult:
        return client.infer(self.model, image_id=self.image_id, file=self.file, params=self.params)


def server_summary(info: dict) -> dict:
    """Models, strategies and trainers from ``GET /info/``."""
    return {"name": info.get("name", ""), "version": info.get("version", ""),
            "models": sorted(info.get("models") or {}), "strategies": sorted(info.get("strategies") or {}),
            "trainers": sorted(info.get("trainers") or {}), "train_stats": info.get("train_stats") or {}}


def train_progress(status: dict | None, info: dict | None = None, model: str = DEFAULT_MODEL) -> dict:
    """{"running", "state", "epoch", "total", "best_metric", "text"} from ``GET /train/`` and the trainer's
    ``train_stats`` in ``GET /info/`` (keys epoch/total_epochs/best_metric, as MONAI Label trainers write)."""
    stats = ((info or {}).get("train_stats") or {}).get(model) or {}
    state = (status or {}).get("status") or "not started"
    epoch, total = stats.get("epoch"), stats.get("total_epochs") or stats.get("max_epochs")
    if state == "RUNNING" or epoch is None:  # newest numbers are in the task's log lines while it runs
        for line in reversed(list((status or {}).get("details") or [])):
            m = re.search(r"[Ee]poch\D{0,3}(\d+)\s*/\s*(\d+)", line)
            if m:
                epoch, total = int(m.group(1)), int(m.group(2))
                break
    best = stats.get("best_metric")
    parts = [f"Training: {state}"]
    if epoch is not None and total:
        parts.append(f"epoch {epoch}/{total}")
    if best is not None:
        parts.append(f"best metric {float(best):.4f}")
    if stats.get("best_adf_mm") is not None:  # FetalHC trainer: validation ADF of the best epoch
        parts.append(f"best ADF {float(stats['best_adf_mm']):.2f} mm")
    if state != "RUNNING" and stats.get("publish_reason"):
        parts.append(("published: " if stats.get("published") else "not published: ") + stats["publish_reason"])
    return {"running": state == "RUNNING", "state": state, "epoch": epoch, "total": total, "best_metric": best,
            "text": ", ".join(parts)}


def prepare(volume, *, dicom_file: str | None = None, manual_mm: float | None = None, frame: int = 0):
    """(grey 2-D input volume, spacing report): the calibration is resolved on the volume the user
    selected (logic.resolve_spacing), then carried to the grey copy (logic.prepare_input) if one is needed."""
    report = logic.resolve_spacing(volume, dicom_file=dicom_file, manual_mm=manual_mm)
    grey = logic.prepare_input(volume, frame)
    spacing = report["spacing"]
    if grey is not volume and spacing is not None and logic.volume_spacing(grey) != spacing:
        logic.set_spacing(grey, spacing.row_mm, spacing.col_mm, spacing.source)
    return grey, report


class Flow:
    def __init__(self, scene, url: str = DEFAULT_URL, timeouts: dict | None = None, workdir: str | None = None):
        self.scene = scene
        self.client = MonaiLabelClient(url, timeouts)
        self.info: dict | None = None
        self.workdir = workdir or logic.scratch_dir()

    def set_url(self, url: str) -> None:
        if url.strip().rstrip("/") != self.client.url:
            self.client = MonaiLabelClient(url, self.client.timeouts)
            self.info = None

    # --------------------------------------------------------------------------------- connect
    def connect(self) -> dict:
        self.info = self.client.info()
        return server_summary(self.info)

    # ---------------------------------------------------------------------------------- infer
    def infer_request(self, volume, model: str = DEFAULT_MODEL, *, dicom_file: str | None = None,
                      manual_mm: float | None = None, frame: int = 0, params: dict | None = None) -> InferRequest:
        grey, _ = prepare(volume, dicom_file=dicom_file, manual_mm=manual_mm, frame=frame)
        req = InferRequest(grey, model, params={"result_extension": LABEL_EXTENSION, **(params or {})})
        image_id = grey.GetAttribute(logic.ATTR_IMAGE_ID)
        spacing = logic.volume_spacing(grey)
        if image_id:  # a datastore image: the server has the file; only a manual pixel size must travel
            req.image_id = image_id
            if spacing is not None and spacing.source == logic.SRC_MANUAL:
                req.params["pixel_size_mm"] = spacing.col_mm
        else:
            req.file = logic.write_upload_file(grey, self.workdir)
        return req

    def apply_infer(self, req: InferRequest, res: InferResult) -> dict:
        volume = req.volume
        params = dict(res.params or {})
        mask = None
        if res.label_bytes is not None:
            path = res.save_label(self.workdir)
            try:
                mask = logic.read_label_file(path, logic.image_shape(volume))
            finally:
                os.remove(path)
        params["warnings"] = list(params.get("input_warnings") or [])
        source = f"datastore image {req.image_id}" if req.image_id else "uploaded image"
        params["origin"] = f"server inference ({req.model}, {source})"
        if params.get("ellipse_px") is None:
            reasons = "; ".join(params.get("qc_reasons") or []) or "no head found"
            if mask is not None:
                logic.set_head_segment(volume, mask)
            raise logic.FetalHCError(f"No head measured: {reasons}. Paint the head with the Segment Editor and "
                                     "press Recompute, or try another image.")
        return logic.apply_result(volume, params, mask)

    def segment(self, volume, model: str = DEFAULT_MODEL, **kw) -> dict:
        req = self.infer_request(volume, model, **kw)
        return self.apply_infer(req, req.call(self.client))

    # --------------------------------------------------------------------------------- submit
    def submit_request(self, volume) -> dict:
        """Files for ``submit_call``: the label (exported segment) and, for an image the server does not
        have yet, the image to upload first."""
        image_id = volume.GetAttribute(logic.ATTR_IMAGE_ID)
        upload = None if image_id else logic.write_upload_file(volume, self.workdir)
        io = logic.core.load()[2]
        suffix = io.label_suffix(upload or volume.GetAttribute(logic.ATTR_IMAGE_NAME) or "image.png")
        return {"volume": volume, "image_id": image_id, "upload": upload,
                "label": logic.write_label_file(volume, self.workdir, suffix)}

    def submit_call(self, req: dict, *, train: bool = False, model: str = DEFAULT_MODEL) -> dict:
        image_id = req["image_id"] or self.client.upload_image(req["upload"])
        saved = self.client.save_label(image_id, req["label"], tag="final",
                                       params={"client": "FetalHC Slicer", "hc_source": "user-edited segment"})
        out = {"image_id": image_id, "saved": saved, "train": None}
        if train:
            out["train"] = self.client.train_start(model)
        return out

    def apply_submit(self, req: dict, out: dict) -> None:
        req["volume"].SetAttribute(logic.ATTR_IMAGE_ID, out["image_id"])
        for key in ("label", "upload"):
            if req.get(key) and os.path.exists(req[key]):
                os.remove(req[key])

    def submit(self, volume, *, train: bool = False, model: str = DEFAULT_MODEL) -> dict:
        req = self.submit_request(volume)
        out = self.submit_call(req, train=train, model=model)
        self.apply_submit(req, out)
        return out

    # ----------------------------------------------------------------------------- next image
    def next_image_call(self, strategy: str = DEFAULT_STRATEGY) -> dict:
        sample = self.client.next_sample(strategy, {"client_id": "FetalHC-Slicer"})
        if not sample or not sample.get("id"):
            raise ServerError(f"strategy '{strategy}' has no image left to label")
        return {"sample": sample, "path": self.client.download_image(sample["id"], self.workdir)}

    def apply_next_image(self, got: dict):
        sample = got["sample"]
        volume = logic.load_image_volume(self.scene, got["path"], name=sample["id"])
        volume.SetAttribute(logic.ATTR_IMAGE_ID, sample["id"])
        volume.SetAttribute(logic.ATTR_IMAGE_NAME, sample.get("name") or os.path.basename(got["path"]))
        info_mm = (sample.get("info") or {}).get("pixel_size_mm") or sample.get("pixel_size_mm")
        if info_mm and logic.volume_spacing(volume) is None:
            logic.set_spacing(volume, float(info_mm), float(info_mm), "server datastore info pixel_size_mm")
        os.remove(got["path"])
        return volume

    def next_image(self, strategy: str = DEFAULT_STRATEGY):
        return self.apply_next_image(self.next_image_call(strategy))

    # --------------------------------------------------------------------------------- train
    def train_start(self, model: str = DEFAULT_MODEL, params: dict | None = None) -> dict:
        return self.client.train_start(model, params)

    def train_stop(self):
        return self.client.train_stop()

    def train_poll(self, model: str = DEFAULT_MODEL) -> dict:
        return train_progress(self.client.train_status(), self.client.info(), model)
