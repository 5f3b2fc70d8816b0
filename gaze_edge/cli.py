"""The `gaze` command line. Errors print one message (no traceback) and exit non-zero."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import DEFAULT_CHECKPOINT
from .errors import GazeError


def _demo(args: argparse.Namespace) -> int:
    """Caption a few generated scenes with the PyTorch model and show them beside the truth."""
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
    from .model import evaluate

    argv = [str(args.checkpoint), "--scenes", str(args.scenes)]
    argv += ["--json", str(args.json)] if args.json else []
    evaluate.main(argv + (["--figure", str(args.figure)] if args.figure else []))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaze", description="Gaze Attention VLMs on Jetson-class GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="caption generated scenes with the built-in model (PyTorch)")
    demo.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    demo.add_argument("--scenes", type=int, default=6)
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=_demo)

    sc = sub.add_parser("scenes", help="write held-out generated scenes as PNG files (demo and calibration input)")
    sc.add_argument("-o", "--output", type=Path, required=True)
    sc.add_argument("--count", type=int, default=4)
    sc.add_argument("--size", type=int, default=48, help="image side in pixels")
    sc.add_argument("--seed", type=int, default=7)
    sc.set_defaults(func=_scenes)

    ev = sub.add_parser("evaluate", help="held-out caption accuracy and where the model looks")
    ev.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT)
    ev.add_argument("--scenes", type=int, default=500)
    ev.add_argument("--json", type=Path)
    ev.add_argument("--figure", type=Path, help="draw gaze maps of a few held-out scenes to this PNG")
    ev.set_defaults(func=_evaluate)

    # Parser modules import nothing heavy at module level: `gaze caption` on a device needs
    # neither torch nor onnx (tests/test_runtime_core.py checks it).
    from .calibrate.cli import add_calibrate_parser
    from .calibrate.quantize_cli import add_quantize_parser
    from .export.cli import add_export_parser
    from .export.trt_build import add_build_parser
    from .runtime.cli import add_caption_parser, add_profile_parser

    add_export_parser(sub)
    add_build_parser(sub)
    add_caption_parser(sub)
    add_profile_parser(sub)
    add_calibrate_parser(sub)
    add_quantize_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GazeError as exc:
        print(f"gaze: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gaze: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
