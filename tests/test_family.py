"""The model family: Qwen3-style decoder (q/k RMSNorm before rotary) and SigLIP-style tower beside the
Qwen2-style decoder and tiny ViT; invariances, checkpoints, and the ONNX export of the new options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gaze_edge.errors import CheckpointError
from gaze_edge.export import onnx_export as ox
from gaze_edge.export.validate import LayoutConfig, OnnxGazeGenerator, validate_export
from gaze_edge.model import scenes
from gaze_edge.model.checkpoint import load_checkpoint, save_checkpoint
from gaze_edge.model.configuration import GazeConfig
from gaze_edge.model.modeling import GazeForConditionalGeneration
from gaze_edge.model.processing import default_processor
from gaze_edge.model.towers import SiglipTower, VisionTower

FAMILY = dict(decoder_style="qwen3", vision_style="siglip", num_hidden_layers=2, gaze_top_k=[2, 3],
              vision_num_layers=2)


@pytest.fixture(scope="module")
def processor():
    return default_processor(48, 36)


def build(processor, seed: int = 0, **fields) -> GazeForConditionalGeneration:
    torch.manual_seed(seed)
    config = GazeConfig(vocab_size=processor.tokenizer.get_vocab_size(), **{**FAMILY, **fields})
    model = GazeForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model(processor):
    return build(processor)


def inputs(processor, num_images: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [scenes.render(scenes.sample_scene(rng), 48, rng)[0] for _ in range(num_images)]
    prompt = torch.tensor([processor.encode(processor.prompt(num_images=num_images))])
    caption = torch.tensor([processor.encode("a red circle at top left")])
    ids = torch.cat([prompt, caption], 1)
    gaze = torch.zeros_like(ids, dtype=torch.bool)
    gaze[:, prompt.shape[1]:] = True
    return ids, torch.from_numpy(processor.preprocess(images)), gaze


def test_parameters_follow_the_styles(processor):
    qwen3 = build(processor).state_dict()
    assert "layers.0.self_attn.q_norm.weight" in qwen3 and "layers.0.self_attn.k_norm.weight" in qwen3
    assert qwen3["layers.0.self_attn.q_norm.weight"].shape == (64,)
    assert "layers.0.self_attn.q_proj.bias" not in qwen3 and "layers.0.self_attn.o_proj.bias" not in qwen3
    biased = build(processor, attention_bias=True).state_dict()
    assert {"layers.1.self_attn.q_proj.bias", "layers.1.self_attn.v_proj.bias", "layers.1.self_attn.o_proj.bias"} \
        <= set(biased)
    qwen2 = build(processor, decoder_style="qwen2", vision_style="vit")
    names = set(qwen2.state_dict())
    assert "layers.0.self_attn.q_proj.bias" in names and "layers.0.self_attn.o_proj.bias" not in names
    assert not any("q_norm" in n for n in names)
    assert isinstance(qwen2.vision, VisionTower)
    siglip = build(processor).vision
    assert isinstance(siglip, SiglipTower) and siglip.norm is not None
    assert build(processor, vision_post_layernorm=False).vision.norm is None


def test_qk_norm_is_applied_before_rotary(model):
    """project() equals a by-hand Qwen3 computation: per-head RMSNorm, then rotate-half rotary."""
    attn = model.layers[0].self_attn
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(3, 8)[None]
    q, k, v = attn.project(x, pos)
    qh = attn.q_proj(x).view(1, 5, attn.heads, attn.head_dim)
    qh = qh * torch.rsqrt(qh.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * attn.q_norm.weight
    inv = 1.0 / (model.config.rope_theta ** (torch.arange(0, 64, 2).float() / 64))
    ang = torch.cat([pos[0, :, None] * inv] * 2, -1)
    qh = qh.transpose(1, 2)
    want = qh * ang.cos() + torch.cat([-qh[..., 32:], qh[..., :32]], -1) * ang.sin()
    torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-5)
    assert k.shape == v.shape == (1, 2, 5, 64)


def test_siglip_image_size_may_leave_a_remainder(processor):
    """384 px at patch 14: 27 x 27 tokens, as SigLIP's convolution gives; the tiny ViT still refuses it."""
    config = GazeConfig(vocab_size=64, vision_style="siglip", image_size=62, patch_size=14, region_size=(2, 2))
    assert config.grid_size == 4 and config.tokens_per_image == 16
    tower = SiglipTower(config)
    assert tower(torch.randn(2, 3, 62, 62)).shape == (2, 16, config.hidden_size)
    with pytest.raises(CheckpointError, match="multiple of patch_size"):
        GazeConfig(vocab_size=64, image_size=62, patch_size=14).validate()
    with pytest.raises(CheckpointError, match="decoder_style must be one of"):
        GazeConfig(vocab_size=64, decoder_style="llama").validate()


