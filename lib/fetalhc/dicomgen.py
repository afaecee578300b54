"""Synthetic ultrasound DICOM writer, for demos and for testing every calibration/colour path of io.py.

Files are Ultrasound (Multi-frame) Image Storage, explicit VR little endian, uncompressed 8-bit.
Uncompressed YBR_FULL_422 is written as real 4:2:2 data (Y1 Y2 Cb Cr per pixel pair, PS3.3
C.7.6.3.1.2), which pydicom 2.4's numpy handler expands back on reading.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixel_data_handlers.util import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
CALIBRATIONS = ("us_region", "pixel_spacing", "imager_pixel_spacing", "none")
PHOTOMETRICS = ("MONOCHROME2", "RGB", "YBR_FULL_422", "YBR_FULL", "PALETTE COLOR")
FRAME_TIME_MS = 33.3


def _ds_str(value: float) -> str:
    """DS strings hold at most 16 characters; 10 significant digits fit any sane spacing."""
    return f"{value:.10g}"


def _region(box, delta_x: float, delta_y: float, *, data_type=1, spatial_format=1, units=(3, 3)) -> Dataset:
    """One SequenceOfUltrasoundRegions item; box = (x0, y0, x1, y1) inclusive pixel bounds."""
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = spatial_format, data_type, 0
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = map(int, box)
    r.PhysicalUnitsXDirection, r.PhysicalUnitsYDirection = units
    r.ReferencePixelX0 = r.ReferencePixelY0 = 0
    r.ReferencePixelPhysicalValueX = r.ReferencePixelPhysicalValueY = 0.0
    r.PhysicalDeltaX, r.PhysicalDeltaY = float(delta_x), float(delta_y)
    return r


def us_regions(shape: tuple[int, int], spacing_mm: tuple[float, float], extra: bool = False) -> list[Dataset]:
    """One tissue region over the whole image, or with ``extra`` a dual-view layout:

    left 2/3: main 2-D tissue region at ``spacing_mm``; top right: a second 2-D tissue view at 1.5x the
    spacing (a zoomed-out view); bottom right: a PW Doppler strip (seconds x cm/s, not a spatial region).
    """
    h, w = shape
    row_cm, col_cm = spacing_mm[0] / 10, spacing_mm[1] / 10
    if not extra:
        return [_region((0, 0, w - 1, h - 1), col_cm, row_cm)]
    split = w * 2 // 3
    return [_region((0, 0, split - 1, h - 1), col_cm, row_cm),
            _region((split, 0, w - 1, h // 2 - 1), 1.5 * col_cm, 1.5 * row_cm),
            _region((split, h // 2, w - 1, h - 1), 0.01, 1.0, data_type=3, spatial_format=3, units=(4, 7))]


def _pixel_module(ds: Dataset, frames: np.ndarray, photometric: str) -> None:
    """Encode (F, H, W, 3) RGB uint8 frames as ``photometric`` into ds."""
    # OpenCV's RGB2GRAY in its exact fixed-point form (BT.601, 15-bit), without OpenCV (Slicer has none)
    f = frames.astype(np.uint32)
    grey = ((f[..., 0] * 9798 + f[..., 1] * 19235 + f[..., 2] * 3735 + 16384) >> 15).astype(np.uint8)
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1 if photometric in ("MONOCHROME2", "PALETTE COLOR") else 3
    if photometric == "MONOCHROME2":
        data = grey
    elif photometric == "PALETTE COLOR":
        # A grey ramp palette with 16-bit entries (the usual kind), so grey -> index -> grey is lossless.
        lut = (np.arange(256, dtype="<u2") * 257).tobytes()
        for colour in ("Red", "Green", "Blue"):
            ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
            ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut)
        data = grey
    elif photometric == "RGB":
        data = frames
    else:
        data = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in frames])
        if photometric == "YBR_FULL_422":
            if data.shape[2] % 2:
                raise ValueError("YBR_FULL_422 needs an even number of columns")
            y, chroma = data[..., 0], data[..., 1:].astype(np.uint16)
            pairs = (chroma[:, :, 0::2] + chroma[:, :, 1::2] + 1) // 2  # horizontal 2:1 chroma average
            data = np.stack([y[:, :, 0::2], y[:, :, 1::2], pairs[..., 0], pairs[..., 1]], -1).astype(np.uint8)
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds["PixelData"].VR = "OB"


def write_us_dicom(path, pixels, spacing_mm: tuple[float, float] | None, *, calibration: str = "us_region",
                   photometric: str = "MONOCHROME2", frames: int = 1, patient_id: str = "FETALHC-DEMO",
                   patient_name: str = "Demo^Fetal", study_uid: str | None = None, series_uid: str | None = None,
                   sop_uid: str | None = None, description: str = "", extra_regions: bool = False) -> Path:
    """Write ``pixels`` (H, W) grey or (H, W, 3) RGB uint8 as an ultrasound DICOM file.

    ``spacing_mm`` is (row_mm, col_mm). Frame k of a multi-frame file is the image rolled k pixels to
    the right, so that a test can tell which frame it got.
    """
    img = np.asarray(pixels)
    if img.dtype != np.uint8 or not (img.ndim == 2 or img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(f"pixels must be (H, W) or (H, W, 3) uint8, got {img.dtype} {img.shape}")
    if calibration not in CALIBRATIONS or photometric not in PHOTOMETRICS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, photometric one of {PHOTOMETRICS}")
    if calibration != "none" and (spacing_mm is None or min(spacing_mm) <= 0):
        raise ValueError(f"calibration {calibration!r} needs a positive spacing_mm (row_mm, col_mm)")
    if frames < 1:
        raise ValueError("frames must be >= 1")
    rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
    h, w = rgb.shape[:2]
    sop_class = US_MULTIFRAME_STORAGE if frames > 1 else US_IMAGE_STORAGE
    sop_uid = sop_uid or generate_uid()
    now = _dt.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID, meta.ImplementationVersionName = PYDICOM_IMPLEMENTATION_UID, "FETALHC"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY", "", "0001"]  # value 4 0001 = 2-D imaging
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.Modality, ds.Manufacturer = "US", "FetalHC synthetic"
    ds.StudyDescription = ds.SeriesDescription = description
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ""
    ds.LossyImageCompression = "00"
    ds.Rows, ds.Columns = h, w
    if frames > 1:
        ds.NumberOfFrames, ds.FrameTime = frames, _ds_str(FRAME_TIME_MS)
        ds.FrameIncrementPointer = 0x00181063  # -> FrameTime
        ds.CineRate = round(1000 / FRAME_TIME_MS)
    stack = np.stack([np.roll(rgb, k, axis=1) for k in range(frames)])

    if calibration == "pixel_spacing":
        ds.PixelSpacing = [_ds_str(v) for v in spacing_mm]
    elif calibration == "imager_pixel_spacing":
        ds.ImagerPixelSpacing = [_ds_str(v) for v in spacing_mm]
    elif calibration == "us_region":
        ds.SequenceOfUltrasoundRegions = Sequence(us_regions((h, w), spacing_mm, extra_regions))
    _pixel_module(ds, stack, photometric)
    ds.save_as(str(path), write_like_original=False)
    return Path(path)
