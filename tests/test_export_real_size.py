"""A real-size configuration (LLaVA-OneVision-0.5B shapes, 2 decoder layers, random weights) exports with
external data and runs one step in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gaze_edge.export import onnx_export as ox
from gaze_edge.export.validate import LayoutConfig, OnnxGazeGenerator
from gaze_edge.model.configuration import llava_onevision_0_5b_config
from gaze_edge.model.modeling import GazeForConditionalGeneration


def _prefill_and_gaze_step_match_pytorch(folder: Path, config, model, ids: np.ndarray, pixels: np.ndarray) -> None:
    """One ONNX Runtime prefill (last position) and one gaze decode step within 1e-4 of PyTorch."""
    gen = OnnxGazeGenerator(folder, LayoutConfig.from_model_config(config), threads=2)
    gen.reset(1, ids.shape[1] + 2)
    logits = gen.forward(gen.embed(ids, pixels), ids, np.ones_like(ids), gaze=False)
    step = np.array([[12]])
    step_logits = gen.forward(gen.embed(step, None), step, np.ones_like(step), gaze=True)
    with torch.no_grad():
        cache = model.new_cache(1)
        ref = model(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), past_key_values=cache).logits
        ref_step = model(torch.from_numpy(step), gaze_mask=torch.ones(1, 1, dtype=torch.bool),
                         past_key_values=cache).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    for got, want in ((logits[:, -1], ref[:, -1].numpy()), (step_logits, ref_step.numpy())):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


@pytest.mark.slow
def test_real_size_exports_with_external_data_and_runs(tmp_path: Path):
    torch.manual_seed(0)
    config = llava_onevision_0_5b_config(num_hidden_layers=2, vision_num_layers=1)
    model = GazeForConditionalGeneration(config).eval()
    ox.export_decoder(model, tmp_path / "decoder.onnx", max_images=1, opset=18, external_data=True)
    ox.export_vision(model, tmp_path / "vision.onnx", opset=18, external_data=True)
    ox.export_embeddings(model, tmp_path / "embed_tokens.npy")
    assert (tmp_path / "decoder.onnx.data").stat().st_size > 500e6  # lm_head alone is 545 MB in fp32
    assert (tmp_path / "decoder.onnx").stat().st_size < 10e6
    onnx.checker.check_model(str(tmp_path / "decoder.onnx"), full_check=True)
    proto = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    assert len(ox.gaze_nodes(proto)) == 2 and len(proto.functions) == 1

    # One prefill step over a prompt with one image (729 visual + 4 context tokens) and a decode step.
    ids = np.array([[config.bos_token_id] + [config.image_token_id] * config.tokens_per_image
                     + list(config.context_token_ids) + [10, 11, config.assistant_token_id]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 378, 378)).astype(np.float32)
    _prefill_and_gaze_step_match_pytorch(tmp_path, config, model, ids, pixels)


def _real_size_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "real_size.py"
    spec = importlib.util.spec_from_file_location("real_size", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cambrian_4b_shapes_export_run_and_profile(tmp_path: Path):
    """Issue #13: the paper's Cambrian-4B shapes (Qwen3-4B + SigLIP2-So400m/16 at 512 px; here 1 decoder and
    1 vision layer, random weights) export with external data (bench/real_size.py, what docs/PERF.md quotes),
    run a prefill and a gaze decode step in ONNX Runtime equal to PyTorch, and `gaze profile --json
    --project-layers 36` reports the full model's weight and KV bytes per token."""
    import json

    from gaze_edge.cli import main as gaze_main
    from gaze_edge.model.configuration import cambrian_4b_config

    config = cambrian_4b_config(num_hidden_layers=1, vision_num_layers=1)
    assert (config.tokens_per_image, config.regions_per_image, config.gaze_top_k) == (1024, 16, 4)
    folder = _real_size_script().export(tmp_path, 1, max_images=1, kinds=("gaze",), max_seq_len=1100,
                                        model_name="cambrian-4b")["gaze"]
    assert (folder / "decoder.onnx.data").stat().st_size > 1.5e9  # lm_head 151936 x 2560 fp32 alone is 1.56 GB
    proto = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    (node,) = ox.gaze_nodes(proto)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    # context_attention 1: own_image (docs/ONNX_CONTRACT.md)
    assert attrs["top_k"] == 4 and attrs["max_region_tokens"] == 64 and attrs["context_attention"] == 1

    torch.manual_seed(0)  # the script's model: same seed, same config
    model = GazeForConditionalGeneration(config).eval()
    ids = np.array([[151644] + [config.image_token_id] * config.tokens_per_image + list(config.context_token_ids)
                    + [10, 11, 151644]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
    _prefill_and_gaze_step_match_pytorch(folder, config, model, ids, pixels)
    del model

    out = tmp_path / "profile.json"
    assert gaze_main(["profile", str(folder), "--project-layers", "36", "--no-dense", "--warmup", "0",
                      "--repeats", "1", "--max-new-tokens", "2", "--threads", "2", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    layer = (2560 * 4096 * 2 + 2560 * 1024 * 2 + 3 * 2560 * 9728 + 2 * 2560 + 2 * 128) * 4  # Qwen3-4B, fp32
    assert report["decoder_weight_bytes"] == {"per_layer_bytes": layer, "other_bytes": (2560 + 151936 * 2560) * 4}
    proj = report["roofline_projection"]
    assert proj["decoder_layers"] == 36 and proj["layers_projected_from_export"]
    assert proj["weights_bytes_per_step"] == (2560 + 151936 * 2560) * 4 + 36 * layer + 2560 * 4
    kv, full = report["kv_bytes_per_step"], proj["kv_bytes_per_step"]
    assert full == {mode: 36 * v for mode, v in kv.items()}
    context = report["context_tokens"]
    per_token = 2 * 8 * 128 * 4  # K and V, 8 KV heads of 128, fp32, one layer
    assert kv["dense"] == per_token * context
    kept = 4 * 64  # top_k 4 regions of 8 x 8 tokens
    assert kv["gaze"] == per_token * (context - 1024 + kept) + 8 * 16 * 128 * 4
