"""The TensorRT backend's plain decisions, tested without TensorRT (tests/test_runtime_trt.py).

Profile choice, cache length, buffer and binding plans for every GazeAttention v2 decoder input
(docs/ONNX_CONTRACT.md; past_key_values.* and present.* on one buffer: the plugin's aliased, in-place KV
cache), engine I/O checks, the host -> device copies of the layout tables (runtime/cache.py SlotState, the
same arrays the ONNX Runtime backend binds), the dense_slots regrowth, logits_positions, prefill splits and
the CUDA-graph rule. runtime/trt_backend.py (the TensorRT/CUDA glue) applies them and re-exports every name.
Exercised without TensorRT only (tests/test_runtime_trt.py); not run on TensorRT.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gaze_edge.errors import InputError
from gaze_edge.export.trt_build import contract_problem, dense_width

from .backend import BackendError
from .cache import SLOT_BYTES, SlotState
from .folder import ModelShape


@dataclass(frozen=True)
class ProfileRange:
    """What one decoder optimization profile accepts: (min, max) of batch B, new tokens T, cache slots S and
    dense_slots width N."""

    index: int
    batch: tuple[int, int]
    tokens: tuple[int, int]
    cache: tuple[int, int]
    dense: tuple[int, int] = (1, 2**31 - 1)

    def accepts(self, batch: int, tokens: int) -> bool:
        return self.batch[0] <= batch <= self.batch[1] and self.tokens[0] <= tokens <= self.tokens[1]


def profile_range(index: int, embeds: Sequence[Sequence[int]], kv: Sequence[Sequence[int]],
                  dense: Sequence[Sequence[int]] | None = None) -> ProfileRange:
    """A ProfileRange from the (min, opt, max) shapes of `inputs_embeds` [B, T, H], a past key [B, Hkv, S, D]
    and (when given) `dense_slots` [B, N]."""
    lo, _, hi = embeds
    kv_lo, _, kv_hi = kv
    width = (1, 2**31 - 1) if dense is None else (int(dense[0][1]), int(dense[2][1]))
    return ProfileRange(index, (int(lo[0]), int(hi[0])), (int(lo[1]), int(hi[1])), (int(kv_lo[2]), int(kv_hi[2])),
                        width)


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
    widest = min(p.dense[1] for p in profiles)
    if dense_width(capacity) > widest:
        raise BackendError(f"this generation's dense_slots may grow to {dense_width(capacity)} columns; the decoder "
                           f"engine's profiles accept at most {widest}: rebuild the engines for this export "
                           "(`gaze build --force`)")
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


#: Layout-table bytes per cache slot on the device, as runtime/cache.py counts them (SLOT_BYTES): slot_pos,
#: slot_region, slot_valid, slot_image (per slot) and dense_slots (at most one entry per slot). The region tables
#: add REGION_TABLE_BYTES + 8 * M per region.
SLOT_METADATA_BYTES = SLOT_BYTES
#: The per-slot tables [B, S] with their item sizes, and the region tables [B, R, M] / [B, R].
SLOT_TABLES = (("slot_pos", 8), ("slot_valid", 1), ("slot_region", 8), ("slot_image", 8))
REGION_TABLES = ("region_slots", "region_count", "region_last")
#: Every layout table (the decoder inputs SlotState.tables() returns).
LAYOUT_TABLES = (*(name for name, _ in SLOT_TABLES), "dense_slots", *REGION_TABLES)
#: Byte a device buffer is filled with on allocation, so that it equals a fresh SlotState (-1 is 0xff bytes).
FILL_BYTE = {"slot_region": 0xFF, "slot_image": 0xFF, "dense_slots": 0xFF, "region_slots": 0xFF, "region_last": 0xFF}


def check_plugin_contract(config: dict[str, Any], where: Path) -> None:
    """Refuse an export whose GazeAttention plugin version is not the one plugins_trt and this backend implement."""
    problem = contract_problem(config, where)
    if problem:
        raise BackendError(f"{problem}, or run it with the ONNX Runtime backend (--backend onnxruntime)")


def kv_buffer(layer: int, kind: str) -> str:
    return f"kv.{layer}.{kind}"


def plan_decoder_buffers(shape: ModelShape, batch: int, cache_len: int, max_tokens: int,
                         query_outputs: bool) -> dict[str, BufferSpec]:
    """Every device buffer of the decoder, allocated once per (batch, cache_len, max_tokens).

    dense_slots gets its widest binding (cache_len rounded up to SlotState.DENSE_STEP), so its regrowth
    re-binds a shape but never reallocates; logits holds up to max_tokens columns (n <= T).
    """
    dt, f32, i64, b1 = np.dtype(shape.dtype), np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.bool_)
    b, s, t, r = batch, cache_len, max_tokens, max(shape.num_regions, 1)
    specs = [
        BufferSpec("inputs_embeds", (b, t, shape.hidden_size), dt),
        BufferSpec("logits_positions", (t,), i64),
        BufferSpec("write_offset", (1,), i64),
        *(BufferSpec(name, (b, s), b1 if item == 1 else i64) for name, item in SLOT_TABLES),
        BufferSpec("gaze", (b, t), b1),
        BufferSpec("dense_slots", (b, dense_width(s)), i64),
        BufferSpec("region_slots", (b, r, shape.max_region_tokens), i64),
        BufferSpec("region_count", (b, r), i64),
        BufferSpec("region_last", (b, r), i64),
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


def plan_decoder_bindings(shape: ModelShape, batch: int, cache_len: int, tokens: int, query_outputs: bool,
                          dense: int = SlotState.DENSE_STEP, positions: int = 1) -> list[Binding]:
    """Which decoder tensor gets which buffer, with which shape, for a call over `tokens` new tokens whose
    dense_slots table is `dense` columns wide and which asks for `positions` logits columns.

    past_key_values.{i}.{key,value,desc} and present.{i}.{key,value,desc} name the SAME buffer. Every v2 input
    is bound (docs/ONNX_CONTRACT.md), in graph order.
    """
    if not 1 <= positions <= tokens:
        raise InputError(f"a call of {tokens} tokens cannot return logits of {positions} columns")
    bufs = plan_decoder_buffers(shape, batch, cache_len, tokens, query_outputs)
    if not 1 <= dense <= bufs["dense_slots"].shape[1]:
        raise BackendError(f"dense_slots of {dense} columns do not fit the {bufs['dense_slots'].shape[1]} this cache "
                           "allows")
    shapes = {"logits_positions": (positions,), "dense_slots": (batch, dense)}
    out = []
    for name in ("inputs_embeds", "logits_positions", "write_offset", "slot_pos", "slot_valid", "slot_region",
                 "slot_image", "gaze", "dense_slots", *REGION_TABLES):
        out.append(Binding(name, name, shapes.get(name, bufs[name].shape), bufs[name].dtype, True))
    for i in range(shape.num_layers):
        for kind in ("key", "value", "desc"):
            spec = bufs[kv_buffer(i, kind)]
            out.append(Binding(f"past_key_values.{i}.{kind}", spec.name, spec.shape, spec.dtype, True))
            out.append(Binding(f"present.{i}.{kind}", spec.name, spec.shape, spec.dtype, False))
    out.append(Binding("logits", "logits", (batch, positions, shape.vocab_size), bufs["logits"].dtype, False))
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
    """A 2-D host -> device copy of part of one layout table (rows = sequences); `buffer` is the decoder input
    name, which is also the host array's key in SlotState.tables()."""

    buffer: str
    dst_offset: int  # bytes into the device buffer
    dst_pitch: int
    src_offset: int  # bytes into the host array
    src_pitch: int
    width: int  # bytes per row
    height: int  # rows


