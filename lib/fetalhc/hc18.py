"""HC18 challenge data: reader, ground-truth masks, exam-grouped split, COCO export.

Data: van den Heuvel et al., PLoS ONE 13(8): e0200412, 2018; Zenodo 10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .geometry import Ellipse, ellipse_mask, fit_annotation

TRAIN_CSV = "training_set_pixel_size_and_HC.csv"
TEST_CSV = "test_set_pixel_size.csv"


@dataclass(frozen=True)
class Record:
    name: str  # e.g. "010_2HC.png"
    image: Path
    annotation: Path | None
    pixel_mm: float
    hc_mm: float | None

    @property
    def exam(self) -> str:
        """Frames of one examination share the number before the first underscore."""
        return exam_of(self.name)


def exam_of(name: str) -> str:
    return Path(name).name.split("_")[0]


def _find(root: Path, *names: str) -> Path:
    for n in names:
        for p in (root / n, root.parent / n):
            if p.exists():
                return p
    raise FileNotFoundError(f"none of {names} found in {root} or its parent")


def read_records(root: str | Path, split: str = "training") -> list[Record]:
    """Records of ``<root>/{training,test}_set`` (or a flat folder holding the images and CSV)."""
    root = Path(root)
    csv_path = _find(root, TRAIN_CSV if split == "training" else TEST_CSV)
    img_dir = root / f"{split}_set" if (root / f"{split}_set").is_dir() else csv_path.parent
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            name = row["filename"]
            ann = img_dir / name.replace(".png", "_Annotation.png")
            hc = row.get("head circumference (mm)")
            out.append(Record(name, img_dir / name, ann if ann.exists() else None,
                              float(row["pixel size(mm)"]), float(hc) if hc else None))
    return out


def read_grey(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return img


def gt_ellipse(rec: Record) -> Ellipse:
    """Ground-truth ellipse in pixels, fitted to every pixel of the drawn outline."""
    if rec.annotation is None:
        raise ValueError(f"{rec.name} has no annotation")
    return fit_annotation(read_grey(rec.annotation) > 127)


def gt_mask(rec: Record, shape: tuple[int, int] | None = None) -> np.ndarray:
    shape = shape or read_grey(rec.image).shape
    return ellipse_mask(gt_ellipse(rec), shape)


def grouped_split(items: list, group_of, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Seeded split by group: no group has members on both sides. A positive fraction holds out at least
    one group while another remains for training; a zero fraction holds out nothing."""
    groups = sorted({group_of(x) for x in items})
    random.Random(seed).shuffle(groups)
    n_val = min(max(1, round(len(groups) * val_fraction)), len(groups) - 1) if val_fraction > 0 else 0
    val_groups = set(groups[:n_val])
    return [x for x in items if group_of(x) not in val_groups], [x for x in items if group_of(x) in val_groups]


def exam_split(names: list[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """HC18 split: frames of one examination never straddle training and validation."""
    return grouped_split(names, exam_of, val_fraction, seed)


def mask_polygon(mask: np.ndarray) -> list[float]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(contours, key=cv2.contourArea)
    return [float(v) for v in c.reshape(-1)]


def export_coco(records: list[Record], out_json: str | Path) -> dict:
    """COCO instance-segmentation file (one 'fetal_head' per image), as the thesis trained from."""
    images, anns = [], []
    for i, rec in enumerate(records, 1):
        h, w = read_grey(rec.image).shape
        images.append({"id": i, "file_name": rec.name, "height": h, "width": w, "pixel_size_mm": rec.pixel_mm})
        if rec.annotation is None:
            continue
        m = gt_mask(rec, (h, w))
        ys, xs = np.nonzero(m)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": int(m.sum()),
                     "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                     "segmentation": [mask_polygon(m)]})
    coco = {"info": {"description": "HC18 fetal head (CC BY 4.0, doi:10.5281/zenodo.1322001)"},
            "licenses": [{"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
            "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "fetal_head", "supercategory": "head"}]}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(coco))
    return coco
