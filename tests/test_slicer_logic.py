"""The Slicer module's non-GUI part (FetalHCLib on slicer-core MRML), without a server.

Runs under both dependency sets: the server's (.venv: numpy 1.26, pydicom 2.4, OpenCV, torch) and
Slicer's (.venv-slicer: numpy 2.4, pydicom 3.0, no OpenCV, no torch; scripts/test.sh runs it there too).
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from slicer_support import EXTENSION, MODULE_DIR, ROOT, new_scene

from FetalHCLib import client as hcclient, files, nodes, results, selftest, shared  # noqa: E402
from FetalHCLib.logic import FetalHCLogic, train_progress  # noqa: E402
from fetalhc import clinical, geometry, io, result as fresult  # noqa: E402
from fetalhc.dicomgen import write_us_dicom  # noqa: E402

sys.path.insert(0, str(EXTENSION / "tools"))
import vendor_fetalhc  # noqa: E402

SAMPLE = ROOT / "sample-data" / "hc18" / "399_HC.png"
# A Python like Slicer's: no OpenCV, no torch, no fetalhc package on the path (an editable install too)
BLOCK = ("import sys, os; sys.modules['cv2'] = None; sys.modules['torch'] = None; "
         "sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p, 'fetalhc', '__init__.py'))]; ")


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def logic(scene, tmp_path):
    lg = FetalHCLogic(scene, workdir=str(tmp_path / "work"))
    os.makedirs(lg.workdir, exist_ok=True)
    return lg


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------- the shared core

def test_dependency_set():
    """Under scripts/test.sh's Slicer venv this is Slicer 5.8+'s set: numpy 2, pydicom 3, no cv2/torch."""
    import importlib.util

    import pydicom
    if os.environ.get("FETALHC_SLICER_DEPS") == "1":
        assert int(np.__version__.split(".")[0]) >= 2 and int(pydicom.__version__.split(".")[0]) >= 3
        assert importlib.util.find_spec("cv2") is None and importlib.util.find_spec("torch") is None
    assert shared.source  # the core was found


def test_shared_core_is_one_list_read_by_the_tool_cmake_and_shared(tmp_path):
    listed = shared.module_files()
    assert listed == vendor_fetalhc.files() and "result.py" in listed and "geometry.py" in listed
    written = vendor_fetalhc.vendor(tmp_path / "_vendor")
    assert [p.name for p in written] == listed
    for name in listed:
        assert (tmp_path / "_vendor" / "fetalhc" / name).read_bytes() == (ROOT / "lib" / "fetalhc" / name).read_bytes()
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "shared_modules.txt" in cmake and not re.search(r"\b(geometry|clinical|io|result)\.py\b", cmake)
    # closed under imports: every fetalhc module a listed one imports is listed too, and none needs cv2/torch
    for name in listed:
        text = (ROOT / "lib" / "fetalhc" / name).read_text()
        for dep in re.findall(r"^from \.(\w+) import", text, re.MULTILINE):
            assert f"{dep}.py" in listed, f"{name} imports {dep}, which is not in shared_modules.txt"
        assert not re.search(r"^\s*(import|from) (cv2|torch)\b", text, re.MULTILINE) or name == "io.py"
    in_tree = MODULE_DIR / "FetalHCLib" / "_vendor" / "fetalhc"
    if in_tree.exists():  # left by a CMake configure or the tool: must not be stale
        for name in listed:
            assert (in_tree / name).read_bytes() == (ROOT / "lib" / "fetalhc" / name).read_bytes(), \
                f"{in_tree / name} is stale: rerun slicer_extension/tools/vendor_fetalhc.py"


def test_module_runs_from_the_vendored_copy_without_fetalhc_opencv_or_torch(tmp_path):
    """A Slicer without fetalhc, OpenCV and torch: FetalHCLib copied alone + vendoring is enough, and the
    live correction scenario runs."""
    pkg = tmp_path / "FetalHC" / "FetalHCLib"
    shutil.copytree(MODULE_DIR / "FetalHCLib", pkg, ignore=shutil.ignore_patterns("_vendor", "__pycache__"))
    vendor_fetalhc.vendor(pkg / "_vendor")
    code = (BLOCK + f"sys.path.insert(0, {str(ROOT / 'tests')!r}); from slicer_support import new_scene; "
            f"sys.path.remove({str(MODULE_DIR)!r}); sys.path.insert(0, {str(pkg.parent)!r}); "
            "import importlib.util; assert importlib.util.find_spec('fetalhc') is None; "
            "from FetalHCLib import shared, selftest, logic; "
            "s = new_scene(); lg = logic.FetalHCLogic(s); case = selftest.live_case(lg, s); "
            "selftest.check_live_case(case, lambda ok, m: print('FAIL', m) if not ok else None); "
            "print(shared.source, shared.geometry.__name__, round(case['ai'].hc_mm, 2))")
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAIL" not in out.stdout, out.stdout
    assert out.stdout.split()[:3] == ["vendored", "copy", "FetalHCLib._vendor.fetalhc.geometry"]


def test_module_added_from_a_checkout_finds_lib_fetalhc():
    """Module path added straight from a git clone (no build, fetalhc not installed): lib/ is used."""
    if (MODULE_DIR / "FetalHCLib" / "_vendor" / "fetalhc" / "geometry.py").exists():
        pytest.skip("a vendored copy is present in the tree and takes precedence")
    code = (BLOCK + f"sys.path.insert(0, {str(MODULE_DIR)!r}); "
            "from FetalHCLib import shared; print(shared.source, '|', shared.geometry.__file__)")
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("source checkout") and out.stdout.strip().endswith("lib/fetalhc/geometry.py")


# --------------------------------------------------------------------------- live measurement

def test_live_correction_edit_mask_drag_curve_revert(scene, logic):
    scheduled = []
    logic.scheduler = lambda ms, fn: scheduled.append((ms, fn))  # the widget's Qt single-shot timer

    def wait():
        assert scheduled and scheduled[-1][0] < 1000  # an edit schedules a re-measurement within 1 s
        t0 = time.perf_counter()
        scheduled.pop()[1]()
        assert time.perf_counter() - t0 < 1.0

    case = selftest.live_case(logic, scene, wait=wait)
    selftest.check_live_case(case, lambda ok, msg: _check(ok, msg))
    volume, ai, edited = case["volume"], case["ai"], case["after_mask"]
    m = nodes.ijk_to_ras(volume)
    assert np.linalg.det(m[:3, :3]) < 0 and m[0, 0] < 0  # a flipped IJK->RAS, not index x spacing
    # the same core as the server: the edited mask's HC is fetalhc's fit of that mask in mm
    _, mm = geometry.fit_mask(case["edited"].astype(bool), selftest.SPACING_MM)
    assert edited.hc_mm == pytest.approx(mm.perimeter, abs=1e-3)  # stored as Result.to_dict() rounds it
    assert edited.ga.weeks == pytest.approx(clinical.hadlock_ga(mm.perimeter).weeks)
    bio = clinical.biometry(mm)
    assert edited.biometry()["bpd_mm"] == pytest.approx(bio["bpd_mm"])
    # and the same outline QC as the server runs on a mask: this edit is still a whole, elliptical head
    assert edited.qc_ok is True and edited.extra["mask_ellipse_dice"] >= 0.97
    curve = volume.GetNodeReference(nodes.REF_CURVE)
    assert curve.IsA("vtkMRMLMarkupsClosedCurveNode") and curve.GetMeasurement("length").GetEnabled()
    assert curve.GetMeasurement("length").GetValueWithUnitsAsPrintableString().endswith("mm")
    assert not logic.pending  # Revert (a programmatic write) scheduled nothing
    table = results.table_values(volume)
    assert table["HC"] == f"{ai.hc_mm:.1f} mm" and table["Outline"] == "AI" and table["QC"] == "OK"
    assert table["BPD"] == f"{2 * ai.ellipse_mm.b:.1f} mm" and table["Cephalic index"] != "n/a"
    assert case["after_curve"].extra["warnings"] == []


def _check(ok, msg):
    assert ok, msg


def test_a_mask_edit_after_an_ellipse_edit_says_it_replaced_it(scene, logic):
    volume, mask, truth = selftest.synthetic_volume(scene)
    selftest.show_synthetic_ai(logic, volume, mask)
    selftest.scale_curve(volume, 0.95)
    assert logic.flush()[0].outline_source == "edited ellipse"
    nodes.set_head_segment(volume, selftest.trim(mask, truth))
    res = logic.flush()[0]
    assert res.outline_source == "edited mask" and "edited ellipse was replaced" in res.extra["warnings"][0]
    assert selftest.agreement(res) < selftest.AGREEMENT


def test_submit_measures_a_pending_edit_first_and_sends_the_outline_shown(scene, logic):
    volume, mask, truth = selftest.synthetic_volume(scene)
    selftest.show_synthetic_ai(logic, volume, mask)
    edited = selftest.trim(mask, truth)
    nodes.set_head_segment(volume, edited)  # the debounce has not fired yet
    assert logic.pending
    req = logic.submit_request(volume)
    assert not logic.pending and req.params["outline_source"] == "edited mask"
    shown = logic.current_result(volume)
    assert req.params["measurement"]["hc_mm"] == pytest.approx(shown.hc_mm, abs=1e-3)
    assert req.upload.endswith(".nrrd") and req.label.endswith(".nrrd")  # label format follows the image's
    assert np.array_equal(files.read_label_file(req.label, edited.shape), edited > 0)
    with pytest.raises(nodes.FetalHCError, match="DICOM"):
        logic.submit_request(volume, pacs=True)  # not a DICOM input


def test_known_ga_from_the_parameter_node_gives_the_centile(scene, logic):
    logic.set_known_ga(24.5)
    assert logic.parameter_node().GetParameter("KnownGAWeeks") == "24.5"
    volume, mask, _ = selftest.synthetic_volume(scene)
    res = selftest.show_synthetic_ai(logic, volume, mask)
    expected = clinical.hc_centile(res.hc_mm, 24.5)
    assert res.centile["centile"] == pytest.approx(expected["centile"])
    assert results.table_values(volume)["HC centile"].startswith(results._ordinal(expected["centile"]))
    assert [results._ordinal(c) for c in (0.3, 1.2, 2.0, 3.4, 11.0, 22.0, 50.0, 99.5)] == \
        ["<1st", "1st", "2nd", "3rd", "11th", "22nd", "50th", ">99th"]
    assert logic.parameter_node() is logic.parameter_node()  # one parameter node per scene


def test_failed_qc_and_an_emptied_segment_are_shown_as_failures(scene, logic):
    volume, mask, _ = selftest.synthetic_volume(scene)
    res = selftest.show_synthetic_ai(logic, volume, mask)
    res.qc_ok, res.qc_reasons = False, ["head cut by the image border: HC extrapolated"]
    logic.accept_ai(volume, res, mask)
    assert results.qc_line(logic.current_result(volume)) == "FAILED: head cut by the image border: HC extrapolated"
    assert results.table_values(volume)["QC"].startswith("FAILED")
    nodes.set_head_segment(volume, np.zeros_like(mask))
    empty = logic.flush()[0]
    assert empty.qc_ok is False and "empty" in empty.qc_text and empty.hc_mm is None
    assert logic.revert_to_ai(volume).hc_mm == pytest.approx(res.hc_mm, abs=1e-3)


def test_pixels_only_without_spacing_then_manual_pixel_size(scene, logic):
    e = geometry.Ellipse.make(60, 40, 30, 20, 0.3)
    mask = geometry.ellipse_mask(e, (90, 120)).astype(np.uint8)
    volume = nodes.add_volume(scene, mask * 100, "png without calibration")
    report = nodes.resolve_spacing(volume)
    assert report["spacing"] is None and "Enter the pixel size" in report["message"]
    pts = geometry.region_boundary(geometry.largest_component(mask))
    res = logic.accept_ai(volume, fresult.measure_points(pts, None), mask)
    assert res.hc_mm is None and res.hc_px == pytest.approx(e.perimeter, rel=5e-3)
    assert any("no pixel spacing" in w for w in res.extra["warnings"])
    assert results.table_values(volume)["HC"].endswith("px (no spacing)")
    logic.prepare(volume, manual_mm=0.2)
    rec = logic.remeasure(volume, "edited mask")
    assert rec.hc_mm == pytest.approx(0.2 * e.perimeter, rel=5e-3) and rec.spacing.source == nodes.SRC_MANUAL
    assert selftest.agreement(rec) < 1e-3
    with pytest.raises(nodes.FetalHCError, match="no AI result"):
        logic.revert_to_ai(nodes.add_volume(scene, mask, "other"))


# -------------------------------------------------------------------------------- spacing & input

def _grey_sample() -> np.ndarray:
    return io.to_grey_uint8(files.read_raster(str(SAMPLE)))


def _as_slicer_dicom_volume(scene, path, rgb: bool):
    """What Slicer's DICOM module makes of an US file calibrated only by regions: 1.0 mm spacing."""
    import pydicom
    ds = pydicom.dcmread(str(path))
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode", "US DICOM")
    nodes.set_volume_array(volume, ds.pixel_array[None])
    volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    volume.SetAttribute(nodes.ATTR_UIDS, str(ds.SOPInstanceUID))
    return volume


