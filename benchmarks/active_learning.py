"""Simulated relabeling on HC18: does ``hc_uncertainty`` pick better images to label than random?

    .venv/bin/python benchmarks/active_learning.py ../shared/hc18 --out runs/active_learning
    .venv/bin/python benchmarks/active_learning.py sample-data/hc18 --start 4 --step 2 --rounds 1 \\
        --epochs 1 --init-epochs 1 --seeds 0 1 --out /tmp/al-smoke   # smoke run on the shipped samples

Exam-grouped split of the HC18 training set (validation exams never enter the pool). Round 0: the slim
model (mobilenet_v3_fpn) trained on ``--start`` random images (or ``--init CKPT``), shared by both
strategies. Each round then adds ``--step`` images from the pool, chosen either by the TTA measurement
uncertainty (``fetalhc.uncertainty``, the MONAI Label app's scoring) or at random, and fine-tunes the
previous round's model for ``--epochs`` on everything labelled so far. Each round's model (its last
epoch, no checkpoint selection on the validation set) is scored on the same validation images: the
exams held out by ``--split-seed`` (default 0: `fetalhc split`'s seed-0 exam split). ``--seeds`` repeats the whole
simulation with other start sets, random picks and training seeds, and reports the mean per round.
Writes results.json, results.csv, results.md (mean and per-seed tables) and active_learning.png.
Data: HC18, van den Heuvel et al., PLoS ONE 2018, doi:10.5281/zenodo.1322001 (CC BY 4.0).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch

from fetalhc import hc18
from fetalhc.data import hc18_samples
from fetalhc.engine import validate
from fetalhc.io import Spacing
from fetalhc.model import load_model
from fetalhc.train import TrainConfig, fit
from fetalhc.uncertainty import measurement_uncertainty

STRATEGIES = ("hc_uncertainty", "random")


def train(out: Path, names: list[str], samples: dict, args, epochs: int, init: str | None, seed: int) -> str:
    cfg = TrainConfig(out_dir=str(out), model="mobilenet_v3_fpn", epochs=epochs, batch_size=args.batch_size,
                      lr=args.lr if init else args.init_lr, init=init, device=args.device, seed=seed,
                      warmup_iters=args.warmup)
    fit(cfg, [samples[n] for n in names], [], show_progress=False)  # no selection on the validation set
    (out / "best.pt").unlink(missing_ok=True)  # = last.pt without a validation set; saves disk
    return str(out / "last.pt")


def evaluate(ckpt: str, val: list, device) -> dict:
    model, _ = load_model(ckpt, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = validate(model, val)[1]
    return {"val_adf_mm": s["adf_mm"]["mean"], "val_adf_median_mm": s["adf_mm"]["median"],
            "val_dice": s.get("dice", {}).get("mean"), "val_missed": s["missed"]}


def most_uncertain(ckpt: str, candidates: list[str], records: dict, k: int, device) -> list[str]:
    model, _ = load_model(ckpt, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scores = {}
    for name in candidates:
        r = records[name]
        scores[name] = measurement_uncertainty(model, hc18.read_grey(r.image),
                                               Spacing(r.pixel_mm, r.pixel_mm, "HC18 CSV"))["uncertainty"]
    return sorted(candidates, key=lambda n: (-scores[n], n))[:k]


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per (round, strategy): mean over seeds (the start row is shared by both strategies)."""
    keys = sorted({(r["round"], r["strategy"]) for r in rows}, key=lambda k: (k[1] != "start", k[1], k[0]))
    out = []
    for rnd, strategy in keys:
        group = [r for r in rows if (r["round"], r["strategy"]) == (rnd, strategy)]
        m = {"round": rnd, "strategy": strategy, "labelled": group[0]["labelled"], "seeds": len(group)}
        for k in ("val_adf_mm", "val_adf_median_mm", "val_dice", "val_missed", "seconds"):
            vals = [g[k] for g in group if g[k] is not None]
            m[k] = sum(vals) / len(vals) if vals else None
        m["val_adf_per_seed"] = [round(g["val_adf_mm"], 2) for g in group]
        out.append(m)
    return out


