"""Slicer's "Save to PACS" end to end: Slicer logic (slicer-core) -> real FetalHC server on a DICOMweb
datastore -> real Orthanc. The study comes from PACS through "Next image"; the corrected outline goes back
as DICOM SEG and the measurement shown in Slicer as DICOM SR, both read back from Orthanc."""
from __future__ import annotations

import json

import numpy as np
import pytest

from slicer_support import new_scene

from FetalHCLib import nodes  # noqa: E402
from FetalHCLib.logic import FetalHCLogic  # noqa: E402
from monailabel_support import real_server  # noqa: E402
from test_monailabel_orthanc import ORTHANC, orthanc  # noqa: E402,F401  (the Orthanc fixture)
from test_pacs_orthanc import _fetch, study  # noqa: E402,F401  (the US study in Orthanc)

pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc "
                                                        "orthanc-dicomweb)")


def test_save_to_pacs_from_slicer_stores_seg_and_sr_of_what_is_shown(orthanc, study, tmp_path):  # noqa: F811
    from fetalhc.dicom_out import read_seg, read_sr
    from fetalhc.pipeline import measure_mask

    env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "US"}),
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"), "MONAI_LABEL_SESSIONS": "false"}
    with real_server(tmp_path / "server", f"{orthanc}/dicom-web", env=env) as srv:
        logic = FetalHCLogic(new_scene(), workdir=str(tmp_path / "work"))
        logic.set_server(srv["url"])
        uid = study["series"]["399_HC.png"]["uid"]  # PixelSpacing-calibrated series
        volume = logic.apply_next_image({"sample": {"id": uid, "name": uid},
                                         "path": logic.client.download_image(uid, logic.workdir)})
        assert logic.is_dicom_input(volume)
        shown = logic.segment(volume)
        assert shown.hc_mm is not None and shown.qc_ok
        out = logic.save_to_pacs(volume)
        pacs = out["pacs"]
        assert pacs and pacs["seg_sop_instance_uid"] and pacs["sr_sop_instance_uid"], out
        assert "Stored in PACS" in out["message"]
        seg = read_seg(_fetch(orthanc, study["study_uid"], pacs["seg_sop_instance_uid"], tmp_path))
        assert seg.source_series_uid == uid and np.array_equal(seg.mask > 0, logic.outline_mask(volume) > 0)
        sr = read_sr(_fetch(orthanc, study["study_uid"], pacs["sr_sop_instance_uid"], tmp_path))
        # The SR measures the label that was sent (the server never takes a client's numbers for PACS), with
        # the same outline path Slicer uses for an edit; the AI's HC on screen came from its soft mask.
        sent = measure_mask(logic.outline_mask(volume), shown.spacing)
        assert sr["hc_mm"] == pytest.approx(sent.hc_mm, abs=1e-3)
        assert sr["hc_mm"] == pytest.approx(shown.hc_mm, abs=1.0)
        assert volume.GetAttribute(nodes.ATTR_IMAGE_ID) == uid
