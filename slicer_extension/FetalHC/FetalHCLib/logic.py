"""Everything the FetalHC module does that needs MRML but not Qt.

Works on any MRML scene given as an argument: Slicer's ``slicer.mrmlScene`` or, headless, a
``slicer.vtkMRMLScene()`` from the ``slicer-core`` wheel. Geometry (ellipse fit, perimeter), Hadlock GA
and DICOM/NRRD spacing come from fetalhc (:mod:`FetalHCLib.core`), never from a copy written here.

Pixel convention (fetalhc.geometry): x = column = IJK i, y = row = IJK j, origin at the centre of the
first pixel, so a pixel point (x, y) is the IJK point (x, y, k) and reaches RAS through the volume's
IJK->RAS matrix (which holds spacing, flips and origin). Spacing is (row_mm, col_mm) =
(volume spacing[1], volume spacing[0]).
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import core

SEGMENT_ID, SEGMENT_NAME, SEGMENT_COLOR = "fetal_head", "Fetal head", (0.95, 0.55, 0.25)
CURVE_COLOR = (1.0, 0.85, 0.1)
CURVE_POINTS = 24  # spline through 24 points on the ellipse: length within 0.01 % of the perimeter
ATTR_SPACING_SOURCE = "FetalHC.SpacingSource"  # empty: no calibration known
ATTR_IMAGE_ID = "FetalHC.ImageId"  # datastore id on the server
ATTR_IMAGE_NAME = "FetalHC.ImageName"  # datastore file name (its suffix picks the label format)
ATTR_RESULT = "FetalHC.Result"  # JSON of the last result shown
ATTR_INPUT = "FetalHC.Input"  # on a derived grey volume: the frame it holds
REF_GREY, REF_SEG, REF_CURVE, REF_TABLE = "FetalHC.Grey", "FetalHC.Segmentation", "FetalHC.Curve", "FetalHC.Table"
SRC_MANUAL = "manual pixel size (user entry)"
SRC_SERVER = "server"
SPACING_TOLERANCE = 1e-3  # relative; beyond it the server measured with another spacing than the volume has
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FetalHCError(Exception):
    """A problem to show the user as a plain message (no head, no spacing, bad label...)."""


# ------------------------------------------------------------------------------------------- arrays

def volume_array(volume) -> np.ndarray:
    """Voxels as numpy (K, J, I) or (K, J, I, C); a view on the node's image data."""
    image = volume.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise FetalHCError(f"volume '{volume.GetName()}' has no image data")
    dims = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return arr.reshape(dims[::-1] + ((comps,) if comps > 1 else ()))


def set_volume_array(volume, arr: np.ndarray) -> None:
    """Replace the voxels with ``arr`` (K, J, I) or (K, J, I, C) of any numeric dtype, keeping the geometry."""
    arr = np.ascontiguousarray(arr)
    image = vtk.vtkImageData()
    image.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    flat = arr.reshape(-1, arr.shape[3]) if arr.ndim == 4 else arr.ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(arr.dtype))
    image.GetPointData().SetScalars(scalars)
    volume.SetAndObserveImageData(image)