def plan_slot_copies(batch: int, host_capacity: int, device_capacity: int, offset: int, tokens: int) -> list[SlotCopy]:
    """The copies that bring slot columns [offset, offset + tokens) of the per-slot tables to the device.

    Only these columns change between calls (SlotState.write writes exactly them), so a decode step
    copies B x 25 bytes of per-slot tables, not B x S x 25. The host arrays have `host_capacity`
    columns, the device ones `device_capacity` (the engine's S, possibly larger).
    """
    if offset < 0 or offset + tokens > host_capacity or host_capacity > device_capacity:
        raise InputError(f"slots [{offset}, {offset + tokens}) do not fit the host cache of {host_capacity} slots "
                         f"and the device cache of {device_capacity}")
    return [SlotCopy(name, offset * item, device_capacity * item, offset * item, host_capacity * item,
                     tokens * item, batch)
            for name, item in SLOT_TABLES]


@dataclass
class DeviceTables:
    """What of a SlotState the device's layout tables hold: the backend's mirror bookkeeping (no device memory).

    columns: slot columns [0, columns) copied; dense: the dense_slots width the device holds (and the binding
    shape; 0 = nothing yet); dense_count [B] and region_count [B, R]: the entries copied so far. A freshly
    allocated device (buffers filled per FILL_BYTE) equals a fresh SlotState, so `empty` starts from nothing.
    """

    columns: int
    dense: int
    dense_count: np.ndarray
    region_count: np.ndarray

    @classmethod
    def empty(cls, slots: SlotState) -> DeviceTables:
        return cls(0, 0, np.zeros_like(slots.dense_count), np.zeros_like(slots.region_count))


