"""One training at a time, over every way a run starts (``POST /train``, auto-train after N labels).

MONAI Label registers a run's process only once its subprocess exists and queues any run it is given
on a one-worker executor, so two quick requests both got "SUBMITTED" and a queued run started by itself
after the first was killed. Here a run starts only when no run is SUBMITTED or RUNNING (checked and
registered under one lock); otherwise the answer is 429 with the running job's id. Nothing is queued.
"""
from __future__ import annotations

import threading
import uuid

from fastapi.responses import JSONResponse
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import processes, tasks

from lib.inputs import http_error

ACTIVE = ("SUBMITTED", "RUNNING")
_lock = threading.Lock()
_sync_run: dict | None = None  # a run_sync training in this process (no MONAI Label task for it)


class TrainingBusy(Exception):
    def __init__(self, job: dict):
        super().__init__(f"a training run is already {job['status']} (job {job['id']}): wait for it to end or "
                         "stop it with DELETE /train/; nothing was queued")
        self.job = job

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": str(self), "job_id": self.job["id"], "status": self.job["status"]}, 429)


def active_job() -> dict | None:
    if _sync_run is not None:
        return _sync_run
    return next((t for t in reversed(tasks("train")) if t.get("status") in ACTIVE), None)


def start(app, model: str, params: dict | None, run_sync: bool = False):
    """Check the options (400), then run ``model``'s training unless one is active (TrainingBusy)."""
    global _sync_run
    trainer = app._trainers.get(model)
    if trainer is None:
        raise http_error(404, f"unknown trainer {model!r}; available: {', '.join(app._trainers)}")
    config = app.info().get("config", {}).get("train", {})
    if hasattr(trainer, "check_request"):
        trainer.check_request({**config, **(params or {})})
    with _lock:
        job = active_job()
        if job is not None:
            raise TrainingBusy(job)
        if not run_sync:
            res, _ = AsyncTask.run("train", request={"model": model}, params=params or {}, enqueue=False)
            if res is None:  # a process MONAI Label still tracks
                raise TrainingBusy({"id": next(iter(processes("train")), "unknown"), "status": "RUNNING"})
            return res
        _sync_run = {"id": f"sync-{uuid.uuid4()}", "status": "RUNNING"}
    try:
        res, _ = AsyncTask.run("train", request={"model": model}, params=params or {}, force_sync=True)
        return res
    finally:
        _sync_run = None
