"""Results back to PACS as standard DICOM (pure Python, highdicom): a SEG for the head mask and a TID 1500
measurement report (Enhanced SR) for HC / BPD / OFD, the ellipse, the Hadlock GA and the QC verdict.

Codes are DICOM's own (PS3.16, from pydicom's code dictionary), none invented:
- segment: category SCT 123037004 "Anatomical Structure" (CID 7150), type SCT 69536005 "Head" (CID 7151;
  PS3.16 has no separate fetal-head concept), label "Fetal head"; the SR's subject context is the fetus.
- measurements: LOINC 11984-2 HC, 11820-8 BPD, 11851-3 OFD (CID 12005 fetal biometry) in UCUM "mm";
  GA LOINC 18185-9 in UCUM "wk" with method LOINC 11932-1 "HC, Hadlock 1984" (CID 12013).
- QC: DCM 111050 "Quality Assessment" = DCM 111237 / 111236 "Usable - (does not) meet the quality control
  standard" (CID 6044), the reasons as a TEXT "Comment"; the spacing source as a TEXT "Calibration".

The ellipse is a SCOORD ELLIPSE on the source image: major-axis end points, then minor-axis end points, as
(column, row). DICOM puts 0.0\\0.0 at the top-left corner of the first pixel, fetalhc.geometry at its
centre, hence the half-pixel shift (and back in :func:`read_sr`).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from . import __version__

NOT_DICOM = "DICOM output needs a DICOM input"
FETAL_HEAD_LABEL = "Fetal head"
CATEGORY = codes.cid7150.AnatomicalStructure  # SCT 123037004
PROPERTY = codes.cid7151.Head  # SCT 69536005
HC, BPD, OFD = codes.LN.HeadCircumference, codes.LN.BiparietalDiameter, codes.LN.OccipitalFrontalDiameter
GA, HADLOCK_HC = codes.LN.GestationalAge, codes.LN.HCHadlock1984
QC_NAME = codes.DCM.QualityAssessment
QC_PASS, QC_FAIL = codes.DCM.UsableMeetsTheQualityControlStandard, codes.DCM.UsableDoesNotMeetTheQualityControlStandard
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 901, 902  # fixed, so PACS viewers sort FetalHC results after the images
MANUFACTURER = "FetalHC"


class DicomOutError(ValueError):
    """A result that cannot become DICOM (not a DICOM source, wrong label shape, nothing to report)."""


def read_source(path) -> Dataset:
    """The source ultrasound instance (with pixels, so highdicom can check the frame geometry)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        try:
            ds = pydicom.dcmread(str(path))
        except InvalidDicomError:  # no preamble (some PACS exports): a DICOM only if it reads as one
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(path), force=True)
    except Exception as exc:  # anything pydicom cannot parse is simply not DICOM here
        raise DicomOutError(f"{Path(path).name}: {NOT_DICOM} ({type(exc).__name__})") from None
    if not all(k in ds for k in ("SOPClassUID", "StudyInstanceUID", "Rows", "PixelData")):
        raise DicomOutError(f"{Path(path).name}: {NOT_DICOM} (not a DICOM image instance)")
    return ds


def _frames(source: Dataset) -> int:
    return int(source.get("NumberOfFrames", 1) or 1)


def check_label(source: Dataset, mask: np.ndarray, frame: int = 0) -> np.ndarray:
    """The label as a (H, W) bool array, refused unless it matches the source frame."""
    m = np.asarray(mask)
    shape = (int(source.Rows), int(source.Columns))
    if m.ndim != 2 or m.shape != shape:
        raise DicomOutError(f"label is {' x '.join(map(str, m.shape))} pixels but the source image frame is "
                            f"{shape[0]} x {shape[1]}")
    if not 0 <= frame < _frames(source):
        raise DicomOutError(f"frame {frame} does not exist: the source has {_frames(source)} frame(s)")
    if not m.any():
        raise DicomOutError("label is empty: no fetal head to store")
    return m > 0


def _algorithm(model_version: str):
    from highdicom import AlgorithmIdentificationSequence
    return AlgorithmIdentificationSequence(name="FetalHC", family=codes.DCM.ArtificialIntelligence,
                                           version=model_version or __version__)


