"""The served model file: first-start copy of the shipped default, and atomic publishing.

Readers (the infer task's ``fetalhc.pipeline.Measurer``) open ``<model_dir>/fetal_head.pt`` by name and
reload when its (mtime, size, inode) changes. Publishing writes a temp file in the same folder, fsyncs
it and renames it over the old one, so a reader sees the old or the new file, never half of one.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


FILE_MODE = 0o666 & ~_umask()  # what open() gives new files (images written by MONAI Label, 0644 usually)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files; labels and models get the images' mode
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def ensure_initial_model(initial: Path, published: Path) -> bool:
    """Copy the shipped model to the app's model folder on first start (the shipped file is never written)."""
    if published.is_file():
        return True
    if not initial.is_file():
        logger.warning(f"no model to serve: {published} is missing and the initial model {initial} does not exist; "
                       "infer is disabled until a training run publishes one")
        return False
    logger.info(f"first start: copying the initial model {initial} -> {published}")
    atomic_copy(initial, published)
    return True


def publish(candidate: str | Path, published: Path) -> None:
    """Keep the previous model as ``<name>.prev.pt`` (for roll-back), then swap the new one in atomically."""
    if published.is_file():
        atomic_copy(published, published.with_suffix(".prev.pt"))
    atomic_copy(candidate, published)
    logger.info(f"published {candidate} -> {published}")
