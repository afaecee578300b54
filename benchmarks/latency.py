"""End-to-end CPU latency (load file -> HC) per model config, median and p95, and peak memory.

    .venv/bin/python benchmarks/latency.py [--threads 2] [--repeats 5] [--model CKPT] [--configs ...]

Each config runs in its own process so that peak RSS is its own. Untrained configs time the same
computation as trained ones (random weights keep up to ``fetalhc.model.CANDIDATES`` detections too).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-data" / "hc18"


def worker(config: str, model: str | None, threads: int, repeats: int) -> dict:
    import resource
    import tempfile
    import time

    import numpy as np
    import torch

    from fetalhc.io import load_image
    from fetalhc.model import build_model, load_model, save_checkpoint
    from fetalhc.pipeline import measure_image

    torch.set_num_threads(threads)
    if model:
        net, meta = load_model(model)
        config = meta["config"]["name"]
    else:
        net = build_model(config).eval()
        with tempfile.TemporaryDirectory() as d:  # exercise the real load path too
            net, _ = load_model(save_checkpoint(Path(d) / "m.pt", net))
    files = sorted(p for p in SAMPLES.glob("*_HC.png"))
    csv = SAMPLES / "training_set_pixel_size_and_HC.csv"
    img = load_image(files[0], pixel_csv=csv)
    measure_image(net, img.pixels, img.spacing)  # warm-up
    times = []
    for _ in range(repeats):
        for f in files:
            t0 = time.perf_counter()
            img = load_image(f, pixel_csv=csv)
            measure_image(net, img.pixels, img.spacing)
            times.append(time.perf_counter() - t0)
    t = np.array(times)
    return {"config": config, "trained": bool(model), "stages": 1 + (getattr(net, "fetalhc_refiner", None) is not None), "images": len(times), "median_s": float(np.median(t)),
            "p95_s": float(np.percentile(t, 95)), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "image_size": list(img.pixels.shape), "threads": threads}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=str(ROOT / "models" / "fetalhc_default.pt"))
    ap.add_argument("--configs", nargs="*", default=["resnet50_fpn"], help="untrained configs to time as well")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        config, model = args.worker
        print(json.dumps(worker(config, model or None, args.threads, args.repeats)))
        return
    jobs = ([("default", args.model)] if Path(args.model).is_file() else []) + [(c, "") for c in args.configs]
    print(f"{'config':22s} {'weights':8s} {'stages':>6s} {'median s':>9s} {'p95 s':>7s} {'peak MB':>8s}  (load -> HC, "
          f"{args.threads} threads, 800x540 HC18 samples)")
    for config, model in jobs:
        out = subprocess.run([sys.executable, __file__, "--worker", config, model, "--threads", str(args.threads),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['config']:22s} {'trained' if r['trained'] else 'random':8s} {r['stages']:6d} {r['median_s']:9.3f} "
              f"{r['p95_s']:7.3f} {r['peak_rss_mb']:8.0f}")


if __name__ == "__main__":
    main()
