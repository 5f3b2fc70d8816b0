"""`gaze caption` and `gaze profile`: the parsers gaze_edge/cli.py adds, and what they run.

Neither imports torch. Every option is checked while parsing (gaze_edge/cli_args.py); errors
are GazeError subclasses, which gaze_edge.cli prints as one line (exit codes: docs/CLI.md).
Flags mean the same in every subcommand (the table in docs/CLI.md); the ones the runtime
commands share are defined here once (`common_flags`, `sampling_flags`, `media_flags`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from gaze_edge import cli_args as ca
from gaze_edge import console
from gaze_edge.errors import InputError

from .generate import GazeRuntime, Prompt, Timings
from .sampling import SamplingConfig

#: Most images or frames one prompt may hold on the command line (the export's --max-images caps it further).
MAX_PROMPT_IMAGES = 1024


def common_flags(p: argparse.ArgumentParser) -> None:
    """EXPORT, --backend, --threads: every runtime command."""
    p.add_argument("export", type=Path, help="export folder written by `gaze export`")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime or tensorrt")
    p.add_argument("--threads", type=ca.threads, default=None,
                   help="intra-op threads of the backend, 1 .. 1024 (default: the backend's choice)")


def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, what: str = "most tokens one reply generates",
                   ) -> None:
    """--max-new-tokens and the sampling options, with one meaning and one range everywhere."""
    p.add_argument("--max-new-tokens", type=ca.int_in(1, 1 << 20), default=max_new_tokens, help=what)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=ca.number_in(0, math.inf), default=1.0, help="finite, >= 0 (0: greedy)")
    p.add_argument("--top-k", type=ca.non_negative_int, default=0, help="sampling: keep the k most likely (0: off)")
    p.add_argument("--top-p", type=ca.number_in(0, 1, low_open=True), default=1.0, help="in (0, 1]; 1: off")
    p.add_argument("--repetition-penalty", type=ca.number_in(0, math.inf, low_open=True), default=1.0,
                   help="finite, > 0 (1: off)")
    p.add_argument("--seed", type=ca.seed, default=None, help=f"0 .. {ca.MAX_SEED} (default: a fresh one)")


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop_token_ids=tuple(getattr(args, "stop_token_id", ())))


def frames_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--frames N: a count everywhere (frames per video)."""
    p.add_argument("--frames", type=ca.int_in(1, MAX_PROMPT_IMAGES), default=None,
                   help=f"{what} (default: the export's max images)")


# ------------------------------------------------------------------------------------ gaze caption


class _Intermixed(argparse.ArgumentParser):
    """Positionals may follow options (`gaze caption EXPORT --threads 1 a.png b.png`): argparse alone would give
    an IMAGE list of nargs='*' its empty value at EXPORT and then call a.png unrecognized."""

    _mixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def _intermixed(p: argparse.ArgumentParser) -> None:
    """Give a parser built by add_parser (of whatever class the top parser uses) the intermixed parsing."""
    p.__class__ = type(f"Intermixed{type(p).__name__}", (_Intermixed, type(p)), {})


def add_caption_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "caption", help="caption images, or frames sampled from a video, with an exported model",
        description="Caption IMAGE... (all in one prompt) or --video FILE (--frames N frames sampled evenly); "
                    "the text streams to stdout as it is generated.")
    common_flags(p)
    p.add_argument("images", type=Path, nargs="*", default=[], metavar="IMAGE", help="image files, all in one prompt")
    p.add_argument("--video", type=Path, default=None, metavar="FILE",
                   help="a video file (PyAV: pip install 'gaze-edge[video]') instead of images")
    frames_flag(p, "frames sampled evenly from --video")
    p.add_argument("--as-frames", action="store_true",
                   help="the IMAGE files are frames of one video, in order (pre-extracted frames)")
    p.add_argument("--prompt", type=ca.text, default=None,
                   help="user text (default: 'describe the image .', '... the images .' or '... the frames .')")
    sampling_flags(p, 32, "most tokens the caption has")
    p.add_argument("--stop-token-id", type=ca.non_negative_int, action="append", default=[],
                   help="extra stop token (repeatable)")
    console.add_json_flag(p, "the caption, its tokens and words", ca.output_file(".json", stdout=True))
    p.add_argument("--gaze-map", type=ca.output_file(".png"), default=None, metavar="FILE.png",
                   help="write a PNG of the regions selected per word")
    p.set_defaults(func=run_caption, usage_check=caption_usage, usage_parser=p)
    _intermixed(p)
    return p


