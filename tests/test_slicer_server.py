"""The Slicer module's Logic (FetalHCLib on slicer-core MRML) against a real FetalHC MONAI Label server.

The server is ``monailabel start_server --app monailabel_app`` on loopback (a separate process, real
HTTP) with shipped HC18 samples and their pixel-size CSV as studies; nothing is mocked. It always runs
in the server's environment (.venv: torch, monailabel), while these tests run in either dependency set
-- under scripts/test.sh also in Slicer's (.venv-slicer: numpy 2, pydicom 3, no OpenCV/torch), the way a
real Slicer talks to a real server. Model: the shipped default model (else FETALHC_TEST_MODEL).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from slicer_support import ROOT, new_scene

from FetalHCLib import files, nodes, results, selftest  # noqa: E402
from FetalHCLib.client import MonaiLabelClient, ServerError  # noqa: E402
from FetalHCLib.logic import FetalHCLogic  # noqa: E402
from fetalhc import geometry, io  # noqa: E402
from fetalhc.dicomgen import write_us_dicom  # noqa: E402

APP = ROOT / "monailabel_app"
SERVER_PYTHON = Path(os.environ.get("FETALHC_SERVER_PYTHON") or ROOT / ".venv" / "bin" / "python")
SAMPLES = ROOT / "sample-data" / "hc18"
HC18_CSV = "training_set_pixel_size_and_HC.csv"
MODEL = Path(os.environ.get("FETALHC_TEST_MODEL") or ROOT / "models" / "fetalhc_default.pt")

pytestmark = [pytest.mark.skipif(not (APP / "main.py").is_file(), reason="monailabel_app is not there"),
              pytest.mark.skipif(not (SERVER_PYTHON.parent / "monailabel").is_file(),
                                 reason=f"no MONAI Label server environment at {SERVER_PYTHON.parent}"),
              pytest.mark.skipif(not MODEL.is_file(), reason=f"no model at {MODEL}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    studies.mkdir()
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
           "MONAI_LABEL_SESSIONS": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(APP), str(ROOT / "lib"), str(ROOT / "tests")]),
           "MONAILABEL_PYEXE": str(SERVER_PYTHON),
           "PATH": os.pathsep.join([str(SERVER_PYTHON.parent), os.environ.get("PATH", "")])}
    env.pop("FETALHC_API_TOKEN", None)
    subprocess.run([str(SERVER_PYTHON), "-c", "import sys; from pathlib import Path; "
                    "from monailabel_support import make_studies; make_studies(Path(sys.argv[1]), 5, 1)", str(studies)],
                   check=True, env=env, timeout=120)
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(SERVER_PYTHON.parent / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies),
         "--conf", "models", "fetal_head", "--conf", "model_dir", str(root / "model"),
         "--conf", "initial_model", str(MODEL), "--conf", "max_epochs", "1", "--conf", "refiner_iters", "12",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/info/", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail("MONAI Label server did not start:\n" + (root / "server.log").read_text()[-4000:])
                time.sleep(1)
        yield {"url": url, "studies": studies, "root": root}
    finally:
        _stop(proc)
        log.close()


def _stop(proc):
    """End the server we started (its own process group: uvicorn and any train subprocess)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def logic(server, tmp_path):
    lg = FetalHCLogic(new_scene(), workdir=str(tmp_path / "work"))
    lg.set_server(server["url"])
    yield lg
    assert os.listdir(lg.workdir) == [], "a request left temporary files behind"


def _label_info(logic, image_id) -> dict:
    objects = logic.client._json("GET", "/datastore/", query={"output": "all"})["objects"]
    return objects[image_id]["labels"]["final"]["info"]


def _check_shown(volume, result):
    """What the user sees agrees with the server: curve length = HC, segment = server label, table."""
    assert result.hc_mm is not None and result.model_version and result.outline_source == "AI"
    assert selftest.agreement(result) <= selftest.AGREEMENT
    assert result.extra["curve_length_mm"] == pytest.approx(result.hc_mm, rel=1e-3)  # in practice ~1e-5
    assert np.allclose(volume.GetSpacing()[:2], result.spacing.as_tuple()[::-1], rtol=1e-6)
    mask = nodes.segment_mask(volume)
    refit, _ = geometry.fit_mask(mask.astype(bool))
    assert refit.perimeter == pytest.approx(result.ellipse_px.perimeter, rel=0.03)  # hard vs the server's soft mask
    table = results.table_values(volume)
    assert table["HC"] == f"{result.hc_mm:.1f} mm" and table["Model version"] == result.model_version
    assert table["QC"] == ("OK" if result.qc_ok else f"FAILED: {result.qc_text}")
    assert table["BPD"] == f"{result.biometry()['bpd_mm']:.1f} mm"


# --------------------------------------------------------------------------------------------- tests

def test_connect_lists_models_and_strategies(logic):
    summary = logic.connect()
    assert summary["name"] == "FetalHC" and "fetal_head" in summary["models"]
    assert {"hc_uncertainty", "random", "first"} <= set(summary["strategies"])
    assert "fetal_head" in summary["trainers"]