def write_seg(source: Dataset, mask: np.ndarray, out_path=None, *, frame: int = 0, model_version: str = "",
              segmentation: str = "AUTOMATIC", series_uid: str | None = None) -> Dataset:
    """Binary DICOM SEG of the fetal head on ``frame`` of ``source``.

    ``segmentation``: AUTOMATIC (the AI mask: algorithm FetalHC ``model_version``), SEMIAUTOMATIC (an AI mask
    a clinician corrected: same algorithm) or MANUAL (drawn by hand: no algorithm).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    binary = check_label(source, mask, frame)
    kind = hd.seg.SegmentAlgorithmTypeValues(str(segmentation).upper())
    algorithm = None if kind == hd.seg.SegmentAlgorithmTypeValues.MANUAL else _algorithm(model_version)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=FETAL_HEAD_LABEL, segmented_property_category=CATEGORY,
        segmented_property_type=PROPERTY, algorithm_type=kind, algorithm_identification=algorithm,
        tracking_uid=generate_uid(), tracking_id="fetal head")
    seg = hd.seg.Segmentation(
        source_images=[_one_frame(source)], pixel_array=binary,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=series_uid or generate_uid(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="FetalHC",
        software_versions=_software(model_version), device_serial_number="0",
        series_description=f"FetalHC fetal head ({kind.value.lower()})", content_label="FETAL_HEAD",
        content_description="Fetal head mask for head circumference")
    if "PatientOrientation" not in seg and "SharedFunctionalGroupsSequence" in seg \
            and "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        seg.PatientOrientation = source.get("PatientOrientation", "")  # Type 2C without a patient frame
    if _frames(source) > 1:  # the SEG frame is derived from one frame of the cine
        for item in seg.PerFrameFunctionalGroupsSequence:
            for d in item.DerivationImageSequence:
                for ref in d.SourceImageSequence:
                    ref.ReferencedFrameNumber = frame + 1
    if out_path is not None:
        seg.save_as(str(out_path))
    return seg


def _one_frame(source: Dataset) -> Dataset:
    """Header of a cine as if it had one frame: highdicom 0.22 segments multi-frame images only when they
    have a frame of reference, which ultrasound has not; the frame number is put into the references after."""
    if _frames(source) == 1:
        return source
    view = Dataset()
    for elem in source:
        if elem.keyword not in ("NumberOfFrames", "FrameIncrementPointer", "FrameTime", "PixelData"):
            view.add(elem)
    view.file_meta = getattr(source, "file_meta", Dataset())
    return view


def _software(model_version: str):
    return f"fetalhc {__version__}, model {model_version}"[:64] if model_version else f"fetalhc {__version__}"


def ellipse_points(ellipse_px: dict) -> np.ndarray:
    """(4, 2) SCOORD ELLIPSE data (column, row): major-axis end points, then minor-axis end points."""
    cx, cy, a, b, t = (float(ellipse_px[k]) for k in ("cx", "cy", "a", "b", "angle"))
    u, v = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    c = np.array([cx, cy]) + 0.5
    return np.stack([c + a * u, c - a * u, c + b * v, c - b * v]).astype(np.float32)


def write_sr(source: Dataset, result: dict, out_path=None, *, frame: int = 0, manual: bool = False,
             series_uid: str | None = None) -> Dataset:
    """TID 1500 measurement report of one pipeline result (``Measurement.to_dict()``) on ``frame``.

    ``manual``: the measurement was fitted to a clinician's mask, not to the AI's (said in the report).
    Millimetre values only where the result has them (i.e. a known spacing source).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    if hasattr(result, "to_dict"):
        result = result.to_dict()
    if not result.get("ellipse_px"):
        raise DicomOutError(f"no head ellipse to report ({result.get('qc') or 'no head found'})")
    if not 0 <= frame < _frames(source):
        raise DicomOutError(f"frame {frame} does not exist: the source has {_frames(source)} frame(s)")
    version = result.get("model_version") or ""
    algorithm = hd.sr.AlgorithmIdentification(name="FetalHC", version=version or __version__)
    frames = [frame + 1] if _frames(source) > 1 else None
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE, graphic_data=ellipse_points(result["ellipse_px"]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source, frames))
    mm = hd.sr.CodedConcept.from_code(codes.UCUM.Millimeter)
    # Values as the result gives them (to_dict rounds to 0.001), so the SR reads back exactly.
    measurements = [hd.sr.Measurement(name=name, value=round(float(result[key]), 3), unit=mm, algorithm_id=algorithm)
                    for name, key in ((HC, "hc_mm"), (BPD, "bpd_mm"), (OFD, "ofd_mm")) if result.get(key) is not None]
    if result.get("ga_valid") and result.get("ga_weeks") is not None:
        measurements.append(hd.sr.Measurement(name=GA, value=round(float(result["ga_weeks"]), 3),
                                              unit=codes.UCUM.Week, method=HADLOCK_HC, algorithm_id=algorithm))
    qc = hd.sr.QualitativeEvaluation(QC_NAME, QC_PASS if result.get("qc_ok") else QC_FAIL)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="fetal head ellipse"),
        referenced_region=region, finding_type=PROPERTY, finding_category=CATEGORY, algorithm_id=algorithm,
        measurements=measurements or None, qualitative_evaluations=[qc])
    texts = [(codes.DCM.Comment, f"QC: {result.get('qc') or 'OK'}"),
             (codes.DCM.Comment, "ellipse fitted to a clinician-corrected mask" if manual else
              "ellipse fitted to the AI mask"),
             (codes.DCM.Calibration, f"pixel spacing: {result.get('spacing_source') or 'unknown (no mm values)'}")]
    for name, value in texts:
        group[0].ContentSequence.append(hd.sr.TextContentItem(name=name, value=value[:1024],
                                                              relationship_type="CONTAINS"))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="FetalHC", model_name=version or f"fetalhc {__version__}"))
    context = hd.sr.ObservationContext(
        observer_device_context=observer,
        subject_context=hd.sr.SubjectContext(subject_class=codes.DCM.Fetus,
                                             subject_class_specific_context=hd.sr.SubjectContextFetus("1")))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                     imaging_measurements=[group])
    sr = hd.sr.EnhancedSR(
        evidence=[source], content=report[0], series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, series_description="FetalHC head circumference", is_complete=True,
        is_final=False)
    if out_path is not None:
        sr.save_as(str(out_path))
    return sr