def ijk_to_ras(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def pixels_to_ras(volume, xy: np.ndarray, k: float = 0.0) -> np.ndarray:
    """Pixel points (N, 2) as (x=column, y=row) -> RAS (N, 3), through IJK->RAS (not index x spacing)."""
    xy = np.asarray(xy, float)
    ijk1 = np.column_stack([xy, np.full(len(xy), k), np.ones(len(xy))])
    return (ijk1 @ ijk_to_ras(volume).T)[:, :3]


def ras_to_pixels(volume, ras: np.ndarray) -> np.ndarray:
    ras1 = np.column_stack([np.asarray(ras, float), np.ones(len(ras))])
    return (ras1 @ np.linalg.inv(ijk_to_ras(volume)).T)[:, :2]


def image_shape(volume) -> tuple[int, int]:
    dims = volume.GetImageData().GetDimensions()
    return dims[1], dims[0]


# ------------------------------------------------------------------------------------------ spacing

def volume_spacing(volume):
    """The volume's spacing as fetalhc ``Spacing`` when it is a known calibration, else None."""
    source = volume.GetAttribute(ATTR_SPACING_SOURCE)
    if not source:
        return None
    col, row = volume.GetSpacing()[:2]
    return core.load()[2].Spacing(row, col, source)


def set_spacing(volume, row_mm: float, col_mm: float, source: str) -> None:
    """Set the in-plane spacing (keeps directions, origin and slice spacing) and record its source.

    A head segment and curve already on the volume stay on the same pixels (they live in RAS, so they
    are re-placed); their millimetre values change with the spacing, so Recompute afterwards."""
    spacing = core.load()[2].Spacing(row_mm, col_mm, source)  # validates (positive, finite)
    seg, curve = volume.GetNodeReference(REF_SEG), volume.GetNodeReference(REF_CURVE)
    mask = segment_mask(volume) if seg is not None and seg.GetSegmentation().GetSegment(SEGMENT_ID) else None
    curve_px = None
    if curve is not None and curve.GetNumberOfControlPoints():
        ras = np.array([curve.GetNthControlPointPositionWorld(i) for i in range(curve.GetNumberOfControlPoints())])
        curve_px = ras_to_pixels(volume, ras)
    volume.SetSpacing(spacing.col_mm, spacing.row_mm, volume.GetSpacing()[2])
    volume.SetAttribute(ATTR_SPACING_SOURCE, source)
    if mask is not None:
        set_head_segment(volume, mask)
    if curve_px is not None:
        _set_curve_points(curve, pixels_to_ras(volume, curve_px))


def dicom_file_spacing(path: str):
    """(Spacing or None, warnings) from a DICOM file's header: PixelSpacing, ImagerPixelSpacing, else the
    largest calibrated 2-D tissue region of SequenceOfUltrasoundRegions (PhysicalDeltaX/Y in cm) --
    fetalhc.io's rules, so Slicer and the server agree."""
    return core.load()[2].dicom_header_spacing(path)


def resolve_spacing(volume, *, dicom_file: str | None = None, manual_mm: float | None = None) -> dict:
    """Work out and apply the volume's calibration; returns {"spacing", "source", "message", "warnings"}.

    Order: a manual pixel size; a source already recorded on the node; the DICOM file the volume was
    loaded from (Slicer shows 1.0 mm for ultrasound calibrated only by SequenceOfUltrasoundRegions, so
    PhysicalDeltaX/Y are read from the file and set here); a NRRD/NIfTI header. Otherwise the spacing is
    unknown and HC can only be given in pixels until the user enters the pixel size.
    """
    io = core.load()[2]
    warnings: list[str] = []
    if manual_mm is not None:
        set_spacing(volume, manual_mm, manual_mm, SRC_MANUAL)
    elif not volume.GetAttribute(ATTR_SPACING_SOURCE):
        storage = volume.GetStorageNode()
        path = storage.GetFileName() if storage is not None else None
        kind = io.file_kind(path) if path else None
        if dicom_file or kind == "dicom":
            spacing, warnings = dicom_file_spacing(dicom_file or path)
            if spacing is not None:
                set_spacing(volume, spacing.row_mm, spacing.col_mm, spacing.source)
        elif kind in ("nrrd", "nifti"):
            volume.SetAttribute(ATTR_SPACING_SOURCE, f"{kind.upper() if kind == 'nrrd' else 'NIfTI'} header")
    spacing = volume_spacing(volume)
    if spacing is None:
        message = "No pixel spacing: the image carries no calibration. Enter the pixel size (mm) to get HC in mm."
    else:
        message = f"Spacing {spacing.col_mm:.4f} x {spacing.row_mm:.4f} mm (column x row) from {spacing.source}"
        lo, hi = io.PLAUSIBLE_MM
        if not all(lo <= v <= hi for v in spacing.as_tuple()):
            warnings.append(f"spacing outside the usual {lo}-{hi} mm of fetal ultrasound: check the calibration")
    return {"spacing": spacing, "source": spacing.source if spacing else None, "message": message,
            "warnings": warnings}


# ------------------------------------------------------------------------------------------- volumes

def add_volume(scene, pixels: np.ndarray, name: str, spacing=None, ijk_to_ras_matrix=None):
    """A scalar volume from a (H, W) image. Default geometry is Slicer's for a 2-D PNG (ITK's LPS
    identity: RAS = diag(-1, -1, 1)); ``spacing`` is a fetalhc Spacing (recorded as calibration)."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    set_volume_array(volume, np.asarray(pixels)[None])
    if ijk_to_ras_matrix is not None:
        volume.SetIJKToRASMatrix(_vtk_matrix(np.asarray(ijk_to_ras_matrix, float)))
    else:
        volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    if spacing is not None:
        set_spacing(volume, spacing.row_mm, spacing.col_mm, spacing.source)
    volume.CreateDefaultDisplayNodes()
    return volume


def load_image_volume(scene, path: str, name: str | None = None):
    """Load an image file as a volume: NRRD/NIfTI with MRML's own reader (orientation kept), anything
    else (PNG, JPEG, DICOM...) with fetalhc.io (grey pixels + header spacing, Slicer's 2-D geometry)."""
    io = core.load()[2]
    name = name or os.path.basename(path).split(".")[0]
    kind = io.file_kind(path)
    if kind in ("nrrd", "nifti"):
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = _storage(path, scene)
        volume.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(volume):
            scene.RemoveNode(volume)
            raise FetalHCError(f"cannot read {path}")
        volume.CreateDefaultDisplayNodes()
        resolve_spacing(volume)
        return volume
    try:
        loaded = io.load_image(path)
    except io.InputError as e:
        raise FetalHCError(str(e)) from None
    return add_volume(scene, loaded.pixels, name, loaded.spacing)


def prepare_input(volume, frame: int = 0):
    """The 2-D uint8 grey scalar volume FetalHC measures: ``volume`` itself when it already is one, else a
    derived volume "<name> (FetalHC grey)" (RGB -> BT.601 luma as in fetalhc.io, one frame of a cine,
    other pixel types scaled to 0-255) with the same geometry, made once and reused (with its spacing)."""
    io = core.load()[2]
    arr = volume_array(volume)
    if volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode") \
            and arr.ndim == 3 and arr.shape[0] == 1 and arr.dtype == np.uint8:
        return volume
    derived = volume.GetNodeReference(REF_GREY)
    if derived is not None and derived.GetAttribute(ATTR_INPUT) == str(frame):
        return derived
    if not 0 <= frame < arr.shape[0]:
        raise FetalHCError(f"frame {frame} does not exist: '{volume.GetName()}' has {arr.shape[0]} frames")
    grey = io.to_grey_uint8(arr[frame])
    if derived is None:
        derived = volume.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume.GetName()} (FetalHC grey)")
        volume.SetNodeReferenceID(REF_GREY, derived.GetID())
    m = ijk_to_ras(volume)
    m[:3, 3] = pixels_to_ras(volume, [[0, 0]], k=frame)[0]  # origin at the chosen frame
    set_volume_array(derived, grey[None])
    derived.SetIJKToRASMatrix(_vtk_matrix(m))
    for key in (ATTR_SPACING_SOURCE, ATTR_IMAGE_ID, ATTR_IMAGE_NAME, "DICOM.instanceUIDs"):
        if volume.GetAttribute(key):
            derived.SetAttribute(key, volume.GetAttribute(key))
    derived.SetAttribute(ATTR_INPUT, str(frame))
    if derived.GetDisplayNode() is None:
        derived.CreateDefaultDisplayNodes()
    return derived


def _vtk_matrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def write_upload_file(volume, directory: str) -> str:
    """The file sent to the server for a volume not in its datastore: NRRD (pixels + spacing + geometry,
    read by fetalhc.io) when the spacing is known, else PNG (pixels only: no made-up 1.0 mm)."""
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in volume.GetName())[:60] or "image"
    if volume_spacing(volume) is None:
        return _write_png(volume_array(volume)[0], os.path.join(directory, base + ".png"))
    return _write_with_mrml(volume, os.path.join(directory, base + ".nrrd"))


