"""Numpy reference of the Gaze Attention op (../shared/GAZE_SPEC.md).

This is the implementation every other one (PyTorch, the ONNX function body, the CUDA
kernels) is checked against. It favours being obviously right over being fast: it
loops over batch entries, KV heads and queries and computes in float64.
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

Choices the spec leaves open (recorded in docs/ONNX_CONTRACT.md):

- A region is *eligible* for a query at position p when it has at least one valid
  token and all its valid tokens sit at positions < p. Regions of an image that comes
  later in the sequence, and padding regions (no tokens), are therefore never selected.
- k = min(top_k, R); fewer are selected when fewer regions are eligible.
- The selection score is the unscaled dot product, max over the group's query heads.
- A query with no visible key (a padding query) outputs zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass
class GazeReferenceResult:
    out: np.ndarray  # [B, Hq, Tq, D] float64
    selected: np.ndarray  # [B, Hkv, Tq, R] bool: regions selected for each gaze query
    descriptors: np.ndarray  # [B, Hkv, R, D] float64
    scores: np.ndarray  # [B, Hkv, Tq, R] float64 (max over the group's heads)


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
) -> GazeReferenceResult:
    """Gaze attention for one layer, float64, straight from the spec."""
    batch, q_heads, q_len, dim = q.shape
    kv_batch, kv_heads, k_len, kv_dim = k.shape
    if (kv_batch, kv_dim) != (batch, dim) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of KV heads {kv_heads}")
    group = q_heads // kv_heads
    if num_regions is None:
        num_regions = int(k_region.max()) + 1 if k_region.size else 0
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    k_region = np.asarray(k_region, dtype=np.int64)
    k_valid = np.asarray(k_valid, dtype=bool)

    desc = region_descriptors(k64, k_region, k_valid, num_regions)
    out = np.zeros((batch, q_heads, q_len, dim), dtype=np.float64)
    selected = np.zeros((batch, kv_heads, q_len, num_regions), dtype=bool)
    scores = np.zeros((batch, kv_heads, q_len, num_regions), dtype=np.float64)

    for b in range(batch):
        # Last position of each region's valid tokens (regions without tokens: never eligible).
        region_last = np.full(num_regions, np.iinfo(np.int64).max, dtype=np.int64)
        for r in range(num_regions):
            members = (k_region[b] == r) & k_valid[b]
            if members.any():
                region_last[r] = k_pos[b][members].max()
        for t in range(q_len):
            p = q_pos[b, t]
            causal = k_valid[b] & (k_pos[b] <= p)
            eligible = region_last < p
            for h in range(kv_heads):
                heads = range(h * group, (h + 1) * group)
                score = np.max(q64[b, list(heads), t] @ desc[b, h].T, axis=0)
                scores[b, h, t] = score
                if gaze[b, t]:
                    sel = select_regions(score, eligible, top_k)
                    selected[b, h, t] = sel
                    in_sel = np.zeros(k_len, dtype=bool)
                    visual = k_region[b] >= 0
                    in_sel[visual] = sel[k_region[b][visual]]
                    keys = causal & ((k_region[b] < 0) | in_sel)
                else:
                    keys = causal
                if not keys.any():
                    continue
                for g in heads:
                    logits = (k64[b, h, keys] @ q64[b, g, t]) * scale
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    out[b, g, t] = w @ v64[b, h, keys]
    return GazeReferenceResult(out=out, selected=selected, descriptors=desc, scores=scores)
