"""FetalHC results in PACS over DICOMweb: STOW-RS of SEG/SR, and the final labels PACS holds (QIDO + WADO).

The SEG and SR themselves are written by ``fetalhc.dicom_out`` (highdicom, no dcmqi). A label in PACS is the
latest SEG (by content date/time) that references an image series; any binary SEG decodes, FetalHC's own
pick the "Fetal head" segment.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from fetalhc.dicom_out import NOT_DICOM, DicomOutError, SegLabel, read_seg
from fetalhc.io import file_kind
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)
LISTING_TTL_S = 10.0  # QIDO + metadata per SEG series: cached briefly, dropped on every save


@dataclass(frozen=True)
class RemoteSeg:
    study_uid: str
    series_uid: str
    sop_uid: str
    image_series_uid: str
    stamp: tuple

    def pacs(self, sr_uid: str | None = None) -> dict:
        return {"seg_sop_instance_uid": self.sop_uid, "sr_sop_instance_uid": sr_uid,
                "series_instance_uid": self.series_uid, "study_instance_uid": self.study_uid}


class Pacs:
    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()
        self._listing: tuple[float, dict[str, RemoteSeg]] | None = None

    def store(self, *datasets: Dataset) -> None:
        """STOW-RS; raises when PACS refuses any instance (dicomweb-client checks the response)."""
        self.client.store_instances(list(datasets))
        with self._lock:
            self._listing = None

    def labels(self) -> dict[str, RemoteSeg]:
        """{image series UID: its latest SEG} over every SEG series in PACS."""
        with self._lock:
            if self._listing and time.monotonic() - self._listing[0] < LISTING_TTL_S:
                return self._listing[1]
        latest: dict[str, RemoteSeg] = {}
        try:
            for item in self.client.search_for_series(search_filters={"Modality": "SEG"}):
                s = Dataset.from_json(item)
                study, series = str(s.StudyInstanceUID), str(s.SeriesInstanceUID)
                for meta in self.client.retrieve_series_metadata(study, series):
                    seg = self._describe(Dataset.from_json(meta), study, series)
                    if seg and (seg.image_series_uid not in latest or seg.stamp > latest[seg.image_series_uid].stamp):
                        latest[seg.image_series_uid] = seg
        except Exception as exc:  # PACS unreachable: the cached labels still serve, with the reason logged
            logger.warning(f"cannot list the SEGs in PACS ({type(exc).__name__}: {exc}); using cached labels only")
            return self._listing[1] if self._listing else {}
        with self._lock:
            self._listing = (time.monotonic(), latest)
        return latest

    @staticmethod
    def _describe(meta: Dataset, study: str, series: str) -> RemoteSeg | None:
        refs = meta.get("ReferencedSeriesSequence")
        if not refs:
            logger.warning(f"SEG series {series} references no image series; ignored")
            return None
        try:
            clock = float(str(meta.get("ContentTime", "0") or "0"))
        except ValueError:
            clock = 0.0
        stamp = (str(meta.get("ContentDate", "")), clock, str(meta.SOPInstanceUID))
        return RemoteSeg(study, series, str(meta.SOPInstanceUID), str(refs[0].SeriesInstanceUID), stamp)

    def fetch(self, seg: RemoteSeg) -> SegLabel:
        """WADO-RS of the SEG instance, decoded by highdicom."""
        ds = self.client.retrieve_instance(seg.study_uid, seg.series_uid, seg.sop_uid)
        try:
            return read_seg(ds)
        except (DicomOutError, ValueError, AttributeError, IndexError) as exc:
            raise DicomOutError(f"SEG {seg.sop_uid} in PACS cannot be decoded: {exc}") from None


def check_store_sr(params: dict, datastore, image) -> bool:
    """``store_sr`` of an infer request or a label's params: False, or True for a series of the DICOMweb
    datastore; anything else is a 4xx before any work is done."""
    from monailabel.utils.others.generic import strtobool

    from lib.inputs import http_error

    if not strtobool(str(params.get("store_sr") or False)):
        return False
    if not isinstance(image, str):
        raise http_error(415, f"store_sr: {NOT_DICOM}")
    if hasattr(datastore, "store_sr") and not os.path.isabs(image):
        return True
    path = image if os.path.isabs(image) else datastore.get_image_uri(image)
    if file_kind(path) != "dicom":
        raise http_error(415, f"store_sr: {NOT_DICOM}")
    raise http_error(400, "store_sr stores the SR in PACS: it needs a study of the DICOMweb datastore "
                          "(start the server with --studies http://<pacs>/dicom-web)")
