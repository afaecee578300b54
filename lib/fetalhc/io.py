"""Image loading with pixel spacing: PNG/JPEG/BMP/TIFF, DICOM, NIfTI and NRRD -> 2-D uint8 grey + mm.

Every loader returns rows x cols (y, x) uint8 pixels and a :class:`Spacing` ``(row_mm, col_mm)`` or
None; None means "unknown", and downstream code then reports pixels only, never guessed millimetres.

Index order of NIfTI/NRRD: voxel axis 0 (i, fastest in the file) is image x (columns) and axis 1 (j)
is image y (rows), so ``array[i, j]`` is returned as ``pixels[j, i]``. This is how ITK, Slicer and
nibabel lay out a 2-D picture, and :func:`save_label_like` writes labels back the same way. Display
orientation (flips in the affine / space directions) is not applied: a perimeter does not care.
"""
from __future__ import annotations

import csv
import io as _io
import math
import struct
import warnings as _warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
PLAUSIBLE_MM = (0.01, 1.0)  # US fields of view are 2-30 cm over a few hundred pixels

SRC_PIXEL_SPACING = "DICOM PixelSpacing (0028,0030)"
SRC_IMAGER_SPACING = "DICOM ImagerPixelSpacing (0018,1164)"
SRC_US_REGION = "DICOM ultrasound region (0018,6011) PhysicalDeltaX/Y"
SRC_PIXEL_SIZE = "--pixel-size"

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
NRRD_SPATIAL_KINDS = ("domain", "space", "time", "none", "???")
UNITS_CM = 3
PNG_SIGNATURE, JPEG_SOI = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"  # PhysicalUnitsX/YDirection code for cm


class InputError(ValueError):
    """Bad input with a clear, user-facing message (no traceback needed)."""


@dataclass(frozen=True)
class Spacing:
    row_mm: float
    col_mm: float
    source: str

    def __post_init__(self):
        try:
            row, col = float(self.row_mm), float(self.col_mm)
        except (TypeError, ValueError):
            row = col = math.nan
        if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
            raise InputError(f"invalid pixel spacing {self.row_mm!r} x {self.col_mm!r} mm from {self.source}: "
                             "must be positive and finite")
        object.__setattr__(self, "row_mm", row)
        object.__setattr__(self, "col_mm", col)

    def as_tuple(self) -> tuple[float, float]:
        return self.row_mm, self.col_mm

    def __str__(self) -> str:
        return f"{self.row_mm:.6g} x {self.col_mm:.6g} mm ({self.source})"


@dataclass(frozen=True)
class UsRegion:
    """One SequenceOfUltrasoundRegions item; pixel bounds inclusive; mm None unless calibrated in cm."""
    x0: int
    y0: int
    x1: int
    y1: int
    row_mm: float | None
    col_mm: float | None
    data_type: int
    spatial_format: int

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1

    @property
    def area(self) -> int:
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)

    @property
    def is_tissue_2d(self) -> bool:
        return self.data_type == 1 and self.spatial_format == 1

    @property
    def spacing(self) -> Spacing | None:
        return None if self.row_mm is None else Spacing(self.row_mm, self.col_mm, SRC_US_REGION)


@dataclass
class LoadedImage:
    pixels: np.ndarray
    spacing: Spacing | None
    path: str
    meta: dict = field(default_factory=dict)
    regions: list[UsRegion] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return self.meta.setdefault("warnings", [])

    def spacing_at(self, x: float, y: float) -> Spacing | None:
        """Spacing of the 2D-tissue US region (RegionDataType 1, spatial format 1) that contains pixel (x,y);
        falls back to self.spacing. Regions only count when they are what calibrated the image, so a
        PixelSpacing or a user override wins here too."""
        if self.spacing is None or self.spacing.source != SRC_US_REGION:
            return self.spacing
        hits = [r for r in self.regions if r.is_tissue_2d and r.spacing and r.contains(x, y)]
        return min(hits, key=lambda r: r.area).spacing if hits else self.spacing


