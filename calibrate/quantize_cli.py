"""`gaze quantize SRC -o DST`: the parser gaze_edge/cli.py adds, and what it runs.

Imports nothing heavy at module level (no onnx, no onnxruntime): building the `gaze` parser
stays cheap. Every option is checked while parsing (gaze_edge/cli_args.py); errors are
GazeError subclasses, which gaze_edge.cli prints as one line (exit codes: docs/CLI.md).
Method and measured numbers: docs/QUANTIZE.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gaze_edge import cli_args as ca
from gaze_edge import console

DEFAULT_CALIB_COUNT = 32  # same values as calibrate/quantize.py (not imported here: it imports onnx)
DEFAULT_HELD_OUT_COUNT = 200


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `quantize` subcommand to a `gaze` argparse subparsers object."""
    p = subparsers.add_parser("quantize", help="INT8-quantize an export folder (Q/DQ ONNX) and check it against fp32")
    p.add_argument("export", type=Path, help="fp32 export folder written by `gaze export`")
    p.add_argument("-o", "--output", type=Path, required=True, help="quantized export folder to create")
    p.add_argument("--mode", choices=("int8-weight", "int8"), default="int8-weight",
                   help="int8-weight: weight-only INT8 (default); int8: weights and activations (needs --calib)")
    p.add_argument("--calib", type=Path, default=None, metavar="DIR",
                   help="calibration images (a folder; `gaze scenes -o DIR` writes some); needed by --mode int8")
    p.add_argument("--held-out", type=Path, default=None,
                   help="held-out images for the check (a `gaze scenes` folder with truth.txt scores accuracy); "
                        "default: the calibration images")
    p.add_argument("--held-out-count", type=ca.int_in(1, 1_000_000), default=DEFAULT_HELD_OUT_COUNT,
                   help=f"most held-out images checked (default {DEFAULT_HELD_OUT_COUNT})")
    p.add_argument("--calib-count", type=ca.int_in(1, 1_000_000), default=DEFAULT_CALIB_COUNT,
                   help=f"most calibration images used (default {DEFAULT_CALIB_COUNT})")
    p.add_argument("--max-total-pixels", type=ca.int_in(1, 2**62), default=ca.DEFAULT_MAX_TOTAL_PIXELS,
                   help="most pixels decoded from each image folder (--calib, --held-out), summed over the images "
                        f"used (default {ca.DEFAULT_MAX_TOTAL_PIXELS:,}); a larger folder is refused before decoding")
    p.add_argument("--threads", type=ca.threads, default=None, help="ONNX Runtime intra-op threads (1 .. 1024)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    console.add_json_flag(p, "the report", ca.output_file(".json", stdout=True))
    console.add_renamed(p, "--images", "--calib")  # --images N is a count elsewhere (docs/CLI.md)
    p.set_defaults(func=run_quantize)
    return p


def run_quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeOptions, quantize_export

    options = QuantizeOptions(mode=args.mode, images=args.calib, held_out=args.held_out,
                              held_out_count=args.held_out_count, calib_count=args.calib_count, force=args.force,
                              threads=args.threads,
                              max_total_pixels=getattr(args, "max_total_pixels", ca.DEFAULT_MAX_TOTAL_PIXELS))
    report = quantize_export(args.export, args.output, options)
    if console.json_to_stdout(args.json):
        console.write_json(report, args.json)
        return 0
    print(format_report(report))
    console.write_json(report, args.json)
    return 0


def _pct(value: float | None) -> str:
    return "n/a (no truth.txt)" if value is None else f"{100 * value:.1f}%"


def _mb(value: int) -> str:
    return f"{value / 1e6:.3f} MB"


def _selection_rows(selection: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not selection:
        return []
    return [("gaze positions whose top-k regions changed", f"{selection['positions_with_a_flip']}/"
             f"{selection['gaze_positions']}; max logits error elsewhere "
             f"{selection['logits_rel_err_max_without_flip']:.2e}")]


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain two-column table."""
    check, wb = report["check"], report["weight_bytes"]
    before, after = wb["before"], wb["after"]
    shrink = before["total"] / after["total"] if after["total"] else float("nan")
    matrices = wb["quantized_matrices_before"] / max(wb["quantized_matrices_after"], 1)
    rows = [
        ("mode", report["mode"]),
        ("scheme", report["scheme"]),
        ("checked on", f"{check['images']} images of {check['folder']} ({check['source']})"),
        ("greedy captions identical to fp32", f"{100 * check['greedy_agreement']:.1f}% "
                                              f"({check['identical_captions']}/{check['images']})"),
        ("caption accuracy fp32", _pct(check["accuracy_fp32"])),
        ("caption accuracy quantized", _pct(check["accuracy_quantized"])),
        ("logits rel. L2 error, mean", f"{check['logits_rel_err_mean']:.2e} "
                                       f"({check['logits_positions']} teacher-forced positions)"),
        ("logits rel. L2 error, max", f"{check['logits_rel_err_max']:.2e} (median {check['logits_rel_err_p50']:.2e}, "
                                      f"p99 {check['logits_rel_err_p99']:.2e})"),
        *_selection_rows(check.get("selection")),
        ("weight bytes decoder+vision fp32", f"{_mb(before['total'])} (decoder {_mb(before['decoder'])}, "
                                             f"vision {_mb(before['vision'])})"),
        ("weight bytes decoder+vision quantized", f"{_mb(after['total'])} (decoder {_mb(after['decoder'])}, "
                                                  f"vision {_mb(after['vision'])}); {shrink:.2f}x smaller"),
        ("quantized matrices", f"{_mb(wb['quantized_matrices_before'])} -> {_mb(wb['quantized_matrices_after'])} "
                               f"({matrices:.2f}x)"),
        ("embedding table (unchanged)", _mb(wb["embedding"])),
        ("written", report.get("output", "")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for d in check.get("disagreements", [])[:3]:
        lines.append(f"  differs on {d['image']}: fp32 {d['fp32']!r} vs quantized {d['quantized']!r}")
    return "\n".join(lines)
