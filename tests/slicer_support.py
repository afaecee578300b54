"""Shared helpers of tests/test_slicer_*.py: FetalHCLib on the path and a headless MRML scene.

The MRML classes come from the PyPI wheel ``slicer-core`` (``import slicer``: real MRML, no Qt); a scene
gets what Slicer's application logic would give it (selection node with units, so that measurements
print in mm; the Sequences module logic, for US cine as a sequence browser + proxy node).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "slicer_extension"
MODULE_DIR = EXTENSION / "FetalHC"

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core==5.13.31053.0) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML (slicer-core missing)", allow_module_level=True)
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import vtk  # noqa: E402

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)  # MRML's headless warnings (no colour tables)


def new_scene():
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    units = slicer.vtkSlicerUnitsLogic()
    units.SetMRMLApplicationLogic(app)
    units.SetMRMLScene(scene)
    sequences = slicer.vtkSlicerSequencesLogic()  # registers the sequence (browser) node classes
    sequences.SetMRMLApplicationLogic(app)
    sequences.SetMRMLScene(scene)
    scene._fetalhc_keep = (app, units, sequences)  # keep the logics alive as long as the scene
    return scene