def _write_png(pixels: np.ndarray, path: str) -> str:
    import cv2
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not ok:
        raise FetalHCError(f"cannot encode {path} as PNG")
    buf.tofile(path)
    return path


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


def read_label_file(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A label image from the server as (H, W) uint8 on the input's pixel grid. NRRD/NIfTI are read
    with MRML's reader (file voxel order: i = column, j = row), PNG with OpenCV."""
    name = path.lower()
    if name.endswith((".nrrd", ".nhdr", ".nii", ".nii.gz")):
        node = slicer.vtkMRMLLabelMapVolumeNode()
        scene = slicer.vtkMRMLScene()  # private scratch scene: nothing leaks into the user's
        scene.AddNode(node)
        if not _storage(path, scene).ReadData(node):
            raise FetalHCError(f"cannot read the label file {os.path.basename(path)} sent by the server")
        arr = volume_array(node)
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
    else:
        import cv2
        arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise FetalHCError(f"cannot decode the label file {os.path.basename(path)} sent by the server")
    if arr.ndim != 2 or tuple(arr.shape) != tuple(shape):
        raise FetalHCError(f"the server's label has shape {arr.shape}, the image {shape} (rows, columns): "
                           "they must be on the same pixel grid")
    return (arr > 0).astype(np.uint8)


# ------------------------------------------------------------------------------------- segmentation

def _referenced(volume, role: str, cls: str, name: str):
    node = volume.GetNodeReference(role)
    if node is None:
        node = volume.GetScene().AddNewNodeByClass(cls, name)
        if node.IsA("vtkMRMLDisplayableNode"):
            node.CreateDefaultDisplayNodes()
        volume.SetNodeReferenceID(role, node.GetID())
    return node


def _labelmap_node(volume, mask: np.ndarray):
    """An unattached labelmap node holding ``mask`` (H, W) in the volume's geometry."""
    label = slicer.vtkMRMLLabelMapVolumeNode()
    set_volume_array(label, np.asarray(mask, np.uint8)[None])
    label.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume)))
    return label