def caption_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with this combination of caption arguments (a usage error, exit 2), or None."""
    if args.video is not None and args.images:
        return "give IMAGE files or --video FILE, not both"
    if args.video is None and not args.images:
        return "nothing to caption: give IMAGE files or --video FILE"
    if args.video is None and args.frames is not None:
        return ("--frames N samples frames from --video FILE; image files that are the frames of a video go "
                "with --as-frames")
    if args.video is not None and args.as_frames:
        return "--as-frames is for IMAGE files; the frames of --video are frames already"
    return None


def _caption_inputs(args: argparse.Namespace, max_images: int) -> tuple[list[Any], bool, dict[str, Any] | None]:
    """(images, are they frames, the video's description) from IMAGE... or --video; refused when ambiguous."""
    from .media import load_images, load_video

    problem = caption_usage(args)  # gaze_edge.cli reports it while parsing; callers of run_caption get it here
    if problem is not None:
        raise InputError(problem)
    if args.video is None:
        return load_images(args.images), args.as_frames, None
    count = args.frames or max_images
    video = load_video(args.video, count)
    info = {"path": str(args.video), "frames": len(video.frames), "indices": video.indices,
            "total_frames": video.total_frames, "fps": video.fps}
    return list(video.frames), True, info


def run_caption(args: argparse.Namespace) -> int:
    from .backend import create_backend
    from .folder import ExportFolder
    from .gazemap import draw_gaze_map, region_weights

    sampling = sampling_from_args(args)
    sampling.check()
    folder = ExportFolder.open(args.export)
    # Every image file and the video are read and checked before the model loads.
    images, frames, video = _caption_inputs(args, folder.shape.max_images)
    if video is not None:
        console.progress(f"gaze caption: {video['frames']} of {video['total_frames']} frames of {args.video} "
                         f"(numbers {video['indices']})")
    rt = GazeRuntime(folder, create_backend(args.backend, folder, threads=args.threads))
    sampling.check(rt.shape.vocab_size)  # stop token ids inside the vocabulary
    # The least the cache can need (the images, the new tokens): refused before it is allocated.
    rt.folder.check_fits(1, len(images) * rt.shape.tokens_per_image + args.max_new_tokens)
    want_map = args.gaze_map is not None
    words: list[str] = []
    weights: list[Any] = []
    ids: list[int] = []
    eos = rt.folder.tokens.eos
    stream_text = not console.json_to_stdout(args.json)
    timings = Timings()
    for step in rt.stream(Prompt(args.prompt, images, frames), sampling, with_selection=want_map, timings=timings):
        token = int(step.tokens[0])
        if token == eos:
            break
        ids.append(token)
        words.append(rt.processor.decode([token]))
        weights.append(None if step.selection is None else region_weights(step.selection))
        if stream_text:
            print(step.texts[0], end="", flush=True)
    text = rt.processor.decode(ids)
    if stream_text:
        print(flush=True)
    t = timings.as_dict()
    console.detail(f"gaze caption: {len(ids)} tokens; vision {t['vision_ms']:.1f} ms, prefill "
                   f"{t['prefill_ms']:.1f} ms, TTFT {t['ttft_ms']:.1f} ms, decode "
                   f"{t['decode_ms_per_token_median'] or 0:.2f} ms/token (median)")
    if want_map:
        draw_gaze_map(images, words, weights, rt.shape, args.gaze_map)
    if args.json is not None:
        out: dict[str, Any] = {"caption": text, "tokens": ids, "words": words}
        if video is not None:
            out["video"] = video
        if want_map:
            out["gaze_map"] = str(args.gaze_map)
            out["regions_per_word"] = [None if w is None else [int(r) for r in (w > 0).nonzero()[0]]
                                       for w in weights]
        console.write_json(out, args.json)
    return 0


# ------------------------------------------------------------------------------------ gaze profile


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="measured latency per stage (gaze vs dense), KV bytes, memory, power, roofline projection",
        description="Runs --warmup untimed and --repeats timed generations per mode (gaze decode steps, then "
                    "dense ones on the same export, alternating) and reports medians and p90 per stage. "
                    "The roofline figures are a projection, labelled as such.")
    common_flags(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--images", type=ca.int_in(1, MAX_PROMPT_IMAGES), default=1,
                       help="images per prompt (generated pixels)")
    group.add_argument("--frames", type=ca.int_in(1, MAX_PROMPT_IMAGES), default=0,
                       help="video frames per prompt, instead of images (generated pixels; 0: images)")
    p.add_argument("--batch", type=ca.int_in(1, 4096), default=1, help="sequences per batch")
    p.add_argument("--max-new-tokens", type=ca.int_in(1, 1 << 20), default=32,
                   help="tokens each sequence generates (eos ignored: exactly this many)")
    console.add_renamed(p, "--new-tokens", "--max-new-tokens")
    p.add_argument("--warmup", type=ca.non_negative_int, default=2, help="untimed generations per mode first")
    p.add_argument("--repeats", type=ca.int_in(1, 10_000), default=10, help="timed generations per mode")
    p.add_argument("--dense", type=Path, default=None, metavar="EXPORT",
                   help="a dense twin's export for the dense runs (default: this export with gaze turned off)")
    p.add_argument("--no-dense", action="store_true", help="time gaze decode steps only (half the runs)")
    p.add_argument("--launch-overhead-us", type=ca.number_in(0, 1e6), default=None,
                   help="per-token launch overhead of the roofline projection, in microseconds "
                        "(default: runtime/profile.py launch_overhead_us, from the layer count)")
    p.add_argument("--project-layers", type=ca.int_in(1, 4096), default=None, metavar="N",
                   help="project the roofline for the same model with N decoder layers (an export made with "
                        "fewer layers than the real model; weights and KV bytes scaled per layer)")
    console.add_json_flag(p, "the report", ca.output_file(".json", stdout=True))
    p.add_argument("--plot", type=ca.output_file(".png"), default=None, metavar="FILE.png",
                   help="PNG: measured stages gaze vs dense, and the roofline projection in its own panel")
    p.set_defaults(func=run_profile)
    return p


