"""The TensorRT backend's plain decisions, tested without TensorRT (tests/test_runtime_trt.py).

Profile choice, cache length, buffer and binding plans (past_key_values.* and present.* on one buffer: the
plugin's aliased, in-place KV cache), engine I/O checks, slot copies, prefill splits and the CUDA-graph rule.
runtime/trt_backend.py (the TensorRT/CUDA glue) applies them and re-exports every name.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge.errors import InputError
from gaze_edge.export.trt_build import GLUE_NODE_VERSION, export_plugin_version

from .backend import BackendError
from .folder import ModelShape


@dataclass(frozen=True)
class ProfileRange:
    """What one decoder optimization profile accepts: (min, max) of batch B, new tokens T and cache slots S."""

    index: int
    batch: tuple[int, int]
    tokens: tuple[int, int]
    cache: tuple[int, int]

    def accepts(self, batch: int, tokens: int) -> bool:
        return self.batch[0] <= batch <= self.batch[1] and self.tokens[0] <= tokens <= self.tokens[1]


def profile_range(index: int, embeds: Sequence[Sequence[int]], kv: Sequence[Sequence[int]]) -> ProfileRange:
    """A ProfileRange from the (min, opt, max) shapes of `inputs_embeds` [B, T, H] and a past key [B, Hkv, S, D]."""
    lo, _, hi = embeds
    kv_lo, _, kv_hi = kv
    return ProfileRange(index, (int(lo[0]), int(hi[0])), (int(lo[1]), int(hi[1])), (int(kv_lo[2]), int(kv_hi[2])))


def choose_profile(profiles: Sequence[ProfileRange], batch: int, tokens: int) -> int:
    """The profile a call over `batch` x `tokens` runs in: of those that accept it, the one with the fewest
    maximum tokens (with `gaze build`'s profiles: T = 1 -> 1 (decode), 1 < T <= max_prefill -> 0 (prefill))."""
    fitting = [p for p in profiles if p.accepts(batch, tokens)]
    if not fitting:
        ranges = ", ".join(f"profile {p.index}: B {p.batch[0]}..{p.batch[1]}, T {p.tokens[0]}..{p.tokens[1]}"
                           for p in profiles)
        raise BackendError(f"no decoder engine profile serves a call of batch {batch} x {tokens} tokens ({ranges}); "
                           "rebuild with `gaze build --max-batch/--max-prefill`")
    return min(fitting, key=lambda p: (p.tokens[1], p.index)).index


def max_call_tokens(profiles: Sequence[ProfileRange], batch: int) -> int:
    """The most new tokens one engine call takes at this batch (longer prefill chunks are split)."""
    fitting = [p.tokens[1] for p in profiles if p.batch[0] <= batch <= p.batch[1]]
    if not fitting:
        raise BackendError(f"the decoder engine serves batch {min(p.batch[0] for p in profiles)}.."
                           f"{max(p.batch[1] for p in profiles)}, not {batch}; rebuild with `gaze build --max-batch "
                           f"{batch}` or run smaller batches")
    return max(fitting)


def cache_length(profiles: Sequence[ProfileRange], capacity: int) -> int:
    """Cache slots S to allocate: every profile must accept S (buffers are shared), and S >= capacity.

    `gaze build` fixes S to the export's max_seq_len, so this is usually that; an engine with a dynamic
    S gets the smallest S its profiles allow.
    """
    lo = max(p.cache[0] for p in profiles)
    hi = min(p.cache[1] for p in profiles)
    length = max(capacity, lo)
    if length > hi or lo > hi:
        raise BackendError(f"this generation needs {capacity} cache slots; the decoder engine's profiles accept "
                           f"{lo}..{hi}: rebuild the engines for this export (`gaze build --force`)")
    return length


@dataclass(frozen=True)
class BufferSpec:
    """One device buffer: its name, the largest shape it holds, and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Binding:
    """Engine tensor `tensor` is bound to device buffer `buffer` with this shape for one call."""

    tensor: str
    buffer: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    is_input: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


#: Slot metadata bytes per slot that this backend's binding plan copies (slot_pos, slot_region, slot_valid: the
#: GazeAttention v1 contract, which is what the plugin in plugins_trt implements).
SLOT_METADATA_BYTES = 8 + 8 + 1


def check_plugin_contract(config: dict[str, Any], where: Path) -> None:
    """Refuse an export whose GazeAttention plugin version is not the one plugins_trt and this backend implement."""
    wanted = export_plugin_version(config)
    if wanted != GLUE_NODE_VERSION:
        raise BackendError(f"{where} uses GazeAttention plugin version {wanted or '?'}; this backend's bindings "
                           f"implement version {GLUE_NODE_VERSION} only (they do not feed v2's layout tables yet): "
                           "run it with the ONNX Runtime backend (--backend onnxruntime)")


def kv_buffer(layer: int, kind: str) -> str:
    return f"kv.{layer}.{kind}"


def plan_decoder_buffers(shape: ModelShape, batch: int, cache_len: int, max_tokens: int,
                         query_outputs: bool) -> dict[str, BufferSpec]:
    """Every device buffer of the decoder, allocated once per (batch, cache_len, max_tokens)."""
    dt, f32, i64, b1 = np.dtype(shape.dtype), np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.bool_)
    b, s, t = batch, cache_len, max_tokens
    specs = [
        BufferSpec("inputs_embeds", (b, t, shape.hidden_size), dt),
        BufferSpec("gaze", (b, t), b1),
        BufferSpec("slot_pos", (b, s), i64),
        BufferSpec("slot_region", (b, s), i64),
        BufferSpec("slot_valid", (b, s), b1),
        BufferSpec("write_offset", (1,), i64),
        BufferSpec("logits", (b, t, shape.vocab_size), dt),
    ]
    for i in range(shape.num_layers):
        specs.append(BufferSpec(kv_buffer(i, "key"), (b, shape.kv_heads, s, shape.head_dim), dt))
        specs.append(BufferSpec(kv_buffer(i, "value"), (b, shape.kv_heads, s, shape.head_dim), dt))
        specs.append(BufferSpec(kv_buffer(i, "desc"), (b, shape.kv_heads, shape.num_regions, shape.head_dim), f32))
    if query_outputs:
        specs += [BufferSpec(f"gaze_query.{i}", (b, shape.num_heads, t, shape.head_dim), dt)
                  for i in range(shape.num_layers)]
    return {spec.name: spec for spec in specs}


def plan_decoder_bindings(shape: ModelShape, batch: int, cache_len: int, tokens: int,
                          query_outputs: bool) -> list[Binding]:
    """Which decoder tensor gets which buffer, with which shape, for a call over `tokens` new tokens.

    past_key_values.{i}.{key,value,desc} and present.{i}.{key,value,desc} name the SAME buffer.
    """
    bufs = plan_decoder_buffers(shape, batch, cache_len, tokens, query_outputs)
    out = [Binding(n, n, bufs[n].shape, bufs[n].dtype, True)
           for n in ("inputs_embeds", "slot_pos", "slot_region", "slot_valid", "gaze", "write_offset")]
    for i in range(shape.num_layers):
        for kind in ("key", "value", "desc"):
            spec = bufs[kv_buffer(i, kind)]
            out.append(Binding(f"past_key_values.{i}.{kind}", spec.name, spec.shape, spec.dtype, True))
            out.append(Binding(f"present.{i}.{kind}", spec.name, spec.shape, spec.dtype, False))
    out.append(Binding("logits", "logits", bufs["logits"].shape, bufs["logits"].dtype, False))
    if query_outputs:
        out += [Binding(f"gaze_query.{i}", f"gaze_query.{i}", bufs[f"gaze_query.{i}"].shape,
                        bufs[f"gaze_query.{i}"].dtype, False) for i in range(shape.num_layers)]
    return out


def check_engine_io(expected: Sequence[Binding], actual: dict[str, tuple[bool, np.dtype[Any]]]) -> list[str]:
    """Problems between the binding plan and the engine's I/O tensors (name -> (is_input, dtype))."""
    problems = []
    names = {b.tensor for b in expected}
    for b in expected:
        if b.tensor not in actual:
            problems.append(f"no tensor {b.tensor!r}")
            continue
        is_input, dtype = actual[b.tensor]
        if is_input != b.is_input:
            problems.append(f"{b.tensor!r} is an {'input' if is_input else 'output'}, expected the other")
        if np.dtype(dtype) != b.dtype:
            problems.append(f"{b.tensor!r} is {np.dtype(dtype)}, expected {b.dtype}")
    extra = sorted(set(actual) - names)
    if extra:
        problems.append(f"unexpected tensors {extra[:4]}")
    return problems


@dataclass(frozen=True)
class SlotCopy:
    """A 2-D host -> device copy of the slot columns one call writes (rows = sequences)."""

    buffer: str
    dst_offset: int  # bytes into the device buffer
    dst_pitch: int
    src_offset: int  # bytes into the host array
    src_pitch: int
    width: int  # bytes per row
    height: int  # rows


def plan_slot_copies(batch: int, host_capacity: int, device_capacity: int, offset: int, tokens: int) -> list[SlotCopy]:
    """The copies that bring slots [offset, offset + tokens) of the host SlotState to the device.

    Only these columns change between calls (SlotState.write writes exactly them), so a decode step
    copies B x 17 bytes of slot metadata, not B x S x 17. The host arrays have `host_capacity`
    columns, the device ones `device_capacity` (the engine's S, possibly larger).
    """
    if offset < 0 or offset + tokens > host_capacity or host_capacity > device_capacity:
        raise InputError(f"slots [{offset}, {offset + tokens}) do not fit the host cache of {host_capacity} slots "
                         f"and the device cache of {device_capacity}")
    return [SlotCopy(name, offset * item, device_capacity * item, offset * item, host_capacity * item,
                     tokens * item, batch)
            for name, item in (("slot_pos", 8), ("slot_region", 8), ("slot_valid", 1))]


def split_prefill(region: np.ndarray, regions_per_image: int, max_tokens: int) -> list[int]:
    """Ends of sub-calls of at most `max_tokens` columns over the call's slot regions [B, T]; never inside an image.

    A cut between two columns is inside an image when, in some sequence, both are visual tokens of the
    same image (region // regions_per_image); with region-major storage such a cut would hide a key
    from a query that must see it (docs/RUNTIME.md, decode loop step 4).
    """
    length = region.shape[1]
    image = np.where(region >= 0, region // max(regions_per_image, 1), -1)
    inside = np.zeros(length + 1, dtype=bool)  # inside[c]: a cut before column c splits an image
    inside[1:length] = ((image[:, 1:] == image[:, :-1]) & (image[:, 1:] >= 0)).any(0)
    ends, start = [], 0
    while start < length:
        end = min(start + max_tokens, length)
        while end > start and end < length and inside[end]:
            end -= 1
        if end == start:
            raise BackendError(f"an image's tokens do not fit one call of the decoder engine (at most {max_tokens} "
                               "tokens): rebuild with `gaze build --max-prefill` of at least the tokens per image")
        ends.append(end)
        start = end
    return ends


EAGER, CAPTURE, REPLAY = "eager", "capture", "replay"


class GraphPolicy:
    """When a decode step runs eagerly, is captured in a CUDA graph, or replays the captured graph.

    A call with key K (profile, batch, T, buffer set): replay if the graph was captured for K; else run
    eagerly, and after the `warmup`-th eager run with the same K capture (TensorRT does one-time work in
    the first enqueue after a shape change, which must not land in a graph). A different key, new
    buffers or a profile switch (`invalidate`) drop the graph, so it is re-captured for the new key.
    """

    def __init__(self, warmup: int = 1) -> None:
        if warmup < 1:
            raise ValueError("a CUDA graph needs at least one eager warm-up run before capture")
        self.warmup = warmup
        self.captured: Hashable | None = None
        self._pending: Hashable | None = None
        self._runs = 0

    def action(self, key: Hashable) -> str:
        if self.captured is not None and key == self.captured:
            return REPLAY
        if key != self._pending:
            self._pending, self._runs = key, 0
        self._runs += 1
        return CAPTURE if self._runs >= self.warmup else EAGER

    def mark_captured(self, key: Hashable) -> None:
        self.captured, self._pending, self._runs = key, None, 0

    def invalidate(self) -> None:
        self.captured, self._pending, self._runs = None, None, 0
