"""sample-apps/: the demo studies (same pixels and spacing in every format -> same HC) and the scripted
relabeling session, folder variant always, PACS variant wherever Debian's Orthanc is installed."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_APPS = ROOT / "sample-apps"
sys.path.insert(0, str(SAMPLE_APPS))

from build_studies import SAMPLES, build  # noqa: E402
from fetalhc import hc18  # noqa: E402
from fetalhc.io import SRC_PIXEL_SPACING, SRC_US_REGION, load_image  # noqa: E402
from fetalhc.pipeline import Measurer  # noqa: E402

ROW = re.compile(r"^ {4}(\S+)\s+(\d+\.\d)\s+(\d+\.\d)\s+([+-]\d+\.\d)\s", re.M)  # study, HC, expert, diff


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_apps")
    return out, build(out)


@pytest.fixture(scope="module")
def model(request) -> Path:
    """FETALHC_MODEL when set (development), else the shipped default model, which must exist."""
    env = os.environ.get("FETALHC_MODEL")
    return Path(env) if env else request.getfixturevalue("default_model")


def _load(out: Path, study):
    sidecar = out / "studies" / "pixel_size.csv"
    return load_image(out / study.file, pixel_csv=sidecar if study.file.endswith(".png") else None)


def test_demo_files_carry_the_hc18_pixels_and_spacing(built):
    out, studies = built
    assert {s.store for s in studies} == {"folder", "dicom"}
    kinds = {(s.calibration, s.photometric, s.frames) for s in studies if s.store == "dicom"}
    assert {("us_region", "MONOCHROME2", 1), ("pixel_spacing", "MONOCHROME2", 1),
            ("us_region", "YBR_FULL_422", 1), ("us_region", "MONOCHROME2", 3)} <= kinds
    sources = {"us_region": SRC_US_REGION, "pixel_spacing": SRC_PIXEL_SPACING, "NIfTI header": "NIfTI header",
               "sidecar pixel_size.csv": "pixel CSV pixel_size.csv"}
    csv = {r.name: r for r in hc18.read_records(SAMPLES)}
    for s in studies:
        img = _load(out, s)
        assert img.spacing.source == sources[s.calibration], s.file
        assert img.spacing.as_tuple() == pytest.approx((s.pixel_size_mm,) * 2, rel=1e-6), s.file
        assert s.pixel_size_mm == csv[s.image].pixel_mm and s.hc_mm_csv == csv[s.image].hc_mm
        assert np.array_equal(img.pixels, hc18.read_grey(SAMPLES / s.image)), s.file  # frame 0 of the cine
        assert img.meta["n_frames"] == s.frames and not img.warnings, s.file
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 8e6


def test_every_format_gives_the_png_plus_csv_hc(built, model):
    """Same pixels, same spacing -> the same HC from DICOM (US region, PixelSpacing, YBR, cine) and NIfTI."""
    out, studies = built
    measurer = Measurer(model, "cpu")
    reference = {}
    for name in {s.image for s in studies}:
        m = measurer.measure(hc18.read_grey(SAMPLES / name), load_image(SAMPLES / name,
                             pixel_csv=SAMPLES / hc18.TRAIN_CSV).spacing)
        assert m.hc_mm is not None, f"{name}: {m.qc_text}"
        reference[name] = m.hc_mm
    for s in studies:
        img = _load(out, s)
        m = measurer.measure(img.pixels, img.spacing, spacing_at=img.spacing_at)
        assert m.hc_mm == pytest.approx(reference[s.image], abs=0.1), s.file


def _run_session(*args, timeout: float = 900) -> str:
    """The one command, as a newcomer runs it; SIGTERM on timeout so that it still tears down."""
    cmd = [sys.executable, str(SAMPLE_APPS / "run_session.py"), *args]
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"session timed out after {timeout} s:\n{out}")
    print(out)
    assert proc.returncode == 0, out
    return out


def _check_transcript(out: str, n_studies: int):
    rows = ROW.findall(out)
    assert len(rows) == n_studies + 2, out  # every study, then the two corrected ones with the new model
    for _, hc, expert, _ in rows:
        assert 40 < float(hc) < 400 and 40 < float(expert) < 400
    assert "saved corrected label" in out and "training done" in out and "new model served" in out
    assert re.search(r"next sample to correct \(hc_uncertainty\): \S+", out)
    assert "session complete: every step passed" in out
    work = re.search(r"work folder (\S+);", out).group(1)
    assert not Path(work).exists(), "the temp folder must be removed"
    for port in {int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", out)}:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is still served after the session"
    return rows


def test_folder_session(model):
    rows = _check_transcript(_run_session("--folder", "--model", str(model)), 4)
    assert {r[0] for r in rows[:4]} == {"083_2HC.png", "399_HC.png", "713_HC.nii.gz", "745_HC.nii.gz"}


@pytest.mark.skipif(not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists(),
                    reason="Debian's orthanc (+ orthanc-dicomweb) is not installed; scripts/test.sh installs it")
def test_pacs_session(model):
    out = _run_session("--pacs", "--model", str(model))
    assert "QIDO finds 7 US series" in out
    rows = _check_transcript(out, 7)
    hc = {}
    for study, value, _, _ in rows[:7]:  # variants of one image (PixelSpacing, YBR, cine) give its HC
        hc.setdefault(study.split("_")[0], []).append(float(value))
    assert all(max(v) - min(v) <= 0.15 for v in hc.values()), hc  # 0.1 mm, printed to 0.1 mm
    assert out.count(SRC_US_REGION) >= 6 and SRC_PIXEL_SPACING in out
    # The corrected studies end as SEG + SR in Orthanc; the SR's HC is that of the corrected (expert) mask.
    assert "4. results in PACS" in out and "Orthanc explorer: http://127.0.0.1:" in out
    found = re.findall(r"in Orthanc (\d+) SEG and (\d+) SR series; SR HC ([\d.]+) mm \(expert ([\d.]+) mm\)", out)
    assert len(found) == 2, out
    for seg, sr, hc, expert in found:
        assert int(seg) >= 1 and int(sr) >= 1 and abs(float(hc) - float(expert)) <= 0.01 * float(expert) + 0.1


def test_session_fails_cleanly_without_a_model(tmp_path):
    proc = subprocess.run([sys.executable, str(SAMPLE_APPS / "run_session.py"), "--folder", "--model",
                           str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "FAILED" in proc.stdout and "no model at" in proc.stdout, proc.stdout
    work = re.search(r"work folder (\S+);", proc.stdout)
    assert work is None or not Path(work.group(1)).exists()
