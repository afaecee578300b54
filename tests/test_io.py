"""fetalhc.io and fetalhc.dicomgen: every format, calibration and colour path, and every bad input."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from fetalhc.dicomgen import US_IMAGE_STORAGE, US_MULTIFRAME_STORAGE, write_us_dicom
from fetalhc.geometry import Ellipse, ellipse_mask, fit_mask
from fetalhc.io import (InputError, LoadedImage, Spacing, UsRegion, label_suffix, load_image, read_pixel_csv,
                        save_label_like, to_grey_uint8)

SAMPLES = Path(__file__).resolve().parents[1] / "sample-data" / "hc18"
ANISO = (0.2, 0.3)  # (row_mm, col_mm): different on purpose, so a swap shows
RADIUS_MM = 20.0
REGION_SRC = "DICOM ultrasound region (0018,6011) PhysicalDeltaX/Y"


def circle_image(spacing=ANISO, shape=(240, 180)) -> np.ndarray:
    """A 20 mm radius disc (bright on a grey ramp) drawn in pixels for the given spacing: an ellipse on screen."""
    row, col = spacing
    e = Ellipse.make(shape[1] / 2, shape[0] / 2, RADIUS_MM / col, RADIUS_MM / row, 0.0)
    ramp = np.linspace(20, 90, shape[1])[None].repeat(shape[0], 0)
    return np.where(ellipse_mask(e, shape), 220, ramp).astype(np.uint8)


def assert_circle(img: LoadedImage):
    """Back in mm the disc must be round with the right radius: catches swapped or transposed axes."""
    _, mm = fit_mask(img.pixels > 150, img.spacing.as_tuple())
    assert mm.a == pytest.approx(RADIUS_MM, rel=0.01) and mm.b == pytest.approx(RADIUS_MM, rel=0.01)


def colour_image(shape=(64, 96)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.stack([xx * 255 // shape[1], yy * 255 // shape[0], (xx + yy) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def hc18(tmp_path_factory):
    """(png, csv, pixel size): the first shipped HC18 sample, or a synthetic stand-in when absent."""
    table = SAMPLES / "training_set_pixel_size_and_HC.csv"
    if table.exists():
        with open(table, newline="") as fh:
            row = next(csv.DictReader(fh))
        return SAMPLES / row["filename"], table, float(row["pixel size(mm)"])
    d = tmp_path_factory.mktemp("hc18")
    cv2.imwrite(str(d / "001_HC.png"), circle_image((0.1, 0.1), (540, 800)))
    (d / "pixels.csv").write_text("filename,pixel size(mm),head circumference (mm)\n001_HC.png,0.1,125.7\n")
    return d / "001_HC.png", d / "pixels.csv", 0.1


@pytest.fixture(scope="module")
def circle():
    return circle_image()


# ------------------------------------------------------------------------------------------ raster

def test_png_pixel_size_and_csv(hc18, tmp_path):
    png, table, mm = hc18
    expected = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    img = load_image(png, pixel_size=0.25)
    assert img.spacing == Spacing(0.25, 0.25, "--pixel-size")
    assert img.pixels.dtype == np.uint8 and img.pixels.flags.c_contiguous and np.array_equal(img.pixels, expected)
    assert img.meta["format"] == "PNG" and img.regions == []
    for csv_arg in (table, str(table), read_pixel_csv(table)):
        img = load_image(png, pixel_csv=csv_arg)
        assert img.spacing.as_tuple() == (mm, mm) and img.spacing.source == f"pixel CSV {table.name}"
    # --pixel-size wins over the CSV, and says so
    img = load_image(png, pixel_size=0.3, pixel_csv=table)
    assert img.spacing.row_mm == 0.3 and any("CSV" in w for w in img.meta["warnings"])
    # a file the CSV does not list has no spacing, and the warning names it
    other = tmp_path / "not_listed.png"
    other.write_bytes(png.read_bytes())
    img = load_image(other, pixel_csv=table)
    assert img.spacing is None and any("not_listed.png" in w for w in img.meta["warnings"])


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "abc"])
def test_bad_pixel_size(hc18, bad):
    with pytest.raises(InputError, match="pixel spacing"):
        load_image(hc18[0], pixel_size=bad)


@pytest.mark.parametrize("text,expected", [
    ("filename,pixel size(mm)\na.png,0.1\nb.png,0.2\n", {"a.png": 0.1, "b.png": 0.2}),
    ("\ufefffilename;pixel_size_mm\na.png;0.1\n\n", {"a.png": 0.1}),
    ("Filename,Pixel Size\r\na.png,0.1\r\n", {"a.png": 0.1}),
])
def test_read_pixel_csv_variants(tmp_path, text, expected):
    p = tmp_path / "px.csv"
    p.write_text(text, encoding="utf-8")
    assert read_pixel_csv(p) == expected


@pytest.mark.parametrize("text,match", [
    ("name,size\na.png,0.1\n", "needs columns"),
    ("filename,pixel size(mm)\na.png,abc\n", "line 2"),
    ("filename,pixel size(mm)\na.png,-1\n", "line 2"),
    ("filename,pixel size(mm)\na.png\n", "line 2"),
    ("filename,pixel size(mm)\na.png,0.1\na.png,0.2\n", "twice"),
    ("filename,pixel size(mm)\n", "no rows"),
])
def test_read_pixel_csv_malformed(tmp_path, text, match):
    p = tmp_path / "px.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        read_pixel_csv(p)


def test_csv_matches_converted_file_by_stem(tmp_path, circle):
    dcm = write_us_dicom(tmp_path / "case7.dcm", circle, None, calibration="none")
    img = load_image(dcm, pixel_csv={"case7.png": 0.15})
    assert img.spacing.as_tuple() == (0.15, 0.15)


@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey_alpha", "u16_full", "u16_small", "float01", "bmp", "jpg"])
def test_raster_variants_to_grey(tmp_path, kind):
    grey = circle_image()
    rgb = colour_image(grey.shape)
    expected = grey
    if kind in ("rgb", "rgba", "bmp", "jpg"):
        bgr = rgb[..., ::-1]
        arr = np.dstack([bgr, np.full(grey.shape, 128, np.uint8)]) if kind == "rgba" else bgr
        expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif kind == "grey_alpha":  # OpenCV cannot write 2 channels; a 4-channel grey image is the same for it
        arr = np.dstack([grey, grey, grey, np.full(grey.shape, 7, np.uint8)])
    elif kind == "u16_full":
        arr = grey.astype(np.uint16) * 257
        expected = ((grey.astype(float) - grey.min()) * 255 / (grey.max() - grey.min())).round().astype(np.uint8)
    elif kind == "u16_small":
        arr = grey.astype(np.uint16)
    else:
        arr = grey.astype(np.float32) / 255
    suffix = {"bmp": ".bmp", "jpg": ".jpg", "float01": ".tiff"}.get(kind, ".png")
    path = tmp_path / f"img{suffix}"
    assert cv2.imwrite(str(path), arr)
    img = load_image(path)
    assert img.pixels.shape == grey.shape and img.pixels.dtype == np.uint8
    tol = 6 if kind == "jpg" else 1
    assert np.abs(img.pixels.astype(int) - expected).max() <= tol


def test_to_grey_uint8_edge_cases():
    assert to_grey_uint8(np.eye(3, dtype=bool)).max() == 255
    assert np.array_equal(to_grey_uint8(np.full((4, 4), 1000, np.int32)), np.zeros((4, 4), np.uint8))
    assert to_grey_uint8(np.array([[-5.0, 5.0]])).tolist() == [[0, 255]]
    assert to_grey_uint8(np.array([[np.nan, 100.0]])).tolist() == [[0, 100]]
    with pytest.raises(InputError, match="shape"):
        to_grey_uint8(np.zeros((2, 2, 2, 2)))


# ------------------------------------------------------------------------------------------- DICOM

@pytest.mark.parametrize("calibration,source", [
    ("pixel_spacing", "DICOM PixelSpacing (0028,0030)"),
    ("imager_pixel_spacing", "DICOM ImagerPixelSpacing (0018,1164)"),
    ("us_region", REGION_SRC),
])
def test_dicom_calibrations(tmp_path, circle, calibration, source):
    path = write_us_dicom(tmp_path / "us.dcm", circle, ANISO, calibration=calibration)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "US" and ds.SOPClassUID == US_IMAGE_STORAGE
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    img = load_image(path)
    assert img.spacing.as_tuple() == pytest.approx(ANISO, rel=1e-9) and img.spacing.source == source
    assert np.array_equal(img.pixels, circle) and img.meta["format"] == "DICOM"
    assert img.meta["warnings"] == []
    assert_circle(img)
    # the user's value overrides the header, and says what it replaced
    img = load_image(path, pixel_size=0.5)
    assert img.spacing.as_tuple() == (0.5, 0.5)
    assert img.spacing.source == f"--pixel-size (overrides {source})"
    assert any("overrides" in w for w in img.meta["warnings"])


def test_dicom_us_region_cm_to_mm_and_order(tmp_path, circle):
    path = write_us_dicom(tmp_path / "us.dcm", circle, ANISO)
    region = pydicom.dcmread(path).SequenceOfUltrasoundRegions[0]
    assert (region.PhysicalDeltaX, region.PhysicalDeltaY) == pytest.approx((0.03, 0.02))  # cm, X = columns
    img = load_image(path)
    (r,) = img.regions
    assert (r.x0, r.y0, r.x1, r.y1) == (0, 0, circle.shape[1] - 1, circle.shape[0] - 1)
    assert (r.row_mm, r.col_mm) == pytest.approx(ANISO) and r.contains(0, 0) and not r.contains(-1, 0)


def test_dicom_no_calibration(tmp_path, circle):
    img = load_image(write_us_dicom(tmp_path / "us.dcm", circle, None, calibration="none"))
    assert img.spacing is None and img.spacing_at(10, 10) is None
    assert any("no pixel spacing" in w for w in img.meta["warnings"])


def test_dicom_monochrome1_and_conflicting_calibration(tmp_path, circle):
    ds = pydicom.dcmread(write_us_dicom(tmp_path / "us.dcm", circle, ANISO))
    ds.PhotometricInterpretation = "MONOCHROME1"  # 0 = white
    ds.PixelSpacing = [0.25, 0.25]
    ds.save_as(tmp_path / "m1.dcm")
    img = load_image(tmp_path / "m1.dcm")
    assert np.array_equal(img.pixels, 255 - circle)
    assert img.spacing.as_tuple() == (0.25, 0.25) and any("disagrees" in w for w in img.meta["warnings"])


def test_dicom_region_selection(tmp_path, circle):
    path = write_us_dicom(tmp_path / "dual.dcm", circle, ANISO, extra_regions=True)
    img = load_image(path)
    assert len(img.regions) == 3 and img.spacing.as_tuple() == pytest.approx(ANISO)
    h, w = circle.shape
    assert img.spacing_at(10, 10).as_tuple() == pytest.approx(ANISO)
    assert img.spacing_at(w - 5, 5).as_tuple() == pytest.approx((0.3, 0.45))  # second 2-D view
    assert img.spacing_at(w - 5, h - 5).as_tuple() == pytest.approx(ANISO)  # Doppler strip: not spatial
    doppler = img.regions[2]
    assert doppler.row_mm is None and doppler.data_type == 3
    assert any("region 3" in w and "not calibrated in cm" in w for w in img.meta["warnings"])
    # an override applies everywhere, regions included
    assert load_image(path, pixel_size=0.1).spacing_at(w - 5, 5).as_tuple() == (0.1, 0.1)


def test_dicom_multiframe(tmp_path, circle):
    path = write_us_dicom(tmp_path / "cine.dcm", circle, ANISO, frames=3)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == US_MULTIFRAME_STORAGE and ds.NumberOfFrames == 3
    assert load_image(path).meta["n_frames"] == 3
    img = load_image(path, frame=2)
    assert np.array_equal(img.pixels, np.roll(circle, 2, axis=1)) and img.meta["frame"] == 2
    with pytest.raises(InputError, match="3 frames"):
        load_image(path, frame=3)
    with pytest.raises(InputError, match="1 frame "):
        load_image(write_us_dicom(tmp_path / "one.dcm", circle, ANISO), frame=1)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"])
def test_dicom_colour(tmp_path, photometric):
    rgb = colour_image()
    path = write_us_dicom(tmp_path / "c.dcm", rgb, ANISO, photometric=photometric)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == photometric
    if photometric == "YBR_FULL_422":  # really subsampled: 2 bytes per pixel, not 3
        assert len(ds.PixelData) == rgb.shape[0] * rgb.shape[1] * 2
    img = load_image(path)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert img.pixels.shape == expected.shape and np.abs(img.pixels.astype(int) - expected).max() <= 1
    assert img.meta["photometric"] == photometric


def _recompress(src: Path, dst: Path, syntax, frame_bytes: bytes) -> Path:
    ds = pydicom.dcmread(src)
    ds.PixelData = encapsulate([frame_bytes])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(dst)
    return dst


def test_dicom_compressed(tmp_path, circle):
    src = write_us_dicom(tmp_path / "u.dcm", circle, ANISO)
    ds = pydicom.dcmread(src)
    ds.compress(RLELossless)  # pydicom's own encoder and decoder
    ds.save_as(tmp_path / "rle.dcm")
    img = load_image(tmp_path / "rle.dcm")
    assert np.array_equal(img.pixels, circle) and img.spacing.as_tuple() == pytest.approx(ANISO)
    jpeg = cv2.imencode(".jpg", circle, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    img = load_image(_recompress(src, tmp_path / "jpeg.dcm", JPEGBaseline8Bit, jpeg))  # via Pillow
    assert np.abs(img.pixels.astype(int) - circle).max() <= 8
    with pytest.raises(InputError, match=r"JPEG-LS.*decoder is needed.*pylibjpeg"):
        load_image(_recompress(src, tmp_path / "jls.dcm", JPEGLSLossless, jpeg))


def test_dicom_without_preamble_or_extension(tmp_path, circle):
    ds = pydicom.dcmread(write_us_dicom(tmp_path / "u.dcm", circle, ANISO))
    ds.preamble = None
    raw = tmp_path / "IM0001"
    ds.save_as(raw)
    assert raw.read_bytes()[128:132] != b"DICM"
    img = load_image(raw)
    assert np.array_equal(img.pixels, circle) and img.meta["format"] == "DICOM"


# ---------------------------------------------------------------------------------- NIfTI and NRRD

def _write_nifti(path, img, spacing, layout):
    """Write pixels[j, i] as voxels[i, j] (the documented convention) in a 2-D/3-D layout."""
    vox = img.T
    zooms = [spacing[1], spacing[0], 1.0]
    if layout == "slice_last":
        vox = vox[:, :, None]
    elif layout == "slice_first":
        vox, zooms = vox[None], [1.0, spacing[1], spacing[0]]
    elif layout == "volume":
        vox = np.repeat(vox[:, :, None], 4, 2)
    nii = nib.Nifti1Image(vox, np.diag(zooms + [1.0]))
    nii.header.set_xyzt_units("mm")
    nib.save(nii, str(path))
    return path


def _write_nrrd(path, img, spacing, layout):
    vox, row, col = img.T, *spacing
    if layout == "2d":
        header = {"spacings": [col, row]}
    elif layout == "colour":
        vox = np.repeat(vox[None], 3, 0)
        header = {"kinds": ["RGB-color", "domain", "domain", "domain"], "space": "left-posterior-superior",
                  "space directions": [[math.nan] * 3, [col, 0, 0], [0, row, 0], [0, 0, 1.0]]}
        vox = vox[..., None]
    else:
        vox = vox[:, :, None] if layout == "slice_last" else np.repeat(vox[:, :, None], 4, 2)
        header = {"kinds": ["domain"] * 3, "space": "left-posterior-superior",
                  "space directions": np.diag([col, row, 1.0]), "space origin": [5.0, 6.0, 7.0]}
    nrrd.write(str(path), vox, header, index_order="F")
    return path


WRITERS = {".nii.gz": _write_nifti, ".nrrd": _write_nrrd}
LAYOUTS = [(".nii.gz", "2d"), (".nii.gz", "slice_last"), (".nii.gz", "slice_first"),
           (".nrrd", "2d"), (".nrrd", "slice_last"), (".nrrd", "colour")]


@pytest.mark.parametrize("suffix,layout", LAYOUTS)
def test_volume_formats(tmp_path, circle, suffix, layout):
    path = WRITERS[suffix](tmp_path / f"img{suffix}", circle, ANISO, layout)
    img = load_image(path)
    assert np.array_equal(img.pixels, circle)
    assert img.spacing.as_tuple() == pytest.approx(ANISO)
    assert img.spacing.source == ("NIfTI header" if suffix == ".nii.gz" else "NRRD header")
    assert_circle(img)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_volume_formats_reject_3d(tmp_path, circle, suffix):
    path = WRITERS[suffix](tmp_path / f"vol{suffix}", circle, ANISO, "volume")
    with pytest.raises(InputError, match=r"3-D volume \(180 x 240 x 4\); FetalHC measures 2-D images"):
        load_image(path)


def test_nifti_units(tmp_path, circle):
    nii = nib.Nifti1Image(circle.T.copy(), np.diag([3e-4, 2e-4, 1, 1]))
    nii.header.set_xyzt_units("meter")
    nib.save(nii, str(tmp_path / "m.nii"))
    assert load_image(tmp_path / "m.nii").spacing.as_tuple() == pytest.approx(ANISO)
    nib.save(nib.Nifti1Image(circle.T.copy(), np.diag([0.3, 0.2, 1, 1])), str(tmp_path / "u.nii"))
    img = load_image(tmp_path / "u.nii")
    assert img.spacing.as_tuple() == pytest.approx(ANISO) and any("assuming mm" in w for w in img.meta["warnings"])


# --------------------------------------------------------------------------------- save_label_like

@pytest.mark.parametrize("ref_kind,out_suffix", [
    ("png", ".png"), ("png", ".nrrd"), ("png", ".nii.gz"), ("dcm", ".png"), ("dcm", ".nii.gz"),
    ("nii_slice", ".nii.gz"), ("nii_2d", ".nrrd"), ("nrrd_slice", ".nrrd"), ("nrrd_colour", ".nrrd"),
])
def test_save_label_like_round_trip(tmp_path, circle, ref_kind, out_suffix):
    if ref_kind == "png":
        cv2.imwrite(str(tmp_path / "ref.png"), circle)
        ref = load_image(tmp_path / "ref.png", pixel_size=0.25)  # spacing only lives in the LoadedImage
    elif ref_kind == "dcm":
        ref = load_image(write_us_dicom(tmp_path / "ref.dcm", circle, ANISO))
    else:
        fmt, layout = ref_kind.split("_")
        suffix = ".nii.gz" if fmt == "nii" else ".nrrd"
        layout = {"slice": "slice_last"}.get(layout, layout)
        ref = WRITERS[suffix](tmp_path / f"ref{suffix}", circle, ANISO, layout)
    reference = ref if isinstance(ref, LoadedImage) else load_image(ref)
    mask = circle > 150
    out = save_label_like(mask, ref, tmp_path / f"label{out_suffix}")
    back = load_image(out)
    assert np.array_equal(back.pixels, mask.astype(np.uint8))
    if out_suffix != ".png":
        assert back.spacing.as_tuple() == pytest.approx(reference.spacing.as_tuple())
    if ref_kind == "nii_slice":  # same format: the geometry is copied, not rebuilt
        a, b = nib.load(str(ref)), nib.load(str(out))
        assert np.allclose(a.affine, b.affine) and a.shape == b.shape and b.get_data_dtype() == np.uint8
    if ref_kind.startswith("nrrd"):
        ha, hb = nrrd.read_header(str(ref)), nrrd.read_header(str(out))
        spatial = slice(1, None) if ref_kind == "nrrd_colour" else slice(None)
        assert np.allclose(ha["space directions"][spatial], hb["space directions"])
        assert hb["type"] in ("uint8", "unsigned char")


def test_save_label_like_checks(tmp_path, circle):
    cv2.imwrite(str(tmp_path / "ref.png"), circle)
    with pytest.raises(ValueError, match="shape"):
        save_label_like(np.zeros((3, 3)), tmp_path / "ref.png", tmp_path / "l.png")
    with pytest.raises(ValueError, match="DICOM"):
        save_label_like(circle > 0, tmp_path / "ref.png", tmp_path / "l.dcm")
    assert [label_suffix(p) for p in ("a.png", "b.dcm", "c.nii.gz", "d.nrrd")] == [".png", ".png", ".nii.gz", ".nrrd"]


# ------------------------------------------------------------------------------------- bad inputs

def _bad_input(tmp_path: Path, kind: str, circle) -> Path:
    png = cv2.imencode(".png", circle)[1].tobytes()
    p = tmp_path / {"dir": "folder", "dcm_nopix": "x.dcm", "dcm_huge": "x.dcm", "text_dcm": "x.dcm",
                    "corrupt_dcm": "x.dcm", "text_nii": "x.nii", "text_nrrd": "x.nrrd",
                    "truncated_jpg": "x.jpg", "text_noext": "notes"}.get(kind, "x.png")
    if kind == "dir":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind in ("text_png", "text_dcm", "text_nii", "text_nrrd", "text_noext"):
        p.write_text("this is not an image\n" * 20)
    elif kind == "truncated_png":
        p.write_bytes(png[: len(png) // 2])
    elif kind == "truncated_jpg":
        jpg = cv2.imencode(".jpg", circle)[1].tobytes()
        p.write_bytes(jpg[: len(jpg) // 2])
    elif kind == "huge_png":  # 9000 x 10: cheap to make, over the side limit
        cv2.imwrite(str(p), np.zeros((10, 9000), np.uint8))
    elif kind == "empty_image":
        cv2.imwrite(str(p), np.zeros((1, 1), np.uint8))
        p.write_bytes(p.read_bytes()[:16] + b"\0" * 8 + p.read_bytes()[24:])  # IHDR says 0 x 0
    elif kind.startswith("dcm") or kind == "corrupt_dcm":
        ds = pydicom.dcmread(write_us_dicom(p, circle, ANISO))
        if kind == "dcm_nopix":
            del ds.PixelData
        elif kind == "dcm_huge":  # the header claims 20000 x 20000; nothing that large is ever allocated
            ds.Rows = ds.Columns = 20000
        else:
            ds.PixelData = ds.PixelData[:100]
        ds.save_as(p)
    return p


@pytest.mark.parametrize("kind,match", [
    ("missing", "file not found"),
    ("dir", "is a directory"),
    ("empty", "empty"),
    ("text_png", "not a readable image"),
    ("text_noext", "not a readable image"),
    ("text_dcm", "not a DICOM file"),
    ("text_nii", "not a readable NIfTI"),
    ("text_nrrd", "not a readable NRRD"),
    ("truncated_png", "truncated"),
    ("truncated_jpg", "truncated JPEG"),
    ("huge_png", "too large.*8192 px a side and 40 M pixels"),
    ("empty_image", "no pixels|corrupt"),
    ("dcm_nopix", "no pixel data"),
    ("dcm_huge", "too large .20000 rows x 20000 columns"),
    ("corrupt_dcm", "unreadable or corrupt"),
])
def test_bad_inputs(tmp_path, circle, kind, match):
    path = _bad_input(tmp_path, kind, circle)
    with pytest.raises(InputError, match=match) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_constant_image_is_not_an_error_and_odd_spacing_warns(tmp_path):
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((50, 60), 128, np.uint8))
    img = load_image(tmp_path / "flat.png", pixel_size=5.0)
    assert img.pixels.shape == (50, 60) and (img.pixels == 128).all()
    assert any("outside the usual" in w for w in img.meta["warnings"])


def test_region_and_spacing_types():
    r = UsRegion(10, 20, 30, 40, 0.2, 0.3, 1, 1)
    assert r.contains(10, 40) and r.contains(30.0, 20) and not r.contains(30.5, 20) and r.area == 21 * 21
    assert r.spacing == Spacing(0.2, 0.3, REGION_SRC) and Spacing(1, 2, "x").as_tuple() == (1.0, 2.0)
    assert UsRegion(0, 0, 1, 1, None, None, 3, 3).spacing is None


def test_files_without_a_suffix_are_recognised_by_content(tmp_path):
    """A datastore image downloaded under its bare id keeps its format and calibration."""
    from fetalhc.io import detect_kind, file_kind
    pixels = (np.arange(30 * 40) % 200).astype(np.uint8).reshape(30, 40)
    dcm = write_us_dicom(tmp_path / "a.dcm", pixels, (0.16, 0.14), calibration="us_region").rename(tmp_path / "a")
    nrrd.write(str(tmp_path / "b.nrrd"), pixels.T.copy(), {"spacings": [0.11, 0.17], "kinds": ["domain", "domain"]})
    (tmp_path / "b.nrrd").rename(tmp_path / "b")
    cv2.imwrite(str(tmp_path / "c.png"), pixels)
    (tmp_path / "c.png").rename(tmp_path / "c")
    assert [file_kind(p) for p in (dcm, tmp_path / "b", tmp_path / "c")] == ["raster"] * 3  # by name
    assert [detect_kind(p) for p in (dcm, tmp_path / "b", tmp_path / "c")] == ["dicom", "nrrd", "raster"]
    assert load_image(dcm).spacing.as_tuple() == pytest.approx((0.16, 0.14))
    b = load_image(tmp_path / "b")
    assert np.array_equal(b.pixels, pixels) and b.spacing.as_tuple() == pytest.approx((0.17, 0.11))
    c = load_image(tmp_path / "c")
    assert np.array_equal(c.pixels, pixels) and c.spacing is None
