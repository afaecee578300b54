"""FetalHC MONAI Label app: fetal head segmentation + head circumference, thin over the ``fetalhc`` library.

    monailabel start_server --app monailabel_app --studies <folder | http://orthanc:8042/dicom-web> \\
        --host 127.0.0.1 --conf models fetal_head

See README.md in this folder for conf options, strategies, DICOMweb, the DICOM SEG note and deployment
(tokens, network, TLS).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib import tempfiles, training
from lib.auth import TokenError
from lib.configs.fetal_head import FetalHeadConfig
from lib.datastore import FetalDICOMWebDatastore, FetalLocalDatastore
from lib.inputs import check_id, http_error, number
from lib.pacs import check_store_sr

logger = logging.getLogger(__name__)
CONFIGS = {"fetal_head": FetalHeadConfig}


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        names = [n.strip() for n in conf.get("models", "fetal_head").split(",") if n.strip()]
        names = list(CONFIGS) if names == ["all"] else names
        unknown = [n for n in names if n not in CONFIGS]
        if unknown or not names:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR,
                                      f"unknown model(s) {unknown} in --conf models; available: {', '.join(CONFIGS)}")
        self.models = {}
        for name in names:
            self.models[name] = CONFIGS[name]()
            self.models[name].init(name, self.model_dir, conf, None, studies=studies)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="FetalHC",
                         description="Fetal head circumference from 2-D ultrasound (Mask R-CNN + ellipse fit)",
                         version="0.1.0")
        server = sys.modules.get("monailabel.app")  # imported only in the server, not in train subprocesses
        if server is not None:
            self._init_server(server.app, conf)

    def _init_server(self, fastapi_app, conf):
        """Access control, per-request temp folders (``--conf temp_dir``, default <model_dir>/tmp; stale ones
        removed now) and the extra routes; half-written datastore files of a crashed run are removed."""
        from lib import server

        try:
            server.install(fastapi_app, Path(conf.get("temp_dir") or os.path.join(self.model_dir, "tmp")))
        except TokenError as exc:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, str(exc)) from None
        if isinstance(self._datastore, FetalLocalDatastore) and not isinstance(self._datastore, FetalDICOMWebDatastore):
            self._datastore.clean_stale_temp()

    # ----------------------------------------------------------------------------------------- datastores
    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return FetalLocalDatastore(self.studies, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                   read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def _init_dicomweb_datastore(self):
        logger.info(f"DICOMweb datastore {self.studies}, search filter {settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER}")
        user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        client = DICOMwebClientX(
            url=self.studies, session=create_session_from_user_pass(user, password) if user and password else None,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX, wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
        return FetalDICOMWebDatastore(client, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache or None,
                                      settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)

    def _download_dcmqi_tools(self):
        """MONAI Label downloads dcmqi from GitHub here; FetalHC writes DICOM SEG in Python (highdicom)."""

    # -------------------------------------------------------------------------------------------- tasks
    def init_infers(self):
        return {k: v for c in self.models.values() for k, v in c.infer().items()}

    def init_trainers(self):
        return {name: c.trainer() for name, c in self.models.items()}

    def init_strategies(self):
        strategies = {k: v for c in self.models.values() for k, v in c.strategy().items()}
        return {**strategies, "random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {k: v for c in self.models.values() for k, v in c.scoring_method().items()}

    # --------------------------------------------------------------------------------- request checking
    def infer(self, request, datastore=None):
        """Only datastore ids, the file uploaded with this very request, or this request's session image;
        anything else (a path, a bad id) gets the same 404 as an unknown id, telling nothing of what exists."""
        image = request.get("image")
        datastore = datastore or self.datastore()
        # Results go to this request's temp folder (removed when the request ends); a client cannot choose it.
        folder = tempfiles.request_folder()
        request = {**request, "result_dir": str(folder) if folder else None}
        if isinstance(image, str) and not (tempfiles.is_request_file(image) or self._is_session_image(request)):
            unknown = http_error(404, f"unknown image id {image!r}: use an id from the datastore or upload the file")
            try:
                check_id(image)
            except Exception:
                raise unknown from None
            if not isinstance(datastore, FetalDICOMWebDatastore) and image not in datastore.list_images():
                raise unknown
            datastore.get_image_uri(image)  # 404 for an unknown DICOMweb series
            request["image_info"] = datastore.get_image_info(image)
        store_sr = check_store_sr(request, datastore, image)  # 4xx before inferring without a PACS study
        res = super().infer(request, datastore)
        if store_sr:  # the measurement stands even where PACS cannot take its SR (then pacs_error says why)
            frame = number(request.get("frame"), "frame", 0, 1e6, integer=True) or 0
            res["params"].update(datastore.store_sr(image, res["params"], frame))
        return res

    def _is_session_image(self, request) -> bool:
        """MONAI Label put the image of an existing session (``session_id``) into the request."""
        session = request.get("session")
        if not isinstance(session, dict) or not self.sessions() or not isinstance(session.get("name"), str):
            return False
        found = self.sessions().get_session(session["name"], update_ts=False)
        return bool(found and found.image and found.image == request.get("image"))

    def on_save_label(self, image_id, label_id):
        res = {}
        info = self.datastore().get_label_info(label_id, DefaultLabelTag.FINAL)
        if "pacs" in info:
            res["pacs"] = info["pacs"]
        every = number(self.conf.get("auto_train_every"), "auto_train_every", 0, 1e6, integer=True)
        if every:
            res["auto_train"] = self._maybe_auto_train(every)
        return res

    def _maybe_auto_train(self, every: int) -> str:
        """Retrain after every N new final labels (conf auto_train_every); one run at a time."""
        trainer = next(iter(self._trainers.values()), None)
        since = (trainer.stats().get("start_ts", 0) if trainer else 0) or 0
        ds = self.datastore()
        new = sum(ds.get_label_info(i, DefaultLabelTag.FINAL).get("ts", 0) > since for i in ds.get_labeled_images())
        if new < every:
            return f"{new}/{every} new final labels since the last training"
        try:
            training.start(self, next(iter(self._trainers)), None)
        except training.TrainingBusy as busy:
            return f"training already running (job {busy.job['id']})"
        return f"started after {new} new final labels"
