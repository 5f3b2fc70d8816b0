"""The `gaze` command line: every argument checked while parsing; errors are one line, exit codes in docs/CLI.md."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import DEFAULT_CHECKPOINT, console
from . import cli_args as ca
from .atomic import held_signals, signal_number, signals_interrupt
from .errors import CheckpointError, GazeError, interrupt_in_chain


def _demo(args: argparse.Namespace) -> int:
    """Caption a few generated scenes with the PyTorch model and show them beside the truth."""
    ca.check_checkpoint_fits(args.checkpoint, CheckpointError)
    import numpy as np
    import torch

    from .model import scenes
    from .model.checkpoint import load_checkpoint

    model, processor = load_checkpoint(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    sample = [scenes.sample_scene(rng, held_out=True) for _ in range(args.scenes)]
    images = [scenes.render(s, model.config.image_size, rng)[0] for s in sample]
    ids = torch.tensor([processor.encode(processor.prompt())] * len(sample))
    out = model.generate(ids, pixel_values=torch.from_numpy(processor.preprocess(images)), max_new_tokens=40)
    correct = 0
    print(f"{args.checkpoint}: gaze attention keeps {model.config.gaze_top_k} of "
          f"{model.config.regions_per_image} regions per generated token")
    for scene, tokens in zip(sample, out.sequences.tolist(), strict=True):
        text = processor.decode(tokens)
        ok = scenes.parse_caption(text) == scene.facts
        correct += ok
        print(f"  {'ok ' if ok else 'BAD'} truth: {scene.caption()}\n      model: {text}")
    print(f"{correct}/{len(sample)} captions name exactly the right objects")
    return 0


def _scenes(args: argparse.Namespace) -> int:
    """Write held-out generated scenes as PNG files, with their true captions in truth.txt."""
    import numpy as np
    from PIL import Image

    from .model import scenes

    args.output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    lines = []
    for i in range(args.count):
        scene = scenes.sample_scene(rng, held_out=True)
        image, _ = scenes.render(scene, args.size, rng)
        name = f"scene_{i}.png"
        Image.fromarray(image).save(args.output / name)
        lines.append(f"{name}\t{scene.caption()}")
    (args.output / "truth.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.count} scenes to {args.output} (true captions in truth.txt)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    ca.check_checkpoint_fits(args.checkpoint, CheckpointError)
    import json
    import tempfile

    from .model import evaluate

    argv = [str(args.checkpoint), "--scenes", str(args.scenes)]
    argv += ["--figure", str(args.gaze_map)] if args.gaze_map else []
    with tempfile.TemporaryDirectory(prefix="gaze-evaluate-") as tmp:
        report = Path(tmp) / "evaluate.json"  # then written atomically, or to stdout (--json -)
        argv += ["--json", str(report)] if args.json else []
        # The JSON on stdout replaces the text, which then goes to stderr (docs/CLI.md: --json FILE|-).
        to_stderr = contextlib.redirect_stdout(sys.stderr) if console.json_to_stdout(args.json) else None
        with to_stderr or contextlib.nullcontext():
            evaluate.main(argv)
        if args.json:
            console.write_json(json.loads(report.read_text()), args.json)
    return 0


#: Optional packages each command imports (checked before it starts; a missing one names its extra).
REQUIRES: dict[str, tuple[str, ...]] = {
    "demo": ("torch", "transformers"),
    "evaluate": ("torch", "transformers", "matplotlib"),
    "export": ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"),
    "quantize": ("onnx", "onnxruntime"),
    "calibrate": ("torch", "transformers", "onnx", "onnxruntime", "matplotlib"),
    "caption": ("onnxruntime",),
    "profile": ("onnxruntime",),
    "chat": ("onnxruntime",),
    "serve": ("onnxruntime", "fastapi", "uvicorn", "prometheus_client"),
    "bench": ("onnxruntime",),
    "convert": ("torch", "transformers"),
    "finetune": ("torch", "transformers", "accelerate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ca.GazeArgumentParser(prog="gaze", description="Gaze Attention VLMs on Jetson-class GPUs.",
                                   epilog="exit status: 0 done, 1 failed while running, 2 bad arguments or input "
                                          "(nothing done), 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (docs/CLI.md)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="caption generated scenes with the built-in model (PyTorch)")
    demo.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="a gaze checkpoint folder")
    demo.add_argument("--scenes", type=ca.int_in(1, 10_000), default=6, help="held-out scenes captioned")
    demo.add_argument("--seed", type=ca.seed, default=7, help="seed of the scenes")
    demo.set_defaults(func=_demo)

    sc = sub.add_parser("scenes", help="write held-out generated scenes as PNG files (demo and calibration input)")
    sc.add_argument("-o", "--output", type=ca.output_folder, required=True, help="folder (created with its parents)")
    sc.add_argument("--count", type=ca.int_in(1, 1_000_000), default=4, help="scenes written")
    sc.add_argument("--size", type=ca.int_in(9, 4096), default=64,
                    help="image side in pixels (9 .. 4096; the default model takes 64)")
    sc.add_argument("--seed", type=ca.seed, default=7, help="seed of the scenes")
    sc.set_defaults(func=_scenes)

    ev = sub.add_parser("evaluate", help="held-out caption accuracy and where the model looks")
    ev.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT,
                    help=f"a gaze checkpoint folder (default: {DEFAULT_CHECKPOINT})")
    ev.add_argument("--scenes", type=ca.int_in(1, 1_000_000), default=500, help="held-out scenes captioned")
    console.add_json_flag(ev, "the accuracy report", ca.output_file(".json", stdout=True))
    ev.add_argument("--gaze-map", type=ca.output_file(".png"), default=None, metavar="FILE.png",
                    help="draw gaze maps of a few held-out scenes to this PNG")
    console.add_renamed(ev, "--figure", "--gaze-map")
    ev.set_defaults(func=_evaluate)

    # Parser modules import nothing heavy at module level: `gaze caption` on a device needs
    # neither torch nor onnx (tests/test_runtime_core.py checks it).
    from .calibrate.cli import add_calibrate_parser
    from .calibrate.quantize_cli import add_quantize_parser
    from .export.cli import add_export_parser
    from .export.trt_build import add_build_parser
    from .model.convert import add_convert_parser
    from .model.finetune import add_finetune_parser
    from .runtime.bench import add_bench_parser
    from .runtime.cli import add_caption_parser, add_profile_parser
    from .runtime.commands import add_chat_serve_parsers

    add_export_parser(sub)
    add_convert_parser(sub)
    add_finetune_parser(sub)
    add_build_parser(sub)
    add_caption_parser(sub)
    add_profile_parser(sub)
    add_calibrate_parser(sub)
    add_quantize_parser(sub)
    add_chat_serve_parsers(sub)
    add_bench_parser(sub)
    parser.add_argument("--version", action="version", version=f"gaze {version()}")
    console.add_verbosity_flags(parser, top=True)
    for p in console.walk_parsers(parser):  # one look for every subcommand, wherever its parser is built
        console.use_help_formatter(p)
        if p is not parser and "-v" not in p._option_string_actions:
            console.add_verbosity_flags(p, top=False)
    return parser


def version() -> str:
    """The installed distribution's version (gaze_edge.__version__ when run from a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("gaze-edge")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _set_verbosity(args: argparse.Namespace) -> None:
    level = 1 + int(getattr(args, "verbose", 0)) - int(getattr(args, "quiet", 0))
    console.set_verbosity(level)
    if level < 1:
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own switch: bars that do not pass disable= go quiet