def run_profile(args: argparse.Namespace) -> int:
    from .profile import check_profile_args, format_table, layer_weight_bytes, plot, profile

    if args.plot is not None:
        ca.require("profile --plot", ("matplotlib",))  # before the run, not after it
    if args.dense is not None and args.no_dense:
        raise InputError("--dense EXPORT and --no-dense contradict each other; give one")
    two = args.dense is not None
    # Two runtimes alternate: no spinning thread pools (a spinning one slows the other), as in gaze bench.
    rt = GazeRuntime.load(args.export, backend=args.backend, threads=args.threads, spinning=not two)
    dense_rt = GazeRuntime.load(args.dense, backend=args.backend, threads=args.threads, spinning=False) if two else None
    kwargs = {"images": args.images, "frames": args.frames, "batch": args.batch, "new_tokens": args.max_new_tokens}
    check_profile_args(rt, **kwargs)
    if args.project_layers is not None and layer_weight_bytes(rt) is None:  # before the run, not after it
        raise InputError(f"{rt.folder.path} does not record its per-layer weight bytes (an older export): "
                         "re-run `gaze export` to use --project-layers")
    if dense_rt is not None:
        check_profile_args(dense_rt, **kwargs)
    report = profile(rt, **kwargs, warmup=args.warmup, repeats=args.repeats, dense=not args.no_dense,
                     dense_rt=dense_rt, launch_overhead_us=args.launch_overhead_us,
                     project_layers=args.project_layers, progress=console.progress,
                     detail=console.detail)
    if console.json_to_stdout(args.json):
        console.write_json(report, args.json)
    else:
        print(format_table(report), flush=True)
        console.write_json(report, args.json)
    if args.plot is not None:
        plot(report, str(args.plot))
        console.progress(f"gaze profile: plot written to {args.plot}")
    return 0
