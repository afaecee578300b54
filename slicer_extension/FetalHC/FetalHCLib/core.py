"""The fetalhc modules this extension builds on: ``geometry``, ``clinical`` and ``io``.

They are imported, never re-implemented. Where they come from, first match wins:

1. the installed ``fetalhc`` package (development, the tests, or a Slicer where it was pip-installed);
2. ``FetalHCLib/_vendor``: byte-identical copies made by the extension build (CMake ``configure_file``)
   or by ``slicer_extension/tools/vendor_fetalhc.py``;
3. ``lib/`` of the source checkout this file lives in (module path added straight from a git clone).

All three need numpy and OpenCV (``cv2``); Slicer ships numpy and pydicom but not OpenCV, see
:func:`missing_dependencies`.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

VENDORED = ("geometry.py", "clinical.py", "io.py")
CHECKOUT_LIB = Path(__file__).resolve().parents[3] / "lib"  # <repo>/slicer_extension/FetalHC/FetalHCLib

geometry = clinical = io = None
source = ""


def missing_dependencies() -> list[str]:
    """pip names of the third-party packages the fetalhc modules need and this Python lacks."""
    out = []
    for module, pip_name in (("numpy", "numpy"), ("cv2", "opencv-python-headless"), ("pydicom", "pydicom")):
        try:
            importlib.import_module(module)
        except ImportError:
            out.append(pip_name)
    return out


def _import_from(package: str):
    return tuple(importlib.import_module(f"{package}.{name[:-3]}") for name in VENDORED)


def load():
    """Import geometry, clinical and io (once); raises ImportError with what to install."""
    global geometry, clinical, io, source
    if geometry is not None:
        return geometry, clinical, io
    missing = missing_dependencies()
    if missing:
        raise ImportError("FetalHC needs the Python packages " + ", ".join(missing) +
                          "; in Slicer: slicer.util.pip_install('" + " ".join(missing) + "')")
    errors = []
    candidates = [("fetalhc", "installed fetalhc package"), (f"{__package__}._vendor", "vendored copy")]
    if (CHECKOUT_LIB / "fetalhc" / "geometry.py").is_file():
        candidates.append(("fetalhc", f"source checkout {CHECKOUT_LIB}"))
    for i, (package, label) in enumerate(candidates):
        if i == 2 and str(CHECKOUT_LIB) not in sys.path:
            sys.path.append(str(CHECKOUT_LIB))
            importlib.invalidate_caches()
        try:
            geometry, clinical, io = _import_from(package)
            source = label
            return geometry, clinical, io
        except ImportError as e:
            errors.append(f"{label}: {e}")
    raise ImportError("cannot find the fetalhc geometry/clinical/io modules (" + "; ".join(errors) +
                      "). Build the extension, or run slicer_extension/tools/vendor_fetalhc.py")
