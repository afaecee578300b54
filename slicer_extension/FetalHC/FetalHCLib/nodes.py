"""MRML helpers of the FetalHC module (no Qt, no server): volumes, spacing, head segment, HC curve, table.

Works on any MRML scene: Slicer's ``slicer.mrmlScene`` or, headless, a ``slicer.vtkMRMLScene()`` from
the ``slicer-core`` wheel. Geometry, HC/GA and DICOM/NRRD spacing rules come from the shared fetalhc
core (:mod:`FetalHCLib.shared`), never from a copy written here. Images are read with VTK/MRML readers
(Slicer has no OpenCV).

Pixel convention (fetalhc.geometry): x = column = IJK i, y = row = IJK j, origin at the centre of the
first pixel, so a pixel point (x, y) is the IJK point (x, y, k) and reaches RAS through the volume's
IJK->RAS matrix (which holds spacing, flips and origin). Spacing is (row_mm, col_mm) =
(volume spacing[1], volume spacing[0]).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .shared import io

SEGMENT_ID, SEGMENT_NAME, SEGMENT_COLOR = "fetal_head", "Fetal head", (0.95, 0.55, 0.25)
CURVE_COLOR = (1.0, 0.85, 0.1)
CURVE_POINTS = 24  # spline through 24 points on the ellipse: length within 0.01 % of the perimeter
ATTR_SPACING_SOURCE = "FetalHC.SpacingSource"  # empty: no calibration known
ATTR_IMAGE_ID = "FetalHC.ImageId"  # datastore id on the server
ATTR_IMAGE_NAME = "FetalHC.ImageName"  # datastore file name (its suffix picks the label format)
ATTR_RESULT = "FetalHC.Result"  # Result.to_dict() JSON of what the panel shows
ATTR_AI_RESULT = "FetalHC.AIResult"  # the server's result, for "Revert to AI result"
ATTR_INPUT = "FetalHC.Input"  # on a derived grey volume: the frame it holds
ATTR_DICOM_FILE = "FetalHC.DicomFile"  # the DICOM file the calibration was read from
ATTR_FILE_KIND = "FetalHC.FileKind"  # of a downloaded datastore image: dicom, nrrd, nifti, raster
ATTR_MASK_DIGEST, ATTR_CURVE_DIGEST = "FetalHC.MaskDigest", "FetalHC.CurveDigest"  # of the outline last measured
ATTR_UIDS = "DICOM.instanceUIDs"  # set by Slicer's DICOM module
REF_GREY, REF_SEG, REF_CURVE, REF_TABLE = "FetalHC.Grey", "FetalHC.Segmentation", "FetalHC.Curve", "FetalHC.Table"
REF_AI_MASK = "FetalHC.AIMask"  # labelmap with the server's mask, for "Revert to AI result"
SRC_MANUAL = "manual pixel size (user entry)"
SRC_SERVER = "server"
SPACING_TOLERANCE = 1e-3  # relative; beyond it the server measured with another spacing than the volume has
RASTER_SUFFIXES = io.RASTER_SUFFIXES


class FetalHCError(Exception):
    """A problem to show the user as a plain message (no head, no spacing, bad label...)."""


# ------------------------------------------------------------------------------------------- arrays

def volume_array(volume) -> np.ndarray:
    """Voxels as numpy (K, J, I) or (K, J, I, C); a view on the node's image data."""
    image = volume.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise FetalHCError(f"volume '{volume.GetName()}' has no image data")
    return image_array(image)


def image_array(image) -> np.ndarray:
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


def vtk_matrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


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
    return io.Spacing(row, col, source)


def set_spacing(volume, row_mm: float, col_mm: float, source: str) -> None:
    """Set the in-plane spacing (keeps directions, origin and slice spacing) and record its source.

    A head segment and curve already on the volume stay on the same pixels (they live in RAS, so they
    are re-placed)."""
    spacing = io.Spacing(row_mm, col_mm, source)  # validates (positive, finite)
    seg, curve = volume.GetNodeReference(REF_SEG), volume.GetNodeReference(REF_CURVE)
    mask = segment_mask(volume) if seg is not None and seg.GetSegmentation().GetSegment(SEGMENT_ID) else None
    curve_px = curve_control_pixels(volume) if curve is not None and curve.GetNumberOfControlPoints() else None
    volume.SetSpacing(spacing.col_mm, spacing.row_mm, volume.GetSpacing()[2])
    volume.SetAttribute(ATTR_SPACING_SOURCE, source)
    if mask is not None:
        set_head_segment(volume, mask)
    if curve_px is not None:
        _set_curve_points(curve, pixels_to_ras(volume, curve_px))


def sequence_of(volume):
    """(browser, sequence node, selected item) when ``volume`` is the proxy node of a sequence browser
    (how Slicer 5.8+ loads ultrasound cine), else None."""
    scene = volume.GetScene()
    if scene is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(i)
        if browser.IsProxyNodeID(volume.GetID()):
            return browser, browser.GetSequenceNode(volume), browser.GetSelectedItemNumber()
    return None


