"""Request inputs: ids, image files, spacing and numbers. Every problem is a 4xx with a clear message.

Errors are FastAPI ``HTTPException``s: MONAI Label's endpoints call the app synchronously, so they
reach the client as 4xx instead of MONAI Label's generic 500.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import HTTPException
from fetalhc.io import (DICOM_SUFFIXES, NIFTI_SUFFIXES, NRRD_SUFFIXES, RASTER_SUFFIXES, InputError, LoadedImage,
                        label_suffix, load_image)

IMAGE_SUFFIXES = RASTER_SUFFIXES + NIFTI_SUFFIXES + NRRD_SUFFIXES + DICOM_SUFFIXES
RESULT_SUFFIXES = (".png", ".nii.gz", ".nii", ".nrrd")
MAX_ID = 200


def http_error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def check_id(value, what: str = "image id") -> str:
    """Ids name files in the datastore: no folders, no hidden names, no control characters."""
    if not isinstance(value, str) or not value.strip():
        raise http_error(400, f"{what} is missing")
    bad = [c for c in value if c in "/\\" or ord(c) < 32]
    if bad or value in (".", "..") or value.startswith(".") or len(value) > MAX_ID:
        raise http_error(400, f"invalid {what} {value!r}: use a plain name of at most {MAX_ID} characters, "
                              "without '/', '\\', control characters or a leading '.'")
    return value


def suffix_of(path) -> str:
    name = Path(path).name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def check_suffix(path, what: str = "image") -> None:
    if not suffix_of(path):
        kind = "".join(Path(path).suffixes) or "without an extension"
        raise http_error(415, f"unsupported {what} file type {kind!r}: FetalHC reads {', '.join(IMAGE_SUFFIXES)}")


def _display_name(path: Path) -> str:
    """Uploads are temp files; their names mean nothing to the client."""
    from lib.tempfiles import is_upload_name

    return "uploaded file" if is_upload_name(path) else path.name


def from_input_error(exc: InputError, path: Path) -> HTTPException:
    msg = str(exc)
    if msg.startswith(str(path)):
        msg = _display_name(path) + msg[len(str(path)):]
    return http_error(413 if "too large" in msg else 400, msg)


def series_file(folder: Path) -> Path:
    """The instance to measure in a DICOM series folder (DICOMweb cache): the lowest InstanceNumber."""
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise http_error(404, f"DICOM series folder {folder.name} is empty")
    if len(files) == 1:
        return files[0]

    def number(p):
        try:
            return int(pydicom.dcmread(str(p), stop_before_pixels=True).get("InstanceNumber", 0) or 0), p.name
        except Exception:
            return 1 << 30, p.name
    return min(files, key=number)


def load_input(path, *, pixel_size: float | None = None, pixel_csv=None, frame: int = 0) -> LoadedImage:
    """A 2-D image (file, or DICOM series folder) with its spacing; pixel_size / CSV override headers."""
    p = Path(path)
    if not p.exists():
        raise http_error(404, f"image {p.name} not found")
    if p.is_dir():
        p = series_file(p)
    try:
        return load_image(p, pixel_size=pixel_size, pixel_csv=pixel_csv, frame=frame)
    except InputError as exc:
        raise from_input_error(exc, p) from None


def number(value, name: str, lo: float, hi: float, *, integer: bool = False) -> float | int | None:
    """A numeric option from a request, the Slicer config table or --conf; '' / None / 'none' -> None."""
    if value is None or isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise http_error(400, f"{name} must be a number, got {value!r}") from None
    if not lo <= v <= hi or (integer and v != int(v)):
        raise http_error(400, f"{name} must be {'an integer ' if integer else ''}between {lo:g} and {hi:g}, "
                              f"got {value!r}")
    return int(v) if integer else v


def _positive_mm(value, name: str) -> float | None:
    v = number(value, name, 0.0, 10.0)
    if v is not None and v <= 0:  # 0 would silently fall back to another spacing source
        raise http_error(400, f"{name} must be a pixel size in mm above 0 (at most 10), got {value!r}")
    return v


def pixel_size(request: dict, image_info: dict | None = None) -> float | None:
    """Explicit pixel size (mm) for files without calibration: request param, else the image's info."""
    v = _positive_mm(request.get("pixel_size_mm"), "pixel_size_mm")
    if v is None:
        v = _positive_mm((image_info or {}).get("pixel_size_mm"), "image info pixel_size_mm")
    return v


def check_device(value) -> str:
    """A device of this machine ('cpu', 'cuda', 'cuda:N' or a name from /info); '' or a list: the default."""
    import torch
    from monailabel.utils.others.generic import device_map, name_to_device

    if value is None or isinstance(value, list) or (isinstance(value, str) and not value.strip()):
        return name_to_device(value or None)
    known = {"cpu"} | set(device_map()) | set(device_map().values())
    if torch.cuda.is_available():
        known |= {"cuda"} | {f"cuda:{i}" for i in range(torch.cuda.device_count())}
    if not isinstance(value, str) or value.strip() not in known:
        raise http_error(400, f"unknown device {value!r}: this server has {', '.join(sorted(known))}")
    return name_to_device(value.strip())


def result_path(img: LoadedImage, request: dict) -> str:
    """Temp file for the label: the request's ``result_extension`` (Slicer asks for .nrrd), else the
    input's own format (PNG for PNG/JPG/DICOM)."""
    ext = request.get("result_extension") or label_suffix(img.path)
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext.lower() not in RESULT_SUFFIXES:
        raise http_error(400, f"result_extension {ext!r} is not supported; use one of {', '.join(RESULT_SUFFIXES)}")
    fd, path = tempfile.mkstemp(prefix="fetal_head_", suffix=ext.lower(), dir=request.get("result_dir") or None)
    os.close(fd)
    return path