def test_segment_uploaded_png_then_edit_and_revert(logic):
    truth = io.read_pixel_csv(SAMPLES / HC18_CSV)
    logic.set_known_ga(20.5)
    volume = files.load_image_volume(logic.scene, str(SAMPLES / "399_HC.png"))
    grey, report = logic.prepare(volume, manual_mm=truth["399_HC.png"])
    assert grey is volume and report["source"] == nodes.SRC_MANUAL
    req = logic.infer_request(volume)
    assert req.file.endswith(".nrrd") and req.image_id is None and req.params["ga_weeks"] == 20.5
    result = logic.apply_infer(req, logic.infer_call(req))
    _check_shown(volume, result)
    assert result.spacing.as_tuple() == pytest.approx((truth["399_HC.png"],) * 2)
    assert result.spacing.source == "NRRD header"  # what the server read from our upload
    assert result.hc_mm == pytest.approx(173.96, abs=15)  # HC18 reference HC of 399_HC
    assert result.centile is not None and result.centile["ga_weeks"] == 20.5
    if os.environ.get("FETALHC_UPDATE_SCREENSHOT"):
        import sys
        sys.path.insert(0, str(ROOT / "slicer_extension" / "tools"))
        from render_screenshot import render
        render(volume, str(ROOT / "slicer_extension" / "docs" / "screenshot.png"),
               "FetalHC in Slicer (rendered headless from the MRML nodes): HC18 399_HC.png")
    # the unedited segment measured by the Slicer (same core) gives the server's HC closely
    again = logic.remeasure(volume, "edited mask")
    assert again.hc_mm == pytest.approx(result.hc_mm, rel=0.02) and selftest.agreement(again) <= selftest.AGREEMENT
    selftest.scale_curve(volume, 1.1)
    dragged = logic.flush()[0]
    assert dragged.outline_source == "edited ellipse" and dragged.hc_mm == pytest.approx(1.1 * again.hc_mm, rel=3e-3)
    reverted = logic.revert_to_ai(volume)
    assert reverted.hc_mm == pytest.approx(result.hc_mm, abs=1e-3) and reverted.outline_source == "AI"


def test_next_image_then_infer_by_datastore_id(logic, server):
    volume = logic.next_image("first")
    image_id = volume.GetAttribute(nodes.ATTR_IMAGE_ID)
    assert image_id and (server["studies"] / (image_id + ".png")).is_file()
    assert nodes.volume_spacing(volume) is None  # a PNG: Slicer cannot know the pixel size
    req = logic.infer_request(volume)
    assert req.image_id == image_id and req.file is None
    result = logic.apply_infer(req, logic.infer_call(req))
    # the server's pixel-CSV spacing was adopted, so the curve in RAS mm shows the server's HC
    assert nodes.volume_spacing(volume).source == f"server: {result.spacing.source}"
    assert "pixel CSV" in result.spacing.source
    _check_shown(volume, result)


def test_ultrasound_dicom_calibrated_by_regions_only(logic, tmp_path):
    """Slicer's DICOM volume shows 1.0 mm; the module reads PhysicalDeltaX/Y, converts RGB to grey, uploads NRRD."""
    import pydicom
    grey_png = io.to_grey_uint8(files.read_raster(str(SAMPLES / "399_HC.png")))
    path = write_us_dicom(tmp_path / "us.dcm", np.dstack([grey_png] * 3), (0.14, 0.14), calibration="us_region",
                          photometric="RGB")
    ds = pydicom.dcmread(str(path))
    volume = logic.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "US DICOM")
    nodes.set_volume_array(volume, ds.pixel_array[None])
    volume.SetAttribute(nodes.ATTR_UIDS, str(ds.SOPInstanceUID))
    req = logic.infer_request(volume, dicom_file=str(path))
    grey = req.volume
    assert grey is not volume and grey.GetSpacing()[:2] == pytest.approx((0.14, 0.14))
    assert "PhysicalDeltaX/Y" in grey.GetAttribute(nodes.ATTR_SPACING_SOURCE)
    _check_shown(grey, logic.apply_infer(req, logic.infer_call(req)))
    # Save to PACS on this folder-datastore server: the DICOM itself is uploaded, the label goes out with
    # {"store_sr": true, "outline_source": ...}; the answer is shown whatever the server can do
    try:
        out = logic.save_to_pacs(grey)
    except ServerError as e:  # a server that refuses DICOM output here must say why
        assert 400 <= (e.status or 0) < 500 and "DICOM" in str(e)
        return
    info = _label_info(logic, out["image_id"])
    assert info["store_sr"] is True and info["outline_source"] == "AI"
    assert out["pacs"] or "not a DICOMweb PACS" in out["message"]
    assert os.path.exists(path)  # the user's DICOM file is uploaded, never deleted