def set_head_segment(volume, mask: np.ndarray):
    """Put ``mask`` (H, W, nonzero = head) into segment "Fetal head" of the volume's FetalHC segmentation."""
    seg_node = _referenced(volume, REF_SEG, "vtkMRMLSegmentationNode", f"{volume.GetName()} FetalHC segmentation")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    label = _labelmap_node(volume, mask)
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(label)
    segmentation = seg_node.GetSegmentation()
    if segmentation.GetSegment(SEGMENT_ID) is None:
        segment = slicer.vtkSegment()
        segment.SetName(SEGMENT_NAME)
        segment.SetColor(*SEGMENT_COLOR)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), oriented)
        segmentation.AddSegment(segment, SEGMENT_ID)
    else:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        logic.SetBinaryLabelmapToSegment(oriented, seg_node, SEGMENT_ID, logic.MODE_REPLACE)
    return seg_node


def segment_mask(volume) -> np.ndarray:
    """The (possibly edited) "Fetal head" segment exported on the volume's pixel grid, (H, W) uint8 0/1."""
    seg_node = volume.GetNodeReference(REF_SEG)
    if seg_node is None or seg_node.GetSegmentation().GetSegment(SEGMENT_ID) is None:
        raise FetalHCError("there is no 'Fetal head' segment yet: run Segment head first")
    scene = slicer.vtkMRMLScene()  # scratch scene for the export's temporary labelmap
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(SEGMENT_ID)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, label, volume):
        raise FetalHCError("exporting the 'Fetal head' segment to a labelmap failed")
    arr = volume_array(label)
    return (arr.reshape(arr.shape[-2:]) > 0).astype(np.uint8)


def write_label_file(volume, directory: str, suffix: str = ".png") -> str:
    """Export the head segment as a label file (0/1, uint8) on the image grid for ``PUT /datastore/label``."""
    mask = segment_mask(volume)
    if not mask.any():
        raise FetalHCError("the 'Fetal head' segment is empty: paint the head before submitting")
    base = os.path.join(directory, "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in volume.GetName()))
    if suffix in RASTER_SUFFIXES:
        return _write_png(mask, base + ".png")
    return _write_with_mrml(_labelmap_node(volume, mask), base + suffix)


# ------------------------------------------------------------------------------------------- curve

def ellipse_ras_points(volume, ellipse_px, n: int = CURVE_POINTS) -> np.ndarray:
    """(n, 3) RAS points on a pixel-space ellipse (fetalhc Ellipse), through the volume's IJK->RAS."""
    return pixels_to_ras(volume, ellipse_px.points(n))


def set_head_curve(volume, ellipse_px, n: int = CURVE_POINTS):
    """Closed-curve markup on the ellipse, with its length measurement enabled: the curve shows HC."""
    curve = _referenced(volume, REF_CURVE, "vtkMRMLMarkupsClosedCurveNode", f"{volume.GetName()} HC")
    _set_curve_points(curve, ellipse_ras_points(volume, ellipse_px, n))
    length = curve.GetMeasurement("length")
    length.SetEnabled(True)
    display = curve.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*CURVE_COLOR)
        display.SetColor(*CURVE_COLOR)
        display.SetPointLabelsVisibility(False)
        display.SetPropertiesLabelVisibility(True)
    return curve


