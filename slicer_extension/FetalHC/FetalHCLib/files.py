"""Image and label files of the FetalHC module: what is read from and written for the server (no Qt).

Rasters are read with VTK's readers and PNG is written with zlib (Slicer has no OpenCV); NRRD/NIfTI go
through MRML's volume storage node, so geometry and spacing survive; DICOM pixels and calibration come
from the shared fetalhc.io, so Slicer and the server read a file alike.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib

import numpy as np
import slicer
import vtk

from .nodes import (RASTER_SUFFIXES, FetalHCError, add_volume, image_array, labelmap_node, resolve_spacing,
                    volume_array, volume_spacing)
from .shared import io


def read_raster(path: str) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF (recognised by content) as (H, W) or (H, W, C), first file row first."""
    reader = vtk.vtkImageReader2Factory.CreateImageReader2(path)
    if reader is None:
        raise FetalHCError(f"cannot read {os.path.basename(path)}: not a PNG, JPEG, BMP, TIFF, DICOM, NRRD or NIfTI image")
    reader.SetFileName(path)
    reader.Update()
    image = reader.GetOutput()
    if image is None or image.GetPointData().GetScalars() is None:
        raise FetalHCError(f"cannot decode {os.path.basename(path)}")
    return np.ascontiguousarray(image_array(image)[0][::-1])  # VTK readers put the last file row first


def write_png(pixels: np.ndarray, path: str) -> str:
    """8-bit grey PNG (zlib; no OpenCV in Slicer), rows in array order."""
    arr = np.ascontiguousarray(np.asarray(pixels, np.uint8))
    h, w = arr.shape
    raw = b"".join(b"\x00" + arr[r].tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return path


def load_image_volume(scene, path: str, name: str | None = None):
    """Load an image file (name suffix or none) as a volume: NRRD/NIfTI with MRML's reader (orientation
    kept), DICOM with fetalhc.io (grey pixels + header spacing), rasters with VTK's readers."""
    name = name or os.path.basename(path).split(".")[0]
    kind = io.detect_kind(path)
    if kind in ("nrrd", "nifti"):
        suffix = {"nrrd": io.NRRD_SUFFIXES, "nifti": io.NIFTI_SUFFIXES}[kind]
        if path.lower().endswith(suffix):
            return _read_with_mrml(scene, path, name)
        with tempfile.TemporaryDirectory(prefix="fetalhc_") as tmp:  # MRML picks its reader by suffix
            named = os.path.join(tmp, "image" + suffix[0])
            shutil.copyfile(path, named)
            volume = _read_with_mrml(scene, named, name)
            volume.SetAndObserveStorageNodeID(None)  # the copy is gone; saving asks for a new file
        return volume
    if kind == "dicom":
        try:
            loaded = io.load_image(path)
        except io.InputError as e:
            raise FetalHCError(str(e)) from None
        return add_volume(scene, loaded.pixels, name, loaded.spacing)
    return add_volume(scene, io.to_grey_uint8(read_raster(path), "RGB"), name)


def _read_with_mrml(scene, path: str, name: str):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = _storage(path, scene)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume):
        scene.RemoveNode(volume)
        raise FetalHCError(f"cannot read {os.path.basename(path)}")
    volume.CreateDefaultDisplayNodes()
    resolve_spacing(volume)
    return volume


def _storage(path: str, scene=None):
    """MRML's volume reader/writer (NRRD, NIfTI...) for ``path``, in ``scene`` when given."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    if scene is not None:
        scene.AddNode(storage)
    storage.SetFileName(path)
    return storage


def _write_with_mrml(volume, path: str) -> str:
    if os.path.exists(path):
        os.remove(path)
    storage = _storage(path)
    storage.SetUseCompression(True)
    if not storage.WriteData(volume):
        raise FetalHCError(f"cannot write {path}")
    return path


def safe_name(volume) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in volume.GetName())[:60] or "image"


def write_upload_file(volume, directory: str) -> str:
    """The file sent to the server for a volume not in its datastore: NRRD (pixels + spacing + geometry,
    read by fetalhc.io) when the spacing is known, else PNG (pixels only: no made-up 1.0 mm)."""
    if volume_spacing(volume) is None:
        return write_png(volume_array(volume)[0], os.path.join(directory, safe_name(volume) + ".png"))
    return _write_with_mrml(volume, os.path.join(directory, safe_name(volume) + ".nrrd"))


def read_label_file(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A label image from the server as (H, W) uint8 0/1 on the input's pixel grid. NRRD/NIfTI are read
    with MRML's reader (file voxel order: i = column, j = row), PNG with VTK's."""
    if io.detect_kind(path) in ("nrrd", "nifti"):
        node = slicer.vtkMRMLLabelMapVolumeNode()
        scene = slicer.vtkMRMLScene()  # private scratch scene: nothing leaks into the user's
        scene.AddNode(node)
        if not _storage(path, scene).ReadData(node):
            raise FetalHCError(f"cannot read the label file {os.path.basename(path)} sent by the server")
        arr = volume_array(node)
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
    else:
        arr = read_raster(path)
    if arr.ndim != 2 or tuple(arr.shape) != tuple(shape):
        raise FetalHCError(f"the server's label has shape {arr.shape}, the image {shape} (rows, columns): "
                           "they must be on the same pixel grid")
    return (arr > 0).astype(np.uint8)


def write_label_file(mask: np.ndarray, volume, directory: str, suffix: str = ".png") -> str:
    """``mask`` as a label file (0/1, uint8) on the volume's grid for ``PUT /datastore/label``."""
    mask = np.asarray(mask, np.uint8)
    if not mask.any():
        raise FetalHCError("the outline is empty: paint the head before submitting")
    base = os.path.join(directory, safe_name(volume) + "_label")
    if suffix in RASTER_SUFFIXES:
        return write_png(mask, base + ".png")
    return _write_with_mrml(labelmap_node(volume, mask), base + suffix)
