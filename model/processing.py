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

#: PIL's resampling filters by the names this processor writes and the integers transformers writes.
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
              "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLING.items()}
#: Hugging Face image processors whose ``do_pad`` pads the batch of anyres patches, not the image.
_PATCH_PADDING = ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorFast", "LlavaNextImageProcessor",
                  "LlavaNextImageProcessorFast")


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
    """What preprocess does to an image, in transformers' order: convert to RGB, resize to the square
    ``image_size``, multiply by ``rescale_factor``, subtract ``image_mean`` and divide by ``image_std``
    (each step skipped where its ``do_*`` is false)."""

    image_size: int
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_preprocessor(cls, pre: dict[str, Any], where: str, image_size: int | None = None) -> ImageConfig:
        """Read a preprocessor_config.json: this processor's own or a transformers image processor's.

        Keys honoured: ``size`` ({"height", "width"} or an int; or this processor's ``image_size``),
        ``resample`` (PIL's integer or a name), ``do_resize``, ``do_rescale``, ``rescale_factor``,
        ``do_normalize``, ``image_mean``, ``image_std``, ``do_convert_rgb``. Refused (CheckpointError, one
        line naming the key): a non-square or shortest-edge size, ``do_center_crop``, ``do_pad`` (padding to a
        square), anyres tiling and a size that is not the vision tower's ``image_size`` when that is given.
        """

        def fail(message: str) -> CheckpointError:
            return CheckpointError(f"{where}: {message}")

        size = pre.get("size")
        side: Any
        if isinstance(size, dict):
            if "shortest_edge" in size or "longest_edge" in size:
                raise fail(f"size {size} resizes by an edge and keeps the aspect ratio; gaze-edge's towers take "
                           'a fixed square image: set size to {"height": N, "width": N}')
            if size.get("height") != size.get("width"):
                raise fail(f"size {size} is not square; gaze-edge's towers take a square image")
            side = size.get("height")
        elif size is not None:
            side = size
        else:
            side = pre.get("image_size", image_size)
        if not isinstance(side, int) or isinstance(side, bool) or side < 1:
            raise fail(f"no usable image size (size {size!r}, image_size {pre.get('image_size')!r})")
        if image_size is not None and side != image_size:
            raise fail(f"size {side} px is not the vision tower's {image_size} px input")
        if pre.get("do_center_crop"):
            raise fail("do_center_crop is true: center cropping is not supported; the tower must see the whole "
                       "image resized to a square (set do_center_crop false if the model was trained that way)")
        if pre.get("do_pad") and pre.get("image_processor_type") not in _PATCH_PADDING:
            raise fail("do_pad is true: padding the image to a square is not supported (set do_pad false if the "
                       "model was trained on plain resized images)")
        if pre.get("image_aspect_ratio") == "anyres" or (pre.get("image_grid_pinpoints")
                                                         and pre.get("image_processor_type") not in _PATCH_PADDING):
            raise fail("anyres tiling (image_grid_pinpoints) is not supported: each image is one square view")
        resample = pre.get("resample", "bicubic")
        name = RESAMPLE_NAMES.get(resample) if isinstance(resample, int) else resample
        if name not in RESAMPLING:
            raise fail(f"resample {resample!r} is not a PIL filter ({', '.join(RESAMPLING)} or 0..5)")

        def flag(key: str, default: bool) -> bool:
            value = pre.get(key, default)
            value = default if value is None else value
            if not isinstance(value, bool):
                raise fail(f"{key} must be true or false, got {value!r}")
            return value

        def triple(key: str) -> tuple[float, float, float]:
            value = pre.get(key, (0.5, 0.5, 0.5))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * 3
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise fail(f"{key} must be 3 numbers (R, G, B), got {value!r}")
            return (float(value[0]), float(value[1]), float(value[2]))

        factor = pre.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise fail(f"rescale_factor must be a positive number, got {factor!r}")
        std = triple("image_std")
        if min(std) <= 0:
            raise fail(f"image_std {list(std)} must be positive")
        return cls(image_size=side, resample=str(name), rescale_factor=float(factor), image_mean=triple("image_mean"),
                   image_std=std, do_resize=flag("do_resize", True), do_rescale=flag("do_rescale", True),
                   do_normalize=flag("do_normalize", True), do_convert_rgb=flag("do_convert_rgb", True))

    def to_preprocessor(self) -> dict[str, Any]:
        """preprocessor_config.json keys, readable by from_preprocessor and by transformers' image processors."""
        return {
            "image_size": self.image_size,
            "size": {"height": self.image_size, "width": self.image_size},
            "do_resize": self.do_resize,
            "resample": int(RESAMPLING[self.resample]),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }


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
            image = ImageConfig.from_preprocessor(pre, str(pre_file))

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
        pre = {"processor_class": "GazeProcessor", **self.image.to_preprocessor(),
               "tokens_per_image": self.tokens_per_image}
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
        """RGB images (PIL or uint8 HxWx3) -> float32 [N, 3, S, S], as transformers' image processors do it:
        convert to RGB, resize (PIL, the checkpoint's filter), rescale, normalise; each step as
        preprocessor_config.json says (ImageConfig). InputError for an image the config cannot take."""
        cfg = self.image
        size = cfg.image_size
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        for i, img in enumerate(images):
            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
            if pil.mode != "RGB":
                if not cfg.do_convert_rgb:
                    raise InputError(f"image {i} is {pil.mode}, not RGB, and the checkpoint's preprocessor sets "
                                     "do_convert_rgb false: give RGB images")
                pil = pil.convert("RGB")
            if pil.size != (size, size):
                if not cfg.do_resize:
                    raise InputError(f"image {i} is {pil.size[0]}x{pil.size[1]} px and the checkpoint's "
                                     f"preprocessor sets do_resize false: give {size}x{size} px images")
                pil = pil.resize((size, size), RESAMPLING[cfg.resample])
            arr = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1)
            if cfg.do_rescale:
                arr = arr * np.float32(cfg.rescale_factor)
            out[i] = (arr - mean) / std if cfg.do_normalize else arr
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
    tokenizer = build_tokenizer()
    # Context tokens past the built-in two go after the words, so that no word's id moves.
    tokenizer.add_special_tokens([t for t in context if tokenizer.token_to_id(t) is None])
    image = ImageConfig(image_size=image_size)
    return GazeProcessor(tokenizer, image, CHAT_TEMPLATE, tokens_per_image, context)
