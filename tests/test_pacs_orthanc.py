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

from dicom_tools import dciodvfy_errors, dsrdump
from fetalhc import hc18
from fetalhc.dicom_out import NOT_DICOM, read_seg, read_sr
from fetalhc.dicomgen import write_us_dicom
from fetalhc.io import load_image, save_label_like
from fetalhc.pipeline import measure_mask
from monailabel_support import SAMPLES, app_client, make_studies, model_for_tests
from test_monailabel_orthanc import ORTHANC, _http, orthanc  # noqa: F401  (the Orthanc fixture)

needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc "
                                                           "orthanc-dicomweb)")


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory):  # noqa: F811
    """Calibrated US series of one study (HC18 images with their real pixel size), one of them a 3-frame cine
    (frame k is the image rolled k pixels to the right), and a blank frame (no head)."""
    recs = {r.name: r for r in hc18.read_records(SAMPLES)}
    folder = tmp_path_factory.mktemp("pacs_dicom")
    study_uid = pydicom.uid.generate_uid()
    series = {}
    cases = (("459_HC.png", "us_region", 1), ("399_HC.png", "pixel_spacing", 1), ("cine", "us_region", 3))
    for key, calibration, frames in cases:
        r = recs["459_HC.png" if key == "cine" else key]
        f = write_us_dicom(folder / f"{key}.dcm", cv2.imread(str(r.image), cv2.IMREAD_GRAYSCALE),
                           (r.pixel_mm, r.pixel_mm), calibration=calibration, study_uid=study_uid, frames=frames,
                           patient_id="FETALHC-PACS", description=f"HC18 {r.name} {calibration} x{frames}")
        series[key] = {"uid": str(pydicom.dcmread(f).SeriesInstanceUID), "file": f, "record": r}
        _http(orthanc + "/instances", f.read_bytes(), "POST")
    blank = write_us_dicom(folder / "blank.dcm", np.zeros((240, 320), np.uint8), (0.2, 0.2), study_uid=study_uid,
                           patient_id="FETALHC-PACS", description="blank frame")
    _http(orthanc + "/instances", blank.read_bytes(), "POST")
    return {"study_uid": study_uid, "series": series, "blank": str(pydicom.dcmread(blank).SeriesInstanceUID)}


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
    if ds.Modality == "SR":
        dsrdump(path)  # dcmtk reads it
    return path


def _png(mask) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8))
    return buf.tobytes()


def _count(orthanc, modality):  # noqa: F811
    return len(_dicomweb(orthanc).search_for_series(search_filters={"Modality": modality}))


@needs_orthanc
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
            assert sr["hc_mm"] == pytest.approx(res["hc_mm"], abs=1e-9)
        plain = c.post(f"/infer/fetal_head?image={first['uid']}&output=json").json()
        assert "pacs" not in plain  # off by default

        # A label of the wrong shape is refused before anything reaches PACS.
        segs = _count(orthanc, "SEG")
        r = c.put(f"/datastore/label?image={first['uid']}&tag=final",
                  files={"label": ("label.png", _png(np.ones((50, 60))))})
        assert r.status_code == 422 and "pixels" in r.text and _count(orthanc, "SEG") == segs

        # Corrected final labels (HC18 ground truth) -> SEG + SR in PACS: a PNG label, an NRRD label the way
        # Slicer sends it, and a label of frame 2 of the cine.
        saved = {}
        for name, s in study["series"].items():
            frame = 2 if name == "cine" else 0
            gt = np.roll(hc18.gt_mask(s["record"]).astype(np.uint8), frame, axis=1)
            params = {"store_sr": name != "399_HC.png", "model_version": res["model_version"], "frame": frame}
            if name == "399_HC.png":
                upload = ("label.nrrd", save_label_like(gt, s["file"], tmp_path / "label.nrrd").read_bytes())
                params.pop("model_version")  # drawn by hand: a MANUAL segment
            else:
                upload = ("label.png", _png(gt))
            r = c.put(f"/datastore/label?image={s['uid']}&tag=final", data={"params": json.dumps(params)},
                      files={"label": upload})
            assert r.status_code == 200, r.text
            pacs = r.json()["pacs"]
            assert set(pacs) >= {"seg_sop_instance_uid", "sr_sop_instance_uid", "series_instance_uid"}
            seg_file = _fetch(orthanc, study["study_uid"], pacs["seg_sop_instance_uid"], tmp_path)
            seg = read_seg(seg_file)
            assert np.array_equal(seg.mask, gt) and seg.source_series_uid == s["uid"] and seg.frame == frame
            kind = pydicom.dcmread(seg_file).SegmentSequence[0].SegmentAlgorithmType
            assert kind == ("MANUAL" if name == "399_HC.png" else "SEMIAUTOMATIC")
            if pacs["sr_sop_instance_uid"]:
                sr = read_sr(_fetch(orthanc, study["study_uid"], pacs["sr_sop_instance_uid"], tmp_path))
                assert sr["frame"] == frame and sr["hc_mm"] == pytest.approx(s["record"].hc_mm, rel=0.01)
            saved[name] = (gt, pacs)
        gt, pacs = saved["459_HC.png"]
        img = load_image(first["file"])
        expected = measure_mask(gt, img.spacing, spacing_at=img.spacing_at)
        sr = read_sr(_fetch(orthanc, study["study_uid"], pacs["sr_sop_instance_uid"], tmp_path))
        assert sr["hc_mm"] == pytest.approx(expected.hc_mm, abs=5e-4)
        assert sr["hc_mm"] == pytest.approx(first["record"].hc_mm, rel=0.01)
        assert saved["399_HC.png"][1]["sr_sop_instance_uid"] is None
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
            info = c.get(f"/datastore/label/info?label={s['uid']}&tag=final").json()
            assert info.get("from_pacs") is True, info
        unlabeled = c.post("/activelearning/first", json={})
        assert unlabeled.json() == {} or unlabeled.json().get("id") not in {s["uid"] for s in study["series"].values()}
        r = c.post("/train/fetal_head?run_sync=true", json={"max_epochs": 1, "augment": False, "val_split": 0.5})
        assert r.status_code == 200, r.text
        stats = r.json()
        assert stats["status"] == "DONE" and stats["train_images"] + stats["val_images"] == 3
        assert not stats["skipped"]  # the cine label is used with its own frame
    finally:
        mp.undo()