def plot(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = sorted({r["seed"] for r in rows})
    for strategy, style, colour in zip(STRATEGIES, ("o-", "s--"), ("tab:blue", "tab:orange")):
        mean = [(r["labelled"], r["val_adf_mm"]) for r in mean_rows(rows) if r["strategy"] in (strategy, "start")]
        ax.plot(*zip(*mean), style, color=colour, lw=2, label=f"{strategy} (mean of {len(seeds)} seeds)")
        for seed in seeds if len(seeds) > 1 else []:
            pts = [(r["labelled"], r["val_adf_mm"]) for r in rows
                   if r["seed"] == seed and r["strategy"] in (strategy, "start")]
            ax.plot(*zip(*pts), style, color=colour, lw=0.7, alpha=0.35, ms=3)
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("validation ADF (mm)")
    ax.set_title("HC18 relabeling simulation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| seed | round | labelled | strategy | val ADF (mm) | median ADF (mm) | Dice | missed | minutes |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        dice = f"{100 * r['val_dice']:.2f} %" if r["val_dice"] is not None else "-"
        lines.append(f"| {r['seed']} | {r['round']} | {r['labelled']} | {r['strategy']} | {r['val_adf_mm']:.2f} | "
                     f"{r['val_adf_median_mm']:.2f} | {dice} | {r['val_missed']} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def mean_table(rows: list[dict]) -> str:
    lines = ["| round | labelled | strategy | mean val ADF (mm) | per seed | mean median ADF (mm) | mean Dice |",
             "|---:|---:|---|---:|---|---:|---:|"]
    for r in mean_rows(rows):
        lines.append(f"| {r['round']} | {r['labelled']} | {r['strategy']} | {r['val_adf_mm']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['val_adf_per_seed'])} | {r['val_adf_median_mm']:.2f} | "
                     + (f"{100 * r['val_dice']:.2f} % |" if r["val_dice"] is not None else "- |"))
    return "\n".join(lines)


def run_seed(seed: int, pool: list[str], val: list, records: dict, args, out: Path) -> list[dict]:
    """One simulation: a random start set and round-0 model, then each strategy's rounds."""
    rng = random.Random(seed)
    start = sorted(rng.sample(pool, args.start))
    samples = {s.name: s for s in hc18_samples(args.hc18, start)}
    t0 = time.time()
    ckpt0 = args.init or train(out / "round0", start, samples, args, args.init_epochs, None, seed)
    rows = [{"seed": seed, "round": 0, "strategy": "start", "labelled": len(start),
             **evaluate(ckpt0, val, args.device), "seconds": time.time() - t0, "added": start}]
    print(table(rows), file=sys.stderr)
    for strategy in STRATEGIES:
        labelled, ckpt, pick_rng = list(start), ckpt0, random.Random(seed + 1)
        for rnd in range(1, args.rounds + 1):
            t0 = time.time()
            candidates = sorted(set(pool) - set(labelled))
            if strategy == "random":
                picks = sorted(pick_rng.sample(candidates, args.step))
            else:
                if args.pool_limit and len(candidates) > args.pool_limit:
                    candidates = sorted(pick_rng.sample(candidates, args.pool_limit))
                picks = most_uncertain(ckpt, candidates, records, args.step, args.device)
            samples.update({s.name: s for s in hc18_samples(args.hc18, [n for n in picks if n not in samples])})
            labelled += picks
            ckpt = train(out / f"{strategy}_round{rnd}", labelled, samples, args, args.epochs, ckpt, seed)
            rows.append({"seed": seed, "round": rnd, "strategy": strategy, "labelled": len(labelled),
                         **evaluate(ckpt, val, args.device), "seconds": time.time() - t0, "added": picks})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    return rows


def write_results(out: Path, args, val_names: list[str], rows: list[dict]):
    (out / "results.json").write_text(json.dumps({"args": vars(args), "validation": val_names, "rows": rows,
                                                  "mean": mean_rows(rows)}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "added"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(mean_table(rows) + "\n\n" + table(rows) + "\n")
    plot(rows, out / "active_learning.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hc18", help="HC18 folder (training_set/ + CSV, or a flat folder such as sample-data/hc18)")
    p.add_argument("--out", default="runs/active_learning")
    p.add_argument("--start", type=int, default=50, help="labelled images before round 1")
    p.add_argument("--step", type=int, default=25, help="images added per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per round")
    p.add_argument("--init-epochs", type=int, default=30, help="epochs of the round-0 model (from scratch)")
    p.add_argument("--init", help="round-0 checkpoint instead of training one (must not have seen the pool)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0,
                   help="exam-grouped split (0: `fetalhc split`'s default), fixed for all seeds")
    p.add_argument("--val-limit", type=int, help="use only the first N validation images (faster)")
    p.add_argument("--pool-limit", type=int, help="score at most N random pool images per round (faster)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    p.add_argument("--init-lr", type=float, default=1e-3, help="learning rate of the round-0 model")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one simulation per seed (start set, random picks, training); results are averaged")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    try:
        records = {r.name: r for r in hc18.read_records(args.hc18) if r.annotation is not None}
    except FileNotFoundError as exc:
        p.error(str(exc))
    pool, val_names = hc18.exam_split(sorted(records), args.val_fraction, args.split_seed)
    val_names = val_names[: args.val_limit] if args.val_limit else val_names
    need = args.start + args.step * args.rounds
    if len(pool) < need:
        p.error(f"{len(pool)} pool images, but --start {args.start} + {args.rounds} x --step {args.step} = {need}")
    val = hc18_samples(args.hc18, val_names)
    print(f"{len(pool)} pool / {len(val)} validation images; start {args.start}, +{args.step} x {args.rounds} "
          f"rounds; seeds {args.seeds}", file=sys.stderr)
    rows: list[dict] = []
    seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would be the same simulation twice
    for seed in seeds:
        rows += run_seed(seed, pool, val, records, args, out / f"seed{seed}" if len(seeds) > 1 else out)
        write_results(out, args, val_names, rows)  # after every seed: a cut-short run still reports
    print(mean_table(rows) + "\n\n" + table(rows))
    print(f"wrote {out}/results.json, results.csv, results.md, active_learning.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
