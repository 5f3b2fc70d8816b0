"""`gaze convert`: tiny random transformers LLaVA models (created and saved here, offline) -> gaze checkpoints.

Parity against transformers itself: with top_k >= R and no context tokens the converted model gives
the transformers model's logits (fp32, 1e-4 relative) and its greedy tokens; the ONNX export of a
converted model matches too. Bad sources are refused with one clear message and nothing written.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gaze_edge.errors import CheckpointError
from gaze_edge.model.checkpoint import load_checkpoint
from gaze_edge.model.convert import NEWLINE_TOKEN, ConvertOptions, add_convert_parser, convert_checkpoint

transformers = pytest.importorskip("transformers")

IMAGE = 32  # px; patch 8 -> 4 x 4 visual tokens, 2 x 2 regions -> 4 regions per image
VOCAB = 320  # model rows; the tokenizer has fewer (rows past it are padding, as in Qwen's 151936)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
TEMPLATE = (  # LLaVA-OneVision's shape: image parts first, ChatML turns
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["describe the image.", "a red circle at the top left and a blue square.", "what is in these images?",
          "the cat sat on the mat", "two images of a dog and a ball"] * 20


def save_tokenizer(folder: Path, specials: list[str] = SPECIALS, template: str = TEMPLATE,
                   corpus: list[str] = CORPUS, vocab_size: int = 290) -> dict[str, int]:
    """A byte-level BPE tokenizer with Qwen-style special tokens, saved as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(folder)
    return {t: tok.token_to_id(t) for t in specials}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Norms start at 1 and biases at 0: move them so that a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def vision_config(layers: int, **kw):
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                           num_attention_heads=4, image_size=IMAGE, patch_size=8, **kw)


def make_onevision(folder: Path) -> torch.nn.Module:
    ids = save_tokenizer(folder)
    text = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    rope_theta=10000.0, tie_word_embeddings=False)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision_config(2, vision_use_head=False), text_config=text, image_token_index=ids["<image>"],
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=[[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]])
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    perturb(model, 0)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.LlavaOnevisionImageProcessor(size={"height": IMAGE, "width": IMAGE},
                                              image_grid_pinpoints=config.image_grid_pinpoints).save_pretrained(folder)
    return model


def make_llava(folder: Path, specials: list[str] = SPECIALS, image_token: int | None = None) -> torch.nn.Module:
    """LLaVA with SigLIP (3 layers, pooling head; LLaVA reads layer -2) and Qwen3 (head_dim 32 != 64 / 4, tied)."""
    ids = save_tokenizer(folder, specials)
    text = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)
    config = transformers.LlavaConfig(
        vision_config=vision_config(3), text_config=text,
        image_token_index=ids["<image>"] if image_token is None else image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="full")
    torch.manual_seed(1)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    perturb(model, 1)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return model


def options(**kw) -> ConvertOptions:
    return ConvertOptions(**{"region_size": (2, 2), "top_k": 64, "num_context_tokens": 0, **kw})


@pytest.fixture(scope="module")
def onevision(tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, source folder, converted folder): converted through the CLI entry point."""
    tmp = tmp_path_factory.mktemp("onevision")
    hf = make_onevision(tmp / "src")
    parser = argparse.ArgumentParser(prog="gaze")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(tmp / "src"), "-o", str(tmp / "gaze"), "--region-size", "2x2",
                              "--gaze-top-k", "64", "--context-tokens", "0", "--single-view"])
    assert args.func(args) == 0
    return hf, tmp / "src", tmp / "gaze"


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("llava")
    hf = make_llava(tmp / "src")
    convert_checkpoint(tmp / "src", tmp / "gaze", options())
    return hf, tmp / "src", tmp / "gaze"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def prompt_ids(processor, images: int, answer: str = " a red circle") -> tuple[torch.Tensor, int]:
    """Gaze input ids of a 2-image chat prompt followed by answer tokens; and the prompt's length."""
    prompt = processor.encode(processor.prompt("describe the images.", num_images=images))
    answer_ids = processor.tokenizer.encode(answer, add_special_tokens=False).ids
    return torch.tensor([prompt + answer_ids]), len(prompt)


