"""Datastores that refuse bad input with a 4xx and never lose a saved label.

``FetalLocalDatastore`` (a folder of PNG/JPG/NIfTI/NRRD/DICOM images): uploads and labels are validated
with ``fetalhc.io`` before anything is written (readable 2-D image, sane size, label of the image's shape,
known image id, ids without path separators); label files are written atomically, and so is the datastore
JSON, which is re-read before every write so that the server and the train/scoring subprocesses do not
overwrite each other's entries.

``FetalDICOMWebDatastore`` (e.g. Orthanc with Modality US): series are kept as DICOM files, never converted
to NIfTI (the conversion drops ultrasound-region calibration). Final labels go back to PACS as DICOM SEG
through STOW-RS (highdicom, pure Python: no dcmqi), optionally with an SR of the mask's measurement, and are
listed and read back from PACS, so training works from PACS labels after the local cache is lost.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import cv2
from fetalhc.dicom_out import DicomOutError, read_source, write_seg, write_sr
from fetalhc.pipeline import measure_mask
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import strtobool
from pydicom.dataset import Dataset

from lib.inputs import (IMAGE_SUFFIXES, check_id, check_suffix, http_error, load_input, number, pixel_size,
                        series_file, suffix_of)
from lib.labels import LabelVersions, check_head_mask
from lib.pacs import Pacs, check_store_sr
from lib.publish import FILE_MODE, atomic_copy

logger = logging.getLogger(__name__)
EXTENSIONS = [f"*{s}" for s in IMAGE_SUFFIXES]
_LABEL_LOCK = threading.RLock()  # keep-version + replace + JSON entry of one label save happen as one step


class FetalLocalDatastore(LocalDatastore):
    def __init__(self, path, **kw):
        super().__init__(path, extensions=EXTENSIONS, **kw)
        self._watch_moves()

    def _watch_moves(self):
        handler = getattr(self, "_handler", None)
        if handler is not None:  # the JSON is replaced atomically (a move event), not modified in place
            handler.on_moved = lambda e: self._on_modify_event(type("E", (), {"src_path": e.dest_path})())

    def reload(self):
        """Pick up changes written by another process (train / scoring subprocess)."""
        self._init_from_datastore_file()

    def _update_datastore_file(self, lock=True):
        """MONAI Label rewrites the JSON in place; a crash mid-write would leave it unreadable."""
        from filelock import FileLock

        def write():
            self._ignore_event_config = True
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self._datastore_config_path), suffix=".json.tmp")
            os.fchmod(fd, FILE_MODE)  # as MONAI Label's own JSON (0644 usually), not mkstemp's 0600
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _require(self, image_id: str):
        check_id(image_id)
        self.reload()
        if image_id not in self._datastore.objects:
            raise http_error(404, f"unknown image id {image_id!r}: upload the image first")

    def add_image(self, image_id, image_filename, image_info):
        check_suffix(image_filename)
        image_id = check_id(image_id or Path(image_filename).name[: -len(suffix_of(image_filename))])
        load_input(image_filename)  # 4xx unless a readable 2-D image of sane size
        pixel_size({}, image_info)  # 400 for a pixel_size_mm that is not a number
        self.reload()
        if image_id in self._datastore.objects:
            raise http_error(409, f"image id {image_id!r} already exists; remove it first or choose another id")
        return super().add_image(image_id, image_filename, image_info)

    @property
    def versions(self) -> LabelVersions:
        return LabelVersions(self._datastore_path)

    def _keep_version(self, image_id, label_tag) -> str | None:
        """Copy the current final label (if any) into its versions before it is replaced or removed."""
        if label_tag != DefaultLabelTag.FINAL:
            return None
        old = self._datastore.objects[image_id].labels.get(label_tag) if image_id in self._datastore.objects else None
        path = Path(self._datastore.label_path(label_tag), image_id + old.ext) if old is not None else None
        if path is None or not path.is_file():
            return None
        return self.versions.keep(image_id, label_tag, path, old.info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        self._check_label(image_id, label_filename, label_tag)
        check_store_sr(label_info or {}, self, image_id)  # an SR needs PACS: 4xx here rather than ignored
        # The replaced label first goes to its versions, then the new file (atomically: a crash leaves the
        # previous label or none, never half of one), then the entry; written by hand because
        # LocalDatastore.save_label copies in place.
        ext = suffix_of(label_filename)
        with _LABEL_LOCK:
            self.reload()
            kept = self._keep_version(image_id, label_tag)
            atomic_copy(label_filename, os.path.join(self._datastore.label_path(label_tag), image_id + ext))
            obj = self._datastore.objects[image_id]
            old = obj.labels.get(label_tag)
            info = {**(label_info or {}), "ts": int(time.time()), "name": image_id + ext}
            info.update({"replaced_version": kept} if kept else {})
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file()
            if old is not None and old.ext != ext:
                Path(self._datastore.label_path(label_tag), image_id + old.ext).unlink(missing_ok=True)
        logger.info(f"saved label {label_tag} for {image_id}" + (f", the previous one kept as {kept}" if kept else ""))
        return image_id

    def restore_label(self, image_id, version, label_tag=DefaultLabelTag.FINAL) -> dict:
        """Make a kept version the current label again; the current one becomes a version itself."""
        self._require(image_id)
        path, meta = self.versions.file(image_id, label_tag, version)
        info = {k: v for k, v in (meta.get("info") or {}).items() if k not in ("ts", "name", "replaced_version")}
        self.save_label(image_id, str(path), label_tag, {**info, "restored_from": version})
        return {"image": image_id, "tag": label_tag, "restored": version,
                "kept": self.get_label_info(image_id, label_tag).get("replaced_version")}

    def remove_label(self, label_id, label_tag):
        self._require(label_id)
        with _LABEL_LOCK:
            self._keep_version(label_id, label_tag)
            super().remove_label(label_id, label_tag)
            # The entry goes now, not when the file watcher (auto reload) notices the missing file.
            self.reload()
            obj = self._datastore.objects.get(label_id)
            if obj is not None and obj.labels.pop(label_tag, None) is not None:
                self._update_datastore_file()

    def clean_stale_temp(self) -> int:
        """Half-written label copies (``.<name>.*.tmp``) of a crashed server; call at server start only."""
        removed = 0
        for tag_dir in Path(self._datastore.label_path(None)).iterdir():
            for tmp in tag_dir.glob(".*.tmp") if tag_dir.is_dir() else []:
                tmp.unlink(missing_ok=True)
                removed += 1
        for tmp in Path(self._datastore_config_path).parent.glob("tmp*.json.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info(f"removed {removed} half-written files of an earlier run from the datastore")
        return removed

    def _check_label(self, image_id, label_filename, label_tag):
        check_id(label_tag, "label tag")
        self._require(image_id)
        check_suffix(label_filename, "label")
        label = load_input(label_filename)
        image = load_input(self.get_image_uri(image_id))
        if label.pixels.shape != image.pixels.shape:
            raise http_error(422, f"label is {label.pixels.shape[0]} x {label.pixels.shape[1]} pixels but image "
                                  f"{image_id!r} is {image.pixels.shape[0]} x {image.pixels.shape[1]}")
        if label_tag == DefaultLabelTag.FINAL:
            check_head_mask(label.pixels)

    def remove_image(self, image_id):
        self._require(image_id)
        with _LABEL_LOCK:
            super().remove_image(image_id)  # through remove_label: the final label is kept as a version
            self.reload()
            if self._datastore.objects.pop(image_id, None) is not None:
                self._update_datastore_file()

    def update_image_info(self, image_id, info):
        self._require(image_id)
        super().update_image_info(image_id, info)


class FetalDICOMWebDatastore(FetalLocalDatastore, DICOMWebDatastore):
    """DICOMweb series as DICOM folders in the local cache; final labels are DICOM SEG in PACS (lib.pacs).

    The local cache is only a cache: labelled images are those with a SEG in PACS (or a local label not yet
    stored there), and a label missing from the cache, or older than the latest SEG in PACS, is fetched again.
    """

    def __init__(self, client, search_filter, cache_path=None, fetch_by_frame=False):
        DICOMWebDatastore.__init__(self, client, search_filter, cache_path, fetch_by_frame, convert_to_nifti=False)
        self._watch_moves()
        self.pacs = Pacs(client)

    def get_image_uri(self, image_id):
        check_id(image_id)
        if image_id not in self._datastore.objects and image_id not in self.list_images():
            raise http_error(404, f"unknown image id {image_id!r}: no such series matches the DICOMweb search "
                                  f"filter {self._search_filter}")
        folder = DICOMWebDatastore.get_image_uri(self, image_id)
        if image_id not in self._datastore.objects:  # register, so image info (scores, served) can be kept
            self.reload()
            info = {"ts": int(time.time()), "name": image_id, **self._dicom_info(image_id)}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=""))
            self._update_datastore_file()
        return folder

    def _require(self, image_id):
        self.get_image_uri(image_id)

    def source(self, image_id) -> tuple[Path, Dataset]:
        """The measured instance of a series (lowest InstanceNumber) as a file and a dataset."""
        path = series_file(Path(self.get_image_uri(image_id)))
        return path, read_source(path)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        if label_tag != DefaultLabelTag.FINAL:
            return FetalLocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        # A refused upload goes with its request's temp folder (lib/tempfiles), as on every route.
        return self._save_final(image_id, label_filename, label_info)

    def _save_final(self, image_id, label_filename, label_info):
        """SEG (and with ``store_sr`` an SR of the mask's measurement) built and checked first, then the label
        kept locally, then both stored in PACS; the label info (and so the PUT answer) carries ``pacs``."""
        label_tag = DefaultLabelTag.FINAL
        self._check_label(image_id, label_filename, label_tag)
        info = {k: v for k, v in (label_info or {}).items() if k not in ("pacs", "pacs_error")}
        frame = number(info.get("frame"), "frame", 0, 1e6, integer=True) or 0
        version = str(info.get("model_version") or "")
        path, source = self.source(image_id)
        mask = load_input(label_filename).pixels
        try:
            seg = write_seg(source, mask, frame=frame, model_version=version,
                            segmentation="SEMIAUTOMATIC" if version else "MANUAL")
            sr = None
            if strtobool(str(info.get("store_sr", False))):
                img = load_input(path, pixel_size=pixel_size({}, self.get_image_info(image_id)), frame=frame)
                m = measure_mask(mask, img.spacing, spacing_at=img.spacing_at, model_version=version)
                sr = write_sr(source, m.to_dict(), frame=frame, manual=True)
        except DicomOutError as exc:
            raise http_error(422, f"not stored: {exc}") from None
        # Kept locally first: a clinician's label survives a PACS that is down.
        label_id = FetalLocalDatastore.save_label(self, image_id, label_filename, label_tag, {**info, "frame": frame})
        try:
            self.pacs.store(*([seg] + ([sr] if sr else [])))
        except Exception as exc:
            msg = f"PACS did not store the DICOM SEG{' and SR' if sr else ''} ({type(exc).__name__}: {exc})"
            LocalDatastore.update_label_info(self, label_id, label_tag, {"pacs_error": msg})
            raise http_error(502, f"label kept in the server cache only: {msg}") from None
        pacs = {"seg_sop_instance_uid": str(seg.SOPInstanceUID), "sr_sop_instance_uid": str(sr.SOPInstanceUID)
                if sr else None, "series_instance_uid": str(seg.SeriesInstanceUID),
                "study_instance_uid": str(seg.StudyInstanceUID)}
        LocalDatastore.update_label_info(self, label_id, label_tag, {"pacs": pacs})
        logger.info(f"{image_id}: final label stored in PACS as SEG {pacs['seg_sop_instance_uid']}")
        return label_id

    def store_sr(self, image_id, result: dict, frame: int = 0) -> dict:
        """The AI measurement (infer result) as an SR in PACS: ``{"pacs": {...}}``, or ``{"pacs": None,
        "pacs_error": why}`` (no head, PACS down): the measurement itself is still the answer."""
        _, source = self.source(image_id)
        try:
            sr = write_sr(source, result, frame=frame)
            self.pacs.store(sr)
        except DicomOutError as exc:
            return {"pacs": None, "pacs_error": f"SR not stored: {exc}"}
        except Exception as exc:
            logger.warning(f"{image_id}: PACS did not store the SR: {exc}")
            return {"pacs": None, "pacs_error": f"PACS did not store the SR ({type(exc).__name__}: {exc})"}
        return {"pacs": {"seg_sop_instance_uid": None, "sr_sop_instance_uid": str(sr.SOPInstanceUID),
                         "series_instance_uid": str(sr.SeriesInstanceUID),
                         "study_instance_uid": str(sr.StudyInstanceUID)}}

    def _sync_label(self, image_id) -> None:
        """Fetch the latest SEG from PACS unless the cache holds it, or holds a label PACS never got."""
        remote = self.pacs.labels().get(image_id)
        if remote is None:
            return
        self.reload()
        obj = self._datastore.objects.get(image_id)
        local = obj.labels.get(DefaultLabelTag.FINAL) if obj else None
        if local is not None and ("pacs_error" in local.info or
                                  local.info.get("pacs", {}).get("seg_sop_instance_uid") == remote.sop_uid):
            return
        try:
            label = self.pacs.fetch(remote)
            image = load_input(self.get_image_uri(image_id))
        except DicomOutError as exc:
            logger.warning(f"{image_id}: {exc}")
            return
        if label.mask.shape != image.pixels.shape:
            logger.warning(f"{image_id}: SEG {remote.sop_uid} is {label.mask.shape}, image {image.pixels.shape}")
            return
        fd, tmp = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        try:
            cv2.imwrite(tmp, label.mask)
            FetalLocalDatastore.save_label(self, image_id, tmp, DefaultLabelTag.FINAL,
                                           {"frame": label.frame, "from_pacs": True, "pacs": remote.pacs()})
        finally:
            os.unlink(tmp)
        logger.info(f"{image_id}: final label fetched from PACS (SEG {remote.sop_uid})")

    def get_label_uri(self, label_id, label_tag, image_id=""):
        if label_tag == DefaultLabelTag.FINAL:
            self._sync_label(label_id)
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_labeled_images(self, label_tag=None, labels=None):
        local = LocalDatastore.get_labeled_images(self)
        remote = set(self.pacs.labels()) & set(self.list_images())
        return sorted(set(local) | remote)

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    def datalist(self, full_path=True):
        for image_id in self.get_labeled_images():
            self.get_image_uri(image_id)
            self._sync_label(image_id)
        return LocalDatastore.datalist(self, full_path)
