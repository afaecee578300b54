"""The measurement core the module shares with lib/fetalhc: ``geometry``, ``clinical``, ``io``, ``result``.

Imported, never re-implemented, so Slicer and the server measure with the same code. Where the
``fetalhc`` package comes from, first match wins:

1. an importable ``fetalhc`` (development, the tests, a Slicer where it was installed);
2. ``FetalHCLib/_vendor/fetalhc``: copies of the files in ``shared_modules.txt`` made by the extension
   build (CMake) or by ``slicer_extension/tools/vendor_fetalhc.py``;
3. ``lib/`` of the source checkout this file lives in (module folder added straight from a git clone).

These modules need only numpy and pydicom, which Slicer ships (5.8+: numpy 2.x, pydicom 3.x); nothing
is pip-installed into Slicer's Python.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_LIST = HERE / "shared_modules.txt"
CHECKOUT_LIB = HERE.parents[2] / "lib"  # <repo>/slicer_extension/FetalHC/FetalHCLib -> <repo>/lib


def module_files(path: Path = MODULE_LIST) -> list[str]:
    """File names listed in shared_modules.txt (comments and blank lines skipped)."""
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _import(package: str) -> dict:
    names = [f[:-3] for f in module_files() if f != "__init__.py"]
    return {name: importlib.import_module(f"{package}.{name}") for name in names}


def _load() -> tuple[str, dict]:
    errors = []
    try:
        return "installed fetalhc package", _import("fetalhc")
    except ImportError as e:
        errors.append(f"installed: {e}")
    try:
        return "vendored copy", _import(f"{__package__}._vendor.fetalhc")
    except ImportError as e:
        errors.append(f"vendored: {e}")
    if (CHECKOUT_LIB / "fetalhc" / "geometry.py").is_file():
        sys.path.append(str(CHECKOUT_LIB))
        importlib.invalidate_caches()
        try:
            return f"source checkout {CHECKOUT_LIB}", _import("fetalhc")
        except ImportError as e:
            errors.append(f"checkout: {e}")
    raise ImportError("FetalHC cannot find its fetalhc measurement modules (" + "; ".join(errors) +
                      "). Build the extension, or run slicer_extension/tools/vendor_fetalhc.py")


source, modules = _load()
geometry, clinical, io, result = (modules[n] for n in ("geometry", "clinical", "io", "result"))
