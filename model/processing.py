"""Text and image processing of a Gaze checkpoint: numpy, Pillow, tokenizers and jinja2 only.

No torch here: the on-device runtime uses this same code, so what the model saw in
training is exactly what the device feeds it.

Files (Hugging Face layout): ``tokenizer.json`` (a tokenizers model),
``tokenizer_config.json`` (special tokens and the jinja ``chat_template``) and
``preprocessor_config.json`` (image size, resampling, rescale, mean and std).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from gaze_edge.errors import CheckpointError
from gaze_edge.jsonfile import read_json_object

from . import scenes

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<assistant>", "<image>", "<ctx_0>", "<ctx_1>", "<unk>"]
PROMPT_WORDS = ["describe", "the", "image", "images", "frames", "what", "is", "in", "this", ".", "?"]
DEFAULT_PROMPT = "describe the image ."

CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% elif message['role'] == 'assistant' %}<assistant> {{ message['content'] }} <eos>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)

RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer over the scene grammar and prompt words, specials first."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in [*PROMPT_WORDS, *scenes.CAPTION_WORDS]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


@dataclass
class ImageConfig:
    image_size: int
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class GazeProcessor:
    """Chat template, tokenizer and image preprocessing of one checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image: ImageConfig,
        chat_template: str,
        tokens_per_image: int,
        context_tokens: list[str],
    ) -> None:
        self.tokenizer = tokenizer
        self.image = image
        self.chat_template = chat_template
        self.tokens_per_image = tokens_per_image
        self.context_tokens = context_tokens
        self.image_token_id = self._token_id("<image>")
        self.context_token_ids = [self._token_id(t) for t in context_tokens]
        self.pad_token_id = self._token_id("<pad>")
        self.eos_token_id = self._token_id("<eos>")
        self._template = jinja2.Environment(autoescape=False).from_string(chat_template)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer.json has no {token!r} token; re-export the checkpoint")
        return int(token_id)

    # -------------------------------------------------------------- files

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GazeProcessor:
        path = Path(path)
        tok_file, tok_cfg_file, pre_file = (
            path / "tokenizer.json",
            path / "tokenizer_config.json",
            path / "preprocessor_config.json",
        )
        for f in (tok_file, tok_cfg_file, pre_file):
            if not f.is_file():
                raise CheckpointError(f"{path} has no {f.name}: a checkpoint needs tokenizer and preprocessor files")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{tok_file} is not a valid tokenizers file: {exc}") from exc
        tok_cfg = _read_json(tok_cfg_file)
        pre = _read_json(pre_file)
        try:
            image = ImageConfig(
                image_size=int(pre["image_size"]),
                resample=str(pre.get("resample", "bicubic")),
                rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
                image_mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
                image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
            )
            return cls(
                tokenizer,
                image,
                chat_template=str(tok_cfg["chat_template"]),
                tokens_per_image=int(pre["tokens_per_image"]),
                context_tokens=list(tok_cfg["context_tokens"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: processor config is missing or has a bad field: {exc}") from exc

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "image_token": "<image>",
            "context_tokens": self.context_tokens,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        pre = {
            "processor_class": "GazeProcessor",
            "image_size": self.image.image_size,
            "resample": self.image.resample,
            "rescale_factor": self.image.rescale_factor,
            "image_mean": list(self.image.image_mean),
            "image_std": list(self.image.image_std),
            "tokens_per_image": self.tokens_per_image,
        }
        (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")

    # -------------------------------------------------------------- text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def prompt(self, text: str = DEFAULT_PROMPT, num_images: int = 1) -> str:
        """The chat-formatted prompt for images followed by a user text."""
        content: list[dict[str, str]] = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.apply_chat_template([{"role": "user", "content": content}])

    def encode(self, text: str) -> list[int]:
        """Token ids with each ``<image>`` expanded to its visual tokens and context tokens."""
        ids: list[int] = []
        for token_id in self.tokenizer.encode(text, add_special_tokens=False).ids:
            if token_id == self.image_token_id:
                ids.extend([self.image_token_id] * self.tokens_per_image)
                ids.extend(self.context_token_ids)
            else:
                ids.append(token_id)
        return ids

    def decode(self, ids: list[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def batch_encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and attention mask [B, T] (int64)."""
        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded)
        ids = np.full((len(encoded), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = e
            mask[i, width - len(e) :] = 1
        return ids, mask

    # ------------------------------------------------------------- images

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """RGB images (PIL or uint8 HxWx3) -> float32 [N, 3, S, S]: resize, rescale, normalise."""
        size = self.image.image_size
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        mean = np.asarray(self.image.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image.image_std, dtype=np.float32)[:, None, None]
        for i, img in enumerate(images):
            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
            pil = pil.convert("RGB")
            if pil.size != (size, size):
                pil = pil.resize((size, size), RESAMPLING[self.image.resample])
            arr = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) * self.image.rescale_factor
            out[i] = (arr - mean) / std
        return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError, "restore it from the original checkpoint")

def default_processor(image_size: int, tokens_per_image: int, num_context_tokens: int = 2) -> GazeProcessor:
    """The processor of the built-in scene captioner."""
    context = [f"<ctx_{i}>" for i in range(num_context_tokens)]
    image = ImageConfig(image_size=image_size)
    return GazeProcessor(build_tokenizer(), image, CHAT_TEMPLATE, tokens_per_image, context)
