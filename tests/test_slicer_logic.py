"""FetalHCLib (the Slicer module's non-GUI logic) on real MRML from slicer-core, without a server."""
from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from slicer_support import EXTENSION, MODULE_DIR, ROOT, new_scene

from FetalHCLib import client as hcclient, core, logic, selftest  # noqa: E402
from FetalHCLib.flow import prepare, train_progress  # noqa: E402
from fetalhc import clinical, geometry, io  # noqa: E402
from fetalhc.dicomgen import write_us_dicom  # noqa: E402

sys.path.insert(0, str(EXTENSION / "tools"))
import vendor_fetalhc  # noqa: E402


@pytest.fixture
def scene():
    return new_scene()


# ------------------------------------------------------------------------------------- vendoring

def test_vendored_copy_is_byte_identical_to_lib(tmp_path):
    written = vendor_fetalhc.vendor(tmp_path / "_vendor")
    assert [p.name for p in written] == list(core.VENDORED)
    for name in core.VENDORED:
        assert (tmp_path / "_vendor" / name).read_bytes() == (ROOT / "lib" / "fetalhc" / name).read_bytes()
    in_tree = MODULE_DIR / "FetalHCLib" / "_vendor"
    if in_tree.exists():  # left by a CMake configure or the tool: must not be stale
        for name in core.VENDORED:
            assert (in_tree / name).read_bytes() == (ROOT / "lib" / "fetalhc" / name).read_bytes(), \
                f"{in_tree / name} is stale: rerun slicer_extension/tools/vendor_fetalhc.py"


BLOCK_FETALHC = f"import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != {str(ROOT / 'lib')!r}]; "


