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
    gen = OnnxGazeGenerator(tmp_path, LayoutConfig.from_model_config(config), threads=2)
    ids = np.array([[config.bos_token_id] + [config.image_token_id] * config.tokens_per_image
                     + list(config.context_token_ids) + [10, 11, config.assistant_token_id]])
    mask = np.ones_like(ids)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 378, 378)).astype(np.float32)
    gen.reset(1, ids.shape[1] + 2)
    logits = gen.forward(gen.embed(ids, pixels), ids, mask, gaze=False)
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