def check_parity(gaze_dir: Path, hf, hf_ids, ids, prompt_len, hf_kwargs, pixels):
    model, processor = load_checkpoint(gaze_dir)
    vocab = hf.config.text_config.vocab_size
    gaze_mask = torch.zeros_like(ids, dtype=torch.bool)
    gaze_mask[:, prompt_len:] = True  # answer tokens are gaze queries; top_k >= R keeps every region
    with torch.no_grad():
        want = hf(input_ids=hf_ids, **hf_kwargs).logits
        got = model(ids, pixel_values=pixels, gaze_mask=gaze_mask).logits[..., :vocab]
    assert got.shape == want.shape
    assert rel(got, want) < 1e-4, rel(got, want)
    assert (want[0, -1] - want[0, 0]).abs().max() > 1e-2  # logits do depend on the input

    suppress = [i for i in model.config.never_generated_ids if i < vocab]
    with torch.no_grad():
        ours = model.generate(ids[:, :prompt_len], pixel_values=pixels, max_new_tokens=10).sequences[0].tolist()
        theirs = hf.generate(input_ids=hf_ids[:, :prompt_len], **hf_kwargs, max_new_tokens=10, do_sample=False,
                             suppress_tokens=suppress, eos_token_id=model.config.eos_token_id,
                             pad_token_id=model.config.pad_token_id)[0, prompt_len:].tolist()
    eos = model.config.eos_token_id
    ours = ours[: ours.index(eos) + 1] if eos in ours else ours
    assert ours == theirs and len(ours) >= 2
    return model, processor


def test_llava_onevision_parity(onevision):
    hf, _, gaze_dir = onevision
    model, processor = load_checkpoint(gaze_dir)
    newline = processor.tokenizer.token_to_id(NEWLINE_TOKEN)
    assert processor.image_suffix_token_ids == [newline] == model.config.image_suffix_token_ids
    ids, prompt_len = prompt_ids(processor, 2)
    assert int((ids == newline).sum()) == 2  # one image newline after each image's 16 visual tokens
    hf_ids = torch.where(ids == newline, hf.config.image_token_index, ids)  # transformers: newline is visual
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    kwargs = dict(pixel_values=pixels[:, None], image_sizes=torch.tensor([[IMAGE, IMAGE]] * 2),
                  batch_num_images=torch.tensor([2]))  # a multi-image prompt: one base view per image
    check_parity(gaze_dir, hf, hf_ids, ids, prompt_len, kwargs, pixels)


def test_llava_siglip_qwen3_parity(llava):
    hf, _, gaze_dir = llava
    model, processor = load_checkpoint(gaze_dir)
    assert model.config.decoder_style == "qwen3" and model.config.head_dim == 32
    assert model.config.vision_num_layers == 2  # vision_feature_layer -2 of 3
    ids, prompt_len = prompt_ids(processor, 2)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    check_parity(gaze_dir, hf, ids, ids, prompt_len, dict(pixel_values=pixels), pixels)


def test_llava_siglip2_naflex_qwen3_parity(tmp_path: Path):
    """A SigLIP2 NaFlex tower (linear patch embedding, 3 x 3 position table resized to the 4 x 4 grid) at a fixed
    32 px square. transformers' LLaVA forward cannot pass NaFlex's spatial_shapes, so its side is composed of
    its own modules: the vision tower on patches, the projector, the language model on inputs_embeds."""
    ids = save_tokenizer(tmp_path / "src")
    vision = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=8, num_patches=9)
    text = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                    max_position_embeddings=512, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(2)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    perturb(hf, 2)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "gaze", options(image_size=IMAGE))
    model, processor = load_checkpoint(tmp_path / "gaze")
    assert model.config.attention_bias and model.config.o_bias and model.config.tokens_per_image == 16

    gaze_ids, _ = prompt_ids(processor, 2)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    # NaFlex patches: row-major, each flattened (row, column, channel) as Siglip2ImageProcessor does.
    patches = pixels.permute(0, 2, 3, 1).reshape(2, 4, 8, 4, 8, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, 16, 192)
    with torch.no_grad():
        states = hf.model.vision_tower(pixel_values=patches, pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                                       spatial_shapes=torch.tensor([[4, 4], [4, 4]]), output_hidden_states=True)
        visual = hf.model.multi_modal_projector(states.hidden_states[-1]).reshape(-1, 64)
        embeds = hf.get_input_embeddings()(gaze_ids)
        embeds[gaze_ids == ids["<image>"]] = visual
        want = hf(inputs_embeds=embeds).logits
        got = model(gaze_ids, pixel_values=pixels).logits[..., :VOCAB]
    assert rel(got, want) < 1e-4, rel(got, want)


