"""What the FetalHC app adds to MONAI Label's FastAPI server (``monailabel.app:app``), in one place.

Called once the app object exists inside the server process (``monailabel start_server`` or a
TestClient), never in the train/scoring subprocesses: access control and per-request temp folders as
ASGI middleware, label-version routes, and, in front of MONAI Label's own, the one-at-a-time train
routes and a label download that a concurrent save cannot tear.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response
from monailabel.config import settings
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import get_mime_type
from starlette.middleware import Middleware

from lib import auth, tempfiles, training
from lib.inputs import check_id, http_error, series_file

logger = logging.getLogger(__name__)


def _app():
    """The app MONAI Label's own routes serve: created on first use, re-created after a reset (tests)."""
    from monailabel.interfaces.utils.app import app_instance
    return app_instance()


def _datastore():
    ds = _app().datastore()
    if not hasattr(ds, "restore_label"):
        raise http_error(501, "label versions need the FetalHC folder datastore")
    return ds


router = APIRouter(tags=["FetalHC"])


@router.get("/datastore/label/versions", summary="List the kept versions of an image's label (newest last)")
def list_versions(image: str, tag: str = DefaultLabelTag.FINAL.value):
    ds = _datastore()
    ds._require(image)
    current = ds.get_label_info(image, tag) or None
    return {"image": image, "tag": tag, "current": current, "versions": ds.versions.list(image, tag)}


@router.get("/datastore/label/version", summary="Download one kept version of a label")
def download_version(image: str, version: str, tag: str = DefaultLabelTag.FINAL.value):
    ds = _datastore()
    ds._require(image)
    path, meta = ds.versions.file(image, tag, version)
    return FileResponse(path, filename=f"{image}{meta['ext']}")


@router.put("/datastore/label/restore", summary="Make a kept version the current label (the current one is kept)")
def restore_version(image: str, version: str, tag: str = DefaultLabelTag.FINAL.value):
    return _datastore().restore_label(image, version, tag)


@router.get("/datastore/label", summary="Download a label")
def download_label(label: str, tag: str):
    """MONAI Label streams the file after a stat: a save replacing it in between tore the download
    (Content-Length of the old file). Labels are small: read once, from one open file."""
    path = _app().datastore().get_label_uri(label, tag)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, TypeError):
        raise HTTPException(404, "Label NOT Found") from None
    return Response(data, media_type=get_mime_type(path),
                    headers={"Content-Disposition": f'attachment; filename="{os.path.basename(path)}"'})


@router.get("/datastore/image", summary="Download an image (of a DICOMweb series: the instance FetalHC measures)")
def download_image(image: str):
    """MONAI Label answers 404 for a DICOMweb series (a folder in its cache): Slicer's Next image needs the
    file, so a series gives the instance the infer task measures."""
    uri = _app().datastore().get_image_uri(check_id(image))
    if not uri:  # unknown id: MONAI Label gives "", which as a Path is the server's working folder
        raise HTTPException(404, "Image NOT Found")
    path = series_file(Path(uri)) if Path(uri).is_dir() else Path(uri)
    if not path.is_file():
        raise HTTPException(404, "Image NOT Found")
    return FileResponse(path, media_type=get_mime_type(str(path)), filename=path.name)


def _train(model: str, params: dict | None, run_sync: bool):
    try:
        return training.start(_app(), model, params, run_sync)
    except training.TrainingBusy as busy:
        return busy.response()


@router.post("/train/{model}", summary="Run training for a model (one run at a time: 429 while one is active)")
def train_model(model: str, params: dict | None = None, run_sync: bool = False, enqueue: bool = False):
    return _train(model, params, run_sync)  # enqueue is ignored: nothing is ever queued


@router.post("/train/", summary="Run training (one run at a time)", include_in_schema=False)
def train_all(params: dict | None = None, run_sync: bool = False):
    models = list(_app()._trainers)
    if len(models) != 1:
        raise HTTPException(400, f"name the model: POST /train/<model>, one of {', '.join(models)}")
    model = models[0]
    return {model: _train(model, (params or {}).get(model, params), run_sync)}


def install(fastapi_app: FastAPI, temp_root: Path) -> None:
    """Wire the app into the running server; safe to call again for a re-created app (tests, /reload)."""
    auth.configure(auth.Policy.from_env(), settings.MONAI_LABEL_API_STR)
    tempfiles.configure(temp_root)
    if not any(m.cls is auth.AuthMiddleware for m in fastapi_app.user_middleware):
        # Inside CORS (whose preflight answers need no token), outside everything else.
        fastapi_app.user_middleware += [Middleware(auth.AuthMiddleware), Middleware(tempfiles.RequestTempMiddleware)]
        # MONAI Label parses the params form field with json.loads: a 400, not a 500, when it is not JSON.
        fastapi_app.add_exception_handler(json.JSONDecodeError, lambda _, exc: JSONResponse(
            {"detail": f"params is not valid JSON: {exc}"}, 400))
        fastapi_app.middleware_stack = None  # Starlette rebuilds it (with the above) on the next request
        n = len(fastapi_app.router.routes)
        fastapi_app.include_router(router)
        ours = fastapi_app.router.routes[n:]
        del fastapi_app.router.routes[n:]
        fastapi_app.router.routes[0:0] = ours  # first match wins: ours before MONAI Label's /train routes
        fastapi_app.openapi_schema = None