def dicom_instance_uids(volume) -> list[str]:
    """SOP instance UIDs Slicer's DICOM module recorded: on the volume, else on its sequence/browser."""
    nodes = [volume]
    seq = sequence_of(volume)
    if seq is not None:
        nodes += [seq[1], seq[0]]
    for node in nodes:
        uids = (node.GetAttribute(ATTR_UIDS) or "").split() if node is not None else []
        if uids:
            return uids
    return []


def dicom_file(volume, database) -> str | None:
    """The file of a volume loaded through Slicer's DICOM database (``slicer.dicomDatabase``): the first
    recorded instance's file, else None."""
    uids = dicom_instance_uids(volume)
    if not uids or database is None:
        return None
    path = database.fileForInstance(uids[0])
    return path if path and os.path.exists(path) else None


def resolve_spacing(volume, *, dicom_file: str | None = None, manual_mm: float | None = None) -> dict:
    """Work out and apply the volume's calibration; returns {"spacing", "source", "message", "warnings"}.

    Order: a manual pixel size; a source already recorded on the node; the DICOM file the volume was
    loaded from (read with fetalhc.io's rules, so Slicer and the server agree: PixelSpacing,
    ImagerPixelSpacing, else the calibrated US region); a NRRD/NIfTI header (by content, also for a
    file without a suffix). Otherwise HC can only be given in pixels until the user enters the pixel size.
    """
    warnings: list[str] = []
    if sequence_of(volume) is not None and manual_mm is None:
        volume.RemoveAttribute(ATTR_SPACING_SOURCE)  # browsing a sequence rewrites the proxy: read again
    if manual_mm is not None:
        set_spacing(volume, manual_mm, manual_mm, SRC_MANUAL)
    elif not volume.GetAttribute(ATTR_SPACING_SOURCE):
        storage = volume.GetStorageNode()
        path = storage.GetFileName() if storage is not None else None
        kind = io.detect_kind(path) if path and os.path.isfile(path) else None
        if dicom_file or kind == "dicom":
            spacing, warnings = io.dicom_header_spacing(dicom_file or path)
            if spacing is not None:
                set_spacing(volume, spacing.row_mm, spacing.col_mm, spacing.source)
                volume.SetAttribute(ATTR_DICOM_FILE, dicom_file or path)
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
        volume.SetIJKToRASMatrix(vtk_matrix(np.asarray(ijk_to_ras_matrix, float)))
    else:
        volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    if spacing is not None:
        set_spacing(volume, spacing.row_mm, spacing.col_mm, spacing.source)
    volume.CreateDefaultDisplayNodes()
    return volume


def prepare_input(volume, frame: int | None = None):
    """The 2-D uint8 grey scalar volume FetalHC measures: ``volume`` itself when it already is one, else a
    derived volume "<name> (FetalHC grey)" (RGB -> BT.601 luma as in fetalhc.io, one frame of a cine,
    other pixel types scaled to 0-255) with the same geometry, made once per frame and reused.

    A sequence proxy node (US cine in Slicer 5.8+) always gets a copy of its current frame: the proxy's
    pixels change when the sequence is browsed, the measured frame must not.
    """
    seq = sequence_of(volume)
    arr = volume_array(volume)
    if frame is None:
        frame = 0
    plain = (volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode")
             and arr.ndim == 3 and arr.shape[0] == 1 and arr.dtype == np.uint8)
    if plain and seq is None:
        return volume
    tag = f"item {seq[2]}" if seq is not None else str(frame)
    derived = volume.GetNodeReference(REF_GREY)
    if derived is not None and derived.GetAttribute(ATTR_INPUT) == tag:
        return derived
    k = 0 if seq is not None else frame
    if not 0 <= k < arr.shape[0]:
        raise FetalHCError(f"frame {frame} does not exist: '{volume.GetName()}' has {arr.shape[0]} frames")
    grey = io.to_grey_uint8(arr[k])
    name = f"{volume.GetName()} {tag} (FetalHC grey)" if seq is not None else f"{volume.GetName()} (FetalHC grey)"
    if derived is None or seq is not None:
        derived = volume.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        volume.SetNodeReferenceID(REF_GREY, derived.GetID())
    m = ijk_to_ras(volume)
    m[:3, 3] = pixels_to_ras(volume, [[0, 0]], k=k)[0]  # origin at the chosen frame
    set_volume_array(derived, grey[None])
    derived.SetIJKToRASMatrix(vtk_matrix(m))
    for key in (ATTR_SPACING_SOURCE, ATTR_IMAGE_ID, ATTR_IMAGE_NAME, ATTR_DICOM_FILE):
        if volume.GetAttribute(key):
            derived.SetAttribute(key, volume.GetAttribute(key))
    uids = dicom_instance_uids(volume)
    if uids:
        derived.SetAttribute(ATTR_UIDS, " ".join(uids))
    derived.SetAttribute(ATTR_INPUT, tag)
    if derived.GetDisplayNode() is None:
        derived.CreateDefaultDisplayNodes()
    return derived


# ------------------------------------------------------------------------------------- segmentation