@needs_orthanc
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
        dcm = study["series"]["459_HC.png"]["file"]
        r = c.post("/infer/fetal_head?output=json", data={"params": json.dumps({"store_sr": True})},
                   files={"file": ("us.dcm", dcm.read_bytes())})
        assert r.status_code == 400 and "needs a study of the DICOMweb datastore" in r.text, r.text
        assert _count(orthanc, "SR") == srs
        # A blank frame: no head, so no SR; the measurement is still the answer, and says why.
        r = c.post(f"/infer/fetal_head?image={study['blank']}&output=json",
                   data={"params": json.dumps({"store_sr": True})})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["qc"] == "no head found" and res["pacs"] is None and "no head" in res["pacs_error"]
        assert _count(orthanc, "SR") == srs
    finally:
        mp.undo()


@needs_orthanc
def test_pacs_refusing_the_seg_loses_no_label(orthanc, study, tmp_path_factory, tiny_run):  # noqa: F811
    """A PACS whose STOW-RS endpoint answers 404 (wrong MONAI_LABEL_STOW_PREFIX): 502, the label is kept."""
    root = tmp_path_factory.mktemp("pacs_app_nostow")
    mp = pytest.MonkeyPatch()
    try:
        c = app_client(mp, f"{orthanc}/dicom-web", root / "model", model_for_tests(tiny_run),
                       extra_settings={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": {"Modality": "US"},
                                       "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
                                       "MONAI_LABEL_STOW_PREFIX": "no-such-stow"})
        s = study["series"]["399_HC.png"]
        gt = np.roll(hc18.gt_mask(s["record"]).astype(np.uint8), 5, axis=0)  # not what PACS may already hold
        segs = _count(orthanc, "SEG")
        r = c.put(f"/datastore/label?image={s['uid']}&tag=final", files={"label": ("label.png", _png(gt))})
        assert r.status_code == 502 and "kept in the server cache" in r.text, r.text
        assert _count(orthanc, "SEG") == segs
        info = c.get(f"/datastore/label/info?label={s['uid']}&tag=final").json()
        assert "pacs_error" in info and "pacs" not in info
        r = c.get(f"/datastore/label?label={s['uid']}&tag=final")  # not replaced by an older SEG from PACS
        assert np.array_equal(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED), gt)
    finally:
        mp.undo()


def test_store_sr_on_a_folder_datastore_is_refused_and_saves_nothing(tmp_path, tiny_run):
    """No PACS behind a folder datastore: a label asking for an SR is a clear 4xx, not a silent drop."""
    ids = make_studies(tmp_path / "studies", n_images=2, n_final=0)
    mp = pytest.MonkeyPatch()
    try:
        c = app_client(mp, tmp_path / "studies", tmp_path / "model", model_for_tests(tiny_run))
        gt = hc18.gt_mask(hc18.read_records(SAMPLES)[0]).astype(np.uint8)
        r = c.put(f"/datastore/label?image={ids[0]}&tag=final", data={"params": json.dumps({"store_sr": True})},
                  files={"label": ("label.png", _png(gt))})
        assert r.status_code == 415 and NOT_DICOM in r.text, r.text
        assert not list((tmp_path / "studies" / "labels" / "final").glob(f"{ids[0]}.*"))  # nothing saved
        r = c.post(f"/infer/fetal_head?image={ids[0]}&output=json", data={"params": json.dumps({"store_sr": True})})
        assert r.status_code == 415 and NOT_DICOM in r.text, r.text
    finally:
        mp.undo()
