"""Numpy reference of the Gaze Attention op, spec v2 (docs/GAZE_SEMANTICS.md).

This is the implementation every other one (PyTorch, the ONNX function body, the CUDA
kernels) is checked against. It favours being obviously right over being fast: it
loops over batch entries, queries and query heads and computes in float64.
It imports numpy only, so it runs where torch does not.

Inputs describe one attention layer over the whole key set visible to a call:

- ``q``: [B, Hq, Tq, D] queries after rotary embedding.
- ``k``, ``v``: [B, Hkv, Tk, D] keys (after rotary) and values, every slot of the cache.
- ``q_pos``: [B, Tq] rotary position of each query.
- ``k_pos``: [B, Tk] rotary position of each key slot.
- ``k_region``: [B, Tk] region id (0..R-1) of a visual token, -1 for a dense token.
- ``k_valid``: [B, Tk] False for padding and unwritten slots.
- ``gaze``: [B, Tq] True where the query is a gaze query (a generated token).
- ``top_k``: number of regions a gaze query keeps.
- ``k_image``: [B, Tk] image/frame index (0-based, per sequence) of a visual or context
  token, -1 for text, special tokens and padding. Needed only for ``own_image``.
- ``q_context_image``: [B, Tq] the image/frame index of a query that is a context
  token, -1 for every other query.
- ``routing``: ``kv_head`` (one selection per KV head, by the max over its query heads)
  or ``query_head`` (one selection per query head).
- ``context_attention``: ``causal`` (context tokens attend like text) or ``own_image``
  (a context token attends only to its own image/frame and that image's context tokens).

Choices the spec leaves open (recorded in docs/GAZE_SEMANTICS.md):

- k = min(top_k, number of eligible regions).
- A query with no visible key (a padding query) outputs zeros.
- A context token is never a gaze query: the reference refuses inputs that say both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUTINGS = ("kv_head", "query_head")
CONTEXT_ATTENTIONS = ("causal", "own_image")


def region_index_map(grid_h: int, grid_w: int, region_h: int, region_w: int) -> np.ndarray:
    """Region id (within one image) of each visual token, tokens in row-major order.

    Regions are rh x rw rectangles numbered row-major; edge regions are smaller when
    the grid is not a multiple of the region size (ragged edge).
    """
    if min(grid_h, grid_w, region_h, region_w) <= 0:
        raise ValueError("grid and region sizes must be positive")
    regions_w = -(-grid_w // region_w)
    rows = np.arange(grid_h)[:, None] // region_h
    cols = np.arange(grid_w)[None, :] // region_w
    return (rows * regions_w + cols).reshape(-1).astype(np.int64)


def regions_per_image(grid_h: int, grid_w: int, region_h: int, region_w: int) -> int:
    return (-(-grid_h // region_h)) * (-(-grid_w // region_w))


def region_index_map_frames(
    grid_h: int, grid_w: int, region_h: int, region_w: int, frames: int, region_frames: int
) -> np.ndarray:
    """Region id of every visual token of `frames` consecutive video frames, frame after frame.

    Frames are grouped `region_frames` (rt) at a time; a region is the same rh x rw
    rectangle in every frame of its group, so group n holds regions
    n * regions_per_image .. (n + 1) * regions_per_image - 1. The last group may hold
    fewer than rt frames. With rt = 1 this is one image after another.
    """
    if frames < 0 or region_frames <= 0:
        raise ValueError(f"frames must be >= 0 and region_frames >= 1, got {frames} and {region_frames}")
    rmap = region_index_map(grid_h, grid_w, region_h, region_w)
    group = np.arange(frames) // region_frames
    per_image = regions_per_image(grid_h, grid_w, region_h, region_w)
    return (group[:, None] * per_image + rmap[None, :]).reshape(-1)


def regions_for_frames(
    grid_h: int, grid_w: int, region_h: int, region_w: int, frames: int, region_frames: int
) -> int:
    """Number of regions of `frames` video frames grouped `region_frames` at a time."""
    return -(-frames // region_frames) * regions_per_image(grid_h, grid_w, region_h, region_w)


@dataclass
class GazeReferenceResult:
    out: np.ndarray  # [B, Hq, Tq, D] float64
    selected: np.ndarray  # [B, Hsel, Tq, R] bool: regions selected for each gaze query
    descriptors: np.ndarray  # [B, Hkv, R, D] float64
    scores: np.ndarray  # [B, Hsel, Tq, R] float64 (kv_head: max over the group's heads)


def region_descriptors(
    k: np.ndarray, k_region: np.ndarray, k_valid: np.ndarray, num_regions: int
) -> np.ndarray:
    """d[b, h, r] = mean of the valid keys of region r (zeros for an empty region)."""
    batch, kv_heads, _, dim = k.shape
    desc = np.zeros((batch, kv_heads, num_regions, dim), dtype=np.float64)
    for b in range(batch):
        for r in range(num_regions):
            members = (k_region[b] == r) & k_valid[b]
            if members.any():
                desc[b, :, r] = k[b][:, members].astype(np.float64).mean(axis=1)
    return desc


def select_regions(scores: np.ndarray, eligible: np.ndarray, top_k: int) -> np.ndarray:
    """Boolean mask of the k best eligible regions; ties go to the lower index."""
    num_regions = scores.shape[-1]
    k = min(top_k, num_regions)
    selected = np.zeros(num_regions, dtype=bool)
    candidates = np.flatnonzero(eligible)
    if k <= 0 or candidates.size == 0:
        return selected
    # Stable sort on the negated score keeps ascending region index among equals.
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    selected[order[:k]] = True
    return selected


def gaze_attention_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    k_region: np.ndarray,
    k_valid: np.ndarray,
    gaze: np.ndarray,
    top_k: int,
    num_regions: int | None = None,
    scale: float | None = None,
    k_image: np.ndarray | None = None,
    q_context_image: np.ndarray | None = None,
    routing: str = "kv_head",
    context_attention: str = "causal",
) -> GazeReferenceResult:
    """Gaze attention for one layer, float64, straight from the spec."""
    batch, q_heads, q_len, dim = q.shape
    kv_batch, kv_heads, k_len, kv_dim = k.shape
    if (kv_batch, kv_dim) != (batch, dim) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of KV heads {kv_heads}")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if context_attention not in CONTEXT_ATTENTIONS:
        raise ValueError(f"context_attention must be one of {CONTEXT_ATTENTIONS}, got {context_attention!r}")
    group = q_heads // kv_heads
    if num_regions is None:
        num_regions = int(k_region.max()) + 1 if k_region.size else 0
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    k_region = np.asarray(k_region, dtype=np.int64)
    k_valid = np.asarray(k_valid, dtype=bool)
    gaze = np.asarray(gaze, dtype=bool)
    q_context_image = (
        np.full((batch, q_len), -1, dtype=np.int64) if q_context_image is None else np.asarray(q_context_image)
    )
    if (gaze & (q_context_image >= 0)).any():
        raise ValueError("a query cannot be both a gaze query and a context token")
    own_image = context_attention == "own_image" and bool((q_context_image >= 0).any())
    if own_image and k_image is None:
        raise ValueError("context_attention='own_image' needs k_image for the context queries given")

    desc = region_descriptors(k64, k_region, k_valid, num_regions)
    sel_heads = kv_heads if routing == "kv_head" else q_heads
    out = np.zeros((batch, q_heads, q_len, dim), dtype=np.float64)
    selected = np.zeros((batch, sel_heads, q_len, num_regions), dtype=bool)
    scores = np.zeros((batch, sel_heads, q_len, num_regions), dtype=np.float64)

    for b in range(batch):
        # Last position of each region's valid tokens (regions without tokens: never eligible).
        region_last = np.full(num_regions, np.iinfo(np.int64).max, dtype=np.int64)
        for r in range(num_regions):
            members = (k_region[b] == r) & k_valid[b]
            if members.any():
                region_last[r] = k_pos[b][members].max()
        visual = k_region[b] >= 0
        for t in range(q_len):
            p = q_pos[b, t]
            visible = k_valid[b] & (k_pos[b] <= p)
            if own_image and q_context_image[b, t] >= 0:
                assert k_image is not None
                visible &= np.asarray(k_image[b]) == q_context_image[b, t]
            eligible = region_last < p
            per_head = np.stack([desc[b, g // group] @ q64[b, g, t] for g in range(q_heads)])  # [Hq, R]
            if routing == "kv_head":
                scores[b, :, t] = per_head.reshape(kv_heads, group, num_regions).max(axis=1)
            else:
                scores[b, :, t] = per_head
            if gaze[b, t]:
                for s in range(sel_heads):
                    selected[b, s, t] = select_regions(scores[b, s, t], eligible, top_k)
            for g in range(q_heads):
                h = g // group
                keys = visible
                if gaze[b, t]:
                    sel = selected[b, h if routing == "kv_head" else g, t]
                    in_sel = np.zeros(k_len, dtype=bool)
                    in_sel[visual] = sel[k_region[b][visual]]
                    keys = visible & (~visual | in_sel)
                if not keys.any():
                    continue
                logits = (k64[b, h, keys] @ q64[b, g, t]) * scale
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, g, t] = w @ v64[b, h, keys]
    return GazeReferenceResult(out=out, selected=selected, descriptors=desc, scores=scores)
