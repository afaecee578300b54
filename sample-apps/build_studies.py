"""Build the demo studies from the shipped HC18 images (CC BY 4.0, van den Heuvel et al. 2018, see README.md).

    python sample-apps/build_studies.py [--out DIR] [--images 083_2HC.png 399_HC.png ...]

writes, from each PNG and its row of the HC18 CSV (pixel size, expert HC):

* ``DIR/studies/``: a MONAI Label folder datastore. Half of the images as PNG, with the pixel size in the
  sidecar ``pixel_size.csv`` (HC18 columns, the app finds ``*pixel_size*.csv`` by itself); the other half
  as NIfTI ``.nii.gz`` with the spacing (mm) in the header, no sidecar row needed.
* ``DIR/dicom/``: every image as Ultrasound Image Storage calibrated through SequenceOfUltrasoundRegions
  (PhysicalDeltaX/Y in cm), plus three variants of other images: PixelSpacing, colour YBR_FULL_422, and a
  3-frame cine (Ultrasound Multi-frame; frame 0 is the original image).
* ``DIR/manifest.csv``: one row a file with its store, study id (datastore image id: file stem or DICOM
  SeriesInstanceUID), calibration, pixel size and the expert HC from the CSV, i.e. the HC to expect.

UIDs are derived from the image name and variant, so a rebuild gives the same ids. Default DIR:
``sample-apps/`` (``studies/``, ``dicom/`` and ``manifest.csv`` there are git-ignored).
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from fetalhc import hc18
from fetalhc.dicomgen import write_us_dicom
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample-data" / "hc18"
IMAGES = ("083_2HC.png", "399_HC.png", "713_HC.png", "745_HC.png")  # four exams, HC 88-303 mm
# (calibration, photometric, frames) of the DICOM files; the variants go to the 2nd, 3rd and 4th image
DICOM_BASE = ("us_region", "MONOCHROME2", 1)
DICOM_VARIANTS = (("pixel_spacing", "MONOCHROME2", 1), ("us_region", "YBR_FULL_422", 1),
                  ("us_region", "MONOCHROME2", 3))
SIDECAR = "pixel_size.csv"
CREDIT = ("HC18, van den Heuvel et al., PLoS ONE 13(8): e0200412, 2018, doi:10.5281/zenodo.1322001, "
          "CC BY 4.0")


@dataclass
class Study:
    file: str  # relative to the output folder
    store: str  # folder | dicom
    study_id: str  # the datastore image id
    image: str  # HC18 file name
    calibration: str
    photometric: str
    frames: int
    pixel_size_mm: float
    hc_mm_csv: float


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["fetalhc-sample-apps", *map(str, parts)])


def _write_nifti(path: Path, pixels: np.ndarray, mm: float) -> None:
    """(H, W) -> NIfTI array[i=x, j=y] with the spacing in the affine and units mm (fetalhc.io's layout)."""
    img = nib.Nifti1Image(np.ascontiguousarray(pixels.T), np.diag([mm, mm, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _folder_studies(out: Path, recs: list[hc18.Record]) -> list[Study]:
    folder = out / "studies"
    folder.mkdir(parents=True, exist_ok=True)
    rows, studies = [], []
    for k, rec in enumerate(recs):
        stem, pixels = Path(rec.name).stem, hc18.read_grey(rec.image)
        if k < (len(recs) + 1) // 2:  # PNG (the file as shipped) + a sidecar row
            name, calibration = rec.name, f"sidecar {SIDECAR}"
            (folder / name).write_bytes(rec.image.read_bytes())
            rows.append([name, rec.pixel_mm, rec.hc_mm])
        else:
            name, calibration = f"{stem}.nii.gz", "NIfTI header"
            _write_nifti(folder / name, pixels, rec.pixel_mm)
        studies.append(Study(f"studies/{name}", "folder", stem, rec.name, calibration, "MONOCHROME2", 1,
                             rec.pixel_mm, rec.hc_mm))
    with open(folder / SIDECAR, "w", newline="") as f:
        csv.writer(f).writerows([["filename", "pixel size(mm)", "head circumference (mm)"], *rows])
    return studies


def _dicom_studies(out: Path, recs: list[hc18.Record]) -> list[Study]:
    folder = out / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(rec, DICOM_BASE) for rec in recs]
    jobs += [(recs[(k + 1) % len(recs)], v) for k, v in enumerate(DICOM_VARIANTS)]
    studies = []
    for rec, (calibration, photometric, frames) in jobs:
        stem = Path(rec.name).stem
        tag = "_".join(p for p in (calibration, "ybr" if photometric != "MONOCHROME2" else "",
                                   f"cine{frames}" if frames > 1 else "") if p)
        name, series = f"{stem}_{tag}.dcm", _uid(rec.name, tag, "series")
        write_us_dicom(folder / name, hc18.read_grey(rec.image), (rec.pixel_mm, rec.pixel_mm),
                       calibration=calibration, photometric=photometric, frames=frames,
                       patient_id=f"HC18-{stem}", patient_name=f"HC18^{stem}", study_uid=_uid(rec.name, tag),
                       series_uid=series, sop_uid=_uid(rec.name, tag, "sop"),
                       description=f"HC18 {stem} {tag} (CC BY 4.0)")
        studies.append(Study(f"dicom/{name}", "dicom", series, rec.name, calibration, photometric, frames,
                             rec.pixel_mm, rec.hc_mm))
    return studies


def build(out: str | Path = HERE, images=IMAGES, samples: str | Path = SAMPLES) -> list[Study]:
    """Write studies/, dicom/ and manifest.csv under ``out``; return the manifest rows."""
    out = Path(out)
    by_name = {r.name: r for r in hc18.read_records(samples)}
    missing = [n for n in images if n not in by_name]
    if missing:
        raise SystemExit(f"not in {samples}: {', '.join(missing)}")
    recs = [by_name[n] for n in images]
    studies = _folder_studies(out, recs) + _dicom_studies(out, recs)
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(studies[0])))
        w.writeheader()
        w.writerows(asdict(s) for s in studies)
    return studies


def read_manifest(path: str | Path) -> list[Study]:
    with open(path, newline="") as f:
        return [Study(**{**row, "frames": int(row["frames"]), "pixel_size_mm": float(row["pixel_size_mm"]),
                         "hc_mm_csv": float(row["hc_mm_csv"])}) for row in csv.DictReader(f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE), help="output folder (default: %(default)s)")
    ap.add_argument("--images", nargs="+", default=list(IMAGES), help="HC18 file names from sample-data/hc18")
    args = ap.parse_args(argv)
    studies = build(args.out, args.images)
    for s in studies:
        print(f"{s.file:45s} {s.calibration:22s} {s.photometric:12s} {s.frames} frame(s)  "
              f"{s.pixel_size_mm:.4f} mm/px  expert HC {s.hc_mm_csv:.1f} mm")
    print(f"{len(studies)} files and manifest.csv in {args.out}. Images: {CREDIT}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