def referenced(volume, role: str, cls: str, name: str):
    node = volume.GetNodeReference(role)
    if node is None:
        node = volume.GetScene().AddNewNodeByClass(cls, name)
        if node.IsA("vtkMRMLDisplayableNode"):
            node.CreateDefaultDisplayNodes()
        volume.SetNodeReferenceID(role, node.GetID())
    return node


def labelmap_node(volume, mask: np.ndarray, node=None):
    """A labelmap node (new and unattached unless given) holding ``mask`` (H, W) in the volume's geometry."""
    label = node or slicer.vtkMRMLLabelMapVolumeNode()
    set_volume_array(label, np.asarray(mask, np.uint8)[None])
    label.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras(volume)))
    return label


def set_head_segment(volume, mask: np.ndarray):
    """Put ``mask`` (H, W, nonzero = head) into segment "Fetal head" of the volume's FetalHC segmentation."""
    seg_node = referenced(volume, REF_SEG, "vtkMRMLSegmentationNode", f"{volume.GetName()} FetalHC segmentation")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        labelmap_node(volume, mask))
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


def has_segment(volume) -> bool:
    seg = volume.GetNodeReference(REF_SEG)
    return seg is not None and seg.GetSegmentation().GetSegment(SEGMENT_ID) is not None


def segment_mask(volume) -> np.ndarray:
    """The (possibly edited) "Fetal head" segment exported on the volume's pixel grid, (H, W) uint8 0/1."""
    if not has_segment(volume):
        raise FetalHCError("there is no 'Fetal head' segment yet: run Segment head first")
    scene = slicer.vtkMRMLScene()  # scratch scene for the export's temporary labelmap
    label = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(label)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(SEGMENT_ID)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            volume.GetNodeReference(REF_SEG), ids, label, volume):
        raise FetalHCError("exporting the 'Fetal head' segment to a labelmap failed")
    arr = volume_array(label)
    return (arr.reshape(arr.shape[-2:]) > 0).astype(np.uint8)


def mask_digest(volume) -> str:
    """Digest of the head segment on the image grid ("" without one)."""
    if not has_segment(volume):
        return ""
    mask = segment_mask(volume)
    return hashlib.sha1(np.packbits(mask > 0).tobytes() + str(mask.shape).encode()).hexdigest()


def curve_digest(volume) -> str:
    """Digest of the HC curve's control points, to 1e-6 mm ("" without a curve)."""
    curve = volume.GetNodeReference(REF_CURVE)
    if curve is None or not curve.GetNumberOfControlPoints():
        return ""
    ras = [curve.GetNthControlPointPositionWorld(i) for i in range(curve.GetNumberOfControlPoints())]
    return hashlib.sha1(np.round(np.array(ras), 6).tobytes()).hexdigest()


def store_ai_mask(volume, mask: np.ndarray) -> None:
    """Keep the server's mask (a hidden labelmap) so that "Revert to AI result" can restore it."""
    node = volume.GetNodeReference(REF_AI_MASK)
    if node is None:
        node = volume.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{volume.GetName()} FetalHC AI mask")
        node.SetHideFromEditors(True)
        volume.SetNodeReferenceID(REF_AI_MASK, node.GetID())
    labelmap_node(volume, mask, node)


def ai_mask(volume) -> np.ndarray | None:
    node = volume.GetNodeReference(REF_AI_MASK)
    return None if node is None or node.GetImageData() is None else volume_array(node)[0].astype(np.uint8)


# ------------------------------------------------------------------------------------------- curve

def set_head_curve(volume, ellipse_px, n: int = CURVE_POINTS):
    """Closed-curve markup on the ellipse, with its length measurement enabled: the curve shows HC."""
    curve = referenced(volume, REF_CURVE, "vtkMRMLMarkupsClosedCurveNode", f"{volume.GetName()} HC")
    _set_curve_points(curve, pixels_to_ras(volume, ellipse_px.points(n)))
    curve.GetMeasurement("length").SetEnabled(True)
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


def curve_control_pixels(volume) -> np.ndarray:
    curve = volume.GetNodeReference(REF_CURVE)
    ras = np.array([curve.GetNthControlPointPositionWorld(i) for i in range(curve.GetNumberOfControlPoints())])
    return ras_to_pixels(volume, ras.reshape(-1, 3))


def curve_pixels(volume) -> np.ndarray:
    """The curve's interpolated points in pixel coordinates (x, y)."""
    curve = volume.GetNodeReference(REF_CURVE)
    if curve is None or curve.GetNumberOfControlPoints() < 5:
        raise FetalHCError("there is no HC curve with at least 5 points to fit")
    ras = numpy_support.vtk_to_numpy(curve.GetCurvePointsWorld().GetData()).astype(float)
    return ras_to_pixels(volume, ras)


def ellipse_for_curve(res):
    """The pixel-space ellipse to draw for a Result: the millimetre fit mapped back through its spacing
    (so the curve length equals hc_mm), else the pixel fit."""
    if res.ellipse_mm is not None and res.spacing is not None:
        return res.ellipse_mm.to_px(res.spacing.as_tuple())
    return res.ellipse_px


