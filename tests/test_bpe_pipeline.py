"""Issue #13: a byte-level BPE tokenizer with Qwen-style special tokens through the whole pipeline.

A tiny random transformers LLaVA (SigLIP + Qwen2) is saved offline with a tokenizer built here with the
tokenizers library: byte-level BPE, ChatML special tokens and Qwen2-VL's ``<|vision_start|><|image_pad|>
<|vision_end|>`` image placeholder in its chat template. It is converted (4 context tokens per image that
see only their own image, top_k 2 of 4 regions), exported with `gaze export` and run by the torch-free
runtime: the prompt tokens, special tokens and the image token are the checkpoint's, never the built-in
scene tokenizer's; the runtime's greedy tokens equal PyTorch's; streamed text is the decoded text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaze_edge.cli import main as gaze_main
from gaze_edge.model.checkpoint import load_checkpoint
from gaze_edge.model.convert import ConvertOptions, convert_checkpoint
from tests.test_convert import save_tokenizer

transformers = pytest.importorskip("transformers")

IMAGE = 32  # px; patch 8 -> 4 x 4 tokens; 2 x 2 regions -> 4 regions per image
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
TEMPLATE = (  # Qwen2-VL's shape: ChatML turns, the image as vision_start / image_pad / vision_end
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["describe the image.", "was ist auf diesem Bild?", "une photo d'un chat noir", "ein Hund läuft",
          "a red circle at the top left", "two images: 猫 and 犬"] * 20
PROMPT = "was zeigt das Bild? décris 猫 ü"  # words and characters the merges never saw: bytes, no unk


def make_source(folder: Path) -> tuple[torch.nn.Module, dict[str, int]]:
    ids = save_tokenizer(folder, SPECIALS, TEMPLATE, CORPUS, vocab_size=300)
    text = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    rope_theta=10000.0, tie_word_embeddings=False)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=IMAGE, patch_size=8)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<|image_pad|>"],
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(3)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random model's logits are flat: sharpen them so greedy is not a near tie
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}, resample=2,
                                      image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28]
                                      ).save_pretrained(folder)
    return model, ids


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bpe")
    _, ids = make_source(tmp / "src")
    convert_checkpoint(tmp / "src", tmp / "ckpt", ConvertOptions(region_size=(2, 2), top_k=2, num_context_tokens=4,
                                                                  context_attention="own_image"))
    assert gaze_main(["export", str(tmp / "ckpt"), "-o", str(tmp / "export"), "--max-seq-len", "128"]) == 0
    return tmp, ids


def images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))]


def test_processor_uses_the_checkpoints_tokens(pipeline):
    tmp, ids = pipeline
    _, processor = load_checkpoint(tmp / "ckpt")
    assert processor.image_token == "<|image_pad|>" and processor.image_token_id == ids["<|image_pad|>"]
    assert processor.eos_token == "<|im_end|>" and processor.pad_token == "<|endoftext|>"
    prompt = processor.prompt(PROMPT, num_images=2)
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    encoded = processor.encode(prompt)
    per_image = processor.tokens_per_image + len(processor.context_tokens)
    assert encoded.count(ids["<|image_pad|>"]) == 2 * processor.tokens_per_image
    assert len(processor.context_tokens) == 4 and all(t not in SPECIALS for t in processor.context_tokens)
    assert encoded.count(ids["<|vision_start|>"]) == 2 and encoded.count(ids["<|im_start|>"]) == 2
    first = encoded.index(ids["<|image_pad|>"])
    assert encoded[first + per_image] == ids["<|vision_end|>"]  # visual tokens, then context tokens, then the end
    # The text survives byte-level BPE exactly (no unknown-word replacement), the image placeholder aside.
    text_ids = [i for i in encoded if i not in processor.context_token_ids and i != ids["<|image_pad|>"]]
    assert PROMPT in processor.decode(text_ids, skip_special_tokens=False)
    assert "<image>" not in processor.tokenizer.get_vocab()  # nothing of the built-in scene tokenizer


def test_runtime_greedy_equals_pytorch(pipeline):
    """`gaze export` of the BPE checkpoint, run torch-free: greedy tokens = the PyTorch model's, and the
    streamed text pieces join to the decoded text (multi-byte characters split across tokens included)."""
    from gaze_edge.runtime.generate import GazeRuntime, Prompt
    from gaze_edge.runtime.sampling import SamplingConfig

    tmp, _ = pipeline
    model, processor = load_checkpoint(tmp / "ckpt")
    imgs = images(0)
    prompt_ids = torch.tensor([processor.encode(processor.prompt(PROMPT, num_images=2))])
    pixels = torch.from_numpy(processor.preprocess(imgs))
    with torch.no_grad():
        want = model.generate(prompt_ids, pixel_values=pixels, max_new_tokens=12).sequences[0].tolist()
    eos = model.config.eos_token_id
    want = want[: want.index(eos) + 1] if eos in want else want

    runtime = GazeRuntime.load(tmp / "export")
    pieces: list[str] = []
    tokens: list[int] = []
    for step in runtime.stream(Prompt(PROMPT, imgs), SamplingConfig(max_new_tokens=12)):
        tokens.append(int(step.tokens[0]))
        pieces.append(step.texts[0])
    assert tokens == want and len(tokens) >= 3
    assert "".join(pieces) == processor.decode(tokens)
    assert len(set(tokens)) > 1  # not one token repeated: the check would miss a broken cache


def test_export_validation_passed(pipeline):
    import json

    tmp, _ = pipeline
    report = json.loads((tmp / "export" / "validation_report.json").read_text())
    assert report["passed"] and report["greedy_identical"]
