"""Non-GUI part of the FetalHC Slicer module (no Qt): runs in Slicer and headless on ``slicer-core``.

- :mod:`FetalHCLib.logic`  -- FetalHCLogic, the module's one Logic: parameter node, server flow, submit, PACS, training.
- :mod:`FetalHCLib.live`   -- its live measurement (mixin): show a result, re-measure edits, revert to AI.
- :mod:`FetalHCLib.nodes`  -- MRML helpers: arrays, spacing, sequences, grey input, head segment, HC curve.
- :mod:`FetalHCLib.files`  -- image and label files read from / written for the server (VTK/MRML, no OpenCV).
- :mod:`FetalHCLib.results` -- what the panel and results table show of a Result, and where it is stored.
- :mod:`FetalHCLib.client` -- MONAI Label REST client (standard library only, bearer token).
- :mod:`FetalHCLib.shared` -- the measurement core shared with lib/fetalhc (geometry, clinical, io, result).
- :mod:`FetalHCLib.selftest` -- scenarios shared by pytest (tests/test_slicer_*.py) and FetalHCTest.
"""
