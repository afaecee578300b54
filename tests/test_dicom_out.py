"""DICOM SEG and SR of FetalHC results, checked by independent tools (dciodvfy, dsrdump) and read back.

Sources are synthetic ultrasound DICOM (fetalhc.dicomgen) of a shipped HC18 image with its real pixel size;
masks and measurements are the real pipeline's (shipped model) or the HC18 ground-truth outline.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from dicom_tools import dciodvfy_errors, dsrdump, dsrdump_num
from fetalhc import hc18
from fetalhc.dicom_out import (NOT_DICOM, DicomOutError, read_seg, read_source, read_sr, write_seg, write_sr)
from fetalhc.dicomgen import write_us_dicom
from fetalhc.io import load_image
from fetalhc.pipeline import Measurer, measure_mask


@pytest.fixture(scope="module")
def record(samples_dir):
    return {r.name: r for r in hc18.read_records(samples_dir)}["459_HC.png"]


@pytest.fixture(scope="module")
def measurer(default_model):
    return Measurer(default_model, "cpu")


def _study(tmp_path, record, frames=1):
    pixels = cv2.imread(str(record.image), cv2.IMREAD_GRAYSCALE)
    return write_us_dicom(tmp_path / "us.dcm", pixels, (record.pixel_mm, record.pixel_mm), frames=frames)


@pytest.mark.parametrize("frames,frame", [(1, 0), (3, 2)])
def test_ai_seg_passes_dciodvfy_and_gives_the_mask_back(tmp_path, record, measurer, frames, frame):
    path = _study(tmp_path, record, frames)
    img = load_image(path, frame=frame)
    m = measurer.measure(img.pixels, img.spacing, spacing_at=img.spacing_at)
    assert m.mask.sum() > 1000
    seg = write_seg(read_source(path), m.mask, tmp_path / "seg.dcm", frame=frame, model_version=m.model_version)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    back = read_seg(tmp_path / "seg.dcm")
    assert np.array_equal(back.mask, m.mask) and back.frame == frame
    src = pydicom.dcmread(path)
    assert back.source_sop_instance_uid == src.SOPInstanceUID and seg.StudyInstanceUID == src.StudyInstanceUID
    seg_item = pydicom.dcmread(tmp_path / "seg.dcm").SegmentSequence[0]
    assert seg_item.SegmentLabel == "Fetal head" and seg_item.SegmentAlgorithmType == "AUTOMATIC"
    assert seg_item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "69536005"  # SCT Head
    assert seg_item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"  # SCT Anatomical Structure
    algo = seg_item.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "FetalHC" and algo.AlgorithmVersion == m.model_version


def test_ai_sr_passes_dciodvfy_dsrdump_and_gives_hc_back(tmp_path, record, measurer):
    path = _study(tmp_path, record)
    img = load_image(path)
    m = measurer.measure(img.pixels, img.spacing, spacing_at=img.spacing_at)
    res = m.to_dict()
    write_sr(read_source(path), res, tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    dump = dsrdump(tmp_path / "sr.dcm")  # dcmtk reads the values back independently of highdicom
    assert "# TID 1500" in dump and "# TID 1410" in dump and "(ELLIPSE," in dump and '"Fetus"' in dump
    for key, code in (("hc_mm", "11984-2"), ("bpd_mm", "11820-8"), ("ofd_mm", "11851-3")):
        assert dsrdump_num(dump, code) == (pytest.approx(res[key], abs=1e-9), "mm"), key
    assert dsrdump_num(dump, "18185-9") == (pytest.approx(res["ga_weeks"], abs=1e-9), "wk")
    assert '(11932-1,LN,"HC, Hadlock 1984")' in dump and "(111050,DCM," in dump
    back = read_sr(tmp_path / "sr.dcm")
    assert back["hc_mm"] == pytest.approx(res["hc_mm"], abs=1e-9)
    assert back["bpd_mm"] == pytest.approx(res["bpd_mm"], abs=1e-9)
    assert back["ofd_mm"] == pytest.approx(res["ofd_mm"], abs=1e-9)
    assert back["ga_weeks"] == pytest.approx(res["ga_weeks"], abs=1e-9)
    assert back["qc_ok"] == res["qc_ok"] and any(res["spacing_source"] in t for t in back["texts"])
    assert res["hc_mm"] == pytest.approx(record.hc_mm, rel=0.05)
    # The four SCOORD points are the ellipse's axis end points: an ellipse through them (and the symmetric
    # points) is the result's ellipse.
    p = back["ellipse_points_px"]
    e = res["ellipse_px"]
    assert np.allclose(p[:2].mean(0), [e["cx"], e["cy"]], atol=1e-3)
    assert np.linalg.norm(p[0] - p[1]) / 2 == pytest.approx(e["a"], abs=1e-3)
    assert np.linalg.norm(p[2] - p[3]) / 2 == pytest.approx(e["b"], abs=1e-3)
    assert math.atan2(*(p[0] - p[1])[::-1]) % math.pi == pytest.approx(e["angle"], abs=1e-4)


def test_corrected_label_sr_and_manual_seg(tmp_path, record):
    """A clinician's mask (HC18 ground truth) measured through the one geometry/clinical path."""
    path = _study(tmp_path, record)
    img = load_image(path)
    gt = hc18.gt_mask(record).astype(np.uint8)
    m = measure_mask(gt, img.spacing, model_version="best-x")
    assert m.hc_mm == pytest.approx(record.hc_mm, rel=0.01) and m.ga.valid
    res = m.to_dict()
    write_sr(read_source(path), res, tmp_path / "sr.dcm", manual=True)
    write_seg(read_source(path), gt, tmp_path / "seg.dcm", segmentation="MANUAL")
    for f in ("sr.dcm", "seg.dcm"):
        assert dciodvfy_errors(tmp_path / f) == [], f
    back = read_sr(tmp_path / "sr.dcm")
    assert back["hc_mm"] == pytest.approx(m.hc_mm, abs=5e-4)
    assert any("clinician-corrected" in t for t in back["texts"])
    seg_item = pydicom.dcmread(tmp_path / "seg.dcm").SegmentSequence[0]
    assert seg_item.SegmentAlgorithmType == "MANUAL" and "SegmentationAlgorithmIdentificationSequence" not in seg_item
    assert np.array_equal(read_seg(tmp_path / "seg.dcm").mask, gt)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, record):
    with pytest.raises(DicomOutError, match=NOT_DICOM):
        read_source(record.image)
    src = read_source(_study(tmp_path, record))
    wrong = np.ones((src.Rows - 1, src.Columns), np.uint8)
    with pytest.raises(DicomOutError, match="label is .* pixels but the source image frame is"):
        write_seg(src, wrong, tmp_path / "seg.dcm")
    with pytest.raises(DicomOutError, match="empty"):
        write_seg(src, np.zeros((src.Rows, src.Columns), np.uint8), tmp_path / "seg.dcm")
    with pytest.raises(DicomOutError, match="frame 1 does not exist"):
        write_seg(src, np.ones((src.Rows, src.Columns), np.uint8), tmp_path / "seg.dcm", frame=1)
    assert not (tmp_path / "seg.dcm").exists()
    with pytest.raises(DicomOutError, match="no head ellipse"):
        write_sr(src, {"ellipse_px": None, "qc": "no head found"}, tmp_path / "sr.dcm")
    assert not (tmp_path / "sr.dcm").exists()