def _interrupted(exc: KeyboardInterrupt) -> int:
    signum = signal_number(exc)
    with held_signals(deliver=False):  # a second Ctrl-C while reporting the first is no traceback
        print(f"gaze: interrupted ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
    return 128 + signum


def _run(args: argparse.Namespace) -> int:
    ca.require(args.command, REQUIRES.get(args.command, ()))
    status = int(args.func(args))
    sys.stdout.flush()  # inside the handlers: a reader that left (`| head`) is a BrokenPipeError caught below
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `gaze` command; the exit status follows docs/CLI.md (0, 1, 2, 128 + signal)."""
    command = "gaze"
    with signals_interrupt():
        try:
            try:
                args = build_parser().parse_args(argv)
                command = f"gaze {args.command}"
                check = getattr(args, "usage_check", None)  # combinations of arguments a parser cannot check
                problem = check(args) if check is not None else None
                if problem is not None:
                    args.usage_parser.error(problem)
            except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
                sys.stdout.flush()
                return exc.code if isinstance(exc.code, int) else 2
            _set_verbosity(args)
            return _run(args)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (gaze_edge.atomic.Interrupted)
            return _interrupted(exc)
        except GazeError as exc:
            interrupt = interrupt_in_chain(exc)  # e.g. "not installed" for an import that was interrupted
            if interrupt is not None:
                return _interrupted(interrupt)
            ca.print_error(str(exc))
            return exc.exit_code
        except ImportError as exc:  # an optional package imported deeper than REQUIRES knows
            interrupt = interrupt_in_chain(exc)
            if interrupt is not None:
                return _interrupted(interrupt)
            top = (exc.name or "").split(".")[0]
            if not isinstance(exc, ModuleNotFoundError) or top not in ca.EXTRAS:
                raise  # not a missing optional package: a bug, keep its traceback
            ca.print_error(f"`{command}` needs {top}, which is not installed here: "
                           f"pip install 'gaze-edge[{ca.EXTRAS[top]}]'")
            return 2
        except MemoryError:
            ca.print_error("out of memory: use fewer or smaller inputs (images, --batch, --max-new-tokens)")
            return 1
        except BrokenPipeError:  # `gaze caption ... | head`: the reader left; stop quietly, as SIGPIPE would
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit: no error
            return 128 + signal.SIGPIPE
        except OSError as exc:  # a write failed (disk full, permissions) after the command started
            ca.print_error(str(exc))
            return 1


def entry() -> None:
    """The `gaze` program: run the command, then exit with its status.

    Once the command is done (its output committed or cleaned up), a SIGTERM or SIGHUP that arrives
    while the interpreter shuts down would kill the process with the signal's default action; it is
    ignored instead, so the status says what the command did.
    """
    code = main()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
