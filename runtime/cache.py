"""The static KV cache's size, and the slot metadata the runtime owns (docs/ONNX_CONTRACT.md, "Runtime duties").

`CacheSpec` says what one generation needs and is checked against the export before any
buffer exists. `SlotState` holds slot_pos / slot_region / slot_valid [B, S], written in
place before each decoder call; `lay_out_prompt` computes the layout of a prompt the way
model.modeling.TokenLayout does, and can reorder each image's visual tokens region-major
(each region contiguous in the cache) while every token keeps its row-major rotary position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gaze_edge.errors import InputError
from gaze_edge.memory import gib, total_memory_bytes

from .folder import ModelShape

SLOT_BYTES = 8 + 8 + 1 + 8 + 8  # slot_pos, slot_region, slot_valid, slot_image, dense_slots (at most one per slot)
REGION_TABLE_BYTES = 8 + 8  # region_count, region_last per region (plus 8 per region_slots entry)


@dataclass(frozen=True)
class CacheSpec:
    """Shapes of the static cache of one generation: B sequences, S slots, R regions."""

    batch: int
    capacity: int
    num_layers: int
    kv_heads: int
    head_dim: int
    num_regions: int
    itemsize: int
    max_region_tokens: int = 1

    @classmethod
    def plan(cls, shape: ModelShape, batch: int, capacity: int) -> CacheSpec:
        """Check the request against the export and this machine's memory; InputError before anything is allocated."""
        if batch < 1:
            raise InputError("a batch needs at least one prompt")
        if capacity > shape.max_seq_len:
            raise InputError(f"the prompt and new tokens need {capacity} cache slots; this export holds "
                             f"{shape.max_seq_len} (gaze export --max-seq-len): shorten the prompt, use fewer "
                             "images or --max-new-tokens, or re-export with a larger --max-seq-len")
        spec = cls(batch, capacity, shape.num_layers, shape.kv_heads, shape.head_dim, shape.num_regions,
                   shape.itemsize, shape.max_region_tokens)  # sizes only: nothing is allocated yet
        need, have = spec.total_bytes, total_memory_bytes()
        if have is not None and need > have:
            raise InputError(f"{batch} sequence(s) of {capacity} cache slots need {gib(need)} of KV cache, "
                             f"descriptors and layout tables; this machine has {gib(have)}: use a smaller batch, "
                             "fewer images or fewer new tokens")
        return spec

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.capacity, self.head_dim)

    @property
    def desc_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.num_regions, self.head_dim)

    @property
    def kv_bytes(self) -> int:
        """2 (key, value) x layers x B x Hkv x S x D x itemsize."""
        return 2 * self.num_layers * self.batch * self.kv_heads * self.capacity * self.head_dim * self.itemsize

    @property
    def desc_bytes(self) -> int:
        """layers x B x Hkv x R x D x 4 (descriptor sums are float32)."""
        return self.num_layers * self.batch * self.kv_heads * self.num_regions * self.head_dim * 4

    @property
    def slot_bytes(self) -> int:
        """The layout tables (SlotState): per-slot metadata, the dense list at its largest, the region tables."""
        regions = self.batch * self.num_regions * (REGION_TABLE_BYTES + 8 * self.max_region_tokens)
        return self.batch * self.capacity * SLOT_BYTES + regions

    @property
    def total_bytes(self) -> int:
        """Everything one generation allocates for its cache: K/V, descriptor sums and the layout tables."""
        return self.kv_bytes + self.desc_bytes + self.slot_bytes