@pytest.mark.parametrize("calibration,photometric", [("us_region", "MONOCHROME2"), ("us_region", "RGB"),
                                                     ("pixel_spacing", "MONOCHROME2"), ("none", "RGB")])
def test_dicom_spacing_and_grey_conversion(scene, logic, tmp_path, calibration, photometric):
    pixels = _grey_sample()
    colour = np.dstack([pixels, np.roll(pixels, 3, 1), pixels // 2]) if photometric == "RGB" else pixels
    path = write_us_dicom(tmp_path / "us.dcm", colour, (0.16, 0.14), calibration=calibration, photometric=photometric)
    volume = _as_slicer_dicom_volume(scene, path, photometric == "RGB")
    assert volume.GetSpacing()[:2] == (1.0, 1.0)
    grey, report = logic.prepare(volume, dicom_file=str(path))
    reference = io.load_image(path)
    assert np.array_equal(nodes.volume_array(grey)[0], reference.pixels)  # same grey as the server's
    assert (grey is volume) == (photometric == "MONOCHROME2")
    if calibration == "none":
        assert report["spacing"] is None and "no calibration" in report["message"]
    else:
        assert report["spacing"].as_tuple() == pytest.approx((0.16, 0.14))
        assert grey.GetSpacing()[:2] == pytest.approx((0.14, 0.16))  # (col, row) = (x, y)
        assert report["source"] == reference.spacing.source
        assert ("PhysicalDeltaX/Y" in report["source"]) == (calibration == "us_region")
        assert FetalHCLogic.is_dicom_input(grey)


def test_cine_as_a_sequence_proxy_node_gets_the_dicom_spacing_and_a_stable_frame(scene, logic, tmp_path):
    """Slicer 5.8+ loads US cine as a sequence: a browser whose proxy volume shows the selected frame."""
    pixels = (np.arange(40 * 50) % 251).astype(np.uint8).reshape(40, 50)
    path = write_us_dicom(tmp_path / "cine.dcm", pixels, (0.2, 0.25), frames=3)
    import pydicom
    ds = pydicom.dcmread(str(path))
    frames = ds.pixel_array  # (3, 40, 50)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine sequence")
    for i, frame in enumerate(frames):
        item = slicer_volume(frame)
        sequence.SetDataNodeAtValue(item, str(i))
    sequence.SetAttribute(nodes.ATTR_UIDS, str(ds.SOPInstanceUID))  # as the DICOM plugin records it
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(2)
    seq_logic = scene._fetalhc_keep[-1]  # the Sequences module logic, as in Slicer
    seq_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    assert proxy is not None and np.array_equal(nodes.volume_array(proxy)[0], frames[2])
    assert nodes.dicom_instance_uids(proxy) == [str(ds.SOPInstanceUID)]
    grey, report = logic.prepare(proxy, dicom_file=str(path))
    assert grey is not proxy and "item 2" in grey.GetName()
    assert np.array_equal(nodes.volume_array(grey)[0], frames[2])
    assert report["spacing"].as_tuple() == pytest.approx((0.2, 0.25)) and grey.GetSpacing()[:2] == pytest.approx((0.25, 0.2))
    browser.SetSelectedItemNumber(0)  # browsing on does not change the measured frame
    seq_logic.UpdateProxyNodesFromSequences(browser)
    assert np.array_equal(nodes.volume_array(grey)[0], frames[2])
    assert proxy.GetSpacing()[:2] == pytest.approx((1.0, 1.0))  # the browser rewrote the proxy
    grey0, report0 = logic.prepare(proxy, dicom_file=str(path))
    assert np.array_equal(nodes.volume_array(grey0)[0], frames[0]) and grey0 is not grey
    assert report0["spacing"].as_tuple() == pytest.approx((0.2, 0.25)) and grey0.GetSpacing()[:2] == pytest.approx((0.25, 0.2))


def slicer_volume(frame):
    import slicer
    node = slicer.vtkMRMLScalarVolumeNode()
    nodes.set_volume_array(node, frame[None])
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    return node


def test_multiframe_volume_frame_becomes_a_2d_grey_volume(scene, logic, tmp_path):
    pixels = (np.arange(40 * 50) % 251).astype(np.uint8).reshape(40, 50)
    path = write_us_dicom(tmp_path / "cine.dcm", pixels, (0.2, 0.2), frames=3)
    import pydicom
    frames = pydicom.dcmread(str(path)).pixel_array
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cine")
    nodes.set_volume_array(volume, frames)
    grey, report = logic.prepare(volume, dicom_file=str(path), frame=2)
    assert nodes.image_shape(grey) == (40, 50) and np.array_equal(nodes.volume_array(grey)[0], frames[2])
    assert nodes.ijk_to_ras(grey)[2, 3] == pytest.approx(2.0)  # origin on frame 2
    assert report["spacing"].as_tuple() == pytest.approx((0.2, 0.2))
    with pytest.raises(nodes.FetalHCError, match="frame 5"):
        nodes.prepare_input(volume, 5)


@pytest.mark.parametrize("kind", ["dicom", "nrrd", "png"])
def test_files_without_a_suffix_get_the_right_spacing(scene, logic, tmp_path, kind):
    """e.g. a datastore image downloaded under its bare id."""
    pixels = _grey_sample()[:120, :160]
    bare = tmp_path / "image_0042"
    if kind == "dicom":
        write_us_dicom(tmp_path / "x.dcm", pixels, (0.16, 0.14), calibration="us_region").rename(bare)
        expected = (0.16, 0.14)
    elif kind == "nrrd":
        volume = nodes.add_volume(scene, pixels, "n", io.Spacing(0.17, 0.11, "test"))
        os.rename(files.write_upload_file(volume, str(tmp_path)), bare)
        expected = (0.17, 0.11)
    else:
        os.rename(files.write_png(pixels, str(tmp_path / "p.png")), bare)
        expected = None
    assert io.detect_kind(bare) == ("raster" if kind == "png" else kind)
    volume = files.load_image_volume(scene, str(bare))
    assert np.array_equal(nodes.volume_array(volume)[0], pixels)
    spacing = logic.prepare(volume)[1]["spacing"]
    assert (spacing.as_tuple() if spacing else None) == (pytest.approx(expected) if expected else None)
    if kind == "dicom" or (kind == "nrrd" and _has("nrrd")):
        assert io.load_image(bare).spacing.as_tuple() == pytest.approx(expected)  # the server reads it alike


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_dicom_database_lookup_uses_the_recorded_instance_uid(scene, tmp_path):
    """``nodes.dicom_file`` asks Slicer's DICOM database (``slicer.dicomDatabase.fileForInstance``). That
    database is CTK's ``ctkDICOMDatabase`` (Qt + SQLite), and slicer-core has no ``ctk`` module and no
    DICOM class at all (checked below), so headless only the UID side is tested here (volume attributes;
    sequence/browser ones in the cine test) and the absent-database path. FetalHCTest imports a
    generated US DICOM into a real temporary DICOM database inside Slicer and loads it from there."""
    volume = nodes.add_volume(scene, np.zeros((4, 5), np.uint8), "v")
    assert nodes.dicom_file(volume, None) is None and nodes.dicom_instance_uids(volume) == []
    volume.SetAttribute(nodes.ATTR_UIDS, "1.2.3 1.2.4")
    assert nodes.dicom_instance_uids(volume) == ["1.2.3", "1.2.4"] and nodes.dicom_file(volume, None) is None
    import importlib.util

    import slicer
    assert importlib.util.find_spec("ctk") is None and not [n for n in dir(slicer) if "dicom" in n.lower()], \
        "slicer-core now offers a DICOM database: exercise nodes.dicom_file with it here"


# ------------------------------------------------------------------------ files for/from the server

def test_upload_file_reads_back_identically_with_fetalhc_io(scene, tmp_path):
    """Pixels, orientation and anisotropic spacing survive the NRRD the module uploads."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (37, 53), dtype=np.uint8)
    volume = nodes.add_volume(scene, pixels, "aniso", ijk_to_ras_matrix=selftest.flipped_ijk_to_ras((0.17, 0.11)))
    volume.SetAttribute(nodes.ATTR_SPACING_SOURCE, "test")
    nrrd_path = files.write_upload_file(volume, str(tmp_path))
    if _has("nrrd"):  # the server's reader (pynrrd: not in Slicer's Python)
        back = io.load_image(nrrd_path)
        assert np.array_equal(back.pixels, pixels) and back.spacing.as_tuple() == pytest.approx((0.17, 0.11))
    loaded = files.load_image_volume(scene, nrrd_path)  # MRML's reader: geometry and header spacing kept
    assert np.allclose(nodes.ijk_to_ras(loaded)[:, [0, 1, 3]], nodes.ijk_to_ras(volume)[:, [0, 1, 3]])
    assert np.array_equal(nodes.volume_array(loaded)[0], pixels)
    assert nodes.volume_spacing(loaded).source == "NRRD header"
    volume.RemoveAttribute(nodes.ATTR_SPACING_SOURCE)  # unknown spacing: PNG, no invented 1.0 mm
    png_path = files.write_upload_file(volume, str(tmp_path))
    assert png_path.endswith(".png") and np.array_equal(files.read_raster(png_path), pixels)


def test_png_reader_and_writer_agree_with_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="OpenCV is only in the server's dependency set")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (23, 41), dtype=np.uint8)
    path = files.write_png(pixels, str(tmp_path / "a.png"))
    assert np.array_equal(cv2.imread(path, cv2.IMREAD_UNCHANGED), pixels)
    assert np.array_equal(files.read_raster(str(SAMPLE)), cv2.imread(str(SAMPLE), cv2.IMREAD_GRAYSCALE))
    jpg = tmp_path / "b.jpg"
    cv2.imwrite(str(jpg), np.dstack([pixels, pixels // 2, 255 - pixels]))
    assert np.array_equal(io.to_grey_uint8(files.read_raster(str(jpg)), "RGB"), io.load_image(jpg).pixels)


@pytest.mark.parametrize("suffix", [".png", ".nrrd", ".nii.gz"])
def test_labels_round_trip(scene, tmp_path, suffix):
    e = geometry.Ellipse.make(30, 18, 14, 9, 0.5)
    mask = geometry.ellipse_mask(e, (37, 53)).astype(np.uint8)
    mask[0, :5] = 1  # asymmetric marker: catches transposes and flips
    volume = nodes.add_volume(scene, mask * 50, "lbl", ijk_to_ras_matrix=selftest.flipped_ijk_to_ras((0.17, 0.11)))
    volume.SetAttribute(nodes.ATTR_SPACING_SOURCE, "test")
    path = files.write_label_file(mask, volume, str(tmp_path), suffix)
    assert path.endswith(suffix)
    assert np.array_equal(files.read_label_file(path, (37, 53)), mask)
    if _has({".png": "cv2", ".nrrd": "nrrd", ".nii.gz": "nibabel"}[suffix]):  # the server's dependency set
        assert np.array_equal(io.load_image(path).pixels > 0, mask > 0)  # as the server's trainer reads it
    with pytest.raises(nodes.FetalHCError, match="same pixel grid"):
        files.read_label_file(path, (53, 37))
    with pytest.raises(nodes.FetalHCError, match="empty"):
        files.write_label_file(np.zeros_like(mask), volume, str(tmp_path))


# ----------------------------------------------------------------------------------- REST client

def test_multipart_round_trip_is_byte_exact():
    payload = bytes(range(256)) * 3 + b"\r\n--tricky\r\n\r\n"
    ctype, body = hcclient.encode_multipart({"params": '{"a": 1}'}, {"label": ("x.nrrd", payload)})
    parts = hcclient.parse_multipart(ctype, body)
    assert parts[0][1] == b'{"a": 1}' and parts[1][1] == payload
    assert 'filename="x.nrrd"' in parts[1][0]["content-disposition"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that answers /info/ and records the request headers."""
    seen: list = []

    def do_GET(self):  # noqa: N802
        _Recorder.seen.append(dict(self.headers))
        ok = self.headers.get("Authorization") == "Bearer s3cret"
        body = json.dumps({"name": "FetalHC"} if ok else {"detail": "missing or wrong token"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_bearer_token_goes_out_from_the_panel_field_or_the_environment(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv(hcclient.TOKEN_ENV, raising=False)
        with pytest.raises(hcclient.ServerError, match="401.*missing or wrong token.*API token"):
            hcclient.MonaiLabelClient(url).info()
        assert "Authorization" not in _Recorder.seen[-1]
        assert hcclient.MonaiLabelClient(url, token="s3cret").info()["name"] == "FetalHC"
        assert _Recorder.seen[-1]["Authorization"] == "Bearer s3cret"
        monkeypatch.setenv(hcclient.TOKEN_ENV, "s3cret")
        lg = FetalHCLogic(new_scene())
        lg.set_server(url)
        assert lg.connect()["name"] == "FetalHC" and _Recorder.seen[-1]["Authorization"] == "Bearer s3cret"
    finally:
        server.shutdown()


def test_client_errors_are_clear_messages():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(hcclient.ServerError, match="connection refused"):
        hcclient.MonaiLabelClient(f"http://127.0.0.1:{port}").info()
    lg = FetalHCLogic(new_scene())
    with pytest.raises(hcclient.ServerError, match="invalid server URL"):
        lg.set_server("ftp://x")  # a message for the panel, not a traceback
    with pytest.raises(hcclient.ServerError, match="invalid server URL"):
        lg.connect()
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        c = hcclient.MonaiLabelClient(f"127.0.0.1:{silent.getsockname()[1]}", timeouts={"info": 0.5})
        with pytest.raises(hcclient.ServerError, match="within 0.5 s"):
            c.info()
    finally:
        silent.close()


def test_train_progress_follows_submitted_running_done_error():
    submitted = train_progress({"status": "SUBMITTED"})
    assert submitted["active"] and not submitted["failed"]  # SUBMITTED keeps the polling going
    status = {"status": "RUNNING", "details": ["...", "Epoch: 3/20 loss 0.41", "validating"]}
    p = train_progress(status, {"train_stats": {"fetal_head": {"best_metric": 0.91}}})
    assert (p["active"], p["epoch"], p["total"], p["best_metric"]) == (True, 3, 20, 0.91)
    assert p["text"] == "Training: RUNNING, epoch 3/20, best metric 0.9100"
    stats = {"epoch": 20, "total_epochs": 20, "best_metric": 0.93, "best_adf_mm": 2.345, "published": True,
             "publish_reason": "validation ADF 2.35 mm <= serving 2.60 mm"}
    done = train_progress({"status": "DONE"}, {"train_stats": {"fetal_head": stats}})
    assert not done["active"] and done["text"] == ("Training: DONE, epoch 20/20, best metric 0.9300, best ADF "
                                                   "2.35 mm, published: validation ADF 2.35 mm <= serving 2.60 mm")
    err = train_progress({"status": "ERROR", "details": ["Epoch 1/2", "RuntimeError: out of memory", ""]})
    assert err["failed"] and not err["active"] and err["text"].endswith("failed: RuntimeError: out of memory")
    assert train_progress(None)["text"] == "Training: not started"


# ------------------------------------------------------------------------- module files (no Qt here)

def test_widget_uses_only_widgets_of_the_ui_file_and_cmake_lists_every_script():
    import ast
    import xml.etree.ElementTree as ET
    source = (MODULE_DIR / "FetalHC.py").read_text()
    tree = ast.parse(source)  # Slicer would import it; Qt is not available here
    names = {w.get("name") for w in ET.parse(MODULE_DIR / "Resources" / "UI" / "FetalHC.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= names, f"not in FetalHC.ui: {used - names}"
    for button in ("revertButton", "savePacsButton", "tokenEdit", "qcBannerLabel", "gaWeeksSpinBox"):
        assert button in used
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert {"FetalHC", "FetalHCWidget", "FetalHCTest"} <= set(classes) and "FetalHCLogic" not in classes
    lib_logics = [p.name for p in (MODULE_DIR / "FetalHCLib").glob("*.py") if "class FetalHCLogic" in p.read_text()]
    assert lib_logics == ["logic.py"]  # one Logic
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    for py in sorted((MODULE_DIR / "FetalHCLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{py.name}" in cmake, f"{py.name} missing from MODULE_PYTHON_SCRIPTS"
    assert "WITH_GENERIC_TESTS" in cmake and "${MODULE_NAME}Lib/shared_modules.txt" in cmake
    top = (EXTENSION / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Ultrasound")' in top and "add_subdirectory(FetalHC)" in top
    assert "pip_install" not in source + "".join(p.read_text() for p in (MODULE_DIR / "FetalHCLib").glob("*.py"))


def test_events_that_change_no_outline_are_no_edit(scene, logic):
    """e.g. Slicer converting the segment to a closed surface for 3D, or selecting a curve point."""
    volume, mask, _ = selftest.synthetic_volume(scene)
    selftest.show_synthetic_ai(logic, volume, mask)
    seg = volume.GetNodeReference(nodes.REF_SEG)
    seg.CreateClosedSurfaceRepresentation()
    volume.GetNodeReference(nodes.REF_CURVE).SetNthControlPointSelected(0, False)
    logic._edited(volume.GetID(), "edited mask")
    logic._edited(volume.GetID(), "edited ellipse")
    assert logic.flush() == [] and logic.current_result(volume).outline_source == "AI"


def test_changing_the_known_ga_updates_the_centile(scene, logic):
    volume, mask, _ = selftest.synthetic_volume(scene)
    res = selftest.show_synthetic_ai(logic, volume, mask)
    assert res.centile is None
    logic.set_known_ga(20.0)
    assert logic.refresh_centile(volume).centile["ga_weeks"] == 20.0
    logic.set_known_ga(50.0)  # outside INTERGROWTH-21st: a reason, no centile
    out = logic.refresh_centile(volume)
    assert out.centile is None and any("INTERGROWTH" in r for r in out.qc_reasons)
