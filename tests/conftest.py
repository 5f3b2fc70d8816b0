"""Session fixtures shared by the runtime tests: one export of the default model, made once per session."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from gaze_edge import DEFAULT_CHECKPOINT


def _checkpoint(tmp: Path) -> Path:
    """$GAZE_TEST_CHECKPOINT, else the trained default checkpoint when present, else random weights of its shape."""
    override = os.environ.get("GAZE_TEST_CHECKPOINT")
    if override:
        return Path(override)
    if (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        return DEFAULT_CHECKPOINT
    import torch

    from gaze_edge.model.checkpoint import save_checkpoint
    from gaze_edge.model.modeling import GazeForConditionalGeneration
    from gaze_edge.model.train import tiny_config, tiny_processor

    processor = tiny_processor()
    torch.manual_seed(3)
    config = tiny_config(processor.tokenizer.get_vocab_size(), 2, processor.context_token_ids)
    model = GazeForConditionalGeneration(config)
    save_checkpoint(model, processor, tmp / "ckpt")
    return tmp / "ckpt"


@pytest.fixture(scope="session")
def runtime_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, export folder): fp32, 4 images per sequence, gaze query outputs for gaze maps."""
    from gaze_edge.export.cli import add_export_parser

    tmp = tmp_path_factory.mktemp("runtime")
    checkpoint = _checkpoint(tmp)
    out = tmp / "export"
    parser = argparse.ArgumentParser(prog="gaze")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", str(checkpoint), "-o", str(out), "--max-seq-len", "768", "--max-images", "4",
                              "--gaze-map-outputs", "--validate-scenes", "1"])
    assert args.func(args) == 0
    return checkpoint, out


@pytest.fixture(scope="session")
def torch_model(runtime_export: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from gaze_edge.model.checkpoint import load_checkpoint

    model, processor = load_checkpoint(runtime_export[0])
    return model.eval(), processor
