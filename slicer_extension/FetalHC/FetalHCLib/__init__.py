"""Non-GUI logic of the FetalHC Slicer module (no Qt): usable in Slicer and headless with ``slicer-core``.

- :mod:`FetalHCLib.client` -- MONAI Label REST client (standard library only, no MRML).
- :mod:`FetalHCLib.logic`  -- MRML: spacing, grey input, segment, HC curve, results table, label files.
- :mod:`FetalHCLib.flow`   -- the workflow against a server (segment, recompute, submit, next, train).
- :mod:`FetalHCLib.core`   -- where fetalhc's geometry/clinical/io come from (installed, vendored, checkout).
- :mod:`FetalHCLib.selftest` -- scenarios shared by pytest (tests/test_slicer_*.py) and FetalHCTest.
"""
