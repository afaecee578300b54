"""Independent DICOM validators for the tests: dciodvfy (dicom3tools) and dsrdump (dcmtk).

scripts/test.sh apt-installs both when it runs as root; a test skips only when a tool is absent and apt is
not ours to use (not root), and fails when root should have had it installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    if os.geteuid() == 0:
        pytest.fail(f"{tool} is not installed; scripts/test.sh installs it (apt-get install dicom3tools dcmtk)")
    pytest.skip(f"{tool} is not installed (apt-get install dicom3tools dcmtk)")


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's 'Error' lines for one file (warnings are advice, not conformance failures)."""
    p = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("Error")]


def dsrdump(path) -> str:
    """dcmtk's reading of an SR, with every code and template id printed; it must read without complaint."""
    p = subprocess.run([require("dsrdump"), "+Pc", "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    return p.stdout


def dsrdump_num(dump: str, code: str) -> tuple[float, str]:
    """(value, unit code) of the NUM item with concept code ``code`` in a dsrdump +Pc listing."""
    m = re.search(rf'NUM:\({re.escape(code)},LN,"[^"]*"\)="([^"]+)" \(([^,]+),UCUM', dump)
    assert m, f"no NUM {code} in:\n{dump}"
    return float(m.group(1)), m.group(2)
