"""`fetalhc` command line: measure, train, evaluate, protocol, split, export-coco, export-model."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path


def _measure(args) -> int:
    import cv2

    from .evaluate import SUBMISSION_HEADER, submission_row
    from .io import InputError, load_image, read_pixel_csv
    from .overlay import render
    from .pipeline import Measurer

    measurer = Measurer(args.model, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixel_csv = read_pixel_csv(args.pixel_csv) if args.pixel_csv else None
    rows, failures, results = [], 0, []
    print(f"model {measurer.version}  ({measurer.meta.get('config', {}).get('name', '?')})", file=sys.stderr)
    print(f"{'file':28s} {'HC mm':>8s} {'GA':>8s} {'score':>6s}  {'QC':28s} spacing source")
    for f in args.files:
        name = Path(f).name
        try:
            img = load_image(f, pixel_size=args.pixel_size, pixel_csv=pixel_csv, frame=args.frame)
            if img.spacing is None and not args.pixels_only:
                why = "; ".join(img.meta.get("warnings", [])) or "the file carries no calibration"
                raise InputError(f"{f}: no pixel spacing ({why}). Give --pixel-size MM or --pixel-csv CSV; "
                                 "--pixels-only measures in pixels instead.")
            m = measurer.measure(img.pixels, img.spacing, spacing_at=img.spacing_at,
                                 score_threshold=args.score_threshold, ga_weeks=args.ga_weeks)
        except InputError as exc:
            failures += 1
            print(f"{name:28s} ERROR: {exc}")
            continue
        hc = f"{m.hc_mm:8.1f}" if m.hc_mm is not None else (f"{m.hc_px:6.0f}px" if m.hc_px else "       -")
        src = m.spacing.source if m.spacing else "none"
        print(f"{name:28s} {hc} {m.ga.text if m.ga.valid else '-':>8s} {m.score:6.2f}  {m.qc_text[:28]:28s} {src}")
        rows.append(submission_row(name, m.ellipse_mm))
        results.append({"file": str(f), **m.to_dict()})
        if not args.no_overlay:
            cv2.imwrite(str(out / f"{Path(f).stem}_overlay.png"), render(img.pixels, m, name))
        if args.dicom_out:
            failures += not _dicom_out(f, img, m, Path(args.dicom_out), args.frame)
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SUBMISSION_HEADER)
        w.writerows(rows)
    (out / "measurements.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'predictions.csv'}, {out / 'measurements.json'}"
          + ("" if args.no_overlay else f" and {len(results)} overlay PNGs"), file=sys.stderr)
    return 1 if failures else 0


def _dicom_out(f, img, m, folder: Path, frame: int) -> bool:
    """SEG + SR of one measured file into ``folder``; False (with the reason printed) when it cannot be."""
    from .dicom_out import NOT_DICOM, DicomOutError, read_source, write_seg, write_sr

    name = Path(f).name
    if img.meta.get("format") != "DICOM":
        print(f"{name:28s} ERROR: {NOT_DICOM}: no SEG/SR written for this {img.meta.get('format', 'image')} file")
        return False
    if m.ellipse_px is None:
        print(f"{name:28s} no SEG/SR written: {m.qc_text}")
        return True
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.split(".")[0]
    try:
        source = read_source(f)
        write_seg(source, m.mask, folder / f"{stem}_seg.dcm", frame=frame, model_version=m.model_version)
        write_sr(source, m.to_dict(), folder / f"{stem}_sr.dcm", frame=frame)
    except DicomOutError as exc:
        print(f"{name:28s} ERROR: {exc}")
        return False
    print(f"{name:28s} wrote {folder / (stem + '_seg.dcm')} and {stem}_sr.dcm", file=sys.stderr)
    return True


def _train(args) -> int:
    import torch

    from .data import hc18_samples, split_samples
    from .model import CONFIGS, DEFAULT_CONFIG
    from .train import TrainConfig, fit

    config = args.config or DEFAULT_CONFIG
    if config not in CONFIGS:
        print(f"error: unknown --config {config!r}; choose one of: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or torch.get_num_threads())
    samples = hc18_samples(args.hc18)
    if args.protocol:  # the protocol test exams are never trained or validated on
        from .protocol import protocol_split
        dev = set(protocol_split([s.name for s in samples]).dev)
        samples = [s for s in samples if s.name in dev]
    train, val = split_samples(samples, args.val_fraction, args.seed)
    if args.limit:
        train, val = train[:args.limit], val[:max(1, args.limit // 4)]
    print(f"{len(train)} training / {len(val)} validation images "
          f"({len({s.group for s in val})} held-out exams)", file=sys.stderr)
    cfg = TrainConfig(out_dir=args.out, model=config, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, mask_loss_weight=args.mask_loss_weight, input_size=args.input_size,
                      init=args.init, resume=args.resume, pretrained_backbone=args.pretrained_backbone,
                      augment=not args.no_augment, device=args.device, workers=args.workers, seed=args.seed,
                      half_best=args.half, oversample_small=args.oversample_small,
                      data_summary={"source": f"HC18 {Path(args.hc18).name}", "val_fraction": args.val_fraction,
                                    "split_seed": args.seed, "protocol": args.protocol,
                                    "license": "HC18 CC BY 4.0, doi:10.5281/zenodo.1322001"})
    result = fit(cfg, train, val)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 validates and saves
        print(f"best validation ADF {result['best_metric']} mm -> {result['best_path']}")
    return 0


def _train_refiner(args) -> int:
    import torch

    from .data import hc18_samples, split_samples
    from .model import read_checkpoint
    from .refine import RefinerConfig
    from .refine_train import RefineTrainConfig, refine_checkpoint

    torch.set_num_threads(args.threads or torch.get_num_threads())
    chosen = (("span", args.span), ("depth", args.depth), ("n_radii", args.radii))
    cfg = RefinerConfig(passes=args.passes, **{k: v for k, v in chosen if v is not None})  # before reading images
    if args.stage1_weight is not None:
        RefinerConfig(stage1_weight=args.stage1_weight)  # its range check, before the training, not after
    if args.teacher and not args.pseudo_labels:
        raise ValueError("--teacher only outlines --pseudo-labels images: add --pseudo-labels")
    samples = hc18_samples(args.hc18)
    labelled = [s.name for s in samples]
    if args.protocol:
        from .protocol import protocol_split
        dev = set(protocol_split(labelled).dev)
        samples = [s for s in samples if s.name in dev]
    data = read_checkpoint(args.model).get("data") or {}
    if data.get("train_exams"):  # the first stage's own split: its validation images are new to it
        train_ex, val_ex = set(data["train_exams"]), set(data.get("val_exams", []))
        train = [s for s in samples if s.group in train_ex]
        val = [s for s in samples if s.group in val_ex]
    else:
        train, val = split_samples(samples, args.val_fraction, args.seed)
    print(f"second stage: {len(train)} training / {len(val)} validation images", file=sys.stderr)
    base, k = RefineTrainConfig(), args.start_spread
    tc = RefineTrainConfig(iters=args.iters, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           size_sd=base.size_sd * k, aspect_sd=base.aspect_sd * k, shift_sd=base.shift_sd * k,
                           angle_sd=base.angle_sd * k,
                           wide_fraction=args.wide_fraction, oversample_small=args.oversample_small,
                           polar_augment=args.polar_augment, size_weighted=args.size_weighted)
    pseudo, pseudo_info = _pseudo_labels(args, labelled) if args.pseudo_labels else (None, None)
    res = refine_checkpoint(args.model, args.out, train, val, Path(args.out).with_suffix(".work"),
                            cfg=cfg, tc=tc, pseudo=pseudo, pseudo_info=pseudo_info,
                            fine_tune=not args.from_scratch, stage1_weight=args.stage1_weight,
                            resume=args.resume,
                            progress=lambda r: print(_refine_line(r, args.iters), flush=True),
                            data_summary={"source": f"HC18 {Path(args.hc18).name}", "protocol": args.protocol})
    print(f"both stages -> {res['path']} ({res['seconds'] / 60:.1f} min); {_blend_line(res['stage_blend'])}")
    return 0


def _blend_line(b: dict) -> str:
    if not b["weight"]:
        return "stage blend off"
    kept = " (too few images to calibrate: kept as it was)" if b.get("kept") else ""
    return f"stage blend: weight {b['weight']:.2f}, k {b['scale']:.4f} from {b['images']} images{kept}"


def _blend_stages(args) -> int:
    import torch

    from .data import hc18_samples
    from .model import CheckpointError, load_model, portable_meta, read_checkpoint, save_checkpoint, stored_half
    from .refine import RefinerConfig
    from .refine_train import MIN_SCALE_IMAGES, blend_stages

    RefinerConfig(stage1_weight=args.weight)  # its range check, before the calibration run
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, meta = load_model(args.checkpoint)
    if model.fetalhc_refiner is None:
        raise CheckpointError(f"{args.checkpoint} has no second stage to blend with its first")
    data = meta.get("refiner_data") or {}
    exams = set(data.get("train_exams") or [])
    samples = [s for s in hc18_samples(args.hc18) if s.group in exams]
    if len(samples) < MIN_SCALE_IMAGES:  # k is a median over them
        raise ValueError(f"{args.hc18} holds {len(samples)} of the images {args.checkpoint}'s second stage trained on "
                         f"(its refiner_data lists {len(exams)} exams); at least {MIN_SCALE_IMAGES} are needed")
    model.fetalhc_refiner, blend = blend_stages(model, model.fetalhc_refiner, samples, args.weight)
    keep = portable_meta(meta, "refiner_config", "refiner_data")
    out = save_checkpoint(args.out, model, half=stored_half(read_checkpoint(args.checkpoint)), **keep,
                          refiner_data={**data, "stage_blend": blend})
    print(f"{_blend_line(blend)} -> {out}")
    return 0


def _pseudo_labels(args, labelled: list[str]) -> tuple[list, dict]:
    """The HC18 folder's unlabelled test-set images outlined by the teacher (QC-passed results only), and
    their provenance: what the teacher saw counts as seen by the student (``fetalhc.protocol.seen_exams``)."""
    from . import hc18
    from .model import CheckpointError, load_model
    from .protocol import protocol_split, seen_exams, seen_test_images
    from .refine_train import pseudo_samples

    path = args.teacher or args.model
    teacher, meta = load_model(path)
    if teacher.fetalhc_refiner is None:
        raise CheckpointError(f"{path} has no second stage to make pseudo-labels with: pass --teacher CKPT "
                              "(a two-stage checkpoint)")
    seen = seen_exams(meta, labelled)
    seen_test = seen_test_images(meta, protocol_split(labelled))
    if args.protocol and (seen_test is None or seen_test):
        raise ValueError(f"{path} saw protocol test exams (or does not say what it saw): its pseudo-labels would "
                         "carry them into a --protocol model; pass a --teacher trained with --protocol")
    records = hc18.read_records(args.hc18, "test")
    out = pseudo_samples(teacher, records)
    print(f"pseudo-labels: {len(out)} of {len(records)} unlabelled test-set images, QC passed by "
          f"{meta.get('version', '')}", file=sys.stderr)
    return out, {"images": len(out), "of": len(records), "teacher": meta.get("version", ""),
                 "teacher_seen_exams": None if seen is None else sorted(seen)}


def _refine_line(r: dict, total: int) -> str:
    val = (f" val ADF {r['val_adf_mm']:.2f} mm (first stage {r['val_stage1_adf_mm']:.2f})"
           if "val_adf_mm" in r else "")
    return f"step {r['step']}/{total} loss {r['loss']:.3f}{val} ({r['seconds'] / 60:.1f} min)"


def _evaluate(args) -> int:
    from . import hc18
    from .evaluate import evaluate_submission, format_summary

    names = None
    if args.subset != "all":
        tr, va = hc18.exam_split([r.name for r in hc18.read_records(args.hc18)], args.val_fraction, args.seed)
        names = va if args.subset == "val" else tr
    rows, summary = evaluate_submission(args.predictions, args.hc18, names)
    print(format_summary(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return 0


def _protocol(args) -> int:
    if args.rows:
        return _retabulate(args)
    import torch

    from .pipeline import Measurer
    from .protocol import measure_test_set, seen_test_images

    if args.worst and not args.out:
        raise ValueError("--worst N writes its overlays into OUT/worst/: give --out OUT")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    split = _protocol_split(args.hc18)
    print(f"protocol test set: {len(split.test)} images of {len(split.test_exams)} exams "
          f"(development: {len(split.dev)} images)", file=sys.stderr)
    if args.split_out:
        Path(args.split_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.split_out).write_text(json.dumps({"dev": split.dev, "test": split.test}, indent=1))
    if not args.model:
        return 0
    measurer = Measurer(args.model, args.device)
    seen = seen_test_images(measurer.meta, split)
    title = f"Protocol test set, model {measurer.version}"
    if seen is None or seen:
        why = ("its checkpoint does not record which images it trained on" if seen is None else
               f"it trained on or was chosen on {len(seen)} of the {len(split.test)} protocol test images")
        if not args.allow_seen:
            raise ValueError(f"{args.model}: {why}, so its figures would not be an accuracy estimate. Train with "
                             "`fetalhc train --protocol`, or pass --allow-seen for a figure marked as such.")
        title += f" — NOT an accuracy estimate: {why}"
    done = lambda n: print(f"\r{n}/{len(split.test)} measured", end="", file=sys.stderr, flush=True)  # noqa: E731
    rows = measure_test_set(measurer, args.hc18, split.test, args.score_threshold, progress=done)
    print(file=sys.stderr)
    out = Path(args.out) if args.out else None
    _report(rows, title, out)
    if out:
        with open(out / "protocol_rows.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if args.worst:
            _worst_overlays(measurer, args.hc18, rows, args.worst, out / "worst", args.score_threshold)
    return 0


def _retabulate(args) -> int:
    """``fetalhc protocol --rows FOLDER``: the report of an earlier run, from its rows (no model, no image
    scored again), e.g. after the table gained columns."""
    from .protocol import read_rows

    if args.model or args.worst:
        raise ValueError("--rows re-tabulates an earlier run: give it without --model or --worst")
    folder = Path(args.rows)
    rows = read_rows(folder / "protocol_rows.csv")
    test = _protocol_split(args.hc18).test
    if sorted(r["filename"] for r in rows) != sorted(test):
        raise ValueError(f"{folder / 'protocol_rows.csv'} does not hold the {len(test)} protocol test images of "
                         f"{args.hc18}")
    old = folder / "protocol_summary.json"
    title = json.loads(old.read_text())["title"] if old.exists() else f"Protocol test set, rows of {folder}"
    _report(rows, title, Path(args.out or folder))
    return 0


def _protocol_split(hc18_dir):
    from . import hc18
    from .protocol import protocol_split

    return protocol_split([r.name for r in hc18.read_records(hc18_dir) if r.annotation is not None])


def _report(rows: list[dict], title: str, out: Path | None):
    """Print the protocol table of ``rows``; with ``out``, also write it and its summary JSON there."""
    from .protocol import format_table, protocol_summary

    summary = protocol_summary(rows)
    table = format_table(summary, title)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "protocol_summary.json").write_text(json.dumps({"title": title, **summary}, indent=1))
        (out / "protocol_table.md").write_text(table)


def _worst_overlays(measurer, root, rows: list[dict], n: int, folder: Path, threshold: float):
    """Overlays (JPEG) of the ``n`` largest HC errors: the result in yellow, the ground truth in red."""
    import cv2

    from . import hc18
    from .io import Spacing
    from .overlay import render

    folder.mkdir(parents=True, exist_ok=True)
    recs = {r.name: r for r in hc18.read_records(root)}
    for row in sorted(rows, key=lambda r: -r["adf_mm"])[:n]:
        rec = recs[row["filename"]]
        img = hc18.read_grey(rec.image)
        m = measurer.measure(img, Spacing(rec.pixel_mm, rec.pixel_mm, "HC18 CSV"), score_threshold=threshold)
        name = f"{rec.name}: true HC {row['hc_true_mm']:.1f} mm, error {row['df_mm']:+.1f} mm"
        cv2.imwrite(str(folder / f"{Path(rec.name).stem}.jpg"), render(img, m, name, hc18.gt_ellipse(rec)),
                    [cv2.IMWRITE_JPEG_QUALITY, 85])


def _split(args) -> int:
    from . import hc18

    names = [r.name for r in hc18.read_records(args.hc18)]
    tr, va = hc18.exam_split(names, args.val_fraction, args.seed)
    print(f"{len(tr)} training images, {len(va)} validation images "
          f"({len({hc18.exam_of(n) for n in va})} of {len({hc18.exam_of(n) for n in names})} exams)")
    if args.out:
        Path(args.out).write_text(json.dumps({"seed": args.seed, "val_fraction": args.val_fraction,
                                              "train": tr, "val": va}, indent=1))
    return 0


def _export_coco(args) -> int:
    from . import hc18

    recs = [r for r in hc18.read_records(args.hc18) if r.annotation is not None]
    if args.subset != "all":
        tr, va = hc18.exam_split([r.name for r in recs], args.val_fraction, args.seed)
        keep = set(va if args.subset == "val" else tr)
        recs = [r for r in recs if r.name in keep]
    coco = hc18.export_coco(recs, args.out)
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")
    return 0


def _export_model(args) -> int:
    from .model import load_model, model_version, portable_meta, save_checkpoint

    model, meta = load_model(args.checkpoint)
    keep = portable_meta(meta, "source")  # source: the file exported now
    out = save_checkpoint(args.out, model, half=not args.float32, source=model_version(args.checkpoint), **keep)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {'float32' if args.float32 else 'float16'} weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fetalhc", description="Fetal head circumference from 2-D ultrasound.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", help="measure HC on images (PNG/JPG, DICOM, NIfTI, NRRD)")
    m.add_argument("files", nargs="+")
    sp = m.add_mutually_exclusive_group()
    sp.add_argument("--pixel-size", type=float, help="pixel size in mm (isotropic) for files without calibration")
    sp.add_argument("--pixel-csv", help="HC18-style CSV: filename, pixel size(mm)")
    m.add_argument("--pixels-only", action="store_true", help="measure in pixels when no spacing is known")
    m.add_argument("--model", help="checkpoint (default: the shipped model, or $FETALHC_MODEL)")
    m.add_argument("--out", default="fetalhc-out", help="folder for overlays, predictions.csv, measurements.json")
    m.add_argument("--frame", type=int, default=0, help="frame of a multi-frame DICOM (default 0)")
    m.add_argument("--ga-weeks", type=float, help="known GA in weeks: adds the INTERGROWTH-21st HC centile")
    m.add_argument("--score-threshold", type=float, default=0.5, help="below this the QC flags a low score")
    m.add_argument("--no-overlay", action="store_true")
    m.add_argument("--dicom-out", metavar="DIR", help="also write a DICOM SEG (head mask) and SR (HC report) "
                                                      "for each DICOM input into DIR")
    m.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    m.set_defaults(func=_measure)

    def split_args(q):
        q.add_argument("--val-fraction", type=float, default=0.2)
        q.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train Mask R-CNN on labelled HC18 data (exam-grouped validation)")
    t.add_argument("--hc18", required=True, help="HC18 folder with training_set/ and its CSV")
    t.add_argument("--out", required=True, help="run folder: best.pt, last.pt, history.csv")
    t.add_argument("--config", help="first-stage configuration (default: the shipped model's, "
                   "fetalhc.model.DEFAULT_CONFIG; an unknown name lists them)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--mask-loss-weight", type=float, default=1.0)
    t.add_argument("--input-size", type=int, help="long side in px (default: the config's)")
    t.add_argument("--init", help="checkpoint to fine-tune from")
    t.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    t.add_argument("--pretrained-backbone", action="store_true", help="ImageNet weights from the local torch cache")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--half", action="store_true", help="store best.pt in float16")
    t.add_argument("--oversample-small", type=float, default=1.0,
                   help="draw heads under 100 mm HC this many times as often (default 1: uniform)")
    t.add_argument("--limit", type=int, help="use only the first N training images (smoke runs)")
    t.add_argument("--device")
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--threads", type=int, help="CPU threads for torch")
    t.add_argument("--protocol", action="store_true",
                   help="leave out the evaluation protocol's test exams (see `fetalhc protocol`)")
    split_args(t)
    t.set_defaults(func=_train)

    f = sub.add_parser("train-refiner", help="train the second stage (native-resolution skull outline) for a "
                                             "first-stage checkpoint; writes a checkpoint with both stages")
    f.add_argument("--hc18", required=True, help="HC18 folder with training_set/ and its CSV")
    f.add_argument("--model", required=True, help="first-stage checkpoint (its train/validation exams are reused)")
    f.add_argument("--out", required=True, help="checkpoint to write (both stages); OUT.work/ holds the resumable state")
    f.add_argument("--iters", type=int, default=3000)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--passes", type=int, default=3, help="refinement passes at inference (3: chosen on "
                                                         "development images; a fine-tune keeps the checkpoint's)")
    f.add_argument("--span", type=float, help="radial search window: the first-stage radius x "
                                              "[1 - span, 1 + span] (default: fetalhc.refine.RefinerConfig's)")
    f.add_argument("--depth", type=int, help="U-Net levels of a new second stage, 2-5 (default: "
                                             "fetalhc.refine.RefinerConfig's; a fine-tune keeps the checkpoint's)")
    f.add_argument("--radii", type=int, help="rows of a new second stage's polar image across the window "
                                             "(default: fetalhc.refine.RefinerConfig's n_radii; a fine-tune "
                                             "keeps the checkpoint's)")
    f.add_argument("--wide-fraction", type=float, default=0.0,
                   help="share of training starts perturbed 3x as widely (stage 1's rare gross misses; default 0)")
    f.add_argument("--oversample-small", type=float, default=1.0,
                   help="draw heads under 100 mm HC this many times as often (default 1: uniform)")
    f.add_argument("--size-weighted", action="store_true",
                   help="draw each head in proportion to its HC in mm, so that training weighs a miss as ADF does "
                        "(default: uniform)")
    f.add_argument("--start-spread", type=float, default=1.0,
                   help="scale of the training starts' perturbations (size, aspect, centre, angle) against the "
                        "default's; below 1 for a first stage that misses by less (default 1)")
    f.add_argument("--polar-augment", action="store_true",
                   help="also train on polar images degraded as ultrasound hides a skull: grey response, acoustic "
                        "shadows, speckle (fetalhc.refine_train.degrade)")
    f.add_argument("--pseudo-labels", action="store_true",
                   help="also train on the HC18 folder's unlabelled test-set images, outlined by --teacher where "
                        "its QC passed (none of them is a labelled training or protocol image)")
    f.add_argument("--teacher", help="two-stage checkpoint that outlines the --pseudo-labels images "
                                     "(default: --model, when it has a second stage)")
    f.add_argument("--stage1-weight", type=float,
                   help="weight of the first stage's HC in the reported one (fetalhc.refine.blend_outline; default: "
                        "a fine-tune keeps the checkpoint's, a new second stage uses refine_train.STAGE1_WEIGHT)")
    f.add_argument("--from-scratch", action="store_true", help="do not start from the checkpoint's own refiner")
    f.add_argument("--resume", action="store_true", help="continue OUT.work/refiner_last.pt")
    f.add_argument("--threads", type=int, help="CPU threads for torch")
    f.add_argument("--protocol", action="store_true", help="leave out the protocol's test exams")
    split_args(f)
    f.set_defaults(func=_train_refiner)

    b = sub.add_parser("blend-stages", help="set a two-stage checkpoint's stage blend: its first stage's size bias "
                                            "measured on the HC18 images its second stage trained on")
    b.add_argument("checkpoint")
    b.add_argument("--hc18", required=True, help="HC18 folder with training_set/ and its CSV")
    b.add_argument("--out", required=True, help="checkpoint to write (same weights, float16 if the input is)")
    b.add_argument("--weight", type=float, required=True, help="weight of the first stage's HC (0 turns the blend off)")
    b.add_argument("--threads", type=int, help="CPU threads for torch")
    b.set_defaults(func=_blend_stages)

    e = sub.add_parser("evaluate", help="score an HC18 submission CSV: ADF, DF, Dice, Hausdorff")
    e.add_argument("predictions")
    e.add_argument("hc18")
    e.add_argument("--subset", choices=["all", "val", "train"], default="all",
                   help="restrict to one side of the exam-grouped split (default: every predicted image)")
    e.add_argument("--out", help="per-image CSV (and a .json summary beside it)")
    split_args(e)
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("protocol", help="accuracy on the protocol test set, which no training or setting saw")
    r.add_argument("hc18", help="HC18 folder with training_set/ and its CSV")
    r.add_argument("--model", help="checkpoint to evaluate (without it: only print / write the split)")
    r.add_argument("--rows", metavar="FOLDER", help="re-tabulate FOLDER/protocol_rows.csv of an earlier run (no "
                                                    "model loaded, no image scored again); writes to --out or FOLDER")
    r.add_argument("--out", help="folder for protocol_rows.csv, protocol_summary.json, protocol_table.md")
    r.add_argument("--split-out", help="JSON file with the development and test image names")
    r.add_argument("--allow-seen", action="store_true",
                   help="evaluate a model that saw test images (the table says it is not an accuracy estimate)")
    r.add_argument("--score-threshold", type=float, default=0.5)
    r.add_argument("--worst", type=int, default=0, metavar="N", help="also write overlays of the N largest errors "
                                                                     "into OUT/worst/")
    r.add_argument("--device")
    r.add_argument("--threads", type=int, help="CPU threads for torch")
    r.set_defaults(func=_protocol)

    s = sub.add_parser("split", help="exam-grouped train/validation split of HC18")
    s.add_argument("hc18")
    s.add_argument("--out", help="JSON file with the two name lists")
    split_args(s)
    s.set_defaults(func=_split)

    c = sub.add_parser("export-coco", help="COCO instance-segmentation JSON of HC18 ground truth")
    c.add_argument("hc18")
    c.add_argument("out")
    c.add_argument("--subset", choices=["all", "val", "train"], default="all")
    split_args(c)
    c.set_defaults(func=_export_coco)
    x = sub.add_parser("export-model", help="deployable copy of a checkpoint: no optimizer state, float16")
    x.add_argument("checkpoint")
    x.add_argument("out")
    x.add_argument("--float32", action="store_true", help="keep float32 weights")
    x.set_defaults(func=_export_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io import InputError
    from .model import CheckpointError

    try:
        return args.func(args)
    except (InputError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fetalhc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
