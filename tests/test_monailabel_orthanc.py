"""DICOMweb datastore against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback.

Synthetic ultrasound DICOM (fetalhc.dicomgen) of a shipped HC18 image with known calibration is uploaded;
infer through MONAI Label must read the spacing from the DICOM (ultrasound region / PixelSpacing) and give
the HC that the pipeline gives for the same pixels and spacing. Skips only when Orthanc is not installed.
"""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from fetalhc import geometry, hc18
from fetalhc.dicomgen import write_us_dicom
from fetalhc.io import SRC_PIXEL_SPACING, SRC_US_REGION, Spacing
from fetalhc.model import load_model
from fetalhc.pipeline import measure_image
from monailabel_support import DEFAULT_MODEL, SAMPLES, app_client, free_port, model_for_tests, service

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc "
                                                        "orthanc-dicomweb)")


def _http(url, data=None, method=None):
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    plugin = next((p for p in PLUGINS if Path(p).is_file()), None)
    assert plugin, f"Orthanc is installed but its DICOMweb plugin is not (looked in {PLUGINS}): install orthanc-dicomweb"
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {"Name": "fetalhc-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "orthanc.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{port}"
    with service([ORTHANC, str(root / "orthanc.json")], root / "orthanc.log", lambda: _http(url + "/system"), 60):
        yield url


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory):
    """Two US series (region-calibrated, anisotropic PixelSpacing) and one non-US series to filter out."""
    rec = {r.name: r for r in hc18.read_records(SAMPLES)}["459_HC.png"]
    pixels = cv2.imread(str(rec.image), cv2.IMREAD_GRAYSCALE)
    folder = tmp_path_factory.mktemp("dicom")
    cases = {"us_region": (rec.pixel_mm, rec.pixel_mm), "pixel_spacing": (rec.pixel_mm, rec.pixel_mm * 1.25)}
    series = {}
    for calibration, spacing in cases.items():
        f = write_us_dicom(folder / f"{calibration}.dcm", pixels, spacing, calibration=calibration,
                           description=f"HC18 459_HC {calibration}")
        series[calibration] = (str(pydicom.dcmread(f).SeriesInstanceUID), spacing)
        _http(orthanc + "/instances", f.read_bytes(), "POST")
    other = write_us_dicom(folder / "ct.dcm", pixels, cases["us_region"])
    ds = pydicom.dcmread(other)
    ds.Modality = "OT"
    ds.save_as(other)
    _http(orthanc + "/instances", other.read_bytes(), "POST")
    return {"series": series, "pixels": pixels, "record": rec, "other": str(ds.SeriesInstanceUID)}


@pytest.fixture(scope="module")
def client(orthanc, studies, tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("dicomweb_app")
    mp = pytest.MonkeyPatch()
    c = app_client(mp, f"{orthanc}/dicom-web", root / "model", model_for_tests(tiny_run),
                   extra_settings={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": {"Modality": "US"},
                                   "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")})
    yield c
    mp.undo()


@pytest.mark.parametrize("calibration,source", [("us_region", SRC_US_REGION), ("pixel_spacing", SRC_PIXEL_SPACING)])
def test_infer_reads_ultrasound_calibration_from_dicomweb(client, studies, tiny_run, calibration, source):
    uid, spacing = studies["series"][calibration]
    r = client.post(f"/infer/fetal_head?image={uid}&output=json")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["spacing_source"] == source and res["spacing_mm"] == pytest.approx(list(spacing), rel=1e-6)
    model, _ = load_model(model_for_tests(tiny_run))
    expected = measure_image(model, studies["pixels"], Spacing(*spacing, source)).hc_mm
    assert (res["hc_mm"] is None) == (expected is None)
    if expected is not None:
        assert res["hc_mm"] == pytest.approx(expected, abs=1e-2)
    if DEFAULT_MODEL.is_file() and calibration == "us_region":
        assert res["hc_mm"] == pytest.approx(studies["record"].hc_mm, rel=0.1)


def test_search_filter_keeps_us_only_and_final_label_goes_to_pacs(client, studies):
    us = {uid for uid, _ in studies["series"].values()}
    uid = studies["series"]["us_region"][0]
    assert client.post(f"/infer/fetal_head?image={studies['other']}").status_code == 404
    h, w = studies["pixels"].shape[:2]  # a head-like ellipse: final labels are validated as head masks
    mask = geometry.ellipse_mask(geometry.Ellipse.make(w / 2, h / 2, w / 4, h / 5, 0.3), (h, w)).astype(np.uint8)
    ok, png = cv2.imencode(".png", mask)
    r = client.put(f"/datastore/label?image={uid}&tag=final", files={"label": ("label.png", png.tobytes())})
    assert r.status_code == 200, r.text
    assert r.json()["pacs"]["seg_sop_instance_uid"]  # stored in PACS as DICOM SEG (tests/test_pacs_orthanc.py)
    served = {client.post("/activelearning/first", json={}).json()["id"] for _ in range(2)}
    assert served == us - {uid}