def test_submit_correction_saves_exactly_the_outline_shown(logic, server, tmp_path):
    volume = logic.next_image("random")
    image_id = volume.GetAttribute(nodes.ATTR_IMAGE_ID)
    result = logic.segment(volume)
    h, w = nodes.image_shape(volume)
    edited = geometry.ellipse_mask(geometry.Ellipse.make(w / 2, h / 2, w / 4, h / 5, 0.3), (h, w)).astype(np.uint8)
    nodes.set_head_segment(volume, edited)  # the clinician's corrected segment (the debounce still pending)
    out = logic.submit(volume)
    shown = logic.current_result(volume)
    assert out["image_id"] == image_id and out["saved"]["image"] == image_id and "edited mask" in out["message"]
    assert shown.outline_source == "edited mask" and shown.hc_mm != pytest.approx(result.hc_mm, rel=0.01)
    info = _label_info(logic, image_id)
    assert info["outline_source"] == "edited mask" and info["measurement"]["hc_mm"] == pytest.approx(shown.hc_mm)
    label = tmp_path / "final.png"
    label.write_bytes(urllib.request.urlopen(
        f"{server['url']}/datastore/label?label={image_id}&tag=final", timeout=30).read())
    assert np.array_equal(files.read_raster(str(label)), edited)
    # an image the server does not have yet is uploaded first, then labelled
    local = nodes.add_volume(logic.scene, np.full((64, 96), 60, np.uint8), "local scan", io.Spacing(0.2, 0.2, "test"))
    logic.accept_ai(local, selftest.fresult.measure_points(
        geometry.Ellipse.make(48, 32, 20, 14, 0).points(64), io.Spacing(0.2, 0.2, "test")), None)
    selftest.scale_curve(local, 1.05)  # edited ellipse: the filled ellipse is what goes out
    out = logic.submit(local)
    assert out["image_id"] == "local_scan" and local.GetAttribute(nodes.ATTR_IMAGE_ID) == "local_scan"
    assert _label_info(logic, "local_scan")["outline_source"] == "edited ellipse"


def test_training_refused_while_running_still_saves_and_progress_ends_done(logic):
    states = []
    started = logic.train_start(params={"max_epochs": 1, "train_batch_size": 1})
    assert started.get("status") in ("SUBMITTED", "RUNNING")
    volume = logic.next_image("first")
    logic.segment(volume)
    out = logic.submit(volume, train=True)  # a run is going: 429
    assert out["saved"]["image"] == volume.GetAttribute(nodes.ATTR_IMAGE_ID)
    assert out["train"] is None and "already going" in out["train_error"]
    assert out["message"].startswith("Saved the final label") and "training not started" in out["message"]
    final = logic.train_wait(timeout_s=540, every_s=1.0, on_progress=lambda p: states.append(p["state"]))
    assert final["state"] == "DONE", f"training ended in {final['state']}: {final['text']}"
    seen = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    assert seen[-1] == "DONE" and set(seen) <= {"SUBMITTED", "RUNNING", "DONE"}, seen
    assert logic.client.train_status(check_if_running=True) is None


def test_errors_are_clear_messages(logic):
    with pytest.raises(ServerError, match="connection refused"):
        MonaiLabelClient(f"http://127.0.0.1:{_free_port()}").info()
    volume = files.load_image_volume(logic.scene, str(SAMPLES / "011_HC.png"))
    volume.SetAttribute(nodes.ATTR_IMAGE_ID, "no_such_image")
    with pytest.raises(ServerError, match="404.*unknown image id"):
        logic.segment(volume)
    with pytest.raises(ServerError, match="segmenting with model 'nope'"):
        logic.segment(volume, "nope")
    with socket.socket() as silent:  # a server that accepts the connection but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerError, match="no answer .* within 0.5 s"):
            MonaiLabelClient(url, timeouts={"infer": 0.5}).infer("fetal_head", image_id="011_HC")


def test_no_head_is_a_red_result_and_painting_measures(logic):
    """A blank frame: the server finds no head; the panel shows a failed result and an empty "Fetal head"
    segment to paint in; painting gives the HC of the painted outline."""
    volume = nodes.add_volume(logic.scene, np.full((270, 400), 30, np.uint8), "blank", io.Spacing(0.2, 0.2, "test"))
    shown = logic.segment(volume)
    assert shown.ellipse_px is None and shown.qc_ok is False and "no head" in shown.qc_text
    assert any("paint the head" in w for w in shown.extra["warnings"])
    assert results.table_values(volume)["QC"].startswith("FAILED") and nodes.segment_mask(volume).sum() == 0
    painted = geometry.ellipse_mask(geometry.Ellipse.make(200, 135, 120, 90, 0.2), (270, 400)).astype(np.uint8)
    nodes.set_head_segment(volume, painted)
    res = logic.flush()[0]
    _, mm = geometry.fit_mask(painted.astype(bool), (0.2, 0.2))
    assert res.outline_source == "edited mask" and res.hc_mm == pytest.approx(mm.perimeter, abs=1e-3)
