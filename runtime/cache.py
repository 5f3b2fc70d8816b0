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

from .folder import ModelShape

SLOT_BYTES = 8 + 8 + 1  # slot_pos int64, slot_region int64, slot_valid bool


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

    @classmethod
    def plan(cls, shape: ModelShape, batch: int, capacity: int) -> CacheSpec:
        """Check the request against the export; raise InputError before anything is allocated."""
        if batch < 1:
            raise InputError("a batch needs at least one prompt")
        if capacity > shape.max_seq_len:
            raise InputError(f"the prompt and new tokens need {capacity} cache slots; this export holds "
                             f"{shape.max_seq_len} (gaze export --max-seq-len): shorten the prompt, use fewer "
                             "images or --max-new-tokens, or re-export with a larger --max-seq-len")
        return cls(batch, capacity, shape.num_layers, shape.kv_heads, shape.head_dim, shape.num_regions,
                   shape.itemsize)

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
        return self.batch * self.capacity * SLOT_BYTES


class SlotState:
    """slot_pos, slot_region, slot_valid [B, S]: allocated once, rewritten in place, bound once by backends."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.pos = np.zeros((batch, capacity), dtype=np.int64)
        self.region = np.full((batch, capacity), -1, dtype=np.int64)
        self.valid = np.zeros((batch, capacity), dtype=bool)
        self.written = 0  # slots [0, written) hold tokens; the next call writes from here

    @property
    def capacity(self) -> int:
        return int(self.pos.shape[1])

    def write(self, pos: np.ndarray, region: np.ndarray, valid: np.ndarray) -> int:
        """Lay T new tokens [B, T] into slots [written, written + T); returns write_offset."""
        offset, length = self.written, pos.shape[1]
        if offset + length > self.capacity:
            raise InputError(f"{offset + length} tokens exceed the cache capacity {self.capacity}")
        self.pos[:, offset : offset + length] = pos
        self.region[:, offset : offset + length] = region
        self.valid[:, offset : offset + length] = valid
        self.written = offset + length
        return offset

    def region_counts(self, num_regions: int) -> np.ndarray:
        """Valid slots per region [B, R] (a descriptor is its sum divided by this)."""
        written = slice(0, self.written)
        counts = np.zeros((self.pos.shape[0], num_regions), dtype=np.int64)
        for b in range(counts.shape[0]):
            regions = self.region[b, written][self.valid[b, written] & (self.region[b, written] >= 0)]
            counts[b] = np.bincount(regions, minlength=num_regions)[:num_regions]
        return counts


@dataclass
class PromptLayout:
    """A batch of prompts in the order the cache stores them: ids, positions, regions, validity [B, T]."""

    ids: np.ndarray
    pos: np.ndarray
    region: np.ndarray
    valid: np.ndarray
    order: np.ndarray  # [B, T]: column t of this layout is column order[b, t] of the prompt
    image_block: np.ndarray  # [B, T] image number of a visual token, -1 otherwise

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
                   region_major: bool = True) -> PromptLayout:
    """Positions and regions of left-padded prompts [B, T] (TokenLayout's rule), optionally region-major."""
    valid = mask.astype(bool)
    pos = np.clip(np.cumsum(valid, 1) - 1, 0, None)
    is_image = (ids == image_token_id) & valid
    index = np.clip(np.cumsum(is_image, 1) - 1, 0, None)
    tpi = shape.tokens_per_image
    image_no = np.where(is_image, index // tpi, -1)
    if is_image.any() and int(image_no.max()) >= shape.max_images:
        raise InputError(f"a prompt holds {int(image_no.max()) + 1} images or frames; this export takes at most "
                         f"{shape.max_images} (gaze export --max-images)")
    region = np.where(is_image, image_no * shape.regions_per_image + shape.region_of_token()[index % tpi], -1)
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

    return PromptLayout(take(ids), take(pos), take(region), take(valid), order, take(image_no))
