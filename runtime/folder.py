"""An export folder (docs/ONNX_CONTRACT.md), read and checked before anything is allocated.

`ExportFolder.open(path)` reads gaze_config.json, checks that every file it names is
there and that the config is self-consistent, and builds the torch-free GazeProcessor
from the copied tokenizer/preprocessor files. A missing or mismatched folder raises
ExportFolderError saying which file or field is wrong and what to do.

The folder is a sandbox: every file the runtime opens is resolved inside it. A symbolic link
anywhere in the folder whose target lies outside it, and a file name in gaze_config.json that
is absolute or has a `..` part, are refused by name. Sizes in gaze_config.json must be
positive integers, and what any caption surely allocates (KV cache for the shortest prompt and
one new token, descriptor sums for every region) must fit this machine's memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge.errors import CheckpointError, GazeError, InputError
from gaze_edge.jsonfile import read_json_object
from gaze_edge.memory import gib, total_memory_bytes
from gaze_edge.model.processing import GazeProcessor
from gaze_edge.reference import region_index_map

FORMAT = "gaze-edge-onnx"
FORMAT_VERSION = 2  # 2: GazeAttention v2 (runtime-owned layout tables, routing, context_attention)
DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float16": np.float16}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


MAX_SIZE = 2**31 - 1  # every size in gaze_config.json: int32-safe (ONNX dims, numpy shapes)
CONFIG_FILE = "gaze_config.json"


class ExportFolderError(GazeError):
    """An export folder is missing, incomplete, or does not match what the runtime expects."""


def sequence_bytes(num_layers: int, kv_heads: int, head_dim: int, itemsize: int, capacity: int,
                   num_regions: int) -> int:
    """Cache bytes of one sequence (CacheSpec's formula, batch 1): K and V at `capacity` slots, fp32 descriptors."""
    kv = 2 * num_layers * kv_heads * capacity * head_dim * itemsize
    return kv + num_layers * kv_heads * num_regions * head_dim * 4


def resolve_inside(root: Path, name: Any, what: str) -> Path:
    """root / name for a file name read from gaze_config.json; ExportFolderError if it could leave root."""
    config = root / CONFIG_FILE
    if not isinstance(name, str) or not name or "\0" in name:
        raise ExportFolderError(f"{config}: {what} {name!r} is not a file name; re-run `gaze export`")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ExportFolderError(f"{config} names {what} {name!r}: an absolute path or one with '..' could read "
                                "outside the export folder, and the runtime reads only files inside it; write a "
                                "file name relative to the folder (or re-run `gaze export`)")
    path = root / name
    target, base = path.resolve(), root.resolve()
    if not target.is_relative_to(base):
        raise ExportFolderError(f"{path} ({what}) resolves to {target}, outside the export folder {base}; the "
                                "runtime reads only files inside it: copy the file into the folder")
    return path


def check_links(root: Path) -> None:
    """Every symbolic link inside `root` (at any depth) must point inside `root`; else ExportFolderError."""
    base = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(base):
                    raise ExportFolderError(f"{path} is a symbolic link to {target}, outside the export folder "
                                            f"{base}; the runtime reads only files inside it: replace the link by "
                                            "a copy of the file")


def _processor(path: Path) -> GazeProcessor:
    try:
        return GazeProcessor.from_pretrained(path)
    except CheckpointError as exc:
        raise ExportFolderError(f"{path}: {exc}") from exc


def _int(value: Any, name: str, low: int = 1, high: int = MAX_SIZE) -> int:
    """A JSON integer in [low, high] (not a bool, not a float); ValueError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low} .. {high}, got {value}")
    return value


#: Every size field of gaze_config.json (path of keys, least value); each must be an integer up to MAX_SIZE.
SIZE_FIELDS = (
    (("model", "vocab_size"), 1), (("model", "hidden_size"), 1), (("model", "num_hidden_layers"), 1),
    (("model", "num_attention_heads"), 1), (("model", "num_key_value_heads"), 1), (("model", "head_dim"), 1),
    (("model", "decoder", "kv_cache", "max_seq_len"), 2), (("model", "decoder", "descriptors", "num_regions"), 1),
    (("model", "vision", "image_size"), 1), (("model", "vision", "tokens_per_image"), 1),
    (("gaze", "regions_per_image"), 1), (("gaze", "max_images"), 1), (("gaze", "num_context_tokens"), 0),
)


def _check_sizes(config: dict[str, Any]) -> None:
    """Sizes are integers in range before anything is computed from them (a float or 1e30 allocates nonsense)."""
    for keys, low in SIZE_FIELDS:
        value: Any = config
        for key in keys:
            value = value[key]
        _int(value, ".".join(keys), low)
    gaze = config["gaze"]
    for name in ("grid", "region_size"):
        if not isinstance(gaze[name], list) or len(gaze[name]) != 2:
            raise ValueError(f"gaze.{name} must be two integers, got {gaze[name]!r}")
        for v in gaze[name]:
            _int(v, f"gaze.{name}")
    for k in gaze["top_k_per_layer"]:
        _int(k, "gaze.top_k_per_layer")
    vocab = config["model"]["vocab_size"]
    for name, value in config["special_tokens"].items():
        if value is None and name in ("bos_token_id", "assistant_token_id"):
            continue  # optional: Qwen-style tokenizers have no bos, a converted model no <assistant>
        _int(value, f"special_tokens.{name}", 0, vocab - 1)


def _check_search(search: dict[str, Any]) -> None:
    """The export's sampling defaults are finite and in range (a nan temperature samples garbage)."""
    for name, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0),
                            ("repetition_penalty", 0.0, math.inf)):
        value = search.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise ValueError(f"search.{name} must be a finite number in [{low}, {high}], got {value!r}")
    _int(search.get("top_k", 0), "search.top_k", 0)


