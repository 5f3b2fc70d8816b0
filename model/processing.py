"""Text and image processing of a Gaze checkpoint: numpy, Pillow, tokenizers and jinja2 only.

No torch here: the on-device runtime uses this same code, so what the model saw in
training is exactly what the device feeds it.

Files (Hugging Face layout): ``tokenizer.json`` (a tokenizers model),
``tokenizer_config.json`` (special tokens and the jinja ``chat_template``) and
``preprocessor_config.json`` (image size, resampling, rescale, mean and std).

The special tokens (image, pad, eos, bos, unk) are the strings tokenizer_config.json names
(``image_token``, ``pad_token``, ...); the built-in names below are only the defaults of
the built-in scene tokenizer. ``image_suffix_tokens`` (optional) go after each image's
visual tokens, before its context tokens (a converted LLaVA-OneVision's image newline).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from gaze_edge.errors import CheckpointError, InputError
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


#: tokenizer_config.json keys this processor writes itself (everything else a checkpoint brings is kept).
_OWN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "image_token", "image_suffix_tokens",
             "context_tokens", "chat_template")


class GazeProcessor:
    """Chat template, tokenizer and image preprocessing of one checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image: ImageConfig,
        chat_template: str,
        tokens_per_image: int,
        context_tokens: list[str],
        *,
        image_token: str = "<image>",
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        bos_token: str | None = "<bos>",
        unk_token: str | None = "<unk>",
        image_suffix_tokens: Sequence[str] = (),
        tokenizer_config: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image = image
        self.chat_template = chat_template
        self.tokens_per_image = tokens_per_image
        self.context_tokens = list(context_tokens)
        self.image_token, self.pad_token, self.eos_token = image_token, pad_token, eos_token
        self.bos_token, self.unk_token = bos_token, unk_token
        self.image_suffix_tokens = list(image_suffix_tokens)
        self.tokenizer_config = dict(tokenizer_config or {})  # a converted checkpoint's own keys, saved back
        self.image_token_id = self._token_id(image_token)
        self.image_suffix_token_ids = [self._token_id(t) for t in self.image_suffix_tokens]
        self.context_token_ids = [self._token_id(t) for t in self.context_tokens]
        self.pad_token_id = self._token_id(pad_token)
        self.eos_token_id = self._token_id(eos_token)
        # Every added special token string ("<image>", "<eos>", ...): refused inside message text.
        self.special_tokens = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special},
                                     key=len, reverse=True)
        self._template = compile_chat_template(chat_template)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer.json has no {token!r} token (named in tokenizer_config.json); "
                                  "re-export the checkpoint")
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

            def name(key: str, default: str | None) -> str | None:  # absent: the built-in tokenizer's name
                return _token_name(tok_cfg[key]) if key in tok_cfg else default

            required = {key: name(key, default) for key, default in
                        (("image_token", "<image>"), ("pad_token", "<pad>"), ("eos_token", "<eos>"))}
            for key, value in required.items():
                if value is None:
                    raise CheckpointError(f"{tok_cfg_file}: {key} is null; the processor needs one")
            return cls(
                tokenizer,
                image,
                chat_template=str(tok_cfg["chat_template"]),
                tokens_per_image=int(pre["tokens_per_image"]),
                context_tokens=list(tok_cfg["context_tokens"]),
                image_suffix_tokens=[str(t) for t in tok_cfg.get("image_suffix_tokens", [])],
                tokenizer_config=tok_cfg,
                image_token=str(required["image_token"]),
                pad_token=str(required["pad_token"]),
                eos_token=str(required["eos_token"]),
                bos_token=name("bos_token", "<bos>"),
                unk_token=name("unk_token", "<unk>"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: processor config is missing or has a bad field: {exc}") from exc

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: v for k, v in self.tokenizer_config.items() if k not in _OWN_KEYS},
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "image_token": self.image_token,
            **({"image_suffix_tokens": self.image_suffix_tokens} if self.image_suffix_tokens else {}),
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
        """The conversation as the model's prompt text, rendered like transformers' apply_chat_template.

        Message text may not contain special token strings (InputError): the prompt is tokenized as
        one string, so a user typing "<image>" or "<eos>" would otherwise inject that token.
        """
        self.check_message_text(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token,
                                         pad_token=self.pad_token, unk_token=self.unk_token,
                                         image_token=self.image_token)
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, or a sandbox violation
            raise InputError(f"the chat template refused the conversation: {exc}") from exc

    def check_message_text(self, messages: list[dict[str, Any]]) -> None:
        """InputError if any text of any message holds a special token string."""
        for number, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
            for part in parts:
                text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
                if not isinstance(text, str):
                    continue
                found = next((t for t in self.special_tokens if t in text), None)
                if found is not None:
                    role = message.get("role", "?")
                    raise InputError(f"message {number} ({role}) contains the special token {found!r} as text: "
                                     "special tokens cannot be typed in a prompt (images are attached as images, "
                                     "not written as text); remove it")

    def prompt(self, text: str = DEFAULT_PROMPT, num_images: int = 1) -> str:
        """The chat-formatted prompt for images followed by a user text."""
        content: list[dict[str, str]] = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.apply_chat_template([{"role": "user", "content": content}])

    def encode(self, text: str) -> list[int]:
        """Token ids with each image token expanded to its visual tokens, suffix tokens and context tokens."""
        ids: list[int] = []
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        self._check_representable(text, encoding)
        for token_id in encoding.ids:
            if token_id == self.image_token_id:
                ids.extend([self.image_token_id] * self.tokens_per_image)
                ids.extend(self.image_suffix_token_ids)
                ids.extend(self.context_token_ids)
            else:
                ids.append(token_id)
        return ids

    def _check_representable(self, text: str, encoding: Any) -> None:
        """InputError naming the words the vocabulary cannot represent (mapped to the unk token).

        A WordLevel/WordPiece (or unk-configured BPE) model turns an unknown word into its unk token;
        the unk token typed literally (its source span is the unk text) is not an unknown word.
        Byte-level BPE has no unk token and never reports.
        """
        unk = getattr(self.tokenizer.model, "unk_token", None)
        unk_id = self.tokenizer.token_to_id(unk) if isinstance(unk, str) and unk else None
        if unk_id is None:
            return
        spans = zip(encoding.ids, encoding.offsets, strict=True)
        words = [text[a:b] for i, (a, b) in spans if i == unk_id and text[a:b] != unk]
        if words:
            unique = list(dict.fromkeys(words))
            listed = ", ".join(repr(w) for w in unique)
            raise InputError(f"the model's vocabulary cannot represent {listed}; "
                             "use words from its tokenizer.json")

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


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it: sandboxed and immutable, trim_blocks and
    lstrip_blocks, loop controls, `raise_exception` and `strftime_now` globals, a `tojson` filter."""
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"the chat template (tokenizer_config.json) is not valid jinja: {exc}") from exc


def _token_name(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, null, or a serialised AddedToken {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise ValueError(f"a special token must be a string, null or {{'content': ...}}, got {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError, "restore it from the original checkpoint")

def default_processor(image_size: int, tokens_per_image: int, num_context_tokens: int = 2) -> GazeProcessor:
    """The processor of the built-in scene captioner."""
    context = [f"<ctx_{i}>" for i in range(num_context_tokens)]
    image = ImageConfig(image_size=image_size)
    return GazeProcessor(build_tokenizer(), image, CHAT_TEMPLATE, tokens_per_image, context)
