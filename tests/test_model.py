"""The PyTorch model: chunking invariance, dense identity, batching, images, frames, modes, real-size shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaze_edge import DEFAULT_CHECKPOINT
from gaze_edge.errors import CheckpointError
from gaze_edge.model import scenes
from gaze_edge.model.checkpoint import load_config
from gaze_edge.model.configuration import GazeConfig, llava_onevision_0_5b_config
from gaze_edge.model.modeling import GazeForConditionalGeneration, sample_next_token
from gaze_edge.model.processing import default_processor

MODES = {
    "v1": dict(routing="kv_head", context_attention="causal"),
    "kv_head-own_image": dict(routing="kv_head", context_attention="own_image"),
    "query_head-causal": dict(routing="query_head", context_attention="causal"),
    "query_head-own_image": dict(routing="query_head", context_attention="own_image"),
}
_MODELS: dict[tuple, GazeForConditionalGeneration] = {}


@pytest.fixture(scope="module")
def processor():
    return default_processor(48, 36)


def make_model(processor, **fields) -> GazeForConditionalGeneration:
    """A 2-layer random model (the same weights in every mode), built once per set of config fields."""
    key = tuple(sorted(fields.items()))
    if key not in _MODELS:
        torch.manual_seed(0)
        config = GazeConfig(vocab_size=processor.tokenizer.get_vocab_size(), num_hidden_layers=2, gaze_top_k=2,
                            **fields)
        _MODELS[key] = GazeForConditionalGeneration(config).eval()
    return _MODELS[key]


@pytest.fixture(scope="module")
def model(processor):
    return make_model(processor)  # the class defaults: kv_head routing, own_image context tokens


def prompt_inputs(processor, num_images: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [scenes.render(scenes.sample_scene(rng), 48, rng)[0] for _ in range(num_images)]
    ids = torch.tensor([processor.encode(processor.prompt(num_images=num_images))])
    return ids, torch.from_numpy(processor.preprocess(images))


def teacher_forced(processor, num_images: int, caption: str, seed: int = 0):
    ids, pixels = prompt_inputs(processor, num_images, seed)
    caption_ids = torch.tensor([processor.encode(caption)])
    full = torch.cat([ids, caption_ids], 1)
    gaze = torch.zeros_like(full, dtype=torch.bool)
    gaze[:, ids.shape[1] :] = True
    return full, pixels, gaze


@pytest.mark.parametrize(
    ("mode", "num_images", "region_frames"),
    [("v1", 1, 1), ("kv_head-own_image", 3, 1), ("query_head-causal", 3, 1), ("query_head-own_image", 3, 2)],
)
def test_chunking_invariance_logits(processor, mode, num_images, region_frames):
    """All at once, in chunks, or token by token: the same logits for every token (frames: a 3-frame video)."""
    model = make_model(processor, **MODES[mode], region_frames=region_frames)
    frames = torch.tensor([region_frames > 1])
    ids, pixels, gaze = teacher_forced(processor, num_images, "a red circle at top left and a blue cross at center")
    with torch.no_grad():
        whole = model(ids, pixel_values=pixels, gaze_mask=gaze, frames=frames).logits
        embeds = model.embed(ids, pixels)
        for chunk in (1, 7):
            cache = model.new_cache(1)
            pieces = []
            for s in range(0, ids.shape[1], chunk):
                res = model(ids[:, s : s + chunk], inputs_embeds=embeds[:, s : s + chunk],
                            gaze_mask=gaze[:, s : s + chunk], past_key_values=cache, frames=frames)
                pieces.append(res.logits)
            torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)


def test_chunking_invariance_generation(model, processor):
    ids, pixels = prompt_inputs(processor, 2)
    whole = model.generate(ids, pixel_values=pixels, max_new_tokens=12)
    one = model.generate(ids, pixel_values=pixels, max_new_tokens=12, prefill_chunk=1)
    five = model.generate(ids, pixel_values=pixels, max_new_tokens=12, prefill_chunk=5)
    assert whole.sequences.tolist() == one.sequences.tolist() == five.sequences.tolist()


def test_chunking_invariance_generation_of_video_frames(processor):
    """4 frames in region groups of 3 (the last group holds one frame), query_head, own_image."""
    model = make_model(processor, **MODES["query_head-own_image"], region_frames=3)
    ids, pixels = prompt_inputs(processor, 4)
    frames = torch.tensor([True])
    whole = model.generate(ids, pixel_values=pixels, max_new_tokens=8, frames=frames)
    seven = model.generate(ids, pixel_values=pixels, max_new_tokens=8, frames=frames, prefill_chunk=7)
    assert whole.sequences.tolist() == seven.sequences.tolist()
    assert whole.selections[0][0].shape == (1, 4, 1, 2 * 9)  # [B, Hq, 1, R]: 2 frame groups of 9 regions


@pytest.mark.parametrize(
    ("mode", "region_frames"), [(m, 1) for m in MODES] + [("kv_head-own_image", 2)],
)
def test_gaze_with_all_regions_equals_dense_model(processor, mode, region_frames):
    """top_k >= R: the gaze model is its dense twin (same context_attention); 3 images, or 3 frames in groups of 2."""
    model = make_model(processor, **MODES[mode], region_frames=region_frames)
    frames = torch.tensor([region_frames > 1])
    ids, pixels, gaze = teacher_forced(processor, 3, "a red circle at top left")
    with torch.no_grad():
        dense = model(ids, pixel_values=pixels, frames=frames).logits  # no gaze queries at all
        all_regions = model(ids, pixel_values=pixels, gaze_mask=gaze, gaze_top_k=3 * 9, frames=frames).logits
        sparse = model(ids, pixel_values=pixels, gaze_mask=gaze, gaze_top_k=1, frames=frames).logits
    torch.testing.assert_close(all_regions, dense, rtol=1e-6, atol=1e-6)
    gaze_rows = gaze[0]
    assert (sparse[0, gaze_rows] - dense[0, gaze_rows]).abs().max() > 1e-4  # k=1 really drops keys
    torch.testing.assert_close(sparse[0, ~gaze_rows], dense[0, ~gaze_rows])  # prompt rows are dense


def test_region_numbering_across_images(model, processor):
    ids, _ = prompt_inputs(processor, 2)
    mask = torch.ones_like(ids)
    zero = torch.zeros(1, dtype=torch.long)
    new = model.layout(ids, mask, zero, zero)
    image_slots = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    assert new.region[0, image_slots[:36]].unique().tolist() == list(range(9))
    assert new.region[0, image_slots[36:]].unique().tolist() == list(range(9, 18))
    assert (new.region[0, ids[0] != model.config.image_token_id] == -1).all()
    assert new.pos[0].tolist() == list(range(ids.shape[1]))
    assert int(new.image_tokens_seen) == 72 and model.layout.num_regions(new.image_tokens_seen) == 18


@pytest.mark.parametrize("frames", [False, True])
def test_image_and_context_indices_and_frame_groups(processor, frames):
    """5 images (or frames in groups of 2): which image every token belongs to, and the region ids."""
    model = make_model(processor, region_frames=2)
    ids, _ = prompt_inputs(processor, 5)
    flag = torch.tensor([frames])
    zero = torch.zeros(1, dtype=torch.long)
    new = model.layout(ids, torch.ones_like(ids), zero, zero, flag)
    is_image = ids[0] == model.config.image_token_id
    is_context = torch.isin(ids[0], torch.tensor(model.config.context_token_ids))
    per_image = [i for i in range(5) for _ in range(36)]
    assert new.image[0, is_image].tolist() == per_image
    assert new.image[0, is_context].tolist() == [i for i in range(5) for _ in range(2)]
    assert new.context_image[0, is_context].tolist() == new.image[0, is_context].tolist()
    assert (new.image[0, ~(is_image | is_context)] == -1).all() and (new.context_image[0, ~is_context] == -1).all()
    spatial = model.layout.region_of_token.tolist()
    group = [i // 2 if frames else i for i in range(5)]
    assert new.region[0, is_image].tolist() == [group[i] * 9 + spatial[j] for i in range(5) for j in range(36)]
    assert model.layout.num_regions(new.image_tokens_seen, flag) == (3 if frames else 5) * 9


def test_model_passes_routing_and_context_attention_to_every_layer(processor):
    """own_image changes exactly the rows of context tokens (and what follows them); query_head selects per head."""
    ids, pixels, gaze = teacher_forced(processor, 2, "a red circle at top left")
    first_context = int(torch.isin(ids[0], torch.tensor(processor.context_token_ids)).nonzero()[0])
    with torch.no_grad():
        causal = make_model(processor, **MODES["v1"])(ids, pixel_values=pixels, gaze_mask=gaze)
        own = make_model(processor, **MODES["kv_head-own_image"])(ids, pixel_values=pixels, gaze_mask=gaze)
        per_head = make_model(processor, **MODES["query_head-causal"])(ids, pixel_values=pixels, gaze_mask=gaze)
    torch.testing.assert_close(own.logits[0, :first_context], causal.logits[0, :first_context], rtol=0, atol=0)
    assert (own.logits[0, first_context] - causal.logits[0, first_context]).abs().max() > 1e-4
    assert [s.shape for s in causal.selections] == [(1, 2, ids.shape[1], 18)] * 2
    assert [s.shape for s in per_head.selections] == [(1, 4, ids.shape[1], 18)] * 2
    torch.testing.assert_close(per_head.logits[0, ~gaze[0]], causal.logits[0, ~gaze[0]], rtol=0, atol=0)


def test_config_validates_the_v2_fields():
    for field, value, words in [("routing", "per_token", "routing must be one of"),
                                ("context_attention", "image", "context_attention must be one of"),
                                ("region_frames", 0, "region_frames must be an integer >= 1")]:
        with pytest.raises(CheckpointError, match=words):
            GazeConfig(**{field: value}).validate()
    config = GazeConfig()
    assert (config.routing, config.context_attention, config.region_frames) == ("kv_head", "own_image", 1)


def test_shipped_checkpoints_are_the_paper_family_in_miniature():
    """Qwen3-style decoder, SigLIP-style tower, 4 own_image context tokens, 16 regions of 64 px scenes."""
    for path, top_k in ((DEFAULT_CHECKPOINT, 2), (DEFAULT_CHECKPOINT.parent / "gaze-tiny-dense", 16)):
        config = load_config(path)
        assert (config.routing, config.context_attention, config.region_frames) == ("kv_head", "own_image", 1), path
        assert (config.decoder_style, config.vision_style) == ("qwen3", "siglip"), path
        assert (config.image_size, config.tokens_per_image, config.regions_per_image) == (64, 64, 16), path
        assert config.num_context_tokens == 4 and config.gaze_top_k == top_k, path


def test_batch_with_padding_equals_each_alone(model, processor):
    """Left-padded batch of a 1-image and a 2-image prompt: padding regions and tokens change nothing."""
    rng = np.random.default_rng(3)
    imgs = [scenes.render(scenes.sample_scene(rng), 48, rng)[0] for _ in range(3)]
    texts = [processor.prompt(num_images=1), processor.prompt(num_images=2)]
    ids, mask = processor.batch_encode(texts)
    pixels = torch.from_numpy(processor.preprocess(imgs))
    batch = model.generate(torch.from_numpy(ids), pixel_values=pixels, attention_mask=torch.from_numpy(mask),
                           max_new_tokens=10)
    alone = [
        model.generate(torch.tensor([processor.encode(texts[0])]), pixel_values=pixels[:1], max_new_tokens=10),
        model.generate(torch.tensor([processor.encode(texts[1])]), pixel_values=pixels[1:], max_new_tokens=10),
    ]
    for b in range(2):
        n = alone[b].sequences.shape[1]
        assert batch.sequences[b, :n].tolist() == alone[b].sequences[0].tolist()


def test_wrong_image_count_is_refused(model, processor):
    ids, pixels = prompt_inputs(processor, 2)
    with pytest.raises(ValueError, match="2 images"):
        model(ids, pixel_values=pixels[:1])


def test_video_frames_each_get_context_tokens(processor):
    ids = processor.encode(processor.prompt(num_images=4))
    ctx = processor.context_token_ids
    assert ids.count(processor.image_token_id) == 4 * 36
    assert ids.count(ctx[0]) == 4 and ids.count(ctx[1]) == 4
    first_ctx = ids.index(ctx[0])
    assert ids[first_ctx - 1] == processor.image_token_id and ids[first_ctx + 1] == ctx[1]


# ---------------------------------------------------------------- sampling


def test_greedy_and_seeded_sampling_reproducible(model, processor):
    ids, pixels = prompt_inputs(processor, 1)
    a = model.generate(ids, pixel_values=pixels, max_new_tokens=8, do_sample=True, temperature=1.5, seed=11)
    b = model.generate(ids, pixel_values=pixels, max_new_tokens=8, do_sample=True, temperature=1.5, seed=11)
    assert a.sequences.tolist() == b.sequences.tolist()


def test_top_k_and_top_p_on_a_hand_checked_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, True, 1.0, 2, 1.0, gen)) for _ in range(300)}
    assert draws == {0, 1}  # top-k 2 keeps the two most likely tokens
    # top-p 0.7: 0.5 < 0.7, 0.5 + 0.3 crosses it, so tokens 0 and 1 are kept
    draws = {int(sample_next_token(logits, True, 1.0, 0, 0.7, gen)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(sample_next_token(logits, True, 1.0, 0, 0.5, gen)) for _ in range(100)}
    assert draws == {0}
    counts = np.bincount([int(sample_next_token(logits, True, 1.0, 0, 0.9, gen)) for _ in range(3000)], minlength=4)
    np.testing.assert_allclose(counts[:3] / 3000, np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.04)
    assert counts[3] == 0
    assert int(sample_next_token(logits, False, 1.0, 0, 1.0, gen)) == 0


# ---------------------------------------------------------------- real size


@pytest.mark.slow
def test_real_size_configuration_builds_and_decodes():
    """LLaVA-OneVision-0.5B shapes (2 of 24 decoder layers, 1 of 26 vision layers to fit CI), random weights."""
    config = llava_onevision_0_5b_config(num_hidden_layers=2, vision_num_layers=1)
    assert config.tokens_per_image == 729 and config.regions_per_image == 81
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (14, 2, 64)
    torch.manual_seed(0)
    model = GazeForConditionalGeneration(config).eval()
    tokens = [config.bos_token_id] + [config.image_token_id] * 729 + config.context_token_ids + [100, 200]
    ids = torch.tensor([tokens + [config.assistant_token_id]])
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    out = model.generate(ids, pixel_values=pixels, max_new_tokens=3)
    assert out.sequences.shape == (1, 3)
    selected = out.selections[0][0]
    assert selected is not None and selected.shape == (1, 2, 1, 81)
    assert selected.sum(-1).tolist() == [[[8], [8]]]