# ----------------------------------------------------------------------------------------- helpers

def to_grey_uint8(arr, channel_order: str = "RGB") -> np.ndarray:
    """RGB(A)/grey+alpha/16-bit/float/bool -> contiguous 2-D uint8 (BT.601 luma for colour).

    Intensities already in 0..255 are kept as they are (8-bit data stored in a wider type), floats in
    [0, 1] are scaled by 255, anything else is stretched min..max to 0..255. Alpha is ignored.
    """
    a = np.asarray(arr)
    if a.dtype.names:  # NIfTI RGB24 and similar structured pixels
        a = np.stack([a[n] for n in a.dtype.names[:3]], -1)
    src = a.dtype
    if src == np.uint8 and a.ndim == 2:
        return np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[2] in (1, 2):
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = a[..., :3] if channel_order.upper() == "RGB" else a[..., 2::-1]
        a = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2:
        raise InputError(f"expected a 2-D grey or colour image, got an array of shape {a.shape}")
    if src == np.uint8 or src == np.bool_:
        out = a.astype(np.float64) * (255 if src == np.bool_ else 1)
    else:
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if src.kind == "f" and lo >= 0 and hi <= 1:
            out = a * 255
        elif lo >= 0 and hi <= 255:
            out = a
        else:
            out = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _fail(path, reason: str) -> InputError:
    return InputError(f"{path}: {reason}")


def _check_size(path, rows: int, cols: int) -> None:
    if rows <= 0 or cols <= 0:
        raise _fail(path, f"image has no pixels ({rows} rows x {cols} columns)")
    if rows > MAX_SIDE or cols > MAX_SIDE or rows * cols > MAX_PIXELS:
        raise _fail(path, f"image is too large ({rows} rows x {cols} columns); the limit is {MAX_SIDE} px "
                          f"a side and {MAX_PIXELS // 1_000_000} M pixels")


def _check_frame(path, frame: int, n_frames: int) -> None:
    if not 0 <= frame < n_frames:
        raise _fail(path, f"frame {frame} does not exist: the file has {n_frames} frame"
                          f"{'s' if n_frames != 1 else ''} (0-{n_frames - 1})")


def _header_spacing(row, col, source: str, warn: list) -> Spacing | None:
    """Spacing from a file header; a broken value becomes a warning, not an error."""
    try:
        return Spacing(row, col, source)
    except InputError as e:
        warn.append(f"ignored {e}")
        return None


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return "raster"


# ------------------------------------------------------------------------------------- pixel CSV

class PixelTable(dict):
    """``{file name: pixel size mm}`` that remembers which CSV it came from (for Spacing.source)."""
    source = "pixel CSV"


def _norm(col: str) -> str:
    return "".join(ch for ch in col.lower() if ch.isalnum())


def read_pixel_csv(path) -> dict[str, float]:
    """HC18-style CSV: columns 'filename' and 'pixel size(mm)' (or 'pixel_size_mm' / 'pixel size')."""
    path = Path(path)
    _check_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        raise _fail(path, f"not a readable CSV text file ({e})") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(_io.StringIO(text), dialect))
    if not rows:
        raise _fail(path, "pixel CSV is empty")
    header = [_norm(c) for c in rows[0]]
    name_col = next((i for i, c in enumerate(header) if c == "filename"), None)
    size_col = next((i for i, c in enumerate(header) if c in ("pixelsizemm", "pixelsize")), None)
    if name_col is None or size_col is None:
        raise _fail(path, f"pixel CSV needs columns 'filename' and 'pixel size(mm)'; found {rows[0]}")
    table = PixelTable()
    table.source = f"pixel CSV {path.name}"
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            name, value = row[name_col].strip(), float(row[size_col])
            Spacing(value, value, table.source)
        except (IndexError, ValueError) as e:  # InputError is a ValueError
            raise _fail(path, f"line {line}: bad row {row} ({e})") from None
        if table.get(name, value) != value:
            raise _fail(path, f"line {line}: {name} is listed twice with different pixel sizes")
        table[name] = value
    if not table:
        raise _fail(path, "pixel CSV has no rows")
    return table


