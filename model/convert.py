"""`gaze convert SRC -o DST`: a transformers LLaVA-family checkpoint folder -> a gaze checkpoint.

Sources (config.json + model.safetensors or a sharded model.safetensors.index.json; never pickle):

- ``llava_onevision``: SigLIP + Qwen2, each image as one base view followed by LLaVA-OneVision's
  image newline (what it does for every image of a multi-image prompt); its anyres tiling of a
  single image is not supported and is refused unless ``--single-view`` accepts the base view.
- ``llava``: a SigLIP (``siglip_vision_model``) or SigLIP2 NaFlex (``siglip2_vision_model``, at one
  fixed square size) vision config and a Qwen2 or Qwen3 text config.

Every source tensor is mapped by name to one gaze tensor (shapes checked) or is one the source
model never reads (vision layers after ``vision_feature_layer``, SigLIP's post-LayerNorm and
pooling head); anything else, and anything missing, is refused with its name. The tokenizer
files are the source's: the image, pad, eos and bos tokens and the chat template come from them;
the context tokens (and LLaVA-OneVision's newline) are added to the tokenizer and the embedding
table (initialisation: docs/MODEL.md, "Bring your own model"). The output is built in a folder
beside DST and renamed into place only when complete: nothing is written on error.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from gaze_edge.errors import CheckpointError, InputError
from gaze_edge.reference import CONTEXT_ATTENTIONS, ROUTINGS

from .processing import GazeProcessor, ImageConfig, _read_json, _token_name, compile_chat_template

SOURCE_TYPES = ("llava_onevision", "llava")
VISION_TYPES = ("siglip_vision_model", "siglip2_vision_model")
TEXT_TYPES = ("qwen2", "qwen3")
#: Names of the tokens convert adds; checked not to exist in the source vocabulary.
CONTEXT_TOKEN = "<|gaze_context_{}|>"
NEWLINE_TOKEN = "<|gaze_image_newline|>"
#: Source tokenizer files copied as they are (tokenizer.json and tokenizer_config.json are rewritten).
TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
DTYPES = ("source", "fp32", "fp16", "bf16")

# SigLIP encoder layer parts: gaze name -> transformers name.
SIGLIP_BLOCK = {"norm1": "layer_norm1", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                "v_proj": "self_attn.v_proj", "out_proj": "self_attn.out_proj", "norm2": "layer_norm2",
                "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
VISION = "model.vision_tower.vision_model."
TEXT = "model.language_model."


@dataclass
class ConvertOptions:
    region_size: tuple[int, int]
    top_k: int | list[int]
    num_context_tokens: int = 4
    routing: str = "kv_head"
    context_attention: str = "own_image"
    single_view: bool = False  # llava_onevision: accept one base view per image instead of anyres tiling
    image_size: int | None = None  # siglip2 NaFlex: the fixed square input size (default: its native grid)
    dtype: str = "source"
    seed: int = 0  # context-token initialisation noise


@dataclass
class Converted:
    config: Any  # GazeConfig
    state: dict[str, Any]  # gaze tensor name -> torch.Tensor
    processor: GazeProcessor
    report: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ the source


class Tensors:
    """The source's safetensors (one file or an index of shards), read lazily; names normalised to the
    current transformers layout with the model class's own _checkpoint_conversion_mapping."""

    def __init__(self, src: Path, mapping: dict[str, str]) -> None:
        single, index = src / "model.safetensors", src / "model.safetensors.index.json"
        if single.is_file():
            shards = [single]
        elif index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            shards = sorted({src / str(f) for f in weight_map.values()})
        else:
            pickled = [p.name for p in src.glob("*.bin")] + [p.name for p in src.glob("*.pt*")]
            hint = f" (it has {', '.join(sorted(pickled))}: pickle, never loaded)" if pickled else ""
            raise CheckpointError(f"{src} has no model.safetensors or model.safetensors.index.json{hint}; "
                                  "save it with save_pretrained(..., safe_serialization=True)")
        from safetensors import SafetensorError, safe_open

        self.where: dict[str, Path] = {}  # normalised name -> shard
        self.source_name: dict[str, str] = {}  # normalised name -> name in the file
        self._open: dict[Path, Any] = {}
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard} (listed in the index) does not exist")
            try:
                handle = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{shard} is not a readable safetensors file ({exc})") from exc
            self._open[shard] = handle
            keys = handle.keys()
            for name in keys:
                new = _normalise(name, mapping)
                if new in self.where:
                    raise CheckpointError(f"{src}: tensor {name} appears twice (as {new})")
                self.where[new], self.source_name[new] = shard, name
        self.legacy = any(new != old for new, old in self.source_name.items())  # saved in the old layout
        # As transformers' save_pretrained reverses the mapping: to name missing tensors as this file would.
        self._reverse = {re.sub(r"\(.*\)", "", v): k.lstrip("^") for k, v in mapping.items()}

    def display(self, name: str) -> str:
        """A tensor's name as this checkpoint spells it (the old layout if it was saved in that one)."""
        if name in self.source_name:
            return self.source_name[name]
        if self.legacy:
            for pattern, replacement in self._reverse.items():
                new, count = re.subn("^" + re.escape(pattern), replacement, name)
                if count:
                    return new
        return name

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> Any:
        return self._open[self.where[name]].get_tensor(self.source_name[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open[self.where[name]].get_slice(self.source_name[name]).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it (F32, BF16, ...), without reading the tensor."""
        return str(self._open[self.where[name]].get_slice(self.source_name[name]).get_dtype())


def _normalise(name: str, mapping: dict[str, str]) -> str:
    for pattern, replacement in mapping.items():
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name


def _source_config(src: Path) -> Any:
    if not src.is_dir():
        raise CheckpointError(f"source folder {src} does not exist")
    raw = _read_json(src / "config.json") if (src / "config.json").is_file() else None
    if raw is None:
        raise CheckpointError(f"{src} has no config.json: is this a transformers checkpoint folder?")
    model_type = raw.get("model_type")
    if model_type not in SOURCE_TYPES:
        raise CheckpointError(f"{src}/config.json: model_type {model_type!r} is not supported; gaze convert takes "
                              "llava_onevision (SigLIP + Qwen2) and llava (SigLIP/SigLIP2 + Qwen2/Qwen3)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(src), local_files_only=True)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise CheckpointError(f"{src}/config.json cannot be read by transformers: {exc}") from exc


def _check_source(cfg: Any, src: Path, options: ConvertOptions) -> int:
    """Refuse what the gaze model cannot represent; returns the number of vision layers the source reads."""
    where = f"{src}/config.json"
    vc, tc = cfg.vision_config, cfg.text_config
    if vc is None or vc.model_type not in VISION_TYPES:
        raise CheckpointError(f"{where}: vision_config model_type {getattr(vc, 'model_type', None)!r} is not "
                              f"supported (one of {', '.join(VISION_TYPES)})")
    if tc is None or tc.model_type not in TEXT_TYPES:
        raise CheckpointError(f"{where}: text_config model_type {getattr(tc, 'model_type', None)!r} is not "
                              f"supported (one of {', '.join(TEXT_TYPES)})")
    problems = []
    if cfg.model_type == "llava_onevision" and getattr(cfg, "image_grid_pinpoints", None) and not options.single_view:
        raise CheckpointError(
            f"{where}: llava_onevision tiles a single image into anyres crops (image_grid_pinpoints); gaze-edge "
            "does not support anyres tiling. Pass --single-view to convert it with every image as one base view "
            "plus the image newline (what LLaVA-OneVision does for each image of a multi-image prompt)")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer!r}: only one layer is supported (not a list)")
        layer = -1
    kept = layer if layer >= 0 else vc.num_hidden_layers + 1 + layer  # hidden_states[0] is the embeddings
    if not 1 <= kept <= vc.num_hidden_layers:
        problems.append(f"vision_feature_layer {layer} reads no encoder layer of {vc.num_hidden_layers}")
    if cfg.vision_feature_select_strategy != "full":
        problems.append(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: SigLIP has no "
                        "class token to drop, only 'full' keeps the patch grid")
    if cfg.projector_hidden_act != "gelu" or not getattr(cfg, "multimodal_projector_bias", True):
        problems.append("the projector must be Linear(bias) - gelu - Linear(bias), got "
                        f"projector_hidden_act {cfg.projector_hidden_act!r}, "
                        f"multimodal_projector_bias {getattr(cfg, 'multimodal_projector_bias', True)}")
    if vc.hidden_act != "gelu_pytorch_tanh":
        problems.append(f"vision hidden_act {vc.hidden_act!r} (SigLIP's is gelu_pytorch_tanh)")
    if getattr(vc, "num_channels", 3) != 3:
        problems.append(f"vision num_channels {vc.num_channels} (RGB only)")
    if tc.hidden_act != "silu":
        problems.append(f"text hidden_act {tc.hidden_act!r} (Qwen's SwiGLU uses silu)")
    if getattr(tc, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(tc, "layer_types", None)
                                                         or []):
        problems.append("sliding-window attention layers (use_sliding_window / layer_types)")
    scaling = getattr(tc, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        problems.append(f"rope_scaling {scaling} (plain rotary only)")
    if problems:
        raise CheckpointError(f"{where}: not supported: " + "; ".join(problems))
    return kept


# ------------------------------------------------------------------ tokenizer


def _special(tok_cfg: dict[str, Any], special_map: dict[str, Any], key: str) -> str | None:
    value = tok_cfg.get(key, special_map.get(key))
    return _token_name(value)


def _chat_template(src: Path, tok_cfg: dict[str, Any]) -> str:
    """The processor's template (chat_template.jinja / chat_template.json), else the tokenizer's."""
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text(encoding="utf-8")
    if (src / "chat_template.json").is_file():
        value = _read_json(src / "chat_template.json").get("chat_template")
    else:
        value = tok_cfg.get("chat_template")
    if isinstance(value, list):  # named templates: the default one
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{src} has no chat template (chat_template.jinja, chat_template.json or "
                              "tokenizer_config.json's chat_template)")
    return value


def _image_config(src: Path, image_size: int) -> ImageConfig:
    path = src / "preprocessor_config.json"
    if not path.is_file():
        raise CheckpointError(f"{src} has no preprocessor_config.json: the image size, resampling, mean and std "
                              "the model was trained with are unknown")
    return ImageConfig.from_preprocessor(_read_json(path), str(path), image_size=image_size)


@dataclass
class Tokens:
    processor: GazeProcessor
    source_vocab: int  # tokens the source tokenizer has (the embedding rows it can produce)
    image: int
    pad: int
    eos: int
    bos: int | None
    context: list[int]
    newline: int | None


def _tokens(src: Path, cfg: Any, options: ConvertOptions, image_size: int, tokens_per_image: int) -> Tokens:
    from tokenizers import AddedToken, Tokenizer

    tok_file, cfg_file = src / "tokenizer.json", src / "tokenizer_config.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{src} has no tokenizer.json (a fast tokenizer's file): the gaze processor reads "
                              "tokenizers' format only; save the tokenizer with a fast tokenizer's save_pretrained")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{tok_file} is not a valid tokenizers file: {exc}") from exc
    tok_cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    special_map = _read_json(src / "special_tokens_map.json") if (src / "special_tokens_map.json").is_file() else {}
    source_vocab = tokenizer.get_vocab_size(with_added_tokens=True)

    image_id = int(cfg.image_token_id)
    image = tokenizer.id_to_token(image_id)
    if image is None:
        raise CheckpointError(f"{src}: no image token: config.json's image_token_index {image_id} is not a token of "
                              f"tokenizer.json ({source_vocab} tokens)")
    if image_id not in tokenizer.get_added_tokens_decoder():
        raise CheckpointError(f"{src}: the image token {image!r} (id {image_id}) is not an added token of "
                              "tokenizer.json: the prompt's image placeholder would not encode to it")
    named = _special(tok_cfg, special_map, "image_token")
    if named is not None and named != image:
        raise CheckpointError(f"{src}: tokenizer_config.json's image_token {named!r} is not token {image_id} "
                              f"({image!r}), config.json's image_token_index")
    names = {key: _special(tok_cfg, special_map, key) for key in ("pad_token", "eos_token", "bos_token", "unk_token")}
    for key in ("pad_token", "eos_token"):
        if names[key] is None:
            raise CheckpointError(f"{src}: the tokenizer has no {key} (tokenizer_config.json / "
                                  "special_tokens_map.json); the processor needs one")
        if tokenizer.token_to_id(str(names[key])) is None:
            raise CheckpointError(f"{src}: the tokenizer's {key} {names[key]!r} is not in tokenizer.json")

    new = [CONTEXT_TOKEN.format(i) for i in range(options.num_context_tokens)]
    suffix = [NEWLINE_TOKEN] if cfg.model_type == "llava_onevision" else []
    taken = [t for t in [*new, *suffix] if tokenizer.token_to_id(t) is not None]
    if taken:
        raise CheckpointError(f"{src}: the tokenizer already has {taken}, names gaze convert adds")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*suffix, *new]])
    template = _chat_template(src, tok_cfg)
    compile_chat_template(template)  # a syntax error is named now, not when the model is first used
    decoder = {str(tokenizer.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                               "normalized": False, "single_word": False} for t in [*suffix, *new]}
    processor = GazeProcessor(
        tokenizer, _image_config(src, image_size), template, tokens_per_image, new,
        image_token=image, pad_token=str(names["pad_token"]), eos_token=str(names["eos_token"]),
        bos_token=names["bos_token"], unk_token=names["unk_token"], image_suffix_tokens=suffix,
        tokenizer_config={**tok_cfg, "added_tokens_decoder": {**tok_cfg.get("added_tokens_decoder", {}), **decoder}},
    )
    prompt = processor.prompt("a", num_images=1)
    if prompt.count(image) != 1:
        raise CheckpointError(f"{src}: the chat template writes the image token {image!r} {prompt.count(image)} "
                              "times for one image part, not once")
    bos = None if names["bos_token"] is None else tokenizer.token_to_id(str(names["bos_token"]))
    return Tokens(processor, source_vocab, image_id, processor.pad_token_id, processor.eos_token_id, bos,
                  processor.context_token_ids, processor.image_suffix_token_ids[0] if suffix else None)


# ------------------------------------------------------------------ config and weights


def gaze_config(cfg: Any, kept: int, tokens: Tokens, options: ConvertOptions, vocab: int, image_size: int) -> Any:
    from .configuration import GazeConfig

    vc, tc = cfg.vision_config, cfg.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    config = GazeConfig(
        vocab_size=vocab,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=tc.rms_norm_eps,
        rope_theta=tc.rope_theta,
        max_position_embeddings=tc.max_position_embeddings,
        decoder_style=tc.model_type,
        attention_bias=bool(getattr(tc, "attention_bias", False)) if tc.model_type == "qwen3" else False,
        image_size=image_size,
        patch_size=vc.patch_size,
        vision_hidden_size=vc.hidden_size,
        vision_intermediate_size=vc.intermediate_size,
        vision_num_layers=kept,
        vision_num_heads=vc.num_attention_heads,
        vision_style="siglip",
        vision_layer_norm_eps=vc.layer_norm_eps,
        vision_post_layernorm=False,  # LLaVA reads hidden_states[layer], before SigLIP's post-LayerNorm
        region_size=list(options.region_size),
        gaze_top_k=options.top_k,
        num_context_tokens=options.num_context_tokens,
        routing=options.routing,
        context_attention=options.context_attention,
        image_token_id=tokens.image,
        context_token_ids=tokens.context,
        image_suffix_token_ids=[] if tokens.newline is None else [tokens.newline],
        assistant_token_id=None,
        pad_token_id=tokens.pad,
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
    )
    config.validate()
    return config


def _source_name(gaze: str) -> str:
    """The transformers tensor a gaze tensor comes from."""
    if m := re.fullmatch(r"vision\.blocks\.(\d+)\.(\w+)\.(weight|bias)", gaze):
        return f"{VISION}encoder.layers.{m[1]}.{SIGLIP_BLOCK[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"layers\.(\d+)\.((gate|up|down)_proj\.weight)", gaze):
        return f"{TEXT}layers.{m[1]}.mlp.{m[2]}"
    fixed = {
        "vision.patch_embed.weight": f"{VISION}embeddings.patch_embedding.weight",
        "vision.patch_embed.bias": f"{VISION}embeddings.patch_embedding.bias",
        "vision.pos_embed": f"{VISION}embeddings.position_embedding.weight",
        "vision.projector.0.weight": "model.multi_modal_projector.linear_1.weight",
        "vision.projector.0.bias": "model.multi_modal_projector.linear_1.bias",
        "vision.projector.2.weight": "model.multi_modal_projector.linear_2.weight",
        "vision.projector.2.bias": "model.multi_modal_projector.linear_2.bias",
        "lm_head.weight": "lm_head.weight",
    }
    return fixed.get(gaze, TEXT + gaze)  # embed_tokens, layers.i.{input,post_attention}_layernorm/self_attn.*, norm


def _unused(name: str, kept: int) -> bool:
    """Source tensors the source model itself never reads."""
    if m := re.match(re.escape(VISION) + r"encoder\.layers\.(\d+)\.", name):
        return int(m[1]) >= kept  # after vision_feature_layer
    return name.startswith((VISION + "post_layernorm.", VISION + "head."))  # LLaVA reads hidden_states[layer]


def _iter_plan(expected: dict[str, Any], tied: bool) -> Iterator[tuple[str, str]]:
    """(gaze tensor, source tensor) pairs; a tied lm_head is the embedding table."""
    for gaze in expected:
        yield gaze, TEXT + "embed_tokens.weight" if gaze == "lm_head.weight" and tied else _source_name(gaze)


def convert_weights(tensors: Tensors, cfg: Any, config: Any, tokens: Tokens, kept: int, options: ConvertOptions,
                    src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gaze state dict from the source tensors, every name and shape checked; and a report."""
    import torch

    from .modeling import GazeForConditionalGeneration

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GazeForConditionalGeneration(config).state_dict().items()}
    tied = bool(getattr(cfg.get_text_config(decoder=True), "tie_word_embeddings", True))
    plan = dict(_iter_plan(expected, tied))
    have = tensors.names()
    used = set(plan.values())
    newline = "model.image_newline"
    if tokens.newline is not None:
        used.add(newline)
    if tied:
        used.add("lm_head.weight")  # tied: transformers uses the embedding, whatever the file holds
    missing = sorted(s for s in used if s not in have and not (tied and s == "lm_head.weight"))
    dropped = sorted(n for n in have - used if _unused(n, kept))
    extra = sorted(have - used - set(dropped))
    where = f"{src}: weights"
    if missing:
        shown = [tensors.display(n) for n in missing]
        raise CheckpointError(f"{where}: missing tensor{'s' if len(missing) > 1 else ''} {_names(shown)} "
                              f"(needed for {_names([g for g, s in plan.items() if s in missing])})")
    if extra:
        shown = [tensors.display(n) for n in extra]
        raise CheckpointError(f"{where}: unexpected tensor{'s' if len(shown) > 1 else ''} {_names(shown)}: not "
                              "part of the architecture config.json describes (a different model?)")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    stored = tensors.dtype(plan["embed_tokens.weight"])  # "source": the embedding table's dtype
    dtype = dtypes.get(options.dtype, {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32))
    transforms = _transforms(cfg, config)
    state: dict[str, Any] = {}
    for gaze, source in plan.items():
        tensor, label = tensors.get(source), tensors.display(source)
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{where}: tensor {label} has dtype {tensor.dtype}, expected floating point")
        tensor = transforms.get(gaze, lambda t: t)(tensor.float())
        if gaze in ("embed_tokens.weight", "lm_head.weight"):
            tensor = _grow(tensor, expected[gaze][0], tokens, gaze, options, tensors, newline)
        if tuple(tensor.shape) != expected[gaze]:
            raise CheckpointError(f"{where}: tensor {label} has shape {tuple(tensors.shape(source))}, config.json "
                                  f"implies {expected[gaze]} for {gaze}")
        state[gaze] = tensor.to(dtype).contiguous()
    report = {"source_tensors": len(have), "dropped_unused_by_source": [tensors.display(n) for n in dropped],
              "tied_lm_head": tied, "dtype": str(dtype).removeprefix("torch.")}
    return state, report


def _transforms(cfg: Any, config: Any) -> dict[str, Callable[[Any], Any]]:
    """Per-tensor layout changes: position table [N, D] -> [1, N, D]; SigLIP2's linear patch embedding as a
    convolution and its position table resized (as transformers resizes it) to the fixed grid."""
    import torch

    grid, dim, p = config.grid_size, config.vision_hidden_size, config.patch_size
    if cfg.vision_config.model_type != "siglip2_vision_model":
        return {"vision.pos_embed": lambda t: t[None]}
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    def patch(t: torch.Tensor) -> torch.Tensor:  # Linear over (p, p, C)-flattened patches -> Conv2d [D, C, p, p]
        return t.reshape(dim, p, p, 3).permute(0, 3, 1, 2)

    def positions(t: torch.Tensor) -> torch.Tensor:
        side = int(round(t.shape[0] ** 0.5))
        shapes = cast(torch.LongTensor, torch.tensor([[grid, grid]]))
        return Siglip2VisionEmbeddings.resize_positional_embeddings(t.reshape(side, side, dim), shapes, grid * grid)

    return {"vision.patch_embed.weight": patch, "vision.pos_embed": positions}


def _grow(table: Any, rows: int, tokens: Tokens, gaze: str, options: ConvertOptions, tensors: Tensors,
          newline: str) -> Any:
    """The embedding (or lm_head) table with the rows of the added tokens.

    Embedding: each context token = the mean of the source tokenizer's rows + N(0, (std/10)^2) per dimension
    (seeded); the newline token = LLaVA-OneVision's image_newline. lm_head: new rows zero (never generated).
    Added ids below the source table's size take over rows no source token used (its padding rows).
    """
    import torch

    if table.shape[0] > rows:
        return table  # the shape check names it
    grown = torch.zeros(rows, table.shape[1], dtype=table.dtype)
    grown[: table.shape[0]] = table
    if gaze == "embed_tokens.weight":
        known = table[: tokens.source_vocab]
        generator = torch.Generator().manual_seed(options.seed)
        noise = torch.randn(len(tokens.context), table.shape[1], generator=generator)
        for token_id, n in zip(tokens.context, noise, strict=True):
            grown[token_id] = known.mean(0) + n * known.std(0) / 10
        if tokens.newline is not None:
            grown[tokens.newline] = tensors.get(newline).float()
    return grown


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------ the command


def convert(src: Path, options: ConvertOptions) -> Converted:
    """Read and check a source folder; everything in memory, nothing written."""
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    _check_options(options)
    cfg = _source_config(src)
    kept = _check_source(cfg, src, options)
    vc = cfg.vision_config
    if vc.model_type == "siglip2_vision_model":
        image_size = options.image_size or vc.patch_size * int(round(vc.num_patches**0.5))
        if image_size % vc.patch_size:
            raise CheckpointError(f"--image-size {image_size} is not a multiple of SigLIP2's patch {vc.patch_size}")
    else:
        if options.image_size not in (None, vc.image_size):
            raise CheckpointError(f"--image-size applies to SigLIP2 NaFlex towers only; this SigLIP tower takes "
                                  f"{vc.image_size} px (its learned position table)")
        image_size = vc.image_size
    tokens_per_image = (image_size // vc.patch_size) ** 2
    tokens = _tokens(src, cfg, options, image_size, tokens_per_image)
    model_class = LlavaOnevisionForConditionalGeneration if cfg.model_type == "llava_onevision" else \
        LlavaForConditionalGeneration
    tensors = Tensors(src, dict(model_class._checkpoint_conversion_mapping))
    embed = TEXT + "embed_tokens.weight"
    if embed not in tensors.names():
        raise CheckpointError(f"{src}: weights: missing tensor {tensors.display(embed)}")
    added = [*tokens.context, *([] if tokens.newline is None else [tokens.newline])]
    vocab = max([tensors.shape(embed)[0], *[i + 1 for i in added]])
    config = gaze_config(cfg, kept, tokens, options, vocab, image_size)
    state, report = convert_weights(tensors, cfg, config, tokens, kept, options, src)
    report = {"source": str(src), "model_type": cfg.model_type, "vision": vc.model_type,
              "text": cfg.text_config.model_type, "vision_layers_used": f"{kept} of {vc.num_hidden_layers}",
              "added_tokens": {t: tokens.processor.tokenizer.token_to_id(t) for t in
                               [*tokens.processor.image_suffix_tokens, *tokens.processor.context_tokens]},
              "context_token_init": "mean of the source token embeddings + N(0, (std/10)^2), seed "
                                    f"{options.seed}", **report}
    return Converted(config, state, tokens.processor, report)


def write_converted(converted: Converted, folder: Path, src: Path) -> None:
    """Write a gaze checkpoint (model/checkpoint.py's format) into an existing empty folder."""
    from safetensors.torch import save_file

    from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_config

    converted.config.architectures = ["GazeForConditionalGeneration"]
    (folder / CONFIG_NAME).write_text(converted.config.to_json_string(use_diff=False))
    save_file(converted.state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    converted.processor.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    (folder / "convert_report.json").write_text(json.dumps(converted.report, indent=2) + "\n")
    # Read back what was written: the config and processor load, and agree on the special tokens.
    config, processor = load_config(folder), GazeProcessor.from_pretrained(folder)
    if (processor.image_token_id, processor.context_token_ids, processor.image_suffix_token_ids) != \
            (config.image_token_id, config.context_token_ids, config.image_suffix_token_ids):
        raise CheckpointError("internal error: the written processor and config.json disagree on token ids")


def _check_options(options: ConvertOptions) -> None:
    if options.routing not in ROUTINGS:
        raise CheckpointError(f"routing must be one of {ROUTINGS}, got {options.routing!r}")
    if options.context_attention not in CONTEXT_ATTENTIONS:
        raise CheckpointError(f"context_attention must be one of {CONTEXT_ATTENTIONS}")
    if options.dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {DTYPES}, got {options.dtype!r}")
    if options.num_context_tokens < 0:
        raise CheckpointError("the number of context tokens must be >= 0")


def convert_checkpoint(src: Path, dst: Path, options: ConvertOptions, force: bool = False) -> Converted:
    """Convert SRC into a new gaze checkpoint folder DST; on any error nothing is left behind."""
    from gaze_edge.atomic import check_new_folder, move_folder_into_place, partial_folder

    check_new_folder(dst, force, CheckpointError)
    converted = convert(Path(src), options)
    with partial_folder(dst, CheckpointError) as tmp:
        try:
            write_converted(converted, tmp, Path(src))
        except OSError as exc:
            raise CheckpointError(f"cannot write {dst}: {exc}") from exc
        move_folder_into_place(tmp, dst, CheckpointError, "the converted checkpoint")
    return converted


def _region_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise argparse.ArgumentTypeError(f"expected RHxRW in visual tokens (e.g. 3x3), got {text!r}")
    return int(m[1]), int(m[2])


def _top_k(text: str) -> int | list[int]:
    try:
        values = [int(v, 10) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K0,K1,... (one per decoder layer), got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"top_k values must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 else values


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `convert` subcommand to a `gaze` argparse subparsers object."""
    from gaze_edge import cli_args as ca
    from gaze_edge import console

    p = subparsers.add_parser("convert", help="a transformers LLaVA checkpoint (llava_onevision, llava) -> a gaze "
                                              "checkpoint")
    p.add_argument("source", type=Path, help="transformers folder: config.json, model.safetensors, tokenizer.json ...")
    p.add_argument("-o", "--output", type=Path, required=True, help="gaze checkpoint folder to create")
    p.add_argument("--region-size", type=_region_size, required=True, help="region RHxRW in visual tokens, e.g. 3x3")
    # Required, but checked in run_convert: argparse would refuse the hidden old spelling --top-k K.
    p.add_argument("--gaze-top-k", type=_top_k, metavar="K[,K1,...]",
                   help="regions per gaze query: K, or K0,K1,... per layer (the config's gaze_top_k); required")
    p.add_argument("--context-tokens", type=ca.int_in(0, 256), default=4, help="context tokens after each image")
    p.add_argument("--routing", choices=ROUTINGS, default="kv_head")
    p.add_argument("--context-attention", choices=CONTEXT_ATTENTIONS, default="own_image")
    p.add_argument("--single-view", action="store_true",
                   help="llava_onevision: every image as one base view (no anyres tiling)")
    p.add_argument("--image-size", type=ca.int_in(1, 8192), default=None,
                   help="SigLIP2 NaFlex towers: the fixed square input size in px (default: the native grid)")
    p.add_argument("--dtype", choices=DTYPES, default="source", help="weights dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    # --top-k is the sampling option elsewhere (docs/CLI.md): the old spelling stays, hidden.
    console.add_renamed(p, "--top-k", "--gaze-top-k")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    if args.gaze_top_k is None:
        raise InputError("--gaze-top-k K (or K0,K1,... one per decoder layer) is required: the regions each gaze "
                         "query keeps")
    options = ConvertOptions(region_size=args.region_size, top_k=args.gaze_top_k,
                             num_context_tokens=args.context_tokens,
                             routing=args.routing, context_attention=args.context_attention,
                             single_view=args.single_view, image_size=args.image_size, dtype=args.dtype)
    converted = convert_checkpoint(Path(args.source), Path(args.output), options, force=args.force)
    c, r = converted.config, converted.report
    print(f"wrote {args.output}: {r['model_type']} ({r['vision']} + {r['text']}), {c.num_hidden_layers} layers, "
          f"{c.tokens_per_image} visual tokens and {c.regions_per_image} regions per image, top_k {c.gaze_top_k}, "
          f"{c.num_context_tokens} context tokens; {len(r['dropped_unused_by_source'])} tensors the source never "
          "reads left out (convert_report.json)", flush=True)
    return 0