def plan_table_copies(slots: SlotState, device_capacity: int, mirror: DeviceTables) -> list[SlotCopy]:
    """The copies that make the device's layout tables equal `slots.tables()`, updating `mirror`.

    Per-slot tables: the columns written since the last sync. dense_slots: the entries appended since
    (columns [least copied count, largest count) of the rows that changed, for every row), or, when
    SlotState grew the table (a new, wider array), the whole table at its new width: the caller must then
    re-bind dense_slots with shape [B, mirror.dense] (the device buffer is laid out at that pitch). Region
    tables: the regions [lo, hi) whose count changed. A decode step of a text token thus copies B x 25 bytes
    of slot columns and at most a few dense entries.
    """
    out = plan_slot_copies(slots.pos.shape[0], slots.capacity, device_capacity, mirror.columns,
                           slots.written - mirror.columns) if slots.written > mirror.columns else []
    batch, width = slots.dense_slots.shape
    pitch = width * 8
    if width != mirror.dense:
        out.append(SlotCopy("dense_slots", 0, pitch, 0, pitch, pitch, batch))
    else:
        rows = slots.dense_count != mirror.dense_count
        if rows.any():
            lo, hi = int(mirror.dense_count[rows].min()), int(slots.dense_count[rows].max())
            out.append(SlotCopy("dense_slots", lo * 8, pitch, lo * 8, pitch, (hi - lo) * 8, batch))
    changed = np.flatnonzero((slots.region_count != mirror.region_count).any(0))
    if changed.size:
        lo, hi = int(changed[0]), int(changed[-1]) + 1
        regions, m = slots.region_count.shape[1], slots.max_region_tokens
        out.append(SlotCopy("region_slots", lo * m * 8, regions * m * 8, lo * m * 8, regions * m * 8,
                            (hi - lo) * m * 8, batch))
        out += [SlotCopy(name, lo * 8, regions * 8, lo * 8, regions * 8, (hi - lo) * 8, batch)
                for name in ("region_count", "region_last")]
    mirror.columns, mirror.dense = slots.written, width
    mirror.dense_count = slots.dense_count.copy()
    mirror.region_count = slots.region_count.copy()
    return out


def check_logits_positions(positions: np.ndarray | None, tokens: int) -> np.ndarray:
    """The int64 columns a call over `tokens` tokens returns logits of (None: the last), or InputError."""
    chosen = np.array([tokens - 1]) if positions is None else np.asarray(positions)
    if chosen.ndim != 1 or chosen.size == 0 or chosen.min() < 0 or chosen.max() >= tokens:
        raise InputError(f"logits positions {chosen.tolist()} are not columns of a call of {tokens}")
    return chosen.astype(np.int64)


@dataclass(frozen=True)
class SubCall:
    """One engine call of a prefill split: columns [begin, end), the logits columns it computes (relative to
    begin, never empty: a part nobody asked logits of computes its last column and drops it) and where they go
    in the call's result (`index`, into the call's logits_positions)."""

    begin: int
    end: int
    positions: np.ndarray
    index: np.ndarray


def plan_sub_calls(positions: np.ndarray, ends: Sequence[int]) -> list[SubCall]:
    """Split a call's logits_positions over the sub-calls ending at `ends` (split_prefill)."""
    out, begin = [], 0
    for end in ends:
        index = np.flatnonzero((positions >= begin) & (positions < end))
        local = positions[index] - begin if index.size else np.array([end - begin - 1], dtype=np.int64)
        out.append(SubCall(begin, end, local.astype(np.int64), index))
        begin = end
    return out


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
