"""FetalHCLogic: the module's one Logic (no Qt). It takes nodes as arguments, keeps the module state in
a parameter node, owns the server flow and keeps the shown measurement live.

Server steps are split so that a GUI can run the network part in a worker thread and keep MRML on the
main thread: ``*_request`` (MRML) -> ``*_call`` (network, any thread) -> ``apply_*`` (MRML). The one-call
methods (:meth:`FetalHCLogic.segment`, ...) chain the three; the tests and FetalHCTest use them.

Showing results and re-measuring edits live is :class:`FetalHCLib.live.LiveMeasurement`, a mixin of
this Logic.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import slicer

from . import files, nodes
from .client import DEFAULT_URL, InferResult, MonaiLabelClient, ServerError
from .live import LiveMeasurement
from .nodes import FetalHCError
from .shared import io, result as fresult

try:  # in Slicer; slicer-core (headless tests) has no Qt-based ScriptedLoadableModule
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:
    _LogicBase = object

DEFAULT_MODEL = "fetal_head"
DEFAULT_STRATEGY = "hc_uncertainty"
LABEL_EXTENSION = ".nrrd"  # asked for with the infer param "result_extension" (monailabel_app/lib/inputs.py)
ACTIVE_TRAIN_STATES = ("SUBMITTED", "RUNNING")
# parameter node keys (module state, saved with the scene)
P_URL, P_MODEL, P_STRATEGY, P_GA, P_INPUT = "ServerURL", "Model", "Strategy", "KnownGAWeeks", "InputVolume"


@dataclass
class InferRequest:
    volume: object  # the grey 2-D input volume the result goes onto
    model: str
    image_id: str | None = None
    file: str | None = None
    params: dict = field(default_factory=dict)


@dataclass
class SubmitRequest:
    volume: object
    image_id: str | None
    upload: str | None  # image file to add to the datastore first
    label: str
    params: dict


def train_progress(status: dict | None, info: dict | None = None, model: str = DEFAULT_MODEL) -> dict:
    """{"active", "state", "epoch", "total", "best_metric", "text"} from ``GET /train/`` and the trainer's
    ``train_stats`` in ``GET /info/``. "active" (keep polling) covers SUBMITTED and RUNNING."""
    stats = ((info or {}).get("train_stats") or {}).get(model) or {}
    state = (status or {}).get("status") or "not started"
    active = state in ACTIVE_TRAIN_STATES
    epoch, total = stats.get("epoch"), stats.get("total_epochs") or stats.get("max_epochs")
    if active or epoch is None:  # newest numbers are in the task's log lines while it runs
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
    if not active and stats.get("publish_reason"):
        parts.append(("published: " if stats.get("published") else "not published: ") + stats["publish_reason"])
    if state == "ERROR":
        detail = next((ln for ln in reversed(list((status or {}).get("details") or [])) if ln.strip()), "")
        parts.append(f"failed: {detail[:300]}" if detail else "failed (see the server log)")
    return {"active": active, "state": state, "epoch": epoch, "total": total, "best_metric": best,
            "failed": state == "ERROR", "text": ", ".join(parts)}


def server_summary(info: dict) -> dict:
    return {"name": info.get("name", ""), "version": info.get("version", ""),
            "models": sorted(info.get("models") or {}), "strategies": sorted(info.get("strategies") or {}),
            "trainers": sorted(info.get("trainers") or {}), "train_stats": info.get("train_stats") or {}}


class FetalHCLogic(LiveMeasurement, _LogicBase):
    def __init__(self, scene=None, *, scheduler=None, timeouts: dict | None = None, workdir: str | None = None):
        if _LogicBase is not object:
            _LogicBase.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.init_live(scheduler)
        self.timeouts = timeouts
        self._workdir = workdir
        self._own_workdir = workdir is None
        self._client = None
        self._client_key = None
        self._url = None  # from the parameter node; kept here so worker threads never touch MRML
        self.token = None  # None: env FETALHC_API_TOKEN
        self.info = None

    # ------------------------------------------------------------------------ module state
    def parameter_node(self):
        """The module's vtkMRMLScriptedModuleNode (singleton in the scene, saved with it)."""
        node = self.scene.GetSingletonNode("FetalHC", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag("FetalHC")
            node.SetName("FetalHC")
            node.SetModuleName("FetalHC")
            node = self.scene.AddNode(node)
        for key, default in ((P_URL, DEFAULT_URL), (P_MODEL, DEFAULT_MODEL), (P_STRATEGY, DEFAULT_STRATEGY),
                             (P_GA, "")):
            if not node.GetParameter(key):
                node.SetParameter(key, default)
        return node

    def known_ga(self) -> float | None:
        text = self.parameter_node().GetParameter(P_GA).strip()
        return float(text) if text else None

    def set_known_ga(self, weeks: float | None) -> None:
        self.parameter_node().SetParameter(P_GA, "" if not weeks else f"{float(weeks):g}")

    @property
    def workdir(self) -> str:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="fetalhc_")
        os.makedirs(self._workdir, exist_ok=True)
        return self._workdir

    def cleanup(self) -> None:
        """Remove observers and the scratch folder (Slicer: module widget cleanup / scene close)."""
        for vid in list(self._observations):
            self.unobserve(vid)
        if self._own_workdir and self._workdir and os.path.isdir(self._workdir):
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    # ------------------------------------------------------------------------------ server
    @property
    def client(self) -> MonaiLabelClient:
        """Client for the server URL (ServerError, shown in the panel, for a bad URL). Safe in a worker
        thread once :meth:`set_server` (or a first use on the main thread) has read the parameter node."""
        if self._url is None:
            self._url = self.parameter_node().GetParameter(P_URL)
        key = (self._url, self.token)
        if self._client is None or key != self._client_key:
            self._client = MonaiLabelClient(key[0], self.timeouts, self.token)
            self._client_key = key
            self.info = None
        return self._client

    def set_server(self, url: str, token: str | None = None) -> None:
        self._url = (url or "").strip() or DEFAULT_URL
        self.parameter_node().SetParameter(P_URL, self._url)
        self.token = token
        _ = self.client  # builds the client now: a bad URL is reported here

    def connect(self) -> dict:
        self.info = self.client.info()
        return server_summary(self.info)

    # ------------------------------------------------------------------------ input
    def prepare(self, volume, *, dicom_file: str | None = None, manual_mm: float | None = None,
                frame: int | None = None, database=None):
        """(grey 2-D input volume, spacing report). The calibration is resolved on the selected volume
        (its DICOM file found through ``database`` = slicer.dicomDatabase when not given), then carried
        to the grey copy if one is needed (RGB, cine frame, sequence proxy)."""
        dicom_file = dicom_file or nodes.dicom_file(volume, database)
        report = nodes.resolve_spacing(volume, dicom_file=dicom_file, manual_mm=manual_mm)
        grey = nodes.prepare_input(volume, frame)
        spacing = report["spacing"]
        if grey is not volume and spacing is not None and nodes.volume_spacing(grey) != spacing:
            nodes.set_spacing(grey, spacing.row_mm, spacing.col_mm, spacing.source)
        self.parameter_node().SetNodeReferenceID(P_INPUT, grey.GetID())
        return grey, report

    @staticmethod
    def is_dicom_input(volume) -> bool:
        name = volume.GetAttribute(nodes.ATTR_IMAGE_NAME) or ""
        return bool(nodes.dicom_instance_uids(volume) or volume.GetAttribute(nodes.ATTR_DICOM_FILE)
                    or volume.GetAttribute(nodes.ATTR_FILE_KIND) == "dicom" or (name and io.file_kind(name) == "dicom"))

    # ------------------------------------------------------------------------ infer
    def infer_request(self, volume, model: str = DEFAULT_MODEL, **prepare_kw) -> InferRequest:
        grey, _ = self.prepare(volume, **prepare_kw)
        req = InferRequest(grey, model, params={"result_extension": LABEL_EXTENSION})
        if self.known_ga() is not None:
            req.params["ga_weeks"] = self.known_ga()
        image_id = grey.GetAttribute(nodes.ATTR_IMAGE_ID)
        spacing = nodes.volume_spacing(grey)
        if image_id:  # a datastore image: the server has the file; only a manual pixel size must travel
            req.image_id = image_id
            if spacing is not None and spacing.source == nodes.SRC_MANUAL:
                req.params["pixel_size_mm"] = spacing.col_mm
        else:
            req.file = files.write_upload_file(grey, self.workdir)
        return req

    def infer_call(self, req: InferRequest) -> InferResult:
        try:
            return self.client.infer(req.model, image_id=req.image_id, file=req.file, params=req.params)
        finally:
            _remove(req.file)

    def apply_infer(self, req: InferRequest, res: InferResult):
        volume = req.volume
        mask = None
        if res.label_bytes is not None:
            path = res.save_label(self.workdir)
            try:
                mask = files.read_label_file(path, nodes.image_shape(volume))
            finally:
                _remove(path)
        result = fresult.Result.from_dict(res.params or {})
        result.extra["warnings"] = list(result.extra.pop("input_warnings", None) or [])
        if result.ellipse_px is None:  # no head: a red result, and an empty segment to paint it in
            result.qc_ok = False
            result.qc_reasons = result.qc_reasons or ["no head found"]
            mask = mask if mask is not None else np.zeros(nodes.image_shape(volume), np.uint8)
        return self.accept_ai(volume, result, mask)

    def segment(self, volume, model: str = DEFAULT_MODEL, **prepare_kw):
        req = self.infer_request(volume, model, **prepare_kw)
        return self.apply_infer(req, self.infer_call(req))

    # ------------------------------------------------------------------------ submit / PACS
    def submit_request(self, volume, *, pacs: bool = False) -> SubmitRequest:
        """Files and params for :meth:`submit_call`: the label of exactly the outline shown, its source and
        its measurement; an image the server does not have yet is uploaded first (for PACS: its DICOM)."""
        if self._pending.get(volume.GetID()):
            self.flush()  # an edit still waiting for its debounce: measure it before sending
        res = self.current_result(volume)
        if res is None:
            raise FetalHCError("nothing to submit yet: run Segment head or paint the head first")
        image_id = volume.GetAttribute(nodes.ATTR_IMAGE_ID)
        upload = None
        if pacs and not self.is_dicom_input(volume):
            raise FetalHCError("Save to PACS needs an image loaded from DICOM (DICOM module or PACS)")
        if not image_id:
            source_dicom = volume.GetAttribute(nodes.ATTR_DICOM_FILE)
            upload = source_dicom if pacs and source_dicom else files.write_upload_file(volume, self.workdir)
        suffix = io.label_suffix(upload or volume.GetAttribute(nodes.ATTR_IMAGE_NAME) or "image.png")
        params = {"client": "FetalHC Slicer", "outline_source": res.outline_source, "measurement": res.to_dict()}
        if pacs:
            params["store_sr"] = True
        label = files.write_label_file(self.outline_mask(volume), volume, self.workdir, suffix)
        return SubmitRequest(volume, image_id, upload, label, params)

    def submit_call(self, req: SubmitRequest, *, train: bool = False, model: str = DEFAULT_MODEL) -> dict:
        """Upload (if needed), save the final label, then (optionally) ask for training. A refused training
        (429: one is running) does not undo the save: it is reported next to it."""
        try:
            image_id = req.image_id or self.client.upload_image(req.upload)
            saved = self.client.save_label(image_id, req.label, tag="final", params=req.params)
        finally:
            _remove(req.label)
            if req.upload and os.path.dirname(os.path.abspath(req.upload)) == os.path.abspath(self.workdir):
                _remove(req.upload)
        out = {"image_id": image_id, "saved": saved, "train": None, "train_error": None,
               "pacs": (saved or {}).get("pacs") if isinstance(saved, dict) else None}
        if train:
            try:
                out["train"] = self.client.train_start(model)
            except ServerError as e:
                out["train_error"] = ("a training run is already going; the new label joins the next run"
                                      if e.status == 429 else str(e))
        return out

    def apply_submit(self, req: SubmitRequest, out: dict) -> str:
        """Record the datastore id; returns the message for the panel."""
        req.volume.SetAttribute(nodes.ATTR_IMAGE_ID, out["image_id"])
        text = f"Saved the final label of '{out['image_id']}' ({req.params['outline_source']} outline)"
        if out["train"] is not None:
            text += "; training started"
        elif out["train_error"]:
            text += f"; training not started: {out['train_error']}"
        return text + "."

    def submit(self, volume, *, train: bool = False, model: str = DEFAULT_MODEL) -> dict:
        req = self.submit_request(volume)
        out = self.submit_call(req, train=train, model=model)
        out["message"] = self.apply_submit(req, out)
        return out

    @staticmethod
    def pacs_message(out: dict) -> str:
        pacs = out.get("pacs")
        if not pacs:
            return (f"Saved the label of '{out['image_id']}' on the server, but nothing was stored in PACS: "
                    "the server's datastore is not a DICOMweb PACS.")
        sr = pacs.get("sr_sop_instance_uid")
        return (f"Stored in PACS: SEG {pacs.get('seg_sop_instance_uid')}, "
                + (f"SR {sr}" if sr else "no SR") + f", series {pacs.get('series_instance_uid')}")

    def save_to_pacs(self, volume) -> dict:
        req = self.submit_request(volume, pacs=True)
        out = self.submit_call(req)
        self.apply_submit(req, out)
        out["message"] = self.pacs_message(out)
        return out

    # ------------------------------------------------------------------------ next image
    def next_image_call(self, strategy: str = DEFAULT_STRATEGY) -> dict:
        sample = self.client.next_sample(strategy, {"client_id": "FetalHC-Slicer"})
        if not sample or not sample.get("id"):
            raise ServerError(f"strategy '{strategy}' has no image left to label")
        return {"sample": sample, "path": self.client.download_image(sample["id"], self.workdir)}

    def apply_next_image(self, got: dict):
        sample = got["sample"]
        try:
            kind = io.detect_kind(got["path"])
            volume = files.load_image_volume(self.scene, got["path"], name=sample["id"])
        finally:
            _remove(got["path"])
        volume.SetAttribute(nodes.ATTR_FILE_KIND, kind)
        volume.SetAttribute(nodes.ATTR_IMAGE_ID, sample["id"])
        volume.SetAttribute(nodes.ATTR_IMAGE_NAME, sample.get("name") or os.path.basename(got["path"]))
        info_mm = (sample.get("info") or {}).get("pixel_size_mm") or sample.get("pixel_size_mm")
        if info_mm and nodes.volume_spacing(volume) is None:
            nodes.set_spacing(volume, float(info_mm), float(info_mm), "server datastore info pixel_size_mm")
        return volume

    def next_image(self, strategy: str = DEFAULT_STRATEGY):
        return self.apply_next_image(self.next_image_call(strategy))

    # ------------------------------------------------------------------------ training
    def train_start(self, model: str = DEFAULT_MODEL, params: dict | None = None) -> dict:
        return self.client.train_start(model, params)

    def train_stop(self):
        return self.client.train_stop()

    def train_poll(self, model: str = DEFAULT_MODEL) -> dict:
        return train_progress(self.client.train_status(), self.client.info(), model)

    def train_wait(self, model: str = DEFAULT_MODEL, timeout_s: float = 600, every_s: float = 1.0,
                   on_progress=None) -> dict:
        """Poll until the run leaves SUBMITTED/RUNNING; returns the last progress."""
        deadline = time.time() + timeout_s
        while True:
            p = self.train_poll(model)
            if on_progress:
                on_progress(p)
            if not p["active"] or time.time() > deadline:
                return p
            time.sleep(every_s)


def _remove(path: str | None) -> None:
    if path and os.path.isfile(path):
        os.remove(path)
