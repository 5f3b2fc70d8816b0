"""Exported decoder and vision graphs of a tiny random-weight model: structure and ONNX Runtime parity."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gaze_edge.export import onnx_export as ox
from gaze_edge.export.gaze_function import CONTEXT_ATTENTION, DOMAIN, OP_TYPE, ROUTING
from gaze_edge.export.node import DECODER_CALL_INPUTS
from gaze_edge.export.validate import LayoutConfig, OnnxGazeGenerator, validate_export
from gaze_edge.model.configuration import GazeConfig
from gaze_edge.model.modeling import GazeForConditionalGeneration
from gaze_edge.model.processing import default_processor

TOP_K = [2, 3]


def write_export(model: GazeForConditionalGeneration, folder: Path, trt_compat: bool = False) -> Path:
    folder.mkdir(parents=True)
    ox.export_decoder(model, folder / "decoder.onnx", max_images=2, opset=18, trt_compat=trt_compat)
    ox.export_vision(model, folder / "vision.onnx", opset=18)
    ox.export_embeddings(model, folder / "embed_tokens.npy")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    processor = default_processor(48, 36)
    torch.manual_seed(3)
    config = GazeConfig(vocab_size=processor.tokenizer.get_vocab_size(), num_hidden_layers=2, gaze_top_k=TOP_K)
    model = GazeForConditionalGeneration(config).eval()
    folder = write_export(model, tmp_path_factory.mktemp("export") / "fp32")
    return model, processor, folder


def test_decoder_graph_structure(tiny):
    model, _, folder = tiny
    onnx.checker.check_model(str(folder / "decoder.onnx"), full_check=True)
    onnx.checker.check_model(str(folder / "vision.onnx"), full_check=True)
    proto = onnx.load(str(folder / "decoder.onnx"))
    nodes = ox.gaze_nodes(proto)
    assert len(nodes) == model.config.num_hidden_layers
    for layer, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"top_k": TOP_K[layer], "max_region_tokens": 4, "scale": pytest.approx(64**-0.5),
                         "routing": ROUTING["kv_head"], "context_attention": CONTEXT_ATTENTION["own_image"],
                         "plugin_namespace": b"gaze", "plugin_version": b"2"}
        assert len(node.input) == 16 and len(node.output) == 4
    assert [(f.domain, f.name) for f in proto.functions] == [(DOMAIN, OP_TYPE)]
    names = [i.name for i in proto.graph.input]
    assert names[:12] == list(DECODER_CALL_INPUTS)
    assert names[12:15] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.0.desc"]
    # Past and present share shapes, so one buffer can serve both.
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.input, *proto.graph.output]}
    assert shapes["past_key_values.1.key"] == shapes["present.1.key"]
    assert shapes["past_key_values.1.desc"] == shapes["present.1.desc"]
    # Logits only where asked (prefill: the last position), a dynamic count of their own.
    assert shapes["logits_positions"][0] == shapes["logits"][1] and isinstance(shapes["logits"][1], str)


def test_trt_variant_has_no_function(tiny, tmp_path: Path):
    model, _, _ = tiny
    folder = tmp_path / "trt"
    folder.mkdir()
    ox.export_decoder(model, folder / "decoder.onnx", max_images=2, opset=18, trt_compat=True)
    proto = onnx.load(str(folder / "decoder.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert len(proto.functions) == 0 and len(ox.gaze_nodes(proto)) == 2


def next_token(logits: np.ndarray, model: GazeForConditionalGeneration) -> np.ndarray:
    """Greedy next token, never `<image>` (a random model may pick it; it needs pixels)."""
    last = logits[:, -1].copy()
    last[:, model.config.image_token_id] = -np.inf
    return last.argmax(-1)[:, None]


def test_prefill_and_decode_logits_match_pytorch(tiny):
    """Left-padded batch with 1 and 2 images, prefill in two chunks, then gaze decode steps."""
    model, processor, folder = tiny
    gen = OnnxGazeGenerator(folder, LayoutConfig.from_model_config(model.config))
    ids, mask = processor.batch_encode([processor.prompt(num_images=1), processor.prompt(num_images=2)])
    pixels = np.random.default_rng().standard_normal((3, 3, 48, 48)).astype(np.float32)
    gen.reset(2, ids.shape[1] + 4)
    embeds = gen.embed(ids, pixels)
    half = ids.shape[1] // 2
    onnx_logits = np.concatenate([
        gen.forward(embeds[:, :half], ids[:, :half], mask[:, :half], gaze=False),
        gen.forward(embeds[:, half:], ids[:, half:], mask[:, half:], gaze=False),
    ], axis=1)
    with torch.no_grad():
        cache = model.new_cache(2)
        ref = model(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                    attention_mask=torch.from_numpy(mask), past_key_values=cache).logits.numpy()
    valid = mask.astype(bool)
    assert np.linalg.norm(onnx_logits[valid] - ref[valid]) / np.linalg.norm(ref[valid]) < 1e-4
    token = next_token(ref, model)
    for _ in range(3):
        step = gen.forward(gen.embed(token, None), token, np.ones_like(token), gaze=True)
        with torch.no_grad():
            ref_step = model(torch.from_numpy(token), gaze_mask=torch.ones(token.shape, dtype=torch.bool),
                             past_key_values=cache).logits.numpy()
        assert np.linalg.norm(step - ref_step) / np.linalg.norm(ref_step) < 1e-4
        token = next_token(ref_step, model)


def test_greedy_generation_identical_on_held_out_scenes(tiny):
    model, processor, folder = tiny
    report = validate_export(folder, model, processor, scenes=3, max_new_tokens=16, seed=11)
    assert report["passed"], report
    assert report["greedy_identical"] == "3/3"
    assert report["prefill_logits_rel_err"] < 1e-4 and report["decode_logits_rel_err"] < 1e-4


def test_fp16_export_within_spec_tolerance(tiny, tmp_path: Path):
    model, processor, _ = tiny
    folder = write_export(copy.deepcopy(model).half(), tmp_path / "fp16")
    report = validate_export(folder, model, processor, dtype="fp16", scenes=2, max_new_tokens=8)
    assert report["prefill_logits_rel_err"] < 1e-2 and report["decode_logits_rel_err"] < 1e-2, report


def test_optimum_config_describes_the_graph_and_its_dummy_inputs_validate(tiny):
    """optimum's OnnxConfig names match the graph; its dummy inputs run in ORT and match the torch op."""
    import onnxruntime as ort

    from gaze_edge.export.optimum_config import GazeDecoderOnnxConfig

    model, _, folder = tiny
    onnx_config = GazeDecoderOnnxConfig(model.config, max_images=2)
    sess = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert list(onnx_config.inputs) == [i.name for i in sess.get_inputs()]
    assert list(onnx_config.outputs) == [o.name for o in sess.get_outputs()]
    dummy = onnx_config.generate_dummy_inputs(framework="pt")
    got = sess.run(None, {name: t.numpy() for name, t in dummy.items()})
    with torch.no_grad():
        want = ox.GazeDecoderForExport(model, "gaze", "2")(*dummy.values())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
