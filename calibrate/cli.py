"""`gaze calibrate OUT --calib DIR [--coverage 0.95]`: choose top_k per layer and write it into OUT.

Method: calibrate/budget.py. Imports nothing heavy at module level (the `gaze` parser is
built on devices without torch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge import cli_args as ca
from gaze_edge import console
from gaze_edge.atomic import replace_file
from gaze_edge.errors import CheckpointError, InputError


def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="choose top_k per layer from dense attention coverage and write it into an export",
        description="Measure, on calibration images, how much dense attention mass the gaze selection keeps for "
                    "every k; choose per layer the smallest k reaching --coverage; report caption agreement and "
                    "KV bytes read per token for every budget (table, JSON, plot); write the chosen top_k into "
                    "decoder.onnx and gaze_config.json.")
    p.add_argument("out", type=Path, help="export folder written by `gaze export` (rewritten in place)")
    # Required, but checked in run_calibrate: argparse would refuse the hidden old spelling --images DIR.
    p.add_argument("--calib", type=Path, metavar="DIR", help="folder of calibration images (PNG/JPEG); required")
    p.add_argument("--coverage", type=ca.number_in(0, 1, low_open=True), default=0.95,
                   help="share of the dense visual attention mass the selected regions must keep, in (0, 1]")
    p.add_argument("--min-agreement", type=ca.number_in(0, 1, low_open=True),
                   help="then lower k layer by layer while at least this share of calibration captions stays "
                        "identical to the dense model's, in (0, 1] (default: coverage alone decides)")
    p.add_argument("--checkpoint", type=Path,
                   help="the checkpoint OUT was exported from (default: the one its validation_report.json names)")
    p.add_argument("--prompts", type=Path, help="text file, one user prompt per line, cycled over the images "
                                                "(default: the model's default prompt)")
    p.add_argument("--calib-count", type=ca.positive_int, metavar="N", help="use only the first N calibration images")
    p.add_argument("--max-total-pixels", type=ca.int_in(1, 2**62), default=ca.DEFAULT_MAX_TOTAL_PIXELS,
                   help="most pixels decoded from each image folder, summed over its files "
                        f"(default {ca.DEFAULT_MAX_TOTAL_PIXELS:,}); a larger folder is refused before decoding")
    p.add_argument("--held-out", type=Path,
                   help="folder of held-out images with truth.txt (`gaze scenes`): the budget table is measured "
                        "there, and the written export is checked there with ONNX Runtime")
    p.add_argument("--report", type=ca.output_folder, help="folder for calibration.json and calibration.png "
                                                        "(default: OUT/calibration)")
    p.add_argument("--max-new-tokens", type=ca.int_in(1, 1 << 20), default=40)
    p.add_argument("--batch", type=ca.int_in(1, 4096), default=32, help="images captioned per batch")
    p.add_argument("--dry-run", action="store_true", help="measure and report; do not rewrite OUT")
    # Renamed for one flag vocabulary (docs/CLI.md): --images N is a count elsewhere, --max-images is export's.
    console.add_renamed(p, "--images", "--calib")
    console.add_renamed(p, "--max-images", "--calib-count")
    console.add_renamed(p, "--batch-size", "--batch")
    p.set_defaults(func=run_calibrate)
    return p


def _resolve_checkpoint(folder: Any, given: Path | None) -> Path:
    if given is not None:
        return given
    report = folder.path / "validation_report.json"
    recorded = None
    if report.is_file():
        try:
            recorded = json.loads(report.read_text(encoding="utf-8")).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            recorded = None
    if not recorded or not Path(recorded).is_dir():
        raise InputError(f"cannot tell which checkpoint {folder.path} was exported from"
                         f"{f' ({recorded} is gone)' if recorded else ''}; pass --checkpoint CKPT (coverage needs "
                         "the PyTorch model's dense attention)")
    return Path(recorded)


def _check_pair(folder: Any, model: Any, checkpoint: Path) -> None:
    """The checkpoint must be the one the export came from: same shapes and the same embedding table."""
    from .budget import CalibrationError

    s, c = folder.shape, model.config
    mine = (s.num_layers, s.num_heads, s.kv_heads, s.head_dim, s.vocab_size, s.tokens_per_image, s.regions_per_image)
    theirs = (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size,
              c.tokens_per_image, c.regions_per_image)
    table = np.load(folder.embedding_path, mmap_mode="r").astype(np.float32)
    weights = model.embed_tokens.weight.detach().float().numpy()
    same = mine == theirs and table.shape == weights.shape and np.allclose(table, weights, rtol=1e-3, atol=1e-3)
    if not same:
        raise CalibrationError(f"checkpoint {checkpoint} is not the one {folder.path} was exported from (shapes "
                               f"{theirs} vs {mine}, or different weights); pass the right --checkpoint")


def run_calibrate(args: argparse.Namespace) -> int:
    from gaze_edge.runtime.folder import ExportFolder

    from . import budget as bg
    from .data import load_image_set, read_prompts

    if args.calib is None:
        raise InputError("--calib DIR is required: a folder of calibration images (`gaze scenes -o DIR --count 64` "
                         "writes generated ones)")
    coverage = bg.check_coverage(args.coverage)
    if args.min_agreement is not None and not 0.0 < args.min_agreement <= 1.0:
        raise InputError(f"--min-agreement must be in (0, 1] (share of captions identical to the dense model's), "
                         f"got {args.min_agreement}")
    if args.max_new_tokens < 1 or args.batch < 1:
        raise InputError("--max-new-tokens and --batch must be at least 1")
    folder = ExportFolder.open(args.out)
    prompts = read_prompts(args.prompts)
    checkpoint = _resolve_checkpoint(folder, args.checkpoint)
    ca.check_checkpoint_fits(checkpoint, CheckpointError)
    budget = getattr(args, "max_total_pixels", ca.DEFAULT_MAX_TOTAL_PIXELS)
    images = load_image_set(args.calib, args.calib_count, processor=folder.processor, max_total_pixels=budget)
    held = load_image_set(args.held_out, what="held-out", processor=folder.processor,
                          max_total_pixels=budget) if args.held_out else None

    from gaze_edge.model.checkpoint import load_checkpoint  # PyTorch: coverage needs the dense attention

    print(f"[1/5] loading {checkpoint} and {len(images)} calibration images from {args.calib}", file=sys.stderr)
    model, processor = load_checkpoint(checkpoint)
    model.eval()
    _check_pair(folder, model, checkpoint)
    layers, regions = folder.shape.num_layers, folder.shape.regions_per_image
    trained = [model.config.layer_top_k(i) for i in range(layers)]
    current = list(folder.shape.top_k_per_layer)

    print(f"[2/5] captioning at the export's budget {current} and measuring coverage (dense pass)", file=sys.stderr)
    progress = bg.TqdmProgress()
    cap = bg.Captioner(model, processor, images, prompts, args.batch, args.max_new_tokens)
    curves = cap.coverage(cap.captions(current), progress)
    by_coverage = [int(k) for k in bg.choose_top_k(curves.per_layer, coverage)]
    chosen = by_coverage
    per_head = bg.choose_top_k(curves.visual, coverage)
    search: list[dict[str, Any]] = []
    if args.min_agreement is not None:
        print(f"[2b/5] lowering k while >= {args.min_agreement:.0%} of calibration captions match dense",
              file=sys.stderr)
        dense_tokens = cap.captions([regions] * layers)
        chosen, search = bg.descend_by_agreement(cap, by_coverage, dense_tokens, args.min_agreement, progress)

    print(f"[3/5] budget vs quality on {'held-out' if held else 'calibration'} images", file=sys.stderr)
    evaluated = held or images
    ev = bg.Captioner(model, processor, evaluated, prompts, args.batch, args.max_new_tokens)
    budgets = {f"k={k}": [k] * layers for k in range(1, regions + 1)}
    budgets.update({"trained": trained, "calibrated": chosen})
    prompt_len = float(np.mean([len(processor.encode(processor.prompt(p) if p else processor.prompt()))
                                for p in prompts]))
    rows = bg.sweep(ev, folder.shape, budgets, f"k={regions}", prompt_len, progress)
    # Per-head budgets: bytes are linear in k, so a layer's cost is that of its heads' mean k.
    context = next(r.context_len for r in rows if r.name == "calibrated")
    per_head_bytes = bg.kv_bytes_per_token(folder.shape, [float(k) for k in per_head.mean(1)], context)
    report = bg.CalibrationReport(
        coverage_target=coverage, images=len(images), queries=curves.queries, regions=regions,
        trained_top_k=trained, chosen_top_k=chosen, coverage_top_k=by_coverage, min_agreement=args.min_agreement,
        agreement_search=search, per_head_top_k=per_head.tolist(),
        per_head_kv_bytes_per_token=per_head_bytes,
        coverage_per_layer=curves.per_layer.round(5).tolist(),
        coverage_p10_per_layer=curves.visual_p10.round(5).tolist(),
        kept_mass_per_layer=curves.kept.mean(1).round(5).tolist(), rows=rows)

    if held is not None:
        print("[4/5] held-out check of the export before rewriting (ONNX Runtime)", file=sys.stderr)
        report.held_out = {"images": len(held), "folder": str(args.held_out),
                           "before": _runtime_check(folder.path, held, prompts, args)}
    if args.dry_run:
        print("[5/5] --dry-run: the export is unchanged", file=sys.stderr)
    else:
        print(f"[5/5] writing top_k {chosen} into {folder.path}", file=sys.stderr)
        bg.write_top_k(folder, chosen, {
            "coverage_target": coverage, "coverage_top_k": by_coverage, "min_agreement": args.min_agreement,
            "images": len(images), "images_folder": str(args.calib),
            "trained_top_k_per_layer": trained, "coverage_at_chosen_k": [
                round(float(curves.per_layer[i, k - 1]), 5) for i, k in enumerate(chosen)],
            "checkpoint": str(checkpoint), "date": datetime.date.today().isoformat()})
        report.written = True
        if held is not None and report.held_out is not None:
            report.held_out["after"] = _runtime_check(folder.path, held, prompts, args)

    out_dir = args.report or folder.path / "calibration"
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_file(out_dir / "calibration.json", (json.dumps(report.as_dict(), indent=2) + "\n").encode())
    draw(report, out_dir / "calibration.png")
    print(format_report(report))
    print(f"report: {out_dir / 'calibration.json'}, plot: {out_dir / 'calibration.png'}")
    return 0


def _runtime_check(path: Path, held: Any, prompts: list[str | None], args: argparse.Namespace) -> dict[str, Any]:
    """Greedy captions of the export as written, with the torch-free runtime; accuracy where truth exists."""
    from gaze_edge.runtime.generate import GazeRuntime, Prompt
    from gaze_edge.runtime.sampling import SamplingConfig

    from .data import accuracy

    rt = GazeRuntime.load(path)
    texts: list[str] = []
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    for start in range(0, len(held), args.batch):
        batch = [Prompt(prompts[i % len(prompts)], [held.images[i]])
                 for i in range(start, min(len(held), start + args.batch))]
        texts += rt.generate(batch, sampling).texts
    return {"top_k": list(rt.shape.top_k_per_layer),
            "accuracy": accuracy(texts, held.names, held.truth) if held.has_truth else None,
            "texts_sha": _digest(texts)}


def _digest(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def format_report(report: Any) -> str:
    lines = [f"coverage target {report.coverage_target}: {report.queries} gaze queries on {report.images} images, "
             f"R = {report.regions} regions per image",
             "layer  chosen k  coverage at k   (trained k, coverage)"]
    for i, k in enumerate(report.chosen_top_k):
        t = report.trained_top_k[i]
        lines.append(f"{i:>5}  {k:>8}  {report.coverage_per_layer[i][k - 1]:>11.3f}   "
                     f"({t}, {report.coverage_per_layer[i][t - 1]:.3f})")
    if report.min_agreement is not None:
        lines.append(f"coverage chose {report.coverage_top_k}; lowered while >= {report.min_agreement:.0%} of "
                     f"calibration captions match dense ({len(report.agreement_search)} trials) -> "
                     f"{report.chosen_top_k}")
    lines.append(f"per KV head (measured, not written: one top_k per node): {report.per_head_top_k}")
    lines.append("")
    lines.append(f"{'budget':<12} {'top_k per layer':<18} {'KV B/token':>11} {'agree w/ dense':>15} {'accuracy':>9}")
    for r in report.rows:
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        lines.append(f"{r.name:<12} {str(r.top_k):<18} {r.kv_bytes_per_token:>11,.0f} "
                     f"{100 * r.agreement:>14.1f}% {acc:>9}")
    if report.held_out:
        for when in ("before", "after"):
            h = report.held_out.get(when)
            if h:
                acc = "-" if h["accuracy"] is None else f"{100 * h['accuracy']:.1f}%"
                lines.append(f"export {when:<6} top_k {h['top_k']}: held-out accuracy (ONNX Runtime) {acc} "
                             f"on {report.held_out['images']} images")
    return "\n".join(lines)


def draw(report: Any, path: Path) -> None:
    """Coverage curves per layer (target and choice marked) and caption agreement vs KV bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = np.arange(1, report.regions + 1)
    for i, curve in enumerate(report.coverage_per_layer):
        line = left.plot(ks, curve, marker="o", ms=3, label=f"layer {i} (k={report.chosen_top_k[i]})")[0]
        k = report.chosen_top_k[i]
        left.plot([k], [curve[k - 1]], marker="*", ms=14, color=line.get_color())
    left.axhline(report.coverage_target, color="gray", ls="--", lw=1)
    left.set_xlabel("top_k (regions kept per gaze query)")
    left.set_ylabel("share of dense visual attention mass kept")
    left.set_title(f"coverage (target {report.coverage_target}, * = chosen)")
    left.legend(fontsize=8)
    uniform = [r for r in report.rows if r.name.startswith("k=")]
    x = [r.kv_bytes_per_token for r in uniform]
    right.plot(x, [100 * r.agreement for r in uniform], marker="o", label="agreement with dense")
    if all(r.accuracy is not None for r in uniform):
        right.plot(x, [100 * (r.accuracy or 0) for r in uniform], marker="s", label="accuracy")
    for r in uniform:
        right.annotate(r.name, (r.kv_bytes_per_token, 100 * r.agreement), fontsize=7, xytext=(2, -9),
                       textcoords="offset points")
    for r in report.rows:
        if r.name in ("trained", "calibrated"):
            right.plot([r.kv_bytes_per_token], [100 * r.agreement], marker="*", ms=14, ls="",
                       label=f"{r.name} {r.top_k}")
    right.set_xlabel("KV + descriptor bytes read per generated token")
    right.set_ylabel("% of held-out captions")
    right.set_title("quality vs budget")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