def test_sr_without_spacing_reports_no_millimetres(tmp_path, record):
    path = write_us_dicom(tmp_path / "us.dcm", cv2.imread(str(record.image), cv2.IMREAD_GRAYSCALE), None,
                          calibration="none")
    img = load_image(path)
    m = measure_mask(hc18.gt_mask(record), img.spacing)
    assert m.hc_mm is None and m.hc_px
    write_sr(read_source(path), m.to_dict(), tmp_path / "sr.dcm", manual=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    back = read_sr(tmp_path / "sr.dcm")
    assert back["hc_mm"] is None and back["ga_weeks"] is None and not back["qc_ok"]
    assert any("unknown" in t for t in back["texts"])
    p = back["ellipse_points_px"]
    assert np.linalg.norm(p[0] - p[1]) / 2 == pytest.approx(m.ellipse_px.a, abs=1e-3)


def test_cli_dicom_out_writes_seg_and_sr_per_dicom_input(tmp_path, record, default_model):
    study = _study(tmp_path, record)
    p = subprocess.run([sys.executable, "-m", "fetalhc.cli", "measure", str(study), str(record.image),
                        "--pixel-size", str(record.pixel_mm), "--model", str(default_model),
                        "--out", str(tmp_path / "out"), "--no-overlay", "--dicom-out", str(tmp_path / "dcm")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr  # the PNG cannot have DICOM output: a per-file error
    assert f"{record.name}" in p.stdout and NOT_DICOM in p.stdout and "Traceback" not in p.stdout + p.stderr
    assert sorted(f.name for f in (tmp_path / "dcm").iterdir()) == ["us_seg.dcm", "us_sr.dcm"]
    res = {Path(r["file"]).name: r for r in json.loads((tmp_path / "out" / "measurements.json").read_text())}
    for f in ("us_seg.dcm", "us_sr.dcm"):
        assert dciodvfy_errors(tmp_path / "dcm" / f) == [], f
    assert read_sr(tmp_path / "dcm" / "us_sr.dcm")["hc_mm"] == pytest.approx(res["us.dcm"]["hc_mm"], abs=1e-9)
    assert read_seg(tmp_path / "dcm" / "us_seg.dcm").mask.sum() > 1000