def test_converted_files(llava):
    """The source's tokenizer, its special tokens and chat template; what was left out and why."""
    _, src, gaze_dir = llava
    report = json.loads((gaze_dir / "convert_report.json").read_text())
    dropped = report["dropped_unused_by_source"]
    assert any(".encoder.layers.2." in n for n in dropped) and any(".head." in n for n in dropped)
    assert any("post_layernorm" in n for n in dropped) and report["tied_lm_head"] is True
    tok_cfg = json.loads((gaze_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["image_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == \
        ("<image>", "<|im_end|>", "<|endoftext|>")
    assert tok_cfg["chat_template"] == TEMPLATE and tok_cfg["context_tokens"] == []
    assert (gaze_dir / "special_tokens_map.json").read_bytes() == (src / "special_tokens_map.json").read_bytes()
    loaded = transformers.AutoTokenizer.from_pretrained(gaze_dir)  # still a transformers tokenizer
    assert loaded.convert_tokens_to_ids("<image>") == load_checkpoint(gaze_dir)[0].config.image_token_id


def test_context_tokens_are_added_and_initialised(llava, tmp_path: Path):
    hf, src, _ = llava
    convert_checkpoint(src, tmp_path / "ctx", options(num_context_tokens=4, top_k=2))
    model, processor = load_checkpoint(tmp_path / "ctx")
    ids = model.config.context_token_ids
    assert len(ids) == 4 and ids == processor.context_token_ids and min(ids) >= processor.tokenizer.get_vocab_size() - 4
    table = model.embed_tokens.weight.detach()
    source = hf.get_input_embeddings().weight.detach()
    known = source[: min(ids)]
    spread = known.std(0).norm()  # a typical source row lies about this far from their mean
    for i in ids:  # the mean of the source rows + noise of a tenth of their spread: in distribution, all distinct
        assert 0.05 < float((table[i] - known.mean(0)).norm() / spread) < 0.2
    assert len({tuple(table[i].tolist()) for i in ids}) == 4
    torch.testing.assert_close(table[: min(ids)], known)
    prompt = processor.encode(processor.prompt("hi", num_images=1))
    assert prompt.count(ids[0]) == 1 and prompt.index(ids[0]) == prompt.index(model.config.image_token_id) + 16


def test_dtype_option(llava, tmp_path: Path):
    convert_checkpoint(llava[1], tmp_path / "bf16", options(dtype="bf16"))
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "convert_report.json").read_text())["dtype"] == "bfloat16"


def test_onnx_export_of_converted_model_matches(onevision, tmp_path: Path):
    """The converted LLaVA-OneVision through the GazeAttention export: ORT logits = PyTorch = transformers."""
    from gaze_edge.export import onnx_export as ox
    from gaze_edge.export.validate import LayoutConfig, OnnxGazeGenerator

    hf, _, gaze_dir = onevision
    model, processor = load_checkpoint(gaze_dir)
    ox.export_decoder(model, tmp_path / "decoder.onnx", max_images=2, opset=18)
    ox.export_vision(model, tmp_path / "vision.onnx", opset=18)
    ox.export_embeddings(model, tmp_path / "embed_tokens.npy")
    gen = OnnxGazeGenerator(tmp_path, LayoutConfig.from_model_config(model.config))
    ids, prompt_len = prompt_ids(processor, 2)
    ids_np = ids[:, :prompt_len].numpy()
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    gen.reset(1, prompt_len + 2)
    prefill = gen.forward(gen.embed(ids_np, pixels.numpy()), ids_np, np.ones_like(ids_np), gaze=False)
    newline = processor.tokenizer.token_to_id(NEWLINE_TOKEN)
    hf_ids = torch.where(ids == newline, hf.config.image_token_index, ids)
    with torch.no_grad():
        want = hf(input_ids=hf_ids, pixel_values=pixels[:, None], image_sizes=torch.tensor([[IMAGE, IMAGE]] * 2),
                  batch_num_images=torch.tensor([2])).logits
    vocab = hf.config.text_config.vocab_size
    assert rel(torch.from_numpy(prefill)[..., :vocab], want[:, :prompt_len]) < 1e-4
    token = ids[:, prompt_len:prompt_len + 1].numpy()  # the first answer token, fed as a gaze query
    step = gen.forward(gen.embed(token, None), token, np.ones_like(token), gaze=True)
    assert rel(torch.from_numpy(step)[..., :vocab], want[:, prompt_len:prompt_len + 1]) < 1e-4


# ------------------------------------------------------------------ refusals


def refused(src: Path, tmp_path: Path, match: str, **kw) -> str:
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match) as info:
        convert_checkpoint(src, dst, options(**kw))
    message = str(info.value)
    assert "\n" not in message
    assert not dst.exists() and not list(tmp_path.glob(".out.*")), "something was written"
    return message


