"""MONAI Label REST client, standard library only (urllib + json), every request with a timeout.

Endpoints (monailabel 0.8.5, ``monailabel/endpoints``):

=====================================================  ====================================================
``GET /info/``                                         app info: models, strategies, trainers, train_stats
``POST /infer/{model}?image=ID&output=all``            form ``params`` (JSON), optional file ``file``;
                                                       answers multipart (``params`` JSON + label file) or
                                                       plain JSON when there is no label
``GET /datastore/image?image=ID``                      the image file
``PUT /datastore/label?image=ID&tag=final``            form ``params``, file ``label``
``POST /activelearning/{strategy}``                    JSON body (params); answers ``{"id": ...}`` or ``{}``
``POST /train/{model}?run_sync=false&enqueue=false``   JSON body (train params)
``DELETE /train/``                                     stop training
``GET /train/[?check_if_running=true]``                last (or running) train task; 404 when none
=====================================================  ====================================================

With a token (panel field, or env ``FETALHC_API_TOKEN``) every request carries
``Authorization: Bearer <token>``.
"""
from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUTS = {"info": 10.0, "infer": 300.0, "datastore": 60.0, "activelearning": 300.0, "train": 30.0}


class ServerError(Exception):
    """A request that failed, with a message meant for the user (no traceback needed)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class InferResult:
    params: dict  # the infer task's JSON result (fetalhc Measurement.to_dict() plus extras)
    label_name: str | None = None  # file name of the label part, e.g. "tmpab12.nrrd"
    label_bytes: bytes | None = None

    def save_label(self, directory: str) -> str | None:
        if self.label_bytes is None:
            return None
        name = os.path.basename(self.label_name or "label.nrrd")
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(self.label_bytes)
        return path


def encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    """multipart/form-data body: ``fields`` name -> text, ``files`` name -> (file name, content)."""
    boundary = "fetalhc-" + uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n').encode()
        out += value.encode("utf-8") + b"\r\n"
    for name, (filename, content) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{os.path.basename(filename)}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


def _header_param(header: str, key: str) -> str | None:
    m = re.search(rf'(?:^|;)\s*{key}\s*=\s*(?:"([^"]*)"|([^;\s]*))', header, re.IGNORECASE)
    return None if m is None else (m.group(1) if m.group(1) is not None else m.group(2))


def parse_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body into (lower-cased headers, raw content) pairs, byte-exact."""
    boundary = _header_param(content_type, "boundary")
    if not boundary:
        raise ServerError(f"malformed multipart answer (no boundary in {content_type!r})")
    delimiter = b"--" + boundary.encode("latin-1")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, content))
    return parts


