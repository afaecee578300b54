"""Non-GUI part of the FetalHC Slicer module (no Qt): runs in Slicer and headless on ``slicer-core``.

- :mod:`FetalHCLib.logic`  -- FetalHCLogic, the module's one Logic: parameter node, server flow, live edits.
- :mod:`FetalHCLib.nodes`  -- MRML helpers: spacing, grey input, head segment, HC curve, results table, files.
- :mod:`FetalHCLib.client` -- MONAI Label REST client (standard library only, bearer token).
- :mod:`FetalHCLib.shared` -- the measurement core shared with lib/fetalhc (geometry, clinical, io, result).
- :mod:`FetalHCLib.selftest` -- scenarios shared by pytest (tests/test_slicer_*.py) and FetalHCTest.
"""