def _set_curve_points(curve, ras: np.ndarray) -> None:
    points = vtk.vtkPoints()
    for p in ras:
        points.InsertNextPoint(*p)
    curve.SetControlPointPositionsWorld(points)
    for i in range(curve.GetNumberOfControlPoints()):
        curve.SetNthControlPointLabel(i, "")


def curve_length_mm(volume) -> float | None:
    curve = volume.GetNodeReference(REF_CURVE)
    if curve is None or curve.GetNumberOfControlPoints() < 3:
        return None
    length = curve.GetMeasurement("length")
    return float(length.GetValue()) if length is not None and length.GetEnabled() else curve.GetCurveLengthWorld()


def curve_pixels(volume) -> np.ndarray:
    """The curve's interpolated points in pixel coordinates (x, y)."""
    curve = volume.GetNodeReference(REF_CURVE)
    if curve is None or curve.GetNumberOfControlPoints() < 5:
        raise FetalHCError("there is no HC curve with at least 5 points to fit")
    pts = curve.GetCurvePointsWorld()
    ras = numpy_support.vtk_to_numpy(pts.GetData()).astype(float)
    return ras_to_pixels(volume, ras)


# ---------------------------------------------------------------------------------------- results

def ellipse_for_curve(result: dict):
    """The pixel-space ellipse to draw for a result: the millimetre fit mapped back through the spacing
    the server measured with (so the curve length equals hc_mm), else the pixel fit."""
    geometry = core.load()[0]
    e_mm, sp = result.get("ellipse_mm"), result.get("spacing_mm")
    if e_mm and sp:
        return geometry.Ellipse(**e_mm).to_px(tuple(sp))
    if result.get("ellipse_px"):
        return geometry.Ellipse(**result["ellipse_px"])
    return None


def measure(mask: np.ndarray, spacing, *, points_px: np.ndarray | None = None) -> dict:
    """HC from a mask (or from boundary points in pixels) with fetalhc's formulas; keys as
    fetalhc Measurement.to_dict()."""
    geometry, clinical, _ = core.load()
    sp = spacing.as_tuple() if spacing is not None else None
    try:
        if points_px is not None:
            e_px = geometry.fit_points(points_px)
            e_mm = geometry.fit_points(points_px * [sp[1], sp[0]]) if sp else None
        else:
            e_px, e_mm = geometry.fit_mask(np.asarray(mask, bool), sp)
    except ValueError as e:
        raise FetalHCError(f"no head to measure: {e}") from None
    hc = e_mm.perimeter if e_mm is not None else None
    ga = clinical.hadlock_ga(hc)
    return {"hc_mm": hc, "hc_px": e_px.perimeter, "ellipse_px": e_px.as_dict(),
            "ellipse_mm": e_mm.as_dict() if e_mm else None, "ga_weeks": ga.weeks, "ga_text": ga.text,
            "ga_valid": ga.valid, "spacing_mm": list(sp) if sp else None,
            "spacing_source": spacing.source if spacing else None}


def apply_result(volume, result: dict, mask: np.ndarray | None = None) -> dict:
    """Show a measurement on ``volume``: segment, HC curve, results table and the node's result attribute.

    ``result`` has the keys of fetalhc Measurement.to_dict(). Returns it completed with "curve_length_mm",
    "warnings" and a display "spacing" line. When the volume has no calibration and the server measured
    with one, the volume takes the server's spacing so the curve (in RAS mm) shows the same HC.
    """
    result = dict(result)
    warnings = list(result.get("warnings") or [])
    own, server = volume_spacing(volume), result.get("spacing_mm")
    if server and own is None:
        set_spacing(volume, server[0], server[1], f"{SRC_SERVER}: {result.get('spacing_source') or 'unknown'}")
    elif server and own is not None and not np.allclose(own.as_tuple(), server, rtol=SPACING_TOLERANCE, atol=0):
        warnings.append(f"the server measured with spacing {server[1]:.4f} x {server[0]:.4f} mm "
                        f"({result.get('spacing_source')}), the volume has {own.col_mm:.4f} x {own.row_mm:.4f} mm "
                        f"({own.source}); press Recompute to measure with the volume's spacing")
    if mask is not None:
        set_head_segment(volume, mask)
    ellipse = ellipse_for_curve(result)
    if ellipse is not None:
        set_head_curve(volume, ellipse)
    result["curve_length_mm"] = curve_length_mm(volume) if ellipse is not None else None
    if result.get("hc_mm") is None and result.get("hc_px") is not None and volume_spacing(volume) is None:
        warnings.append("no pixel spacing: HC is in pixels only; enter the pixel size and press Recompute")
    result["warnings"] = warnings
    volume.SetAttribute(ATTR_RESULT, json.dumps(result, default=float))
    update_table(volume, result)
    return result


