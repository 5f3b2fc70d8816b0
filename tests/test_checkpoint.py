"""Checkpoint round trip, and every corrupt or incomplete checkpoint named clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gaze_edge.errors import CheckpointError
from gaze_edge.model.checkpoint import load_checkpoint, save_checkpoint
from gaze_edge.model.configuration import GazeConfig
from gaze_edge.model.modeling import GazeForConditionalGeneration
from gaze_edge.model.processing import default_processor


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    processor = default_processor(48, 36)
    torch.manual_seed(1)
    model = GazeForConditionalGeneration(
        GazeConfig(vocab_size=processor.tokenizer.get_vocab_size(), num_hidden_layers=2, gaze_top_k=[2, 3])
    )
    save_checkpoint(model, processor, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_round_trip_same_outputs(checkpoint: Path, tmp_path: Path):
    model, processor = load_checkpoint(checkpoint)
    assert model.config.gaze_top_k == [2, 3]
    save_checkpoint(model, processor, tmp_path / "again")
    again, _ = load_checkpoint(tmp_path / "again")
    ids = torch.tensor([processor.encode(processor.prompt())])
    pixels = torch.randn(1, 3, 48, 48)
    a = model.generate(ids, pixel_values=pixels, max_new_tokens=6)
    b = again.generate(ids, pixel_values=pixels, max_new_tokens=6)
    assert a.sequences.tolist() == b.sequences.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits, again(ids, pixel_values=pixels).logits,
                                   rtol=0, atol=0)
    assert {p.name for p in checkpoint.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"
    }


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, fn) -> None:
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
        (lambda p: (p / "tokenizer.json").unlink(), "has no tokenizer.json"),
        (lambda p: (p / "config.json").write_text("{ not json"), "config.json is not valid JSON"),
        (lambda p: _edit_config(p, model_type="llama"), "model_type is 'llama'"),
        (lambda p: _edit_json(p / "tokenizer_config.json", image_token="<|image_pad|>"),
         r"tokenizer.json has no '<\|image_pad\|>' token"),
        (lambda p: _edit_config(p, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (lambda p: _edit_config(p, gaze_top_k=[2, 2, 2]), "gaze_top_k has 3 entries"),
        (lambda p: _edit_config(p, hidden_size=0), "hidden_size must be a positive integer"),
        (lambda p: _edit_weights(p, lambda s: s.pop("lm_head.weight")), "missing tensors lm_head.weight"),
        (lambda p: _edit_weights(p, lambda s: s.update(extra=torch.zeros(1))), "unexpected tensors extra"),
        (
            lambda p: _edit_weights(p, lambda s: s.update({"norm.weight": torch.zeros(7)})),
            r"tensor norm.weight has shape \(7,\), config.json implies \(128,\)",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
            "not a readable safetensors file",
        ),
    ],
)
def test_corrupt_checkpoint_is_named(checkpoint: Path, damage, message: str):
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_cli_reports_corrupt_checkpoint_without_traceback(checkpoint: Path):
    shutil.copy(checkpoint / "config.json", checkpoint / "config.bak")
    (checkpoint / "config.json").write_text("[1, 2")
    proc = subprocess.run(
        [sys.executable, "-m", "gaze_edge.cli", "demo", "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "gaze: error:" in proc.stderr and "config.json is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
