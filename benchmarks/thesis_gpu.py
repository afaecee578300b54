"""The thesis configuration (Mask R-CNN ResNet50-FPN at 800 px) trained on a GPU and scored on the protocol.

A lent GPU machine takes at most 64 MiB of files and a few minutes, so this runs in two steps:

    # here: the shipped stage 1's 512 training images (JPEG) and the protocol test images (lossless WebP)
    .venv/bin/python benchmarks/thesis_gpu.py pack ../shared/hc18 --out .gpu_pack
    # on the GPU machine (its own torch): train for a fixed wall-clock budget, then score on the test set
    PYTHONPATH=lib python3 benchmarks/thesis_gpu.py run .gpu_pack --out $OUT --budget-s 190

Training uses exactly the images that trained the shipped stage 1 (its checkpoint lists their exams) and
no validation images: the number of epochs follows from the budget and the first epoch's speed, and the
last epoch is scored, so no test image (and no other image) chooses anything. The recipe is the shipped
one (AdamW, lr 1e-3, 200-iteration warm-up then cosine, thesis augmentations) with batch 8. Rows: stage 1
alone (the thesis method: mask -> ellipse -> HC), and with the shipped second stage and runner-up rule.
Training images travel as JPEG (quality 92) to fit the transfer limit; the test images are bit-exact.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import HEADER, Timed, table_row  # noqa: E402

from fetalhc import hc18  # noqa: E402
from fetalhc.data import hc18_samples  # noqa: E402
from fetalhc.model import combine_stages, read_checkpoint  # noqa: E402
from fetalhc.pipeline import Measurer  # noqa: E402
from fetalhc.protocol import (ProtocolSplit, measure_test_set, protocol_split, protocol_summary,  # noqa: E402
                              seen_test_images)
from fetalhc.train import TrainConfig, fit  # noqa: E402

CSV_NAME = "training_set_pixel_size_and_HC.csv"
CONFIG = "resnet50_fpn"


def pack(args) -> int:
    root, out = Path(args.hc18), Path(args.out)
    recs = {r.name: r for r in hc18.read_records(root) if r.annotation is not None}
    split = protocol_split(list(recs))
    stage1 = read_checkpoint(args.model)["data"]
    train = [n for n in split.dev if hc18.exam_of(n) in set(stage1["train_exams"])]
    if len(train) != stage1["train_images"]:
        print(f"found {len(train)} of the {stage1['train_images']} images that trained {args.model}", file=sys.stderr)
        return 2
    if out.exists():
        shutil.rmtree(out)
    (out / "training_set").mkdir(parents=True)
    for names, lossless in ((train, False), (split.test, True)):
        for n in names:
            img = hc18.read_grey(recs[n].image)
            stem = out / "training_set" / Path(n).stem
            if lossless:
                ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100 = lossless
                if not ok or not np.array_equal(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), img):
                    raise RuntimeError(f"{n}: WebP did not round-trip exactly")
                stem.with_suffix(".webp").write_bytes(buf.tobytes())
            else:
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality])
                stem.with_suffix(".jpg").write_bytes(buf.tobytes())
            shutil.copy(recs[n].annotation, out / "training_set" / recs[n].annotation.name)
    keep = set(train) | set(split.test)
    with open(root / CSV_NAME) as f, open(out / CSV_NAME, "w", newline="") as g:
        rows = list(csv.reader(f))
        csv.writer(g).writerows([rows[0]] + [r for r in rows[1:] if r[0] in keep])
    (out / "manifest.json").write_text(json.dumps({
        "train": train, "test": split.test, "train_jpeg_quality": args.jpeg_quality, "stage1_of": str(args.model),
        "data": "HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0)"}, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(train)} training + {len(split.test)} test images -> {out} ({size / 2**20:.1f} MiB)")
    return 0


def _unpack(pack_dir: Path, root: Path) -> dict:
    """The pack as an HC18 folder (PNG), so the library reads it like the real one."""
    (root / "training_set").mkdir(parents=True, exist_ok=True)
    for p in (pack_dir / "training_set").iterdir():
        dst = root / "training_set" / (p.stem + ".png")
        if p.suffix == ".png":
            shutil.copy(p, dst)
        else:
            cv2.imwrite(str(dst), cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    shutil.copy(pack_dir / CSV_NAME, root / CSV_NAME)
    return json.loads((pack_dir / "manifest.json").read_text())


def _score(measurer, root: Path, names: list[str], out: Path, tag: str, **options) -> dict:
    timed = Timed(measurer, **options)
    rows = measure_test_set(timed, root, names)
    with open(out / f"rows_{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {**protocol_summary(rows), "latency_median_s": float(np.median(timed.latency)), "n": len(rows)}


def run(args) -> int:
    if args.work:
        return _run(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="thesis_gpu.") as work:  # checkpoints of ~0.5 GB: none left behind
        return _run(args, Path(work))


def _run(args, work: Path) -> int:
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = work / "hc18"
    manifest = _unpack(Path(args.pack), root)
    train_names, test_names = manifest["train"][:args.limit or None], manifest["test"][:args.test_limit or None]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = False  # on: RoI heads see a new batch shape every step, each re-tuned
    report = {"config": CONFIG, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
              "torch": torch.__version__, "batch_size": args.batch_size, "lr": args.lr, "budget_s": args.budget_s,
              "train_images": len(train_names), "test_images": len(test_names),
              "train_jpeg_quality": manifest["train_jpeg_quality"]}

    def save():
        (out / "result.json").write_text(json.dumps(report, indent=1))

    train = hc18_samples(root, train_names)
    summary = {"source": "HC18 (thesis_gpu pack)", "protocol": True,
               "license": "HC18 CC BY 4.0, doi:10.5281/zenodo.1322001"}

    def config(out_dir, epochs, amp=True):
        return TrainConfig(out_dir=str(out_dir), model=CONFIG, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                           device=device, workers=args.workers, amp=amp, data_summary=summary)

    # One epoch to time it (and to catch a failing CUDA path before the long run), then the real schedule.
    t0 = time.time()
    probe = fit(config(work / "probe", 1), train, [], show_progress=False)
    epoch_s = probe["history"][0]["seconds"]
    report["probe_epoch_s"], report["setup_s"] = epoch_s, t0 - t_start
    eval_device = device
    try:  # both stages and the runner-up rule on this device, before the long run
        for ckpt in (probe["last_path"], args.model):
            Measurer(ckpt, device).measure(train[0].image, train[0].spacing)
    except Exception:  # report it, and still score on the CPU rather than lose the run
        report["cuda_measure_error"] = traceback.format_exc()
        eval_device = "cpu"
    epochs = max(1, math.floor(args.budget_s / epoch_s))
    report["epochs"] = epochs
    save()
    print(f"probe epoch {epoch_s:.1f} s -> {epochs} epochs", flush=True)
    t0 = time.time()

    def progress(st):
        print(f"epoch {st['epoch']}/{st['total_epochs']} loss {st['train_loss']:.3f} ({st['seconds']:.1f} s)",
              flush=True)
    try:
        result = fit(config(work / "r50", epochs), train, [], callback=progress, show_progress=False)
    except FloatingPointError:  # fp16 overflow from scratch: once more in fp32, same schedule
        report["amp_failed"] = traceback.format_exc()
        result = fit(config(work / "r50_fp32", epochs, amp=False), train, [], callback=progress, show_progress=False)
    report["train_s"] = time.time() - t0
    report["history"] = result["history"]
    save()

    # The trained stage 1 with the shipped second stage: the ablation's rows for this backbone.
    two_stage = combine_stages(result["last_path"], args.model, work / "r50_two_stage.pt")
    measurer = Measurer(two_stage, eval_device)
    # The split as drawn over all of HC18 (pack); drawn again over the pack's images alone it would differ.
    seen = seen_test_images(measurer.meta, ProtocolSplit(manifest["train"], manifest["test"]))
    if seen is None or seen:
        report["refused"] = f"the model saw protocol test images: {seen}"
        save()
        return 2
    report["eval_device"] = eval_device
    refiner = measurer.model.fetalhc_refiner
    lines = list(HEADER)
    steps = [("stage1", "ResNet50-FPN stage 1 (thesis method: mask -> ellipse)", None, False),
             ("two_stage", "ResNet50-FPN stage 1 + shipped stage 2 and runner-up rule", refiner, True)]
    for tag, label, ref, runner_up in steps:
        measurer.model.fetalhc_refiner = ref
        s = _score(measurer, root, test_names, out, tag, runner_up=runner_up)
        report[tag] = s
        lines.append(table_row(label, s, s["latency_median_s"]))
        save()
        print(lines[-1], flush=True)
    if time.time() - t_start < args.deadline_s:  # same images, shipped model, same machine: a consistency check
        s = _score(Measurer(args.model, eval_device), root, test_names, out, "shipped")
        report["shipped"] = s
        lines.append(table_row(f"shipped model on this machine ({eval_device})", s, s["latency_median_s"]))
    report["table"] = "\n".join(lines)
    report["total_s"] = time.time() - t_start
    save()
    print(report["table"])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the training and test images for the GPU machine")
    p.add_argument("hc18")
    p.add_argument("--model", default="models/protocol/fetalhc_protocol.pt",
                   help="whose stage-1 training images to take (the protocol model: restore it as "
                        "models/protocol/README.md says)")
    p.add_argument("--out", default=".gpu_pack")
    p.add_argument("--jpeg-quality", type=int, default=92)
    p.set_defaults(func=pack)
    r = sub.add_parser("run", help="train the thesis config for a fixed budget and score it (GPU machine)")
    r.add_argument("pack")
    r.add_argument("--out", required=True)
    r.add_argument("--model", default="models/protocol/fetalhc_protocol.pt",
                   help="the protocol model (its second stage; restore it as models/protocol/README.md says)")
    r.add_argument("--work", help="keep the unpacked images and checkpoints here (default: a temporary folder)")
    r.add_argument("--budget-s", type=float, default=390.0, help="training wall time after the probe epoch")
    r.add_argument("--deadline-s", type=float, default=520.0, help="skip the shipped-model check after this")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--workers", type=int, default=10)
    r.add_argument("--device")
    r.add_argument("--limit", type=int, help="first N training images (smoke test)")
    r.add_argument("--test-limit", type=int, help="first N test images (smoke test)")
    r.set_defaults(func=run)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