def test_chunking_invariance_and_dense_twin(processor, model):
    ids, pixels, gaze = inputs(processor)
    with torch.no_grad():
        whole = model(ids, pixel_values=pixels, gaze_mask=gaze).logits
        cache = model.new_cache(1)
        embeds = model.embed(ids, pixels)
        pieces = [model(ids[:, s:s + 7], inputs_embeds=embeds[:, s:s + 7], gaze_mask=gaze[:, s:s + 7],
                        past_key_values=cache).logits for s in range(0, ids.shape[1], 7)]
        torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-4, atol=1e-5)
        regions = 2 * model.config.regions_per_image
        dense = model(ids, pixel_values=pixels, gaze_mask=torch.zeros_like(gaze)).logits
        twin = model(ids, pixel_values=pixels, gaze_mask=gaze, gaze_top_k=regions).logits
        torch.testing.assert_close(twin, dense, rtol=1e-5, atol=1e-6)
        assert (whole - dense).abs().max() > 1e-3  # top_k 2 and 3 of 18 do change the answer tokens


def test_checkpoint_round_trip(processor, model, tmp_path: Path):
    save_checkpoint(model, processor, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.decoder_style == "qwen3" and loaded.config.vision_style == "siglip"
    ids, pixels, gaze = inputs(processor, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pixels, gaze_mask=gaze).logits,
                                   model(ids, pixel_values=pixels, gaze_mask=gaze).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("family") / "export"
    folder.mkdir()
    ox.export_decoder(model, folder / "decoder.onnx", max_images=2, opset=18)
    ox.export_vision(model, folder / "vision.onnx", opset=18)
    ox.export_embeddings(model, folder / "embed_tokens.npy")
    return folder


def next_token(logits: np.ndarray, model: GazeForConditionalGeneration) -> np.ndarray:
    last = logits[:, -1].copy()
    last[:, model.config.never_generated_ids] = -np.inf  # a random model may pick <image>, which needs pixels
    return last.argmax(-1)[:, None]


def test_export_matches_pytorch(processor, model, exported: Path):
    """Qwen3 + SigLIP through the same GazeAttention node: prefill and gaze decode logits as in PyTorch."""
    import onnx

    proto = onnx.load(str(exported / "decoder.onnx"))
    nodes = ox.gaze_nodes(proto)
    assert len(nodes) == 2 and all(len(n.input) == 16 and len(n.output) == 4 for n in nodes)
    gen = OnnxGazeGenerator(exported, LayoutConfig.from_model_config(model.config))
    ids, pixels, _ = inputs(processor, 2)
    ids_np = ids.numpy()
    mask = np.ones_like(ids_np)
    gen.reset(1, ids.shape[1] + 3)
    logits = gen.forward(gen.embed(ids_np, pixels.numpy()), ids_np, mask, gaze=False)
    with torch.no_grad():
        cache = model.new_cache(1)
        ref = model(ids, pixel_values=pixels, past_key_values=cache).logits.numpy()
        assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 1e-4
        token = next_token(ref, model)
        for _ in range(2):
            step = gen.forward(gen.embed(token, None), token, np.ones_like(token), gaze=True)
            want = model(torch.from_numpy(token), gaze_mask=torch.ones(1, 1, dtype=torch.bool),
                         past_key_values=cache).logits.numpy()
            assert np.linalg.norm(step - want) / np.linalg.norm(want) < 1e-4
            token = next_token(want, model)


def test_export_greedy_identical(processor, model, exported: Path):
    report = validate_export(exported, model, processor, scenes=2, max_new_tokens=8, seed=5)
    assert report["passed"], report