def _csv_lookup(table: dict, path: Path) -> float | None:
    """By file name; else by stem when unique (a DICOM or NIfTI converted from the listed PNG)."""
    if path.name in table:
        return table[path.name]
    stem = path.name.split(".")[0]
    hits = [v for k, v in table.items() if k.split(".")[0] == stem]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------- raster

def _read_raster(path: Path, data: bytes, frame: int) -> LoadedImage | None:
    """None when OpenCV cannot decode the bytes at all."""
    if data[:8] == PNG_SIGNATURE and len(data) >= 24:  # size from IHDR before decoding a bomb
        cols, rows = struct.unpack(">II", data[16:24])
        _check_size(path, rows, cols)
    if data[:2] == JPEG_SOI and b"\xff\xd9" not in data[-4096:]:
        raise _fail(path, "truncated JPEG (no end-of-image marker)")  # libjpeg would pad it with grey
    import cv2  # only here and in save_label_like: the spacing rules run without OpenCV (3D Slicer)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    _check_frame(path, frame, 1)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF"}.get(path.suffix.lower(), path.suffix[1:].upper())
    meta = {"format": fmt or "image", "frame": 0, "n_frames": 1, "dtype": str(arr.dtype), "shape": arr.shape}
    _check_size(path, *arr.shape[:2])
    return LoadedImage(to_grey_uint8(arr, "BGR"), None, str(path), meta)


# ----------------------------------------------------------------------------------------- DICOM

def _read_dicom_dataset(path: Path, by_name: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(str(path))
    except InvalidDicomError:
        pass  # no 128-byte preamble: retried below
    except Exception as e:
        raise _fail(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), force=True)
            ok = "SOPClassUID" in ds or "PixelData" in ds
    except Exception:
        ok = False
    if not ok:
        raise _fail(path, "not a DICOM file" if by_name else
                    "not a readable image (unsupported format, or a corrupt/truncated file)")
    return ds


def _us_regions(ds, warn: list) -> list[UsRegion]:
    out = []
    for i, item in enumerate(ds.get("SequenceOfUltrasoundRegions", None) or [], start=1):
        try:
            box = [int(item[k].value) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                                 "RegionLocationMaxX1", "RegionLocationMaxY1")]
        except (KeyError, TypeError, ValueError):
            warn.append(f"ultrasound region {i} has no valid location; ignored")
            continue
        units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
        dtype, fmt = int(item.get("RegionDataType", 0) or 0), int(item.get("RegionSpatialFormat", 0) or 0)
        row = col = None
        if units == (UNITS_CM, UNITS_CM):
            # PhysicalDeltaX runs along columns, Y along rows; negative deltas only flip direction.
            s = _header_spacing(abs(float(item.get("PhysicalDeltaY", 0) or 0)) * 10,
                                abs(float(item.get("PhysicalDeltaX", 0) or 0)) * 10, f"ultrasound region {i}", warn)
            row, col = s.as_tuple() if s else (None, None)
        else:
            warn.append(f"ultrasound region {i} (data type {dtype}) is not calibrated in cm "
                        f"(units {units[0]}/{units[1]}); not used for spacing")
        out.append(UsRegion(*box, row, col, dtype, fmt))
    return out


def _region_spacing(regions: list[UsRegion], warn: list) -> Spacing | None:
    """Largest calibrated 2-D tissue region; another 2-D calibrated region only as a last resort."""
    cands = [r for r in regions if r.is_tissue_2d and r.spacing]
    if not cands:
        cands = [r for r in regions if r.spatial_format == 1 and r.spacing]
        if cands:
            warn.append("no 2-D tissue ultrasound region; spacing taken from another 2-D region")
    if not cands:
        return None
    if len({r.spacing.as_tuple() for r in cands}) > 1:
        warn.append(f"{len(cands)} calibrated ultrasound regions with different spacings: the largest is the "
                    "image spacing; use spacing_at(x, y) for the region holding the head")
    return max(cands, key=lambda r: r.area).spacing


