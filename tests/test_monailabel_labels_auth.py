"""The app's pure pieces without a server: head-mask validation and the access policy."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from fetalhc import geometry, hc18
from monailabel_support import APP, SAMPLES

sys.path.insert(0, str(APP))
from lib import auth  # noqa: E402
from lib.labels import head_mask_problems  # noqa: E402

API, ADMIN = "u" * 20, "a" * 20


def test_expert_masks_pass_and_garbage_fails():
    for rec in hc18.read_records(SAMPLES):
        assert head_mask_problems(hc18.gt_mask(rec).astype(np.uint8)) == [], rec.name
        assert head_mask_problems((hc18.gt_mask(rec) * 255).astype(np.uint8)) == [], rec.name  # 0/255 is binary too
    shape = (540, 800)
    ring = geometry.ellipse_mask(geometry.Ellipse.make(400, 270, 200, 150, 0), shape) & \
        ~geometry.ellipse_mask(geometry.Ellipse.make(400, 270, 190, 140, 0), shape)
    tiny = geometry.ellipse_mask(geometry.Ellipse.make(400, 270, 8, 6, 0), shape)
    flat = geometry.ellipse_mask(geometry.Ellipse.make(400, 270, 300, 60, 0), shape)
    cases = {"empty mask": np.zeros(shape), "not elliptical": ring, "head area": tiny, "axis ratio": flat,
             "not a binary mask": np.arange(shape[0] * shape[1]).reshape(shape) % 7}
    for reason, mask in cases.items():
        problems = head_mask_problems(mask.astype(np.uint8))
        assert any(reason in p for p in problems), (reason, problems)


@pytest.mark.parametrize("method,path,admin", [
    ("DELETE", "/datastore/", True), ("DELETE", "/datastore/label", True), ("GET", "/datastore/dataset", True),
    ("GET", "/logs/", True), ("POST", "/train/fetal_head", True), ("PUT", "/model/fetal_head", True),
    ("GET", "/train/", False), ("PUT", "/datastore/label", False), ("POST", "/infer/fetal_head", False),
    ("GET", "/modelx", False), ("PUT", "/datastore/label/restore", False)])
def test_admin_routes(method, path, admin):
    assert auth.is_admin_route(method, path) is admin


def test_policy():
    off = auth.Policy()
    assert off.check("GET", "/info/", "127.0.0.1", None) is None and off.check("GET", "/", "::1", None) is None
    assert off.check("GET", "/info/", "192.0.2.7", None)[0] == 403
    on = auth.Policy(API, ADMIN)
    assert on.check("GET", "/info/", "127.0.0.1", None)[0] == 401  # loopback needs the token too
    assert on.check("GET", "/info/", "192.0.2.7", f"Bearer {API}") is None
    assert on.check("GET", "/info/", "192.0.2.7", f"Bearer {API}x")[0] == 401
    assert on.check("GET", "/info/", "192.0.2.7", f"Basic {API}")[0] == 401
    assert on.check("GET", "/logs/", "192.0.2.7", f"Bearer {API}")[0] == 403
    assert on.check("GET", "/logs/", "192.0.2.7", f"Bearer {ADMIN}") is None
    assert auth.Policy(API).check("GET", "/logs/", "127.0.0.1", f"Bearer {API}")[0] == 403  # no admin token set


def test_tokens_from_env_or_file(tmp_path):
    f = tmp_path / "t"
    f.write_text(ADMIN + "\n")
    assert auth.Policy.from_env({"FETALHC_API_TOKEN": API, "FETALHC_ADMIN_TOKEN_FILE": str(f)}) == auth.Policy(API, ADMIN)
    with pytest.raises(auth.TokenError, match="cannot read"):
        auth.token_from_env("FETALHC_API_TOKEN", {"FETALHC_API_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(auth.TokenError, match="not both"):
        auth.token_from_env("FETALHC_API_TOKEN", {"FETALHC_API_TOKEN": API, "FETALHC_API_TOKEN_FILE": str(f)})
