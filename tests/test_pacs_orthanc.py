"""Results back into a real PACS (Orthanc + DICOMweb plugin): SEG and SR through the MONAI Label server.

Orthanc -> infer (SR of the AI measurement) -> corrected final label -> SEG (+ SR) by STOW-RS -> QIDO/WADO
back, checked by dciodvfy and read back with highdicom -> a server with an empty cache finds the label in
PACS and trains on it. Skips only when Orthanc is not installed.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_tools import dciodvfy_errors
from fetalhc import hc18
from fetalhc.dicom_out import NOT_DICOM, read_seg, read_sr
from fetalhc.dicomgen import write_us_dicom
from fetalhc.io import load_image
from fetalhc.pipeline import measure_mask
from monailabel_support import SAMPLES, app_client, model_for_tests
from test_monailabel_orthanc import ORTHANC, _http, orthanc  # noqa: F401  (the Orthanc fixture)

pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc "
                                                        "orthanc-dicomweb)")


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory):  # noqa: F811
    """Two calibrated US series of one study (HC18 images with their real pixel size)."""
    recs = {r.name: r for r in hc18.read_records(SAMPLES)}
    folder = tmp_path_factory.mktemp("pacs_dicom")
    study_uid = pydicom.uid.generate_uid()
    series = {}
    for name, calibration in (("459_HC.png", "us_region"), ("399_HC.png", "pixel_spacing")):
        r = recs[name]
        f = write_us_dicom(folder / f"{r.name}.dcm", cv2.imread(str(r.image), cv2.IMREAD_GRAYSCALE),
                           (r.pixel_mm, r.pixel_mm), calibration=calibration, study_uid=study_uid,
                           patient_id="FETALHC-PACS", description=f"HC18 {name}")
        series[name] = {"uid": str(pydicom.dcmread(f).SeriesInstanceUID), "file": f, "record": r}
        _http(orthanc + "/instances", f.read_bytes(), "POST")
    return {"study_uid": study_uid, "series": series}


def _client(mp, orthanc, root, tiny_run):  # noqa: F811
    return app_client(mp, f"{orthanc}/dicom-web", root / "model", model_for_tests(tiny_run),
                      extra_settings={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": {"Modality": "US"},
                                      "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")},
                      max_epochs=1, train_batch_size=1)


def _dicomweb(orthanc):  # noqa: F811
    return DICOMwebClient(f"{orthanc}/dicom-web")


def _fetch(orthanc, study_uid, sop_uid, tmp_path):  # noqa: F811
    """QIDO for the instance, WADO it back, save it for dciodvfy."""
    web = _dicomweb(orthanc)
    found = web.search_for_instances(study_uid, search_filters={"SOPInstanceUID": sop_uid})
    assert len(found) == 1, f"{sop_uid} is not in PACS"
    series_uid = str(Dataset.from_json(found[0]).SeriesInstanceUID)
    ds = web.retrieve_instance(study_uid, series_uid, sop_uid)
    path = tmp_path / f"{sop_uid}.dcm"
    ds.save_as(str(path), write_like_original=False)
    assert dciodvfy_errors(path) == [], path
    return path


def _png(mask) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8))
    return buf.tobytes()


def _count(orthanc, modality):  # noqa: F811
    return len(_dicomweb(orthanc).search_for_series(search_filters={"Modality": modality}))


def test_pacs_round_trip_then_training_from_pacs_labels(orthanc, study, tmp_path, tmp_path_factory,  # noqa: F811
                                                        tiny_run):
    first = study["series"]["459_HC.png"]
    root = tmp_path_factory.mktemp("pacs_app")
    mp = pytest.MonkeyPatch()
    try:
        c = _client(mp, orthanc, root, tiny_run)
        # AI measurement -> SR in PACS (infer option store_sr), HC in mm read back from Orthanc.
        r = c.post(f"/infer/fetal_head?image={first['uid']}&output=json",
                   data={"params": json.dumps({"store_sr": True})})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["pacs"]["sr_sop_instance_uid"] and res["pacs"]["seg_sop_instance_uid"] is None
        sr = read_sr(_fetch(orthanc, study["study_uid"], res["pacs"]["sr_sop_instance_uid"], tmp_path))
        if res["hc_mm"] is not None:
            assert sr["hc_mm"] == pytest.approx(res["hc_mm"], abs=0.005)
        plain = c.post(f"/infer/fetal_head?image={first['uid']}&output=json").json()
        assert "pacs" not in plain  # off by default

        # A label of the wrong shape is refused before anything reaches PACS.
        segs = _count(orthanc, "SEG")
        r = c.put(f"/datastore/label?image={first['uid']}&tag=final",
                  files={"label": ("label.png", _png(np.ones((50, 60))))})
        assert r.status_code == 422 and "pixels" in r.text and _count(orthanc, "SEG") == segs

        # Corrected final labels (HC18 ground truth) -> SEG + SR in PACS.
        saved = {}
        for name, s in study["series"].items():
            gt = hc18.gt_mask(s["record"]).astype(np.uint8)
            r = c.put(f"/datastore/label?image={s['uid']}&tag=final",
                      data={"params": json.dumps({"store_sr": name == "459_HC.png",
                                                  "model_version": res["model_version"]})},
                      files={"label": ("label.png", _png(gt))})
            assert r.status_code == 200, r.text
            pacs = r.json()["pacs"]
            assert set(pacs) >= {"seg_sop_instance_uid", "sr_sop_instance_uid", "series_instance_uid"}
            seg = read_seg(_fetch(orthanc, study["study_uid"], pacs["seg_sop_instance_uid"], tmp_path))
            assert np.array_equal(seg.mask, gt) and seg.source_series_uid == s["uid"]
            saved[name] = (gt, pacs)
        gt, pacs = saved["459_HC.png"]
        img = load_image(first["file"])
        expected = measure_mask(gt, img.spacing, spacing_at=img.spacing_at)
        sr = read_sr(_fetch(orthanc, study["study_uid"], pacs["sr_sop_instance_uid"], tmp_path))
        assert sr["hc_mm"] == pytest.approx(expected.hc_mm, abs=0.005)
        assert sr["hc_mm"] == pytest.approx(first["record"].hc_mm, rel=0.01)
        assert saved["399_HC.png"][1]["sr_sop_instance_uid"] is None
        seg_dump = pydicom.dcmread(_fetch(orthanc, study["study_uid"], pacs["seg_sop_instance_uid"], tmp_path))
        assert seg_dump.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
        mp.undo()

        # A new server with an empty cache: the labels come from PACS and training uses them.
        mp = pytest.MonkeyPatch()
        fresh = tmp_path_factory.mktemp("pacs_app_fresh")
        c = _client(mp, orthanc, fresh, tiny_run)
        for name, s in study["series"].items():
            r = c.get(f"/datastore/label?label={s['uid']}&tag=final")
            assert r.status_code == 200, r.text
            back = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(back, saved[name][0])
            assert c.get(f"/datastore/label/info?label={s['uid']}&tag=final").json()["from_pacs"] is True
        unlabeled = c.post("/activelearning/first", json={})
        assert unlabeled.json() == {} or unlabeled.json().get("id") not in {s["uid"] for s in study["series"].values()}
        r = c.post("/train/fetal_head?run_sync=true", json={"max_epochs": 1, "augment": False, "val_split": 0.5})
        assert r.status_code == 200, r.text
        stats = r.json()
        assert stats["status"] == "DONE" and stats["train_images"] + stats["val_images"] == 2
    finally:
        mp.undo()


def test_store_sr_needs_a_dicom_study(orthanc, study, tmp_path_factory, tiny_run):  # noqa: F811
    root = tmp_path_factory.mktemp("pacs_app_bad")
    mp = pytest.MonkeyPatch()
    try:
        c = _client(mp, orthanc, root, tiny_run)
        png = SAMPLES / "459_HC.png"
        srs = _count(orthanc, "SR")
        r = c.post("/infer/fetal_head?output=json", data={"params": json.dumps({"store_sr": True})},
                   files={"file": ("459_HC.png", png.read_bytes())})
        assert 400 <= r.status_code < 500 and NOT_DICOM in r.text, r.text
        assert _count(orthanc, "SR") == srs
    finally:
        mp.undo()
