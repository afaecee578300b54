"""Final labels: validation as a head mask of this task, and versions of every replaced label.

A final label trains the next model, so garbage (an empty mask, the ultrasound image itself, a second
blob) is refused with 422 and the reason. Checks use ``fetalhc.geometry`` (the one place for components
and ellipses). Every final label that a save, restore or delete replaces is first kept as a version in
``<studies>/label_versions/<tag>/<image id>/<version><ext>`` with ``<version>.json`` (its datastore info),
so nothing a clinician saved is lost; versions are listed and restored over the API (README.md).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from fetalhc.geometry import ellipse_agreement, fit_points, largest_component, region_boundary

from lib.inputs import check_id, http_error, suffix_of
from lib.publish import atomic_copy

MIN_AREA, MAX_AREA = 0.002, 0.9  # fraction of the image: HC18 heads cover about 1-60 %
MIN_ELLIPSE_DICE = 0.9  # hand-drawn outlines are less regular than the model's masks (QC uses 0.97)
MIN_AXIS_RATIO = 0.4  # b / a; the QC flags below 0.55 as unusual
VERSIONS_DIR = "label_versions"


def head_mask_problems(pixels: np.ndarray) -> list[str]:
    """Why ``pixels`` is not a plausible fetal head mask (empty list when it is one)."""
    values = np.unique(pixels)
    if len(values) > 2 or values.min() != 0:
        return [f"not a binary mask: {len(values)} distinct values (a label has 0 = background and one "
                "head value; was an image uploaded instead of its label?)"]
    mask = pixels > 0
    if not mask.any():
        return ["empty mask: no head pixels"]
    head = largest_component(mask)
    problems = []
    if (mask & ~head).any():
        problems.append("more than one region: a head mask is one connected, filled region")
    area = float(head.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        problems.append(f"head area {100 * area:.2f} % of the image is outside {100 * MIN_AREA:g}-{100 * MAX_AREA:g} %")
    pts = region_boundary(head)
    if len(pts) < 5:
        return problems + ["mask too small to fit an ellipse"]
    ell = fit_points(pts)
    agreement = ellipse_agreement(mask, ell)
    if agreement < MIN_ELLIPSE_DICE:
        problems.append(f"not elliptical: Dice {agreement:.2f} with its fitted ellipse (< {MIN_ELLIPSE_DICE})")
    if ell.b / ell.a < MIN_AXIS_RATIO:
        problems.append(f"implausible head shape: axis ratio {ell.b / ell.a:.2f} (< {MIN_AXIS_RATIO})")
    return problems


def check_head_mask(pixels: np.ndarray) -> None:
    problems = head_mask_problems(pixels)
    if problems:
        raise http_error(422, "final label rejected, the saved label is unchanged: " + "; ".join(problems))


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LabelVersions:
    """Replaced labels, one folder per (tag, image); a version is never overwritten or removed."""

    def __init__(self, studies: str | Path):
        self.root = Path(studies) / VERSIONS_DIR

    def _folder(self, image_id: str, tag: str) -> Path:
        return self.root / check_id(tag, "label tag") / check_id(image_id)

    def keep(self, image_id: str, tag: str, label_file: str | Path, info: dict | None) -> str:
        """Copy ``label_file`` (the label about to be replaced) into a new version; returns its id."""
        folder = self._folder(image_id, tag)
        folder.mkdir(parents=True, exist_ok=True)
        ext = suffix_of(label_file) or "".join(Path(label_file).suffixes)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")
        version, n = stamp, 1
        while any(folder.glob(f"{version}.*")):
            version, n = f"{stamp}-{n}", n + 1
        atomic_copy(label_file, folder / f"{version}{ext}")
        meta = {"version": version, "image": image_id, "tag": tag, "ext": ext, "sha256": _sha256(label_file),
                "replaced": stamp, "info": info or {}}
        tmp = folder / f".{version}.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, folder / f"{version}.json")
        return version

    def list(self, image_id: str, tag: str) -> list[dict]:
        folder = self._folder(image_id, tag)
        out = []
        for meta in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                out.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def file(self, image_id: str, tag: str, version: str) -> tuple[Path, dict]:
        check_id(version, "version")
        meta = next((m for m in self.list(image_id, tag) if m.get("version") == version), None)
        path = self._folder(image_id, tag) / f"{version}{meta['ext']}" if meta else None
        if path is None or not path.is_file():
            raise http_error(404, f"no version {version!r} of the {tag} label of {image_id!r}; "
                                  f"GET /datastore/label/versions?image={image_id} lists them")
        return path, meta
