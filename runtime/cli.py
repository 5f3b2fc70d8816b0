"""`gaze caption` and `gaze profile`: the parsers gaze_edge/cli.py adds, and what they run.

Neither imports torch. Every option is checked while parsing (gaze_edge/cli_args.py); errors
are GazeError subclasses, which gaze_edge.cli prints as one line (exit codes: docs/CLI.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from gaze_edge import cli_args as ca
from gaze_edge.atomic import replace_file

from .generate import GazeRuntime, Prompt
from .sampling import SamplingConfig


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", type=Path, help="export folder written by `gaze export`")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or tensorrt")
    p.add_argument("--threads", type=ca.threads, default=None, help="intra-op threads of the backend (1 .. 1024)")


def add_caption_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("caption", help="caption images (or video frames) with an exported model")
    _common(p)
    p.add_argument("images", type=Path, nargs="+", help="image files (all in one prompt)")
    p.add_argument("--frames", action="store_true", help="the images are frames of one video, in order")
    p.add_argument("--prompt", type=ca.text, default=None, help="user text (default: 'describe the image .')")
    p.add_argument("--max-new-tokens", type=ca.int_in(1, 1 << 20), default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=ca.number_in(0, math.inf), default=1.0, help=">= 0 (0: greedy)")
    p.add_argument("--top-k", type=ca.non_negative_int, default=0, help="0: off")
    p.add_argument("--top-p", type=ca.number_in(0, 1, low_open=True), default=1.0, help="in (0, 1]; 1: off")
    p.add_argument("--repetition-penalty", type=ca.number_in(0, math.inf, low_open=True), default=1.0,
                   help="> 0 (1: off)")
    p.add_argument("--seed", type=ca.seed, default=None, help=f"0 .. {ca.MAX_SEED}")
    p.add_argument("--stop-token-id", type=ca.non_negative_int, action="append", default=[],
                   help="extra stop token (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--gaze-map", type=ca.output_file(".png"), default=None,
                   help="write a PNG of the regions selected per word")
    p.set_defaults(func=run_caption)
    return p


def run_caption(args: argparse.Namespace) -> int:
    from .gazemap import draw_gaze_map, region_weights
    from .images import load_image

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop_token_ids=tuple(args.stop_token_id))
    sampling.check()
    images = [load_image(p) for p in args.images]  # every file checked before the model loads
    rt = GazeRuntime.load(args.export, backend=args.backend, threads=args.threads)
    sampling.check(rt.shape.vocab_size)  # stop token ids inside the vocabulary
    # The least the cache can need (the images, the new tokens): refused before it is allocated.
    rt.folder.check_fits(1, len(images) * rt.shape.tokens_per_image + args.max_new_tokens)
    want_map = args.gaze_map is not None
    words: list[str] = []
    weights: list[Any] = []
    ids: list[int] = []
    eos = rt.folder.tokens.eos
    for step in rt.stream(Prompt(args.prompt, images, args.frames), sampling, with_selection=want_map):
        token = int(step.tokens[0])
        if token == eos:
            break
        ids.append(token)
        words.append(rt.processor.decode([token]))
        weights.append(None if step.selection is None else region_weights(step.selection))
        if not args.json:
            print(step.texts[0], end="", flush=True)
    text = rt.processor.decode(ids)
    if want_map:
        draw_gaze_map(images, words, weights, rt.shape, args.gaze_map)
    if args.json:
        out: dict[str, Any] = {"caption": text, "tokens": ids, "words": words}
        if want_map:
            out["gaze_map"] = str(args.gaze_map)
            out["regions_per_word"] = [None if w is None else [int(r) for r in (w > 0).nonzero()[0]]
                                       for w in weights]
        print(json.dumps(out))
    else:
        print(flush=True)
    return 0


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="latency, KV bytes, memory and a Jetson roofline projection")
    _common(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--images", type=ca.int_in(1, 1024), default=1, help="images per prompt")
    group.add_argument("--frames", type=ca.int_in(1, 1024), default=0,
                       help="video frames per prompt (instead of images)")
    p.add_argument("--batch", type=ca.int_in(1, 4096), default=1)
    p.add_argument("--new-tokens", type=ca.int_in(1, 1 << 20), default=32)
    p.add_argument("--json", type=ca.output_file(".json", stdout=True), default=None,
                   help="also write the report as JSON here ('-': stdout only)")
    p.add_argument("--plot", type=ca.output_file(".png"), default=None, help="write a PNG of the roofline projection")
    p.set_defaults(func=run_profile)
    return p


def run_profile(args: argparse.Namespace) -> int:
    from .profile import check_profile_args, format_table, plot, profile

    if args.plot is not None:
        ca.require("profile --plot", ("matplotlib",))  # before the run, not after it
    rt = GazeRuntime.load(args.export, backend=args.backend, threads=args.threads)
    check_profile_args(rt, images=args.images, frames=args.frames, batch=args.batch, new_tokens=args.new_tokens)
    report = profile(rt, images=args.images, frames=args.frames, batch=args.batch, new_tokens=args.new_tokens)
    if args.json is not None and str(args.json) == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_table(report))
        if args.json is not None:
            replace_file(args.json, (json.dumps(report, indent=2) + "\n").encode())
    if args.plot is not None:
        plot(report, str(args.plot))
    return 0
