#!/usr/bin/env python3
"""Copy the fetalhc files listed in FetalHCLib/shared_modules.txt into FetalHCLib/_vendor/fetalhc.

For a Slicer without the fetalhc package: the extension build does the same copy (CMake reads the same
list); run this when you add the module folder to Slicer straight from a checkout and want it to work
without the checkout's lib/ (e.g. to zip the module folder). The copies are generated and git-ignored;
tests/test_slicer_logic.py checks that they match lib/fetalhc byte for byte.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = HERE.parents[1] / "lib" / "fetalhc"
MODULE_LIB = HERE.parent / "FetalHC" / "FetalHCLib"
DEST = MODULE_LIB / "_vendor"
VENDOR_INIT = '"""Generated copies of lib/fetalhc (slicer_extension/tools/vendor_fetalhc.py); do not edit."""\n'


def files() -> list[str]:
    return [ln.strip() for ln in (MODULE_LIB / "shared_modules.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def vendor(dest: Path = DEST, lib: Path = LIB) -> list[Path]:
    package = dest / "fetalhc"
    package.mkdir(parents=True, exist_ok=True)
    (dest / "__init__.py").write_text(VENDOR_INIT)
    return [Path(shutil.copyfile(lib / name, package / name)) for name in files()]


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
