"""A whole relabeling session, headless: measure -> correct -> retrain -> next sample, on real HC18 images.

    .venv/bin/python sample-apps/run_session.py            # PACS: Orthanc + DICOMweb (needs `orthanc`)
    .venv/bin/python sample-apps/run_session.py --folder   # folder datastore (PNG + sidecar, NIfTI)

In a temp folder: builds the demo studies (build_studies.py), starts Orthanc on loopback with the DICOMweb
plugin and uploads the ultrasound DICOMs (PACS variant), starts the MONAI Label server with a copy of
monailabel_app, then over the REST API (monailabel.client): infers every study and prints HC, GA, QC and
where the pixel spacing came from, next to the expert HC of the HC18 CSV; saves the HC18 ground-truth
ellipse as the corrected final label of the two worst-measured images; fine-tunes the model for one epoch;
checks that the served model version changed; asks strategy ``hc_uncertainty`` for the next sample; on PACS,
finds the corrected studies' DICOM SEG and SR in Orthanc (QIDO, WADO) and prints how to see them.
Everything is torn down at the end, also on error or Ctrl-C (--keep keeps the temp folder and its logs).
Exit status 0 only when every step passed. The server listens on 127.0.0.1 only; when FETALHC_API_TOKEN /
FETALHC_ADMIN_TOKEN (or their *_FILE variants) are set, the server gets them and every request sends
``Authorization: Bearer`` (the admin token for training).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from build_studies import CREDIT, SAMPLES, Study, build  # noqa: E402
from fetalhc import hc18  # noqa: E402
from fetalhc.io import SRC_PIXEL_SPACING, SRC_US_REGION, label_suffix, save_label_like  # noqa: E402
from fetalhc.pipeline import default_model_path  # noqa: E402

sys.path.insert(1, str(ROOT / "monailabel_app"))
from lib.auth import ADMIN_ENV, API_ENV, token_from_env  # noqa: E402  (the server's own token reading)
try:
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelUtils
except ImportError:
    sys.exit("MONAI Label is not installed: run `bash scripts/setup.sh server` (or scripts/test.sh) first")

MODEL = "fetal_head"
STRATEGY = "hc_uncertainty"
EXPECTED_SOURCE = {"us_region": SRC_US_REGION, "pixel_spacing": SRC_PIXEL_SPACING}  # else the manifest's text
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


class StepError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: bytes | None = None, method: str = "GET", timeout: float = 30,
              headers: dict | None = None):
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**({"Content-Type": "application/dicom"} if data else {}), **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def orthanc_plugin() -> str:
    """The DICOMweb plugin of the Debian package (`dpkg -L orthanc-dicomweb`), else the usual folder."""
    try:
        files = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout.split()
    except OSError:
        files = []
    hits = [f for f in files if f.endswith(DICOMWEB_PLUGIN)] or \
        [str(p) for p in Path("/usr/share/orthanc/plugins").glob(DICOMWEB_PLUGIN)]
    if not hits:
        raise StepError("Orthanc's DICOMweb plugin is missing: apt-get install -y orthanc orthanc-dicomweb")
    return hits[0]


class Session:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.work = Path(tempfile.mkdtemp(prefix="fetalhc-session-"))
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.client: MONAILabelClient | None = None
        self.pacs_url: str | None = None  # DICOMweb root of the session's Orthanc (PACS variant)
        self.stored: dict[str, dict] = {}  # study id -> the `pacs` answer of its final label
        api, admin = token_from_env(API_ENV), token_from_env(ADMIN_ENV)
        self.headers = {"Authorization": f"Bearer {api or admin}"} if api or admin else {}
        self.admin_headers = {"Authorization": f"Bearer {admin}"} if admin else self.headers

    # ----------------------------------------------------------------------------------------- plumbing
    def say(self, text: str = "") -> None:
        print(f"[{time.time() - self.t0:6.1f} s] {text}" if text else "", flush=True)

    def spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                start_new_session=True)  # own process group: the teardown ends it whole
        self.procs.append((name, proc))
        return proc

    def wait_http(self, name: str, url: str, proc: subprocess.Popen, timeout: float, headers: dict | None = None):
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                raise StepError(f"{name} exited with status {proc.returncode}; log:\n{self.log_tail(name)}")
            try:
                return http_json(url, timeout=5, headers=headers)
            except OSError:
                time.sleep(0.5)
        raise StepError(f"{name} did not answer {url} within {timeout:.0f} s; log:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.work / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def teardown(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the group we created: server + its train subprocess
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
                except ProcessLookupError:
                    pass
        if self.args.keep:
            print(f"kept {self.work} (logs: orthanc.log, monailabel.log)")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # --------------------------------------------------------------------------------------------- steps
    def start_orthanc(self, studies: list[Study]) -> str:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise StepError("Orthanc is not installed: `apt-get install -y orthanc orthanc-dicomweb`, or use --folder")
        port, db = free_port(), self.work / "orthanc-db"
        config = {"Name": "FetalHC-demo", "StorageDirectory": str(db), "IndexDirectory": str(db),
                  "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "Plugins": [orthanc_plugin()],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (self.work / "orthanc.json").write_text(json.dumps(config, indent=1))
        proc = self.spawn("orthanc", [exe, str(self.work / "orthanc.json")])
        base = f"http://127.0.0.1:{port}"
        version = self.wait_http("orthanc", f"{base}/system", proc, 60)["Version"]
        plugins = http_json(f"{base}/plugins")
        if "dicom-web" not in plugins:
            raise StepError(f"Orthanc {version} started without the DICOMweb plugin (plugins: {plugins})")
        for s in studies:
            http_json(f"{base}/instances", (self.work / "data" / s.file).read_bytes(), "POST")
        found = http_json(f"{base}/dicom-web/series?Modality=US")
        self.say(f"Orthanc {version} on {base} (loopback, temp storage), DICOMweb at {base}/dicom-web: "
                 f"uploaded {len(studies)} ultrasound DICOM files, QIDO finds {len(found)} US series")
        return f"{base}/dicom-web"

    def start_monailabel(self, studies_uri: str) -> None:
        app, model_dir = self.work / "app", self.work / "model"
        shutil.copytree(ROOT / "monailabel_app", app, ignore=shutil.ignore_patterns("logs", "model", "bin",
                                                                                  "__pycache__", ".*"))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}  # hermetic settings
        env.update({"MONAI_LABEL_TRACKING_ENABLED": "false",
               "PYTHONPATH": os.pathsep.join(p for p in (str(app), os.environ.get("PYTHONPATH", "")) if p),
               "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "US"}),
               "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(self.work / "dicomweb-cache"),
               "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})  # scored explicitly below, not racing the training
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies_uri,
               "--host", "127.0.0.1", "--port", str(port), "--conf", "models", MODEL,
               "--conf", "model_dir", str(model_dir), "--conf", "initial_model", str(self.args.model)]
        proc = self.spawn("monailabel", cmd, env)
        url = f"http://127.0.0.1:{port}"
        info = self.wait_http("monailabel", f"{url}/info/", proc, self.args.start_timeout, self.headers)
        self.client = MONAILabelClient(url, tmpdir=str(self.work / "client"))
        self.admin = MONAILabelClient(url, tmpdir=str(self.work / "client"))  # training is an admin route
        for client, headers in ((self.client, self.headers), (self.admin, self.admin_headers)):
            if headers:
                client.update_auth({"token_type": "Bearer", "access_token": headers["Authorization"].split()[1]})
        (self.work / "client").mkdir(exist_ok=True)
        self.say(f"MONAI Label {info.get('name')} {info.get('version')} on {url}: models {list(info['models'])}, "
                 f"strategies {list(info['strategies'])}, datastore {studies_uri}")

    def infer_all(self, studies: list[Study], title: str) -> dict[str, dict]:
        self.say(f"{title}: infer '{MODEL}' on {len(studies)} studies")
        print(f"    {'study':34s} {'HC mm':>7s} {'expert':>7s} {'diff':>6s}  {'GA (Hadlock)':18s} QC")
        results, bad = {}, []
        for s in studies:
            _, r = self.client.infer(MODEL, s.study_id, {})
            results[s.study_id] = r
            hc, src, mm = r.get("hc_mm"), r.get("spacing_source") or "nowhere", r.get("spacing_mm") or [0.0]
            want = EXPECTED_SOURCE.get(s.calibration, s.calibration.replace("sidecar ", "pixel CSV "))
            ok_spacing = src == want and all(abs(v - s.pixel_size_mm) < 1e-6 * s.pixel_size_mm for v in mm)
            hc_text, diff = (f"{hc:7.1f}", f"{hc - s.hc_mm_csv:+6.1f}") if hc is not None else ("      -", "     -")
            print(f"    {Path(s.file).name:34s} {hc_text} {s.hc_mm_csv:7.1f} {diff}  {r.get('ga_text') or '-':18s} "
                  f"{r.get('qc')}")
            print(f"      spacing {mm[0]:.4f} mm/px from {src}"
                  + ("" if ok_spacing else f"  <-- expected {s.pixel_size_mm:.4f} mm/px from {want}"))
            if hc is None or not ok_spacing:
                bad.append(Path(s.file).name)
        versions = {r.get("model_version") for r in results.values()}
        errors = [abs(r["hc_mm"] - s.hc_mm_csv) for s in studies if (r := results[s.study_id]).get("hc_mm")]
        self.say(f"model {', '.join(sorted(versions))}: mean |HC - expert HC| "
                 f"{sum(errors) / max(1, len(errors)):.1f} mm over {len(errors)} studies")
        if bad:
            raise StepError(f"no HC in mm, or not the expected calibration, for: {', '.join(bad)}")
        return results

    def save_corrections(self, studies: list[Study], results: dict) -> list[Study]:
        """Final labels = HC18 ground-truth ellipses for the two worst-measured images (one per exam)."""
        recs = {r.name: r for r in hc18.read_records(SAMPLES)}
        ranked = sorted(studies, key=lambda s: -abs((results[s.study_id].get("hc_mm") or 0) - s.hc_mm_csv))
        picked = []
        for s in ranked:
            if len(picked) < 2 and s.image not in {p.image for p in picked}:
                picked.append(s)
        (self.work / "labels").mkdir(exist_ok=True)
        for s in picked:
            src = self.work / "data" / s.file
            label = self.work / "labels" / f"{src.name.split('.')[0]}{label_suffix(src)}"
            save_label_like(hc18.gt_mask(recs[s.image]), src, label)
            # On PACS the final label becomes a DICOM SEG, and store_sr adds an SR of the corrected HC.
            params = {"store_sr": True, "model_version": results[s.study_id].get("model_version")} \
                if self.pacs_url else {}
            res = self.client.save_label(s.study_id, str(label), tag="final", params=params)
            self.say(f"saved corrected label for {Path(s.file).name}: the expert ellipse (HC {s.hc_mm_csv} mm), "
                     "tag final" + (f"; PACS: SEG {res['pacs']['seg_sop_instance_uid']}, "
                                    f"SR {res['pacs']['sr_sop_instance_uid']}" if res.get("pacs") else ""))
            if self.pacs_url and not (res.get("pacs") or {}).get("sr_sop_instance_uid"):
                raise StepError(f"the server did not store the SEG and SR in PACS: {res}")
            self.stored[s.study_id] = res.get("pacs")
        return picked

    def show_pacs_results(self, picked: list[Study]) -> None:
        """The SEG and SR of each corrected study, found in Orthanc by QIDO and read back by WADO."""
        from dicomweb_client import DICOMwebClient
        from fetalhc.dicom_out import read_sr

        web = DICOMwebClient(self.pacs_url)
        base = self.pacs_url.rsplit("/dicom-web", 1)[0]
        for s in picked:
            pacs = self.stored[s.study_id]
            study = pacs["study_instance_uid"]
            found = {m: web.search_for_series(study, search_filters={"Modality": m}) for m in ("SEG", "SR")}
            sr_hits = web.search_for_instances(study, search_filters={"SOPInstanceUID": pacs["sr_sop_instance_uid"]})
            seg_hits = web.search_for_instances(study, search_filters={"SOPInstanceUID": pacs["seg_sop_instance_uid"]})
            if not sr_hits or not seg_hits:
                raise StepError(f"SEG/SR of {Path(s.file).name} not found in Orthanc (QIDO)")
            sr_series = sr_hits[0]["0020000E"]["Value"][0]
            hc = read_sr(web.retrieve_instance(study, sr_series, pacs["sr_sop_instance_uid"]))["hc_mm"]
            self.say(f"  {Path(s.file).name}: in Orthanc {len(found['SEG'])} SEG and {len(found['SR'])} SR series; "
                     f"SR HC {hc:.1f} mm (expert {s.hc_mm_csv} mm)")
            print(f"      QIDO: curl '{self.pacs_url}/studies/{study}/series?Modality=SEG'  (and Modality=SR)")
        print(f"      Orthanc explorer: {base}/app/explorer.html (while the session runs; with --keep, restart "
              f"Orthanc on the kept storage: Orthanc {self.work / 'orthanc.json'})")

    def train(self) -> dict:
        params = {"max_epochs": self.args.epochs, "train_batch_size": 2, "publish": "always", "augment": False,
                  "refiner_iters": self.args.refiner_iters}
        self.say(f"train '{MODEL}' (fine-tune the served model): {json.dumps(params)}; publish=always, so that "
                 "the demo serves the new model even after one epoch")
        self.admin.train_start(MODEL, params)
        end, last = time.time() + self.args.train_timeout, None
        while time.time() < end:
            task = self.client.train_status()
            stats = self.client.info().get("train_stats", {}).get(MODEL, {})
            line = f"epoch {stats.get('epoch', 0)}/{stats.get('total_epochs', '?')} ({stats.get('status', 'queued')})"
            if line != last:
                self.say(f"  training: {line}")
                last = line
            if task.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(2)
        else:
            raise StepError(f"training did not finish within {self.args.train_timeout} s")
        if task["status"] != "DONE" or not stats.get("published"):
            detail = "\n".join(task.get("details") or [])
            raise StepError(f"training {task['status']}: {stats.get('error') or stats.get('publish_reason')}\n{detail}")
        adf = ", ".join(f"{name} model {stats[k]:.1f} mm" for k, name in (("candidate_val_adf", "new"),
                        ("serving_val_adf", "serving")) if isinstance(stats.get(k), (int, float)))
        self.say(f"training done in {stats.get('total_time')}: {stats.get('train_images')} train / "
                 f"{stats.get('val_images')} validation image(s){'; validation ADF ' + adf if adf else ''}; "
                 f"published: {stats.get('publish_reason')}")
        return stats

    def next_sample(self) -> dict:
        status, body, _, _ = MONAILabelUtils.http_method(
            "POST", self.client.get_server_url(), f"/scoring/{STRATEGY}?run_sync=true", headers=dict(self.headers))
        if status != 200:
            raise StepError(f"scoring {STRATEGY} failed: HTTP {status} {body[:500]!r}")
        scored = json.loads(body)
        self.say(f"scored unlabelled studies by {STRATEGY} with the new model: {scored.get('executed')} done, "
                 f"failed: {scored.get('failed') or 'none'}")
        nxt = self.client.next_sample(STRATEGY, {})
        if not nxt.get("id"):
            raise StepError(f"{STRATEGY} returned no sample: {nxt}")
        return nxt

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> None:
        pacs = not self.args.folder
        model = Path(self.args.model)
        if not model.is_file():
            raise StepError(f"no model at {model}: pass --model CKPT or set FETALHC_MODEL")
        self.say(f"FetalHC relabeling session ({'PACS: Orthanc + DICOMweb' if pacs else 'folder datastore'}), "
                 f"work folder {self.work}; initial model {model}")
        self.say(f"images: {CREDIT}")
        manifest = build(self.work / "data")
        studies = [s for s in manifest if s.store == ("dicom" if pacs else "folder")]
        self.say(f"built {len(manifest)} demo files; this session uses {len(studies)} "
                 f"{'ultrasound DICOM series' if pacs else 'folder studies'}")
        uri = self.start_orthanc(studies) if pacs else str(self.work / "data" / "studies")
        self.pacs_url = uri if pacs else None
        self.start_monailabel(uri)
        before = self.infer_all(studies, "1. measure")
        picked = self.save_corrections(studies, before)
        old = {r.get("model_version") for r in before.values()}
        self.train()
        after = self.infer_all(picked, "2. measure the corrected studies with the retrained model")
        new = {r.get("model_version") for r in after.values()}
        if new & old or len(new) != 1:
            raise StepError(f"the server still serves {sorted(new)} (before training: {sorted(old)})")
        self.say(f"new model served: {', '.join(old)} -> {', '.join(new)}")
        nxt = self.next_sample()
        name = next((Path(s.file).name for s in studies if s.study_id == nxt["id"]), nxt["id"])
        self.say(f"3. next sample to correct ({STRATEGY}): {name} (uncertainty {nxt.get(STRATEGY)})")
        if pacs:
            self.say("4. results in PACS: DICOM SEG (corrected head mask) and SR (HC report) of the corrected studies")
            self.show_pacs_results(picked)


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--pacs", action="store_true", help="Orthanc + DICOMweb datastore (default)")
    mode.add_argument("--folder", action="store_true", help="local folder datastore, no Orthanc")
    ap.add_argument("--model", default=str(default_model_path()), help="initial model (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default: %(default)s)")
    ap.add_argument("--refiner-iters", type=int, default=50,
                    help="second-stage fine-tuning steps (default: %(default)s, a demo; the server's default is 300)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (studies, logs, models)")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds for the server to start")
    ap.add_argument("--train-timeout", type=float, default=600, help="seconds for training to finish")
    args = ap.parse_args(argv)
    session = Session(args)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` tears down too
    try:
        session.run()
        session.say("session complete: every step passed")
        return 0
    except Exception as exc:  # StepError, HTTP or client errors: one line, then the teardown
        session.say(f"FAILED: {type(exc).__name__}: {getattr(exc, 'msg', exc)}")
        return 1
    except KeyboardInterrupt:
        session.say("interrupted: tearing down")
        return 130
    finally:
        session.teardown()


if __name__ == "__main__":
    sys.exit(main())
