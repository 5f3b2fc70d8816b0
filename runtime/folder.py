"""An export folder (docs/ONNX_CONTRACT.md), read and checked before anything is allocated.

`ExportFolder.open(path)` reads gaze_config.json, checks that every file it names is
there and that the config is self-consistent, and builds the torch-free GazeProcessor
from the copied tokenizer/preprocessor files. A missing or mismatched folder raises
ExportFolderError saying which file or field is wrong and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge.errors import CheckpointError, GazeError
from gaze_edge.jsonfile import read_json_object
from gaze_edge.model.processing import GazeProcessor
from gaze_edge.reference import region_index_map

FORMAT = "gaze-edge-onnx"
FORMAT_VERSION = 1
DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float16": np.float16}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


class ExportFolderError(GazeError):
    """An export folder is missing, incomplete, or does not match what the runtime expects."""


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

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    def region_of_token(self) -> np.ndarray:
        """Region (within one image) of each visual token in row-major order."""
        return region_index_map(self.grid[0], self.grid[1], self.region_size[0], self.region_size[1])


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int
    image: int
    assistant: int


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
        return self.path / self.config["model"]["decoder"]["filename"]

    @property
    def vision_path(self) -> Path:
        return self.path / self.config["model"]["vision"]["filename"]

    @property
    def embedding_path(self) -> Path:
        return self.path / self.config["model"]["embedding"]["filename"]

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
        config_file = path / "gaze_config.json"
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
        try:
            processor = GazeProcessor.from_pretrained(path)
        except CheckpointError as exc:
            raise ExportFolderError(f"{path}: {exc}") from exc
        return cls.from_config(path, config, processor)

    @classmethod
    def from_config(cls, path: Path, config: dict[str, Any], processor: GazeProcessor) -> ExportFolder:
        """A folder of graphs described by an in-memory runtime config (export validation uses this)."""
        try:
            shape, tokens = _parse_shape(config), _parse_tokens(config)
            names = [config["model"][part]["filename"] for part in ("decoder", "vision", "embedding")]
            search = dict(config["search"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportFolderError(f"{path / 'gaze_config.json'} is missing or has a bad field ({exc!r}); "
                                    "re-run `gaze export`") from exc
        for name in names:
            if not (path / name).is_file():
                raise ExportFolderError(f"{path} has no {name}: the export is incomplete; re-run `gaze export`")
        folder = cls(path, config, shape, tokens, search, processor)
        folder._check_consistent()
        return folder

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
    )


def _parse_tokens(config: dict[str, Any]) -> SpecialTokens:
    t = config["special_tokens"]
    return SpecialTokens(bos=int(t["bos_token_id"]), eos=int(t["eos_token_id"]), pad=int(t["pad_token_id"]),
                         image=int(t["image_token_id"]), assistant=int(t["assistant_token_id"]))