def _dicom_spacing(ds, regions: list[UsRegion], warn: list) -> Spacing | None:
    from pydicom.multival import MultiValue
    region_warn: list[str] = []
    region = _region_spacing(regions, region_warn)
    for keyword, source in (("PixelSpacing", SRC_PIXEL_SPACING), ("ImagerPixelSpacing", SRC_IMAGER_SPACING)):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        vals = list(value) if isinstance(value, MultiValue) else [value]
        if len(vals) != 2:
            warn.append(f"ignored {source} {vals}: needs two values")
        elif s := _header_spacing(vals[0], vals[1], source, warn):  # DICOM order is [row, col], as ours
            if region and not np.allclose(region.as_tuple(), s.as_tuple(), rtol=0.01):
                warn.append(f"{source} {s.row_mm:g} x {s.col_mm:g} mm disagrees with {region}; using {source}")
            return s
    warn.extend(region_warn)
    return region


def _dicom_grey(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixel_data_handlers.util import apply_color_lut
        rgb = apply_color_lut(arr, ds)
        return to_grey_uint8(rgb >> 8 if rgb.dtype == np.uint16 else rgb)  # 16-bit LUT entries
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        # Y is the BT.601 luma of the RGB colour, i.e. exactly the grey we want; converting to RGB and back
        # would only add rounding. (The numpy and Pillow handlers of pydicom 2.4 return YBR as stored.)
        return to_grey_uint8(arr[..., 0])
    if photometric.startswith("YBR_PARTIAL"):
        return to_grey_uint8((arr[..., 0].astype(np.float64) - 16) * (255 / 219))
    grey = to_grey_uint8(arr)  # MONOCHROME1/2, RGB, and YBR_ICT/RCT that decoders return as RGB
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _decode_error(path, ts, e: Exception) -> InputError:
    detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if ts is not None and ts.is_compressed:
        return _fail(path, f"cannot decode DICOM pixel data compressed as {ts.name} ({ts}); a decoder is needed, "
                           f"e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` or python-gdcm "
                           f"({detail})")
    return _fail(path, f"DICOM pixel data is unreadable or corrupt ({detail})")


def _read_dicom(path: Path, frame: int, by_name: bool) -> LoadedImage:
    ds = _read_dicom_dataset(path, by_name)
    if "PixelData" not in ds:
        raise _fail(path, "DICOM file has no pixel data (7FE0,0010); it is not an image "
                          f"(SOP class {ds.get('SOPClassUID', 'unknown')})")
    _check_size(path, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_frame(path, frame, n_frames)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # pydicom's padding chatter; real failures raise
            arr = ds.pixel_array
    except Exception as e:
        raise _decode_error(path, ts, e) from None
    if n_frames > 1:
        arr = arr[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()  # after decoding
    warn: list[str] = []
    regions = _us_regions(ds, warn)
    meta = {"format": "DICOM", "frame": frame, "n_frames": n_frames, "photometric": photometric,
            "dtype": str(arr.dtype), "shape": arr.shape, "transfer_syntax": str(ts or ""),
            "sop_class": str(ds.get("SOPClassUID", "")), "modality": str(ds.get("Modality", "")),
            "warnings": warn}
    spacing = _dicom_spacing(ds, regions, warn)
    return LoadedImage(_dicom_grey(arr, ds, photometric), spacing, str(path), meta, regions)


# --------------------------------------------------------------------------------- NIfTI and NRRD

def _plane(path: Path, shape: tuple, fmt: str) -> tuple[int, int]:
    """The two voxel axes (i, j) that hold the picture; single slices saved as 3-D are fine."""
    keep = [a for a, n in enumerate(shape) if n != 1]
    if len(keep) > 2:
        raise _fail(path, f"is a {len(keep)}-D volume ({' x '.join(map(str, shape))}); FetalHC measures 2-D "
                          f"images (save a single slice from the {fmt} volume)")
    keep += [a for a in range(len(shape)) if a not in keep][: 2 - len(keep)]
    if len(keep) < 2:
        raise _fail(path, f"{fmt} array of shape {shape} is not an image")
    i, j = sorted(keep)
    _check_size(path, shape[j], shape[i])
    return i, j


def _voxels_to_image(data: np.ndarray, spatial: tuple, i: int, j: int) -> np.ndarray:
    """array[i, j(, c)] -> pixels[j, i(, c)]; dropping only size-1 axes keeps the order, so reshape is exact."""
    arr = data.reshape(spatial[i], spatial[j], *data.shape[len(spatial):])
    return np.swapaxes(arr, 0, 1)


def _read_nifti(path: Path, frame: int) -> LoadedImage:
    import nibabel as nib
    _check_frame(path, frame, 1)
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:
        raise _fail(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from None
    colour = len(shape) == 5 and shape[4] in (3, 4)  # vector intent: components on the 5th axis
    spatial = shape[:4] if colour else shape
    i, j = _plane(path, spatial, "NIfTI")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise _fail(path, f"NIfTI pixel data is unreadable ({type(e).__name__}: {e})") from None
    warn: list[str] = []
    unit = img.header.get_xyzt_units()[0]
    scale = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)
    if unit not in ("mm", "meter", "micron"):
        warn.append(f"NIfTI spatial units are '{unit}'; assuming mm")
    zooms = img.header.get_zooms()
    spacing = _header_spacing(zooms[j] * scale, zooms[i] * scale, "NIfTI header", warn)
    meta = {"format": "NIfTI", "frame": 0, "n_frames": 1, "dtype": str(data.dtype), "shape": shape,
            "index_shape": spatial, "warnings": warn}
    return LoadedImage(to_grey_uint8(_voxels_to_image(data, spatial, i, j)), spacing, str(path), meta)


def _nrrd_steps(header: dict) -> list[float] | None:
    dirs = header.get("space directions")
    if dirs is not None:
        return [float(np.linalg.norm(d)) if d is not None and np.all(np.isfinite(d)) else math.nan for d in dirs]
    spacings = header.get("spacings")
    return [float(s) for s in spacings] if spacings is not None else None


def _read_nrrd(path: Path, frame: int) -> LoadedImage:
    import nrrd
    _check_frame(path, frame, 1)
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            sizes = tuple(int(s) for s in header["sizes"])
            kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
            comp = [a for a, k in enumerate(kinds) if k not in NRRD_SPATIAL_KINDS]
            if len(comp) > 1 or comp and sizes[comp[0]] not in (1, 3, 4):
                raise _fail(path, f"unsupported NRRD pixel layout (kinds {kinds}, sizes {sizes})")
            spatial = tuple(n for a, n in enumerate(sizes) if a not in comp)
            i, j = _plane(path, spatial, "NRRD")
            data = nrrd.read_data(header, fh, str(path))
    except InputError:
        raise
    except Exception as e:
        raise _fail(path, f"not a readable NRRD file ({type(e).__name__}: {e})") from None
    if comp:  # colour components last, as everywhere else
        data = np.moveaxis(data, comp[0], -1)
    warn: list[str] = []
    steps = _nrrd_steps(header)
    steps = [s for a, s in enumerate(steps) if a not in comp] if steps else None
    spacing = _header_spacing(steps[j], steps[i], "NRRD header", warn) if steps else None
    meta = {"format": "NRRD", "frame": 0, "n_frames": 1, "dtype": str(data.dtype), "shape": sizes,
            "index_shape": spatial, "warnings": warn}
    return LoadedImage(to_grey_uint8(_voxels_to_image(data, spatial, i, j)), spacing, str(path), meta)


# ------------------------------------------------------------------------------------- load_image

def _check_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "file not found")
    if path.is_dir():
        raise _fail(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty (0 bytes)")


def _user_spacing(path: Path, pixel_size, pixel_csv, warn: list) -> Spacing | None:
    if pixel_size is not None:
        if pixel_csv is not None:
            warn.append("--pixel-size given, so the pixel CSV is not used")
        return Spacing(pixel_size, pixel_size, SRC_PIXEL_SIZE)
    if pixel_csv is None:
        return None
    table = pixel_csv if isinstance(pixel_csv, dict) else read_pixel_csv(pixel_csv)
    source = getattr(table, "source", "pixel CSV")
    mm = _csv_lookup(table, path)
    if mm is None:
        warn.append(f"{path.name} is not listed in {source}")
        return None
    return Spacing(mm, mm, source)


def file_kind(path) -> str:
    """'dicom', 'nifti', 'nrrd' or 'raster', from the file name (content sniffing is load_image's job)."""
    return _kind_of(Path(path))


def detect_kind(path) -> str:
    """:func:`file_kind`, but a name without a known suffix is recognised by its content (a DICOM, NRRD or
    NIfTI downloaded as a bare id reads with the right spacing rules). PNG/JPEG/unknown give 'raster'."""
    path = Path(path)
    kind = _kind_of(path)
    if kind != "raster" or path.name.lower().endswith(RASTER_SUFFIXES):
        return kind
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return kind
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head[344:348] in (b"n+1\0", b"ni1\0"):
        return "nifti"
    return kind


def dicom_header_spacing(path) -> tuple[Spacing | None, list[str]]:
    """(spacing, warnings) from a DICOM header alone, by the same rules as load_image (for viewers such as
    Slicer that read the pixels themselves but get ultrasound-region calibration wrong)."""
    import pydicom
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    warn: list[str] = []
    return _dicom_spacing(ds, _us_regions(ds, warn), warn), warn


def load_image(path, *, pixel_size: float | None = None, pixel_csv: str | Path | dict | None = None,
               frame: int = 0) -> LoadedImage:
    """Load a 2-D image as uint8 grey with its spacing. The user's pixel size (``pixel_size``, else the
    CSV row) overrides any header calibration, with a warning saying what it replaced."""
    path = Path(path)
    _check_file(path)
    user_warn: list[str] = []
    user = _user_spacing(path, pixel_size, pixel_csv, user_warn)
    kind = _kind_of(path)
    if kind == "raster" and detect_kind(path) == "nrrd":  # a NRRD saved without its suffix
        kind = "nrrd"
    if kind == "nifti":
        img = _read_nifti(path, frame)
    elif kind == "nrrd":
        img = _read_nrrd(path, frame)
    else:
        data = path.read_bytes()
        if kind == "dicom" or data[128:132] == b"DICM":
            img = _read_dicom(path, frame, by_name=True)
        elif (img := _read_raster(path, data, frame)) is None:
            if data[:8] == PNG_SIGNATURE or data[:2] == JPEG_SOI:
                raise _fail(path, "corrupt or truncated image file (the decoder gave up)")
            img = _read_dicom(path, frame, by_name=False)  # maybe a DICOM without preamble (PACS exports)
    img.warnings[:0] = user_warn
    header = img.spacing
    if user is not None:
        if header is not None:
            img.warnings.append(f"{user.source} {user.row_mm:g} mm overrides {header}")
            user = Spacing(user.row_mm, user.col_mm, f"{user.source} (overrides {header.source})")
        img.spacing = user
    if img.spacing is None:
        img.warnings.append("no pixel spacing: results are in pixels only (give --pixel-size or a pixel CSV)")
    elif not all(PLAUSIBLE_MM[0] <= v <= PLAUSIBLE_MM[1] for v in img.spacing.as_tuple()):
        img.warnings.append(f"pixel spacing {img.spacing} is outside the usual {PLAUSIBLE_MM[0]}-{PLAUSIBLE_MM[1]} mm "
                            "of fetal ultrasound; check the calibration")
    _check_size(path, *img.pixels.shape)
    img.pixels = np.ascontiguousarray(img.pixels, dtype=np.uint8)
    return img


# -------------------------------------------------------------------------------- save_label_like

def label_suffix(reference_path) -> str:
    """Natural label file extension for a reference image: its own format, PNG for raster and DICOM."""
    kind = _kind_of(Path(reference_path))
    return {"nifti": ".nii.gz", "nrrd": ".nrrd"}.get(kind, ".png")


NRRD_PER_AXIS = ("space directions", "kinds", "spacings", "thicknesses", "axis mins", "axis maxs", "centerings",
                 "labels", "units")
NRRD_DATA_FIELDS = ("type", "dimension", "sizes", "encoding", "endian", "data file", "datafile", "line skip",
                    "byte skip", "min", "max", "old min", "old max")


def save_label_like(mask, reference, out_path) -> Path:
    """Write ``mask`` (H, W) as a uint8 label (values kept, bool -> 0/1) in the geometry of ``reference``.

    ``reference`` is a path or a :class:`LoadedImage` (pass the LoadedImage when the spacing came from
    --pixel-size or a CSV). The output format follows ``out_path``'s extension: the same format as
    the reference copies its affine (NIfTI) or header (NRRD) exactly; another format gets the
    reference's spacing (PNG stores none).
    """
    ref = reference if isinstance(reference, LoadedImage) else load_image(reference)
    label = np.asarray(mask)
    if label.shape != ref.pixels.shape:
        raise ValueError(f"mask shape {label.shape} differs from the reference image {ref.pixels.shape}")
    label = np.ascontiguousarray(label.astype(np.uint8))
    out, ref_path = Path(out_path), Path(ref.path)
    kind, same = _kind_of(out), _kind_of(out) == _kind_of(ref_path)
    row, col = ref.spacing.as_tuple() if ref.spacing else (1.0, 1.0)
    voxels = label.T  # pixels[j, i] -> array[i, j], the inverse of loading
    if kind == "nifti":
        import nibabel as nib
        if same:
            src = nib.load(str(ref_path))
            img = type(src)(voxels.reshape(ref.meta["index_shape"]), src.affine, src.header.copy())
        else:
            img = nib.Nifti1Image(voxels, np.diag([col, row, 1.0, 1.0]))
            img.header.set_xyzt_units("mm")
        img.set_data_dtype(np.uint8)
        img.header.set_slope_inter(1.0, 0.0)
        img.header.set_intent("label")
        nib.save(img, str(out))
    elif kind == "nrrd":
        import nrrd
        if same:
            header = nrrd.read_header(str(ref_path))
            keep = [a for a, k in enumerate(header.get("kinds", [])) if str(k).lower() in NRRD_SPATIAL_KINDS]
            for key in NRRD_PER_AXIS:  # drop a colour axis from per-axis fields
                if key in header and keep and len(header[key]) == len(header["sizes"]):
                    vals = header[key]
                    header[key] = vals[keep] if isinstance(vals, np.ndarray) else [vals[a] for a in keep]
            header = {k: v for k, v in header.items() if k not in NRRD_DATA_FIELDS}
            voxels = voxels.reshape(ref.meta["index_shape"])
        else:
            header = {"kinds": ["domain", "domain"], "spacings": [col, row]}
        nrrd.write(str(out), np.asfortranarray(voxels), {**header, "encoding": "gzip"}, index_order="F")
    elif kind == "raster":
        import cv2
        ok, buf = cv2.imencode(out.suffix or ".png", label)
        if not ok:
            raise ValueError(f"cannot write a label as {out.suffix}")
        buf.tofile(str(out))
    else:
        raise ValueError(f"{out}: labels are written as PNG, NIfTI or NRRD, not DICOM")
    return out