def _quote(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


TOKEN_ENV = "FETALHC_API_TOKEN"


def normalise_url(url: str) -> str:
    """``host:port`` -> ``http://host:port``; ServerError (a panel message) for anything but http(s)."""
    url = (url or "").strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ServerError(f"invalid server URL {url!r}: expected http:// or https://, e.g. {DEFAULT_URL}")
    return url


class MonaiLabelClient:
    def __init__(self, url: str = DEFAULT_URL, timeouts: dict | None = None, token: str | None = None):
        self.url = normalise_url(url)
        self.timeouts = {**TIMEOUTS, **(timeouts or {})}
        self.token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip()

    # ------------------------------------------------------------------------------- transport
    def request(self, method: str, path: str, *, query: dict | None = None, json_body=None,
                fields: dict | None = None, files: dict | None = None, timeout: float | None = None,
                what: str = "") -> tuple[int, str, bytes, dict]:
        """One HTTP request; returns (status, content type, body, headers); ServerError on any failure."""
        what = what or f"{method} {path}"
        url = self.url + path
        if query:
            url += "?" + "&".join(f"{k}={_quote(v)}" for k, v in query.items() if v is not None)
        headers, data = {"Accept": "application/json, multipart/form-data, */*"}, None
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if files is not None or fields is not None:
            ctype, data = encode_multipart(fields or {}, files or {})
            headers["Content-Type"] = ctype
        elif json_body is not None:
            data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        timeout = timeout or self.timeouts.get(path.strip("/").split("/")[0], 30.0)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return resp.status, headers.get("content-type", ""), resp.read(), headers
        except urllib.error.HTTPError as e:
            body = e.read()
            hint = {401: " (set the API token in the Server section)", 403: " (the token may not do this)"}.get(e.code, "")
            raise ServerError(f"{what} failed: server answered {e.code} {e.reason}: {_detail(body)}{hint}",
                              e.code) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerError(f"{what}: no answer from {self.url} within {timeout:g} s (timeout)") from None
            if isinstance(reason, ConnectionRefusedError):
                raise ServerError(f"cannot connect to the MONAI Label server at {self.url}: connection refused. "
                                  "Is the server running, and is the URL right?") from None
            raise ServerError(f"cannot reach the MONAI Label server at {self.url}: {reason}") from None
        except (socket.timeout, TimeoutError):
            raise ServerError(f"{what}: no answer from {self.url} within {timeout:g} s (timeout)") from None
        except (ConnectionError, OSError) as e:
            raise ServerError(f"{what}: connection to {self.url} failed ({e})") from None

    def _json(self, method: str, path: str, **kw):
        _, _, body, _ = self.request(method, path, **kw)
        return _loads(body, kw.get("what") or path)

    # ------------------------------------------------------------------------------- endpoints
    def info(self) -> dict:
        return self._json("GET", "/info/", what="reading the server's app info")

    def infer(self, model: str, *, image_id: str | None = None, file: str | None = None,
              params: dict | None = None, timeout: float | None = None) -> InferResult:
        """Run ``model`` on a datastore image (``image_id``) or on an uploaded ``file``."""
        if not image_id and not file:
            raise ValueError("infer needs an image_id or a file")
        files = None
        if file:
            with open(file, "rb") as f:
                files = {"file": (os.path.basename(file), f.read())}
        status, ctype, body, _ = self.request(
            "POST", f"/infer/{_quote(model)}", query={"image": image_id or "", "output": "all"},
            fields={"params": json.dumps(params or {})}, files=files, timeout=timeout,
            what=f"segmenting with model '{model}'")
        if "multipart" not in ctype.lower():
            return InferResult(_loads(body, "infer result"))
        result = InferResult({})
        for headers, content in parse_multipart(ctype, body):
            disposition = headers.get("content-disposition", "")
            filename = _header_param(disposition, "filename")
            if filename:
                result.label_name, result.label_bytes = filename, content
            elif _header_param(disposition, "name") == "params":
                result.params = _loads(content, "infer params") or {}
        return result

    def download_image(self, image_id: str, directory: str) -> str:
        _, _, body, headers = self.request("GET", "/datastore/image", query={"image": image_id},
                                           what=f"downloading image '{image_id}'")
        disposition = headers.get("content-disposition", "")
        name = _header_param(disposition, r"filename\*") or _header_param(disposition, "filename") or image_id
        name = urllib.parse.unquote(name.replace("utf-8''", ""))
        path = os.path.join(directory, os.path.basename(name))
        with open(path, "wb") as f:
            f.write(body)
        return path

    def upload_image(self, file: str, image_id: str | None = None, params: dict | None = None) -> str:
        """Add an image to the datastore; returns its id (the file name without extension by default)."""
        with open(file, "rb") as f:
            content = f.read()
        res = self._json("PUT", "/datastore/image", query={"image": image_id} if image_id else None,
                         fields={"params": json.dumps(params or {})}, files={"file": (os.path.basename(file), content)},
                         what=f"uploading {os.path.basename(file)} to the datastore")
        return res.get("image") if isinstance(res, dict) else res

    def save_label(self, image_id: str, label_file: str, tag: str = "final", params: dict | None = None) -> dict:
        with open(label_file, "rb") as f:
            content = f.read()
        return self._json("PUT", "/datastore/label", query={"image": image_id, "tag": tag},
                          fields={"params": json.dumps(params or {})},
                          files={"label": (os.path.basename(label_file), content)},
                          what=f"saving the label of '{image_id}'")

    def next_sample(self, strategy: str, params: dict | None = None) -> dict:
        """The strategy's next image: ``{"id": ..., ...image info}``, or ``{}`` when none is left."""
        return self._json("POST", f"/activelearning/{_quote(strategy)}", json_body=params or {},
                          what=f"asking strategy '{strategy}' for the next image") or {}

    def train_start(self, model: str, params: dict | None = None, run_sync: bool = False) -> dict:
        return self._json("POST", f"/train/{_quote(model)}",
                          query={"run_sync": str(bool(run_sync)).lower(), "enqueue": "false"},
                          json_body=params or {}, timeout=None if not run_sync else 24 * 3600,
                          what=f"starting training of '{model}'")

    def train_stop(self) -> dict | None:
        return self._json("DELETE", "/train/", what="stopping training")

    def train_status(self, check_if_running: bool = False) -> dict | None:
        """The running (``check_if_running``) or last train task, or None when there is none."""
        try:
            return self._json("GET", "/train/", query={"check_if_running": "true"} if check_if_running else None,
                              what="reading the training status")
        except ServerError as e:
            if e.status == 404:
                return None
            raise


def _loads(body: bytes, what: str):
    try:
        return json.loads(body.decode("utf-8") or "null")
    except ValueError:
        raise ServerError(f"{what}: the server's answer is not JSON: {body[:200]!r}") from None


def _detail(body: bytes) -> str:
    """FastAPI's ``{"detail": ...}`` message, else the start of the body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    return detail[:500] or "(no details)"