# ---------------------------------------------------------------------------------------- read back

@dataclass
class SegLabel:
    mask: np.ndarray  # uint8 (H, W), 1 = fetal head
    frame: int  # 0-based frame of the source
    source_sop_instance_uid: str
    source_series_uid: str


def read_seg(seg) -> SegLabel:
    """The fetal-head mask of a SEG (path or dataset), decoded by highdicom, on its source frame."""
    import highdicom as hd
    import pydicom

    ds = copy.deepcopy(seg) if isinstance(seg, Dataset) else pydicom.dcmread(str(seg))
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    measures = shared[0].get("PixelMeasuresSequence")
    if measures and "SliceThickness" not in measures[0]:
        # highdicom 0.22 writes 2-D pixel measures without a slice thickness (right for ultrasound) but
        # cannot parse them back; only pixels and references are read here.
        del shared[0].PixelMeasuresSequence
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    numbers = seg.get_segment_numbers(segment_label=FETAL_HEAD_LABEL) or [1]
    ref = seg.ReferencedSeriesSequence[0]
    uid = str(ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
    src = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    frame_no = int(src.get("ReferencedFrameNumber", 1) or 1)
    if "ReferencedFrameNumber" in src:
        px = seg.get_pixels_by_source_frame(uid, [frame_no], segment_numbers=numbers[:1], combine_segments=True,
                                            ignore_spatial_locations=True)
    else:
        px = seg.get_pixels_by_source_instance([uid], segment_numbers=numbers[:1], combine_segments=True,
                                               ignore_spatial_locations=True)
    return SegLabel(np.ascontiguousarray(px[0] > 0, np.uint8), frame_no - 1, uid, str(ref.SeriesInstanceUID))


def read_sr(sr) -> dict:
    """HC/BPD/OFD (mm), GA (weeks), QC and the ellipse (fetalhc pixel convention) from a FetalHC SR."""
    import highdicom as hd
    import pydicom

    ds = sr if isinstance(sr, Dataset) else pydicom.dcmread(str(sr))
    report = hd.sr.EnhancedSR.from_dataset(ds, copy=False)
    groups = report.content.get_planar_roi_measurement_groups()
    if not groups:
        raise DicomOutError("SR has no planar ROI measurement group")
    g = groups[0]
    out: dict = {}
    for key, code in (("hc_mm", HC), ("bpd_mm", BPD), ("ofd_mm", OFD), ("ga_weeks", GA)):
        found = g.get_measurements(name=code)
        out[key] = float(found[0].value) if found else None
    qc = g.get_qualitative_evaluations(name=QC_NAME)
    out["qc_ok"] = bool(qc) and qc[0].value == QC_PASS
    notes = (codes.DCM.Comment.value, codes.DCM.Calibration.value)
    out["texts"] = [str(i.TextValue) for i in g[0].ContentSequence
                    if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue in notes]
    out["ellipse_points_px"] = np.asarray(g.roi.value, float) - 0.5
    image = g.roi.ContentSequence[0].ReferencedSOPSequence[0]  # the SELECTED FROM image item
    out["source_sop_instance_uid"] = str(image.ReferencedSOPInstanceUID)
    frames = image.get("ReferencedFrameNumber")
    out["frame"] = int(frames[0] if isinstance(frames, MultiValue) else frames) - 1 if frames else 0
    return out