def recompute(volume, source: str = "segment", previous: dict | None = None) -> dict:
    """Refit the ellipse from the edited segment (``source="segment"``) or from the dragged curve
    (``"curve"``, which also redraws the segment as the filled ellipse) and show the new HC."""
    geometry = core.load()[0]
    spacing = volume_spacing(volume)
    if source == "curve":
        res = measure(None, spacing, points_px=curve_pixels(volume))
        mask = geometry.ellipse_mask(geometry.Ellipse(**res["ellipse_px"]), image_shape(volume)).astype(np.uint8)
    elif source == "segment":
        mask = segment_mask(volume)
        if not mask.any():
            raise FetalHCError("the 'Fetal head' segment is empty: paint the head, then Recompute")
        res = measure(mask, spacing)
    else:
        raise ValueError(f"source must be 'segment' or 'curve', not {source!r}")
    previous = previous if previous is not None else last_result(volume) or {}
    res.update(score=previous.get("score"), model_version=previous.get("model_version", ""),
               qc_ok=None, qc=f"edited by user ({source}); QC not re-run", qc_reasons=[],
               origin=f"recomputed from the edited {source}")
    return apply_result(volume, res, mask)


def last_result(volume) -> dict | None:
    text = volume.GetAttribute(ATTR_RESULT)
    return json.loads(text) if text else None


# ------------------------------------------------------------------------------------------- table

def result_rows(result: dict) -> list[tuple[str, str]]:
    """(quantity, value) lines shown in the panel and stored in the table."""
    def num(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)
    hc = result.get("hc_mm")
    hc_text = f"{hc:.1f} mm" if hc is not None else (
        f"{result['hc_px']:.1f} px (no spacing)" if result.get("hc_px") is not None else "no head found")
    ga_w = result.get("ga_weeks")
    ga = result.get("ga_text") or "n/a"
    if ga_w is not None:
        ga = f"{ga} ({ga_w:.1f} weeks)"
    qc_ok = result.get("qc_ok")
    qc = "OK" if qc_ok else (result.get("qc") or "; ".join(result.get("qc_reasons") or []) or "n/a")
    qc = qc if qc_ok is not False else f"CHECK: {qc}"
    sp = result.get("spacing_mm")
    rows = [("HC", hc_text), ("GA (Hadlock)", ga), ("Score", num(result.get("score"), ".3f")), ("QC", qc),
            ("Pixel spacing", f"{sp[1]:.4f} x {sp[0]:.4f} mm (col x row)" if sp else "unknown"),
            ("Spacing source", result.get("spacing_source") or "none"),
            ("Model version", result.get("model_version") or "n/a"),
            ("Curve length", num(result.get("curve_length_mm"), ".1f") + " mm"),
            ("Result", result.get("origin") or "server inference")]
    return rows + [("Warning", w) for w in result.get("warnings") or []]


def update_table(volume, result: dict):
    table = _referenced(volume, REF_TABLE, "vtkMRMLTableNode", f"{volume.GetName()} FetalHC results")
    table.RemoveAllColumns()
    rows = result_rows(result)
    for title, values in (("Measurement", [r[0] for r in rows]), ("Value", [r[1] for r in rows])):
        col = vtk.vtkStringArray()
        col.SetName(title)
        for v in values:
            col.InsertNextValue(v)
        table.AddColumn(col)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.Modified()
    return table


def table_values(volume) -> dict[str, str]:
    table = volume.GetNodeReference(REF_TABLE)
    if table is None:
        return {}
    return {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}


def summary_text(result: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in result_rows(result))


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="fetalhc_")