class SlotState:
    """The layout tables every GazeAttention node of a call reads, owned and kept current by the runtime.

    Per slot [B, S]: rotary position, region (-1 dense), validity, image/frame index of a visual or
    context token (-1 otherwise). Derived tables, maintained incrementally by `write` (only the
    new tokens are looked at, never all S slots): the valid dense slots in cache order [B, N]
    (-1 padding; N grows in steps of DENSE_STEP so a decode step rebinds nothing), each region's
    slots [B, R, M] (-1 padding), token count and last position [B, R]. Allocated once; backends
    bind the arrays and the runtime rewrites them in place before each call.
    """

    DENSE_STEP = 32

    @classmethod
    def dense_width(cls, entries: int) -> int:
        """The dense_slots columns that hold `entries` entries: rounded up to DENSE_STEP (at least one step)."""
        return max(-(-entries // cls.DENSE_STEP), 1) * cls.DENSE_STEP

    def __init__(self, batch: int, capacity: int, num_regions: int, max_region_tokens: int) -> None:
        self.pos = np.zeros((batch, capacity), dtype=np.int64)
        self.region = np.full((batch, capacity), -1, dtype=np.int64)
        self.valid = np.zeros((batch, capacity), dtype=bool)
        self.image = np.full((batch, capacity), -1, dtype=np.int64)
        self.region_slots = np.full((batch, max(num_regions, 1), max_region_tokens), -1, dtype=np.int64)
        self.region_count = np.zeros((batch, max(num_regions, 1)), dtype=np.int64)
        self.region_last = np.full((batch, max(num_regions, 1)), -1, dtype=np.int64)
        self.dense_slots = np.full((batch, self.DENSE_STEP), -1, dtype=np.int64)
        self.dense_count = np.zeros(batch, dtype=np.int64)
        self.written = 0  # slots [0, written) hold tokens; the next call writes from here

    @property
    def capacity(self) -> int:
        return int(self.pos.shape[1])

    @property
    def max_region_tokens(self) -> int:
        return int(self.region_slots.shape[2])

    def write(self, pos: np.ndarray, region: np.ndarray, valid: np.ndarray, image: np.ndarray | None = None) -> int:
        """Lay T new tokens [B, T] into slots [written, written + T) and update the tables; returns write_offset."""
        offset, length = self.written, pos.shape[1]
        if offset + length > self.capacity:
            raise InputError(f"{offset + length} tokens exceed the cache capacity {self.capacity}")
        new = slice(offset, offset + length)
        self.pos[:, new] = pos
        self.region[:, new] = region
        self.valid[:, new] = valid
        self.image[:, new] = -1 if image is None else image
        self.written = offset + length
        slots = np.arange(offset, offset + length)
        visual = valid & (region >= 0)
        for b in range(pos.shape[0]):
            dense = slots[valid[b] & (region[b] < 0)]
            self._append_dense(b, dense)
            for slot, r, p in zip(slots[visual[b]], region[b][visual[b]], pos[b][visual[b]], strict=True):
                j = self.region_count[b, r]
                if j >= self.max_region_tokens:
                    raise InputError(f"region {r} gets more than max_region_tokens={self.max_region_tokens} tokens: "
                                     "the prompt layout does not match the export's region grid")
                self.region_slots[b, r, j] = slot
                self.region_count[b, r] = j + 1
                self.region_last[b, r] = max(self.region_last[b, r], p)
        return offset

    def _append_dense(self, b: int, dense: np.ndarray) -> None:
        n, m = int(self.dense_count[b]), dense.size
        if n + m > self.dense_slots.shape[1]:  # grow (rare: every DENSE_STEP dense tokens); backends rebind
            width = self.dense_width(n + m)
            grown = np.full((self.dense_slots.shape[0], width), -1, dtype=np.int64)
            grown[:, : self.dense_slots.shape[1]] = self.dense_slots
            self.dense_slots = grown
        self.dense_slots[b, n : n + m] = dense
        self.dense_count[b] = n + m

    def tables(self) -> dict[str, np.ndarray]:
        """The node's layout inputs by decoder input name (docs/ONNX_CONTRACT.md)."""
        return {"slot_pos": self.pos, "slot_valid": self.valid, "slot_region": self.region, "slot_image": self.image,
                "dense_slots": self.dense_slots, "region_slots": self.region_slots,
                "region_count": self.region_count, "region_last": self.region_last}


@dataclass
class PromptLayout:
    """A batch of prompts in the order the cache stores them: ids, positions, regions, validity [B, T]."""

    ids: np.ndarray
    pos: np.ndarray
    region: np.ndarray
    valid: np.ndarray
    order: np.ndarray  # [B, T]: column t of this layout is column order[b, t] of the prompt
    image_block: np.ndarray  # [B, T] image number of a visual token, -1 otherwise
    image: np.ndarray  # [B, T] image number of a visual or context token, -1 otherwise (slot_image)

    def split_points(self, chunk: int) -> list[int]:
        """Prefill chunk ends, each at most `chunk` tokens on, moved past any image that would be cut.

        With region-major storage a visual token can precede, in the cache, a token of the same
        image with a smaller position; a chunk boundary inside an image would then hide a key
        its query must see, so images are never split (a chunk may grow to hold a whole image).
        """
        length = self.ids.shape[1]
        block = self.image_block
        inside = np.zeros(length + 1, dtype=bool)  # inside[t]: a cut before column t splits an image
        inside[1:length] = ((block[:, 1:] == block[:, :-1]) & (block[:, 1:] >= 0)).any(0)
        ends, start = [], 0
        while start < length:
            end = min(start + max(chunk, 1), length)
            while inside[end]:
                end += 1
            ends.append(end)
            start = end
        return ends


def lay_out_prompt(ids: np.ndarray, mask: np.ndarray, shape: ModelShape, image_token_id: int,
                   region_major: bool = True, frames: np.ndarray | None = None) -> PromptLayout:
    """Positions, regions, image indices and validity of left-padded prompts [B, T], optionally region-major.

    The rule of model.modeling.TokenLayout: a valid token's position is the count of valid tokens
    before it; visual token j of image (or frame) n has region n * regions_per_image + map[j], except
    that with `region_frames` rt > 1 the frames of a video (`frames[b]`) share regions rt at a time
    (frame n: region (n // rt) * regions_per_image + map[j]). A visual token and the context tokens
    that follow its image carry the image index n (`slot_image`), everything else -1.
    """
    valid = mask.astype(bool)
    pos = np.clip(np.cumsum(valid, 1) - 1, 0, None)
    is_image = (ids == image_token_id) & valid
    seen = np.cumsum(is_image, 1)  # image tokens up to and including this one
    index = np.clip(seen - 1, 0, None)
    tpi = shape.tokens_per_image
    image_no = np.where(is_image, index // tpi, -1)
    if is_image.any() and int(image_no.max()) >= shape.max_images:
        raise InputError(f"a prompt holds {int(image_no.max()) + 1} images or frames; this export takes at most "
                         f"{shape.max_images} (gaze export --max-images)")
    video = np.zeros(ids.shape[0], dtype=bool) if frames is None else np.asarray(frames, dtype=bool)
    group = np.where(video[:, None], image_no // max(shape.region_frames, 1), image_no)
    region = np.where(is_image, group * shape.regions_per_image + shape.region_of_token()[index % tpi], -1)
    is_context = np.isin(ids, np.asarray(shape.context_token_ids, dtype=ids.dtype)) & valid
    image = np.where(is_image, image_no, np.where(is_context, seen // tpi - 1, -1))
    columns = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    if region_major:
        # Each image keeps its columns; within them its tokens are sorted by region (stable: row-major inside).
        first = np.full_like(columns, -1)
        for b in range(ids.shape[0]):
            for n in np.unique(image_no[b][image_no[b] >= 0]):
                block = image_no[b] == n
                first[b, block] = np.flatnonzero(block)[0]
        primary = np.where(is_image, first, columns)
        order = np.lexsort((columns, region, primary), axis=-1)
    else:
        order = np.array(columns)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order, 1)

    return PromptLayout(take(ids), take(pos), take(region), take(valid), order, take(image_no), take(image))
