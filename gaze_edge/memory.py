"""This machine's memory, and what a config surely allocates: checked before anything is allocated.

Standard library only, so the model loader (model/checkpoint.py), the torch-free runtime and
the CLI's argument checks (gaze_edge/cli_args.py) all use the same rule without importing
each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import GazeError


def total_memory_bytes() -> int | None:
    """Physical memory of this machine (os.sysconf), None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _ints(data: Mapping[str, Any], *names: str) -> list[int] | None:
    values = [data.get(n) for n in names]
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    return [int(v) for v in values] if ok else None  # type: ignore[arg-type]


def weight_bytes_lower_bound(config: Mapping[str, Any]) -> int:
    """fp32 bytes the model of a checkpoint's config.json surely allocates: embedding, MLPs, attention projections.

    A lower bound (biases, norms, the LM head and the projector left out), from the config alone: it
    can be compared with the machine before torch is imported or any tensor exists. Fields that
    are missing or not positive integers count 0 (the checkpoint loader names them).
    """
    total = 0
    embed = _ints(config, "vocab_size", "hidden_size")
    if embed:
        total += embed[0] * embed[1]
    text = _ints(config, "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim")
    if text:
        layers, hidden, inter, heads, kv, hd = text
        total += layers * (2 * hidden * inter + 2 * hidden * heads * hd + 2 * hidden * kv * hd)
    vision = _ints(config, "vision_num_layers", "vision_hidden_size", "vision_intermediate_size")
    if vision:
        layers, hidden, inter = vision
        total += layers * (2 * hidden * inter + 4 * hidden * hidden)
    return 4 * total


def check_weights_fit(config: Mapping[str, Any], config_file: Path, error: type[GazeError]) -> None:
    """`error` if the model `config` (config.json's fields) needs more fp32 weights than this machine's memory."""
    need, have = weight_bytes_lower_bound(config), total_memory_bytes()
    if have is not None and need > have:
        raise error(f"{config_file} describes a model of at least {gib(need)} of fp32 weights; this machine has "
                    f"{gib(have)} of memory: check its sizes (hidden_size, intermediate_size, num_hidden_layers, "
                    "vocab_size) or use a machine with more memory")
