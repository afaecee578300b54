#!/usr/bin/env python3
"""Copy fetalhc's geometry.py, clinical.py and io.py byte for byte into FetalHC/FetalHCLib/_vendor.

For a Slicer without the fetalhc package: the extension build does the same copy (CMake
``configure_file``); run this when you add the module folder to Slicer straight from a checkout and
want it to work without the checkout's lib/ (e.g. to zip the module folder). The copies are
generated, git-ignored, and tests/test_slicer_logic.py checks they match lib/fetalhc byte for byte.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = HERE.parents[1] / "lib" / "fetalhc"
DEST = HERE.parent / "FetalHC" / "FetalHCLib" / "_vendor"
FILES = ("geometry.py", "clinical.py", "io.py")  # = FetalHCLib.core.VENDORED
INIT = '"""Generated copies of lib/fetalhc modules (see slicer_extension/tools/vendor_fetalhc.py); do not edit."""\n'


def vendor(dest: Path = DEST, lib: Path = LIB) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "__init__.py").write_text(INIT)
    return [Path(shutil.copyfile(lib / name, dest / name)) for name in FILES]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=DEST)
    p.add_argument("--lib", type=Path, default=LIB)
    args = p.parse_args(argv)
    for path in vendor(args.dest, args.lib):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
