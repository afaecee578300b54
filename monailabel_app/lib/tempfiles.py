"""Per-request temp folders: no upload, accepted or rejected, outlives its request.

MONAI Label's endpoints write every upload (infer image/label, ``PUT /datastore/image|label``) and the
dataset zip to ``tempfile`` names and remove them only when the request succeeds. The server therefore
gives each HTTP request its own folder under ``<root>`` (``tempfile``'s default directory while the
request runs, through a context variable, so concurrent requests never share one) and removes the folder
when the response has been sent, whatever its status. Request folders left in the root are removed when
the server starts, which clears what a crashed server left behind. Work outside a request (background threads, the training
subprocess) keeps the system temp folder.
"""
from __future__ import annotations

import contextvars
import logging
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)
_current: contextvars.ContextVar[Path | None] = contextvars.ContextVar("fetalhc_request_tmp", default=None)
_system_gettempdir = tempfile.gettempdir
_live: set[Path] = set()
PREFIX = "req-"  # only folders with this prefix are ever removed, whatever folder the root is
ROOT: Path | None = None


def _gettempdir() -> str:
    folder = _current.get()
    return str(folder) if folder is not None else _system_gettempdir()


def configure(root: str | Path) -> Path:
    """Use ``root`` for request folders (created; request folders not in use removed) and hook ``tempfile``."""
    global ROOT
    ROOT = Path(root).resolve()
    ROOT.mkdir(parents=True, exist_ok=True)
    stale = [p for p in ROOT.glob(f"{PREFIX}*") if p not in _live and p.is_dir() and not p.is_symlink()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        logger.info(f"removed {len(stale)} stale temp entries from {ROOT}")
    # tempfile resolves its default folder through this module function on every call (mkstemp,
    # NamedTemporaryFile, TemporaryFile, mkdtemp), so this reaches MONAI Label's endpoints unchanged.
    tempfile.gettempdir = _gettempdir
    return ROOT


def request_folder() -> Path | None:
    return _current.get()


def is_request_file(path) -> bool:
    """True for a file inside the current request's own folder (the upload of this very request)."""
    folder = _current.get()
    if folder is None or not isinstance(path, str) or not path:
        return False
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    return real.is_relative_to(folder) and real.is_file()


def is_upload_name(path) -> bool:
    """A path under the temp root: its name means nothing to the client."""
    try:
        return ROOT is not None and Path(path).resolve().is_relative_to(ROOT)
    except (OSError, RuntimeError):
        return False


class RequestTempMiddleware:
    """ASGI middleware: one temp folder per HTTP request, removed after the response (and its background
    tasks) whatever the outcome."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or ROOT is None:
            return await self.app(scope, receive, send)
        folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=ROOT))
        _live.add(folder)
        token = _current.set(folder)
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
            shutil.rmtree(folder, ignore_errors=True)
            _live.discard(folder)
