"""The gaze selection rule (docs/ONNX_CONTRACT.md, Semantics 4-5) re-run in numpy from the cache.

The decoder graph does not output which regions it selected (the GazeAttention node's
outputs are fixed by the plugin contract). An export made with `--gaze-map-outputs`
adds each layer's rotated queries as extra graph outputs; with the descriptor sums the
runtime already holds and the slot metadata it owns, the selection follows exactly:
score = max over the group's heads of q . (sum / count), top-k of eligible regions,
ties to the lower index. Scores within rounding of each other may break differently
than inside the graph, as GAZE_SPEC.md allows.
"""

from __future__ import annotations

import numpy as np

from gaze_edge.reference import select_regions

from .cache import SlotState


def select_from_cache(query: np.ndarray, desc_sums: np.ndarray, counts: np.ndarray, slots: SlotState,
                      query_pos: np.ndarray, top_k: int) -> np.ndarray:
    """Regions selected [B, Hkv, R] (bool) by gaze queries [B, Hq, D] at positions query_pos [B]."""
    batch, heads, dim = query.shape
    kv_heads, num_regions = desc_sums.shape[1], desc_sums.shape[2]
    group = heads // kv_heads
    means = desc_sums / np.maximum(counts, 1)[:, None, :, None].astype(np.float32)
    q = query.astype(np.float32).reshape(batch, kv_heads, group, dim)
    scores = np.einsum("bhgd,bhrd->bhgr", q, means.astype(np.float32)).max(2)  # [B, Hkv, R]
    last_pos = np.full((batch, num_regions), -1, dtype=np.int64)
    written = slice(0, slots.written)
    for b in range(batch):
        member = slots.valid[b, written] & (slots.region[b, written] >= 0)
        np.maximum.at(last_pos[b], slots.region[b, written][member], slots.pos[b, written][member])
    eligible = (counts > 0) & (last_pos < query_pos[:, None])
    out = np.zeros((batch, kv_heads, num_regions), dtype=bool)
    for b in range(batch):
        for h in range(kv_heads):
            out[b, h] = select_regions(scores[b, h], eligible[b], top_k)
    return out
