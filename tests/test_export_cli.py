"""`gaze export`: a complete, validated folder; bad input named clearly; nothing half-written left behind."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import pytest
import torch

from gaze_edge import console
from gaze_edge.errors import CheckpointError, GazeError
from gaze_edge.export import onnx_export
from gaze_edge.export.cli import ExportError, add_export_parser
from gaze_edge.model.checkpoint import save_checkpoint
from gaze_edge.model.configuration import GazeConfig
from gaze_edge.model.modeling import GazeForConditionalGeneration
from gaze_edge.model.processing import default_processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    processor = default_processor(48, 36)
    torch.manual_seed(5)
    model = GazeForConditionalGeneration(
        GazeConfig(vocab_size=processor.tokenizer.get_vocab_size(), num_hidden_layers=2, gaze_top_k=[2, 3])
    )
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(model, processor, path)
    return path


def run(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="gaze")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    return int(args.func(args))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_export_writes_a_complete_validated_folder(checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        run(checkpoint, "-o", out)
    assert run(checkpoint, "-o", out, "--force", "--max-seq-len", "96", "--max-images", "2",
               "--validate-scenes", "2") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "decoder.onnx", "vision.onnx", "embed_tokens.npy", "gaze_config.json", "validation_report.json",
        "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
    ])
    assert leftovers(tmp_path) == []
    report = json.loads((out / "validation_report.json").read_text())
    assert report["passed"] and report["greedy_identical"] == "2/2"
    config = json.loads((out / "gaze_config.json").read_text())
    assert config["gaze"]["top_k_per_layer"] == [2, 3]
    assert config["gaze"]["grid"] == [6, 6] and config["gaze"]["region_size"] == [2, 2]
    assert config["model"]["decoder"]["kv_cache"]["max_seq_len"] == 96
    assert config["model"]["decoder"]["descriptors"]["num_regions"] == 18
    assert config["special_tokens"]["eos_token_id"] == 2 and "<assistant>" in config["chat_template"]
    assert config["search"]["do_sample"] is False
    captured = capsys.readouterr()
    assert "[1/6]" in captured.err and "[6/6] done" in captured.err  # progress on stderr
    assert "[1/6]" not in captured.out and captured.out.startswith(f"wrote {out} (validation:")


def test_trt_compat_export_has_no_function_and_external_data(checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "trt"
    console.set_verbosity(0)  # what -q sets: no progress on stderr, the result line still on stdout
    try:
        assert run(checkpoint, "-o", out, "--trt-compat", "--external-data", "--max-images", "1") == 0
    finally:
        console.set_verbosity(1)
    captured = capsys.readouterr()
    assert "[1/6]" not in captured.err and captured.out.startswith(f"wrote {out} ")
    proto = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert len(proto.functions) == 0 and len(onnx_export.gaze_nodes(proto)) == 2
    assert (out / "decoder.onnx.data").is_file()  # weights stored beside the graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert "skipped" in json.loads((out / "validation_report.json").read_text())


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda p: json.dump({**json.loads((p / "config.json").read_text()), "model_type": "llama"},
                             (p / "config.json").open("w")), CheckpointError, "model_type is 'llama'"),
        (lambda p: (p / "model.safetensors").unlink(), CheckpointError, "has no model.safetensors"),
        (lambda p: (p / "tokenizer.json").unlink(), GazeError, "has no tokenizer.json"),
    ],
)
def test_bad_checkpoint_is_named_and_nothing_is_left(checkpoint: Path, tmp_path: Path, damage, error, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    damage(broken)
    with pytest.raises(error, match=message):
        run(broken, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_checkpoint_and_bad_options(tmp_path: Path, checkpoint: Path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path / "nope", "-o", tmp_path / "out")
    with pytest.raises(ExportError, match="does not exist"):
        run(checkpoint, "-o", tmp_path / "no" / "such" / "out")
    with pytest.raises(SystemExit) as info:  # refused while parsing (more cases: tests/test_hardening.py)
        run(checkpoint, "-o", tmp_path / "out", "--opset", "17")
    assert info.value.code == 2 and "--opset: must be an integer in 18 .. 23, got 17" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_interrupted_export_leaves_nothing(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_vision", interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, "-o", out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_validation_keeps_the_old_output(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import gaze_edge.export.validate as validate

    def failing(*args, **kwargs):
        return {"passed": False, "prefill_logits_rel_err": 0.5, "decode_logits_rel_err": 0.5, "tolerance": 1e-4,
                "greedy_identical": "0/1"}

    monkeypatch.setattr(validate, "validate_export", failing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(ExportError, match="validation failed"):
        run(checkpoint, "-o", out, "--force", "--max-images", "1")
    assert (out / "keep.txt").read_text() == "previous export" and leftovers(tmp_path) == []