def test_module_works_from_the_vendored_copy_without_fetalhc(tmp_path):
    """A Slicer without fetalhc: FetalHCLib copied alone + build-step vendoring is enough."""
    pkg = tmp_path / "FetalHC" / "FetalHCLib"
    shutil.copytree(MODULE_DIR / "FetalHCLib", pkg, ignore=shutil.ignore_patterns("_vendor", "__pycache__"))
    vendor_fetalhc.vendor(pkg / "_vendor")
    code = (BLOCK_FETALHC + f"sys.path.insert(0, {str(pkg.parent)!r}); "
            "from FetalHCLib import core; g, c, io = core.load(); "
            "import importlib.util; assert importlib.util.find_spec('fetalhc') is None; "
            "print(core.source, g.__name__, round(g.ramanujan_perimeter(10, 5), 4), c.hadlock_ga(175).text)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = [str(round(geometry.ramanujan_perimeter(10, 5), 4)), clinical.hadlock_ga(175).text]
    assert out.stdout.split() == ["vendored", "copy", "FetalHCLib._vendor.geometry"] + expected


def test_module_added_from_a_checkout_finds_lib_fetalhc():
    """Module path added straight from a git clone (no build, fetalhc not installed): lib/ is used."""
    if (MODULE_DIR / "FetalHCLib" / "_vendor" / "geometry.py").exists():
        pytest.skip("a vendored copy is present in the tree and takes precedence")
    code = (BLOCK_FETALHC + f"sys.path.insert(0, {str(MODULE_DIR)!r}); "
            "from FetalHCLib import core; g, c, io = core.load(); print(core.source, '|', g.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("source checkout") and out.stdout.strip().endswith("lib/fetalhc/geometry.py")


def test_missing_opencv_gives_an_install_hint():
    code = ("import sys; sys.modules['cv2'] = None; " + f"sys.path.insert(0, {str(MODULE_DIR)!r}); "
            "from FetalHCLib import core\ntry:\n    core.load()\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "opencv-python-headless" in out.stdout and "pip_install" in out.stdout


# ------------------------------------------------------------------------------- curve and segment

def test_synthetic_ellipse_curve_length_matches_hc_on_flipped_anisotropic_volume(scene):
    case = selftest.synthetic_case(scene)
    volume, shown = case["volume"], case["shown"]
    m = logic.ijk_to_ras(volume)
    assert np.linalg.det(m[:3, :3]) < 0 and m[0, 0] < 0  # a flipped IJK->RAS, not index x spacing
    assert volume.GetSpacing()[:2] == pytest.approx((0.12, 0.15))
    assert shown["hc_mm"] == pytest.approx(case["truth_hc_mm"], rel=5e-3)
    assert selftest.agreement(shown) < 1e-3  # the bar is 0.5 %; the spline through 24 points does far better
    curve = volume.GetNodeReference(logic.REF_CURVE)
    assert curve.IsA("vtkMRMLMarkupsClosedCurveNode") and curve.GetMeasurement("length").GetEnabled()
    assert curve.GetMeasurement("length").GetValueWithUnitsAsPrintableString().endswith("mm")
    # control points (now of the recomputed result) lie on its mm ellipse mapped to pixels
    rec = case["recomputed"]
    ras = np.array([curve.GetNthControlPointPositionWorld(i) for i in range(curve.GetNumberOfControlPoints())])
    e = logic.ellipse_for_curve(rec)
    assert e.to_mm((0.15, 0.12)).perimeter == pytest.approx(rec["hc_mm"], rel=1e-9)
    xy = logic.ras_to_pixels(volume, ras) - [e.cx, e.cy]
    u = xy @ [math.cos(e.angle), math.sin(e.angle)]
    v = xy @ [-math.sin(e.angle), math.cos(e.angle)]
    assert np.allclose((u / e.a) ** 2 + (v / e.b) ** 2, 1.0, atol=1e-6)
    # the segment holds the mask on the volume's grid and exports back unchanged
    seg = volume.GetNodeReference(logic.REF_SEG)
    assert seg.GetSegmentation().GetSegment(logic.SEGMENT_ID).GetName() == "Fetal head"
    assert np.array_equal(case["exported"], case["mask"])
    # edit + Recompute: smaller head, curve follows, table updated
    assert rec["hc_mm"] < shown["hc_mm"] and selftest.agreement(rec) < 1e-3
    assert rec["qc_ok"] is None and "edited" in rec["qc"]
    table = logic.table_values(volume)
    assert table["HC"] == f"{rec['hc_mm']:.1f} mm" and table["Result"] == "recomputed from the edited segment"
    assert table["GA (Hadlock)"].startswith(rec["ga_text"]) and table["Spacing source"] == "synthetic test geometry"


def test_recompute_from_dragged_curve_refits_and_redraws_the_segment(scene):
    case = selftest.synthetic_case(scene)
    volume = case["volume"]
    curve = volume.GetNodeReference(logic.REF_CURVE)
    centre = np.mean([curve.GetNthControlPointPositionWorld(i) for i in range(curve.GetNumberOfControlPoints())], 0)
    for i in range(curve.GetNumberOfControlPoints()):  # the user scales the outline up by 5 %
        p = np.array(curve.GetNthControlPointPositionWorld(i))
        curve.SetNthControlPointPositionWorld(i, *(centre + 1.05 * (p - centre)))
    rec = logic.recompute(volume, "curve")
    assert rec["hc_mm"] == pytest.approx(1.05 * case["recomputed"]["hc_mm"], rel=2e-3)
    assert selftest.agreement(rec) < 1e-3
    mask = logic.segment_mask(volume)
    assert mask.sum() == pytest.approx(1.05 ** 2 * case["edited"].sum(), rel=0.02)


def test_recompute_errors_are_plain_messages(scene):
    volume = logic.add_volume(scene, np.zeros((50, 60), np.uint8), "blank")
    with pytest.raises(logic.FetalHCError, match="Segment head first"):
        logic.recompute(volume)
    logic.set_head_segment(volume, np.zeros((50, 60), np.uint8))
    with pytest.raises(logic.FetalHCError, match="empty"):
        logic.recompute(volume)
    with pytest.raises(logic.FetalHCError, match="curve"):
        logic.recompute(volume, "curve")


def test_pixels_only_without_spacing(scene):
    e = geometry.Ellipse.make(60, 40, 30, 20, 0.3)
    mask = geometry.ellipse_mask(e, (90, 120)).astype(np.uint8)
    volume = logic.add_volume(scene, mask * 100, "png without calibration")
    report = logic.resolve_spacing(volume)
    assert report["spacing"] is None and "Enter the pixel size" in report["message"]
    res = logic.apply_result(volume, logic.measure(mask, None), mask)
    assert res["hc_mm"] is None and res["hc_px"] == pytest.approx(e.perimeter, rel=5e-3)
    assert any("no pixel spacing" in w for w in res["warnings"])
    assert logic.table_values(volume)["HC"].endswith("px (no spacing)")
    # the user enters the pixel size, Recompute gives millimetres
    prepare(volume, manual_mm=0.2)
    rec = logic.recompute(volume)
    assert rec["hc_mm"] == pytest.approx(0.2 * e.perimeter, rel=5e-3) and rec["spacing_source"] == logic.SRC_MANUAL
    assert selftest.agreement(rec) < 1e-3


# -------------------------------------------------------------------------------- spacing & input

def _as_slicer_dicom_volume(scene, path, rgb: bool):
    """What Slicer's DICOM module makes of an US file calibrated only by regions: 1.0 mm spacing."""
    import pydicom
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    cls = "vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode"
    volume = scene.AddNewNodeByClass(cls, "US DICOM")
    logic.set_volume_array(volume, arr[None])
    volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    volume.SetAttribute("DICOM.instanceUIDs", str(ds.SOPInstanceUID))
    return volume


@pytest.mark.parametrize("calibration,photometric", [("us_region", "MONOCHROME2"), ("us_region", "RGB"),
                                                     ("pixel_spacing", "MONOCHROME2"), ("none", "RGB")])
def test_dicom_spacing_and_grey_conversion(scene, tmp_path, samples_dir, calibration, photometric):
    import cv2
    pixels = cv2.imread(str(samples_dir / "399_HC.png"), cv2.IMREAD_GRAYSCALE)
    colour = np.dstack([pixels, np.roll(pixels, 3, 1), pixels // 2]) if photometric == "RGB" else pixels
    path = write_us_dicom(tmp_path / "us.dcm", colour, (0.16, 0.14), calibration=calibration, photometric=photometric)
    volume = _as_slicer_dicom_volume(scene, path, photometric == "RGB")
    assert volume.GetSpacing()[:2] == (1.0, 1.0)
    grey, report = prepare(volume, dicom_file=str(path))
    reference = io.load_image(path)
    assert np.array_equal(logic.volume_array(grey)[0], reference.pixels)  # same grey as the server's
    assert (grey is volume) == (photometric == "MONOCHROME2")
    if calibration == "none":
        assert report["spacing"] is None and "no calibration" in report["message"]
        assert grey.GetSpacing()[:2] == (1.0, 1.0)
    else:
        assert report["spacing"].as_tuple() == pytest.approx((0.16, 0.14))
        assert grey.GetSpacing()[:2] == pytest.approx((0.14, 0.16))  # (col, row) = (x, y)
        assert report["source"] == reference.spacing.source
        assert ("PhysicalDeltaX/Y" in report["source"]) == (calibration == "us_region")


def test_cine_frame_becomes_a_2d_grey_volume(scene, tmp_path):
    pixels = (np.arange(40 * 50) % 251).astype(np.uint8).reshape(40, 50)
    path = write_us_dicom(tmp_path / "cine.dcm", pixels, (0.2, 0.2), frames=3)
    import pydicom
    frames = pydicom.dcmread(str(path)).pixel_array  # (3, 40, 50)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cine")
    logic.set_volume_array(volume, frames)
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    grey, report = prepare(volume, dicom_file=str(path), frame=2)
    assert logic.image_shape(grey) == (40, 50) and np.array_equal(logic.volume_array(grey)[0], frames[2])
    assert logic.ijk_to_ras(grey)[2, 3] == pytest.approx(2.0)  # origin on frame 2
    assert report["spacing"].as_tuple() == pytest.approx((0.2, 0.2))
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cine 2")
    logic.set_volume_array(other, frames)
    with pytest.raises(logic.FetalHCError, match="frame 5"):
        logic.prepare_input(other, 5)


# ------------------------------------------------------------------------ files for/from the server

def test_upload_file_reads_back_identically_with_fetalhc_io(scene, tmp_path):
    """Pixels, orientation and anisotropic spacing survive the NRRD the module uploads."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (37, 53), dtype=np.uint8)
    volume = logic.add_volume(scene, pixels, "aniso", ijk_to_ras_matrix=selftest.flipped_ijk_to_ras((0.17, 0.11)))
    volume.SetAttribute(logic.ATTR_SPACING_SOURCE, "test")
    nrrd_path = logic.write_upload_file(volume, str(tmp_path))
    assert nrrd_path.endswith(".nrrd")
    back = io.load_image(nrrd_path)
    assert np.array_equal(back.pixels, pixels) and back.spacing.as_tuple() == pytest.approx((0.17, 0.11))
    loaded = logic.load_image_volume(scene, nrrd_path)  # MRML's reader: geometry and header spacing kept
    # i, j columns and origin kept (the k axis of a single slice may come back flipped: right-handed)
    assert np.allclose(logic.ijk_to_ras(loaded)[:, [0, 1, 3]], logic.ijk_to_ras(volume)[:, [0, 1, 3]])
    assert np.array_equal(logic.volume_array(loaded)[0], pixels)
    assert logic.volume_spacing(loaded).source == "NRRD header"
    volume.RemoveAttribute(logic.ATTR_SPACING_SOURCE)  # unknown spacing: PNG, no invented 1.0 mm
    png_path = logic.write_upload_file(volume, str(tmp_path))
    back = io.load_image(png_path)
    assert png_path.endswith(".png") and back.spacing is None and np.array_equal(back.pixels, pixels)


@pytest.mark.parametrize("suffix", [".png", ".nrrd", ".nii.gz"])
def test_labels_round_trip_with_the_servers_reader_and_writer(scene, tmp_path, suffix):
    e = geometry.Ellipse.make(30, 18, 14, 9, 0.5)
    mask = geometry.ellipse_mask(e, (37, 53)).astype(np.uint8)
    mask[0, :5] = 1  # asymmetric marker: catches transposes and flips
    volume = logic.add_volume(scene, mask * 50, "lbl", ijk_to_ras_matrix=selftest.flipped_ijk_to_ras((0.17, 0.11)))
    volume.SetAttribute(logic.ATTR_SPACING_SOURCE, "test")
    logic.set_head_segment(volume, mask)
    # Submit: our label file as fetalhc.io (the app's trainer) reads it
    out = logic.write_label_file(volume, str(tmp_path), suffix)
    assert np.array_equal(io.load_image(out).pixels, mask)
    # Infer: a label the app writes (fetalhc.io.save_label_like) as we read it
    ref = io.load_image(logic.write_upload_file(volume, str(tmp_path)))
    server_label = io.save_label_like(mask, ref, tmp_path / f"server{suffix}")
    assert np.array_equal(logic.read_label_file(str(server_label), mask.shape), mask)
    with pytest.raises(logic.FetalHCError, match="same pixel grid"):
        logic.read_label_file(str(server_label), mask.shape[::-1])


def test_empty_segment_cannot_be_submitted(scene, tmp_path):
    volume = logic.add_volume(scene, np.zeros((20, 30), np.uint8), "empty")
    logic.set_head_segment(volume, np.zeros((20, 30), np.uint8))
    with pytest.raises(logic.FetalHCError, match="empty"):
        logic.write_label_file(volume, str(tmp_path))


# ----------------------------------------------------------------------------------- REST client

def test_multipart_round_trip_is_byte_exact():
    payload = bytes(range(256)) * 3 + b"\r\n--tricky\r\n\r\n"
    ctype, body = hcclient.encode_multipart({"params": '{"a": 1}'}, {"label": ("x.nrrd", payload)})
    parts = hcclient.parse_multipart(ctype, body)
    assert parts[0][1] == b'{"a": 1}' and parts[1][1] == payload
    assert 'filename="x.nrrd"' in parts[1][0]["content-disposition"]


def test_client_errors_are_clear_messages():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(hcclient.ServerError, match="connection refused"):
        hcclient.MonaiLabelClient(f"http://127.0.0.1:{port}").info()
    with pytest.raises(hcclient.ServerError, match="invalid server URL"):
        hcclient.MonaiLabelClient("ftp://x")
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        c = hcclient.MonaiLabelClient(f"127.0.0.1:{silent.getsockname()[1]}", timeouts={"info": 0.5})
        with pytest.raises(hcclient.ServerError, match="within 0 s|within 1 s|timeout"):
            c.info()
    finally:
        silent.close()


def test_train_progress_from_status_and_stats():
    status = {"status": "RUNNING", "details": ["...", "Epoch: 3/20 loss 0.41", "validating"]}
    p = train_progress(status, {"train_stats": {"fetal_head": {"best_metric": 0.91}}})
    assert (p["running"], p["epoch"], p["total"], p["best_metric"]) == (True, 3, 20, 0.91)
    assert p["text"] == "Training: RUNNING, epoch 3/20, best metric 0.9100"
    stats = {"epoch": 20, "total_epochs": 20, "best_metric": 0.93, "best_adf_mm": 2.345, "published": True,
             "publish_reason": "validation ADF 2.35 mm <= serving 2.60 mm"}
    done = train_progress({"status": "DONE"}, {"train_stats": {"fetal_head": stats}})
    assert not done["running"] and done["text"] == ("Training: DONE, epoch 20/20, best metric 0.9300, best ADF "
                                                    "2.35 mm, published: validation ADF 2.35 mm <= serving 2.60 mm")
    assert train_progress(None)["text"] == "Training: not started"


# ------------------------------------------------------------------------- module files (no Qt here)

def test_widget_uses_only_widgets_of_the_ui_file_and_cmake_lists_every_script():
    import ast
    import re
    import xml.etree.ElementTree as ET
    source = (MODULE_DIR / "FetalHC.py").read_text()
    ast.parse(source)  # Slicer would import it; Qt is not available here
    names = {w.get("name") for w in ET.parse(MODULE_DIR / "Resources" / "UI" / "FetalHC.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= names, f"not in FetalHC.ui: {used - names}"
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    for py in sorted((MODULE_DIR / "FetalHCLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{py.name}" in cmake, f"{py.name} missing from MODULE_PYTHON_SCRIPTS"
    assert "WITH_GENERIC_TESTS" in cmake and all(f in cmake for f in core.VENDORED)
    top = (EXTENSION / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Ultrasound")' in top and "add_subdirectory(FetalHC)" in top