@pytest.fixture()
def source_copy(llava, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(llava[1], src)
    return src


def edit_config(src: Path, **fields) -> None:
    data = json.loads((src / "config.json").read_text())
    data.update(fields)
    (src / "config.json").write_text(json.dumps(data))


def test_unsupported_model_type(source_copy: Path, tmp_path: Path):
    edit_config(source_copy, model_type="idefics3")
    refused(source_copy, tmp_path, r"model_type 'idefics3' is not supported; gaze convert takes llava_onevision")


def test_unsupported_text_model(source_copy: Path, tmp_path: Path):
    data = json.loads((source_copy / "config.json").read_text())
    edit_config(source_copy, text_config={**data["text_config"], "model_type": "llama"})
    refused(source_copy, tmp_path, r"text_config model_type 'llama' is not supported")


def test_missing_tensor(source_copy: Path, tmp_path: Path):
    state = load_file(source_copy / "model.safetensors")
    name = next(n for n in state if n.endswith("layers.1.mlp.up_proj.weight"))
    del state[name]
    save_file(state, str(source_copy / "model.safetensors"), metadata={"format": "pt"})
    message = refused(source_copy, tmp_path, "missing tensor")
    assert name in message and "layers.1.up_proj.weight" in message


def test_extra_tensor(source_copy: Path, tmp_path: Path):
    state = load_file(source_copy / "model.safetensors")
    name = next(n for n in state if n.endswith("layers.0.self_attn.o_proj.weight")).replace("weight", "bias")
    state[name] = torch.zeros(64)  # Qwen3 without attention_bias has none
    save_file(state, str(source_copy / "model.safetensors"), metadata={"format": "pt"})
    assert name in refused(source_copy, tmp_path, "unexpected tensor")


def test_wrong_shape(source_copy: Path, tmp_path: Path):
    state = load_file(source_copy / "model.safetensors")
    name = next(n for n in state if n.endswith("multi_modal_projector.linear_2.bias"))
    state[name] = torch.zeros(65)
    save_file(state, str(source_copy / "model.safetensors"), metadata={"format": "pt"})
    assert name in refused(source_copy, tmp_path, r"has shape \(65,\), config.json implies \(64,\)")


def test_pickle_only_source(source_copy: Path, tmp_path: Path):
    (source_copy / "model.safetensors").unlink()
    (source_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    refused(source_copy, tmp_path, r"no model.safetensors .*pytorch_model.bin: pickle, never loaded")


def test_tokenizer_without_image_token(tmp_path: Path):
    src = tmp_path / "noimage"
    make_llava(src, specials=SPECIALS[:3], image_token=VOCAB - 1)
    refused(src, tmp_path, r"no image token: config.json's image_token_index 319 is not a token of tokenizer.json")


def test_image_token_must_be_an_added_token(source_copy: Path, tmp_path: Path):
    edit_config(source_copy, image_token_index=40)  # an ordinary BPE piece
    refused(source_copy, tmp_path, r"is not an added token of tokenizer.json")


def test_anyres_refused_without_single_view(onevision, tmp_path: Path):
    refused(onevision[1], tmp_path, r"does not support anyres tiling. Pass --single-view")