@dataclass(frozen=True)
class ModelShape:
    """The shapes the runtime allocates and lays tokens out with (from gaze_config.json)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    max_seq_len: int
    num_regions: int  # R: max_images * regions_per_image
    dtype: type[np.floating[Any]]
    image_size: int
    tokens_per_image: int
    grid: tuple[int, int]
    region_size: tuple[int, int]
    regions_per_image: int
    max_images: int
    top_k_per_layer: tuple[int, ...]
    num_context_tokens: int
    context_token_ids: tuple[int, ...] = ()
    routing: str = "kv_head"
    context_attention: str = "causal"
    region_frames: int = 1  # video frames per region (the same rectangle in rt consecutive frames)

    @property
    def max_region_tokens(self) -> int:
        """M: the most tokens one region holds (rh * rw * region_frames)."""
        return self.region_size[0] * self.region_size[1] * self.region_frames

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    def region_of_token(self) -> np.ndarray:
        """Region (within one image) of each visual token in row-major order."""
        return region_index_map(self.grid[0], self.grid[1], self.region_size[0], self.region_size[1])


@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None
    eos: int
    pad: int
    image: int
    assistant: int | None


@dataclass
class ExportFolder:
    """A checked export folder: paths, shapes, special tokens, search defaults and the processor."""

    path: Path
    config: dict[str, Any]
    shape: ModelShape
    tokens: SpecialTokens
    search: dict[str, Any]
    processor: GazeProcessor

    @property
    def decoder_path(self) -> Path:
        return self.file(self.config["model"]["decoder"]["filename"], "the decoder file")

    @property
    def vision_path(self) -> Path:
        return self.file(self.config["model"]["vision"]["filename"], "the vision file")

    @property
    def embedding_path(self) -> Path:
        return self.file(self.config["model"]["embedding"]["filename"], "the embedding file")

    @property
    def has_gaze_queries(self) -> bool:
        """The decoder also outputs each layer's rotated queries (`gaze export --gaze-map-outputs`)."""
        return bool(self.config["model"]["decoder"].get("gaze_query_outputs", False))

    @classmethod
    def open(cls, path: str | Path) -> ExportFolder:
        path = Path(path)
        if not path.exists():
            raise ExportFolderError(f"export folder {path} does not exist; create it with `gaze export CKPT -o {path}`")
        if not path.is_dir():
            raise ExportFolderError(f"{path} is not a folder; pass the folder `gaze export` wrote")
        check_links(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise ExportFolderError(f"{path} has no gaze_config.json: it is not an export folder "
                                    f"(a checkpoint? run `gaze export {path} -o OUT` first)")
        config = read_json_object(config_file, ExportFolderError, "re-run `gaze export`")
        if config.get("format") != FORMAT:
            raise ExportFolderError(f"{config_file} is not a {FORMAT} runtime config; re-run `gaze export`")
        if config.get("format_version") != FORMAT_VERSION:
            raise ExportFolderError(f"{config_file} has format_version {config.get('format_version')!r}; this "
                                    f"runtime reads version {FORMAT_VERSION}: re-export with this gaze-edge")
        for name in COPIED_FILES:
            if not (path / name).is_file():
                raise ExportFolderError(f"{path} has no {name}: the export is incomplete; re-run `gaze export`")
        processor = _processor(path)
        return cls.from_config(path, config, processor)

    @classmethod
    def from_config(cls, path: Path, config: dict[str, Any], processor: GazeProcessor) -> ExportFolder:
        """A folder of graphs described by an in-memory runtime config (export validation uses this)."""
        try:
            _check_sizes(config)
            shape, tokens = _parse_shape(config), _parse_tokens(config)
            names = {part: config["model"][part]["filename"] for part in ("decoder", "vision", "embedding")}
            search = dict(config["search"])
            _check_search(search)
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportFolderError(f"{path / CONFIG_FILE} is missing or has a bad field ({exc!r}); "
                                    "re-run `gaze export`") from exc
        check_links(path)
        for part, name in names.items():
            if not resolve_inside(path, name, f"the {part} file").is_file():
                raise ExportFolderError(f"{path} has no {name}: the export is incomplete; re-run `gaze export`")
        folder = cls(path, config, shape, tokens, search, processor)
        folder._check_consistent()
        return folder

    def file(self, name: str, what: str = "file") -> Path:
        """`name` inside the folder (relative, no '..', no link out of it): the only way files are opened."""
        return resolve_inside(self.path, name, what)

    def shortest_prompt_tokens(self) -> int:
        """Tokens of the default prompt with one image: the least any caption needs (plus one new token)."""
        return len(self.processor.encode(self.processor.prompt(num_images=1)))

    def check_fits(self, batch: int, capacity: int) -> None:
        """InputError if B sequences of `capacity` cache slots would need more memory than this machine has."""
        s = self.shape
        need = batch * sequence_bytes(s.num_layers, s.kv_heads, s.head_dim, s.itemsize, capacity, s.num_regions)
        have = total_memory_bytes()
        if have is not None and need > have:
            raise InputError(f"{batch} sequence(s) of {capacity} cache slots need {gib(need)} of KV cache and "
                             f"descriptors; this machine has {gib(have)}: use a smaller batch, fewer images or "
                             "fewer new tokens")

    def _check_consistent(self) -> None:
        """Cross-check the processor, the embedding table and the config (a folder assembled from two exports)."""
        s, p = self.shape, self.processor
        problems = []
        if p.tokens_per_image != s.tokens_per_image:
            problems.append(f"preprocessor_config.json has {p.tokens_per_image} tokens per image, "
                            f"gaze_config.json {s.tokens_per_image}")
        if p.image.image_size != s.image_size:
            problems.append(f"preprocessor image_size {p.image.image_size} != gaze_config.json {s.image_size}")
        if p.image_token_id != self.tokens.image:
            problems.append(f"tokenizer <image> id {p.image_token_id} != gaze_config.json {self.tokens.image}")
        if p.tokenizer.get_vocab_size() > s.vocab_size:
            problems.append(f"tokenizer has {p.tokenizer.get_vocab_size()} tokens, the model {s.vocab_size}")
        try:
            table = np.load(self.embedding_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ExportFolderError(f"{self.embedding_path} cannot be read ({exc}); re-run `gaze export`") from exc
        if table.shape != (s.vocab_size, s.hidden_size) or table.dtype != np.dtype(s.dtype):
            problems.append(f"{self.embedding_path.name} is {table.dtype}{list(table.shape)}, gaze_config.json "
                            f"says {np.dtype(s.dtype)}{[s.vocab_size, s.hidden_size]}")
        if s.num_regions != s.max_images * s.regions_per_image:
            problems.append(f"num_regions {s.num_regions} != max_images {s.max_images} x regions_per_image "
                            f"{s.regions_per_image}")
        if problems:
            raise ExportFolderError(f"{self.path} is inconsistent: " + "; ".join(problems)
                                    + ". Its files come from different exports: re-run `gaze export`")
        shortest = self.shortest_prompt_tokens()
        if s.max_seq_len < shortest + 1:
            raise ExportFolderError(f"{self.path} holds {s.max_seq_len} tokens per sequence (max_seq_len), less than "
                                    f"one prompt: the default prompt with one image is {shortest} tokens plus one "
                                    f"new token; re-export with --max-seq-len {shortest + 32} or more")
        need = sequence_bytes(s.num_layers, s.kv_heads, s.head_dim, s.itemsize, shortest + 1, s.num_regions)
        have = total_memory_bytes()
        if have is not None and need > have:
            raise ExportFolderError(f"{self.path / CONFIG_FILE} sizes need {gib(need)} of cache for even the "
                                    f"shortest caption (layers {s.num_layers}, KV heads {s.kv_heads}, head_dim "
                                    f"{s.head_dim}, regions {s.num_regions}); this machine has {gib(have)}: check "
                                    "those sizes, or re-export with fewer --max-images")


def _parse_shape(config: dict[str, Any]) -> ModelShape:
    model, gaze = config["model"], config["gaze"]
    decoder = model["decoder"]
    dtype_name = model["dtype"]
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    layers = int(model["num_hidden_layers"])
    top_k = tuple(int(k) for k in gaze["top_k_per_layer"])
    if len(top_k) != layers:
        raise ValueError(f"gaze.top_k_per_layer has {len(top_k)} entries for {layers} layers")
    return ModelShape(
        vocab_size=int(model["vocab_size"]),
        hidden_size=int(model["hidden_size"]),
        num_layers=layers,
        num_heads=int(model["num_attention_heads"]),
        kv_heads=int(model["num_key_value_heads"]),
        head_dim=int(model["head_dim"]),
        max_seq_len=int(decoder["kv_cache"]["max_seq_len"]),
        num_regions=int(decoder["descriptors"]["num_regions"]),
        dtype=DTYPES[dtype_name],
        image_size=int(model["vision"]["image_size"]),
        tokens_per_image=int(model["vision"]["tokens_per_image"]),
        grid=(int(gaze["grid"][0]), int(gaze["grid"][1])),
        region_size=(int(gaze["region_size"][0]), int(gaze["region_size"][1])),
        regions_per_image=int(gaze["regions_per_image"]),
        max_images=int(gaze["max_images"]),
        top_k_per_layer=top_k,
        num_context_tokens=int(gaze["num_context_tokens"]),
        context_token_ids=tuple(int(i) for i in gaze.get("context_token_ids", ())),
        routing=_choice(gaze, "routing", ("kv_head", "query_head")),
        context_attention=_choice(gaze, "context_attention", ("causal", "own_image")),
        region_frames=int(gaze["region_frames"]),
    )


def _choice(block: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = block[key]
    if value not in allowed:
        raise ValueError(f"gaze.{key} {value!r} is not one of {list(allowed)}")
    return str(value)


def _parse_tokens(config: dict[str, Any]) -> SpecialTokens:
    t = config["special_tokens"]

    def optional(key: str) -> int | None:  # Qwen-style tokenizers have no bos; a converted model no <assistant>
        value = t.get(key)
        return None if value is None else int(value)

    return SpecialTokens(bos=optional("bos_token_id"), eos=int(t["eos_token_id"]), pad=int(t["pad_token_id"]),
                         image=int(t["image_token_id"]), assistant=optional("assistant_token_id"))
