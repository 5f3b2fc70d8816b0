"""The gaze selection rule (docs/ONNX_CONTRACT.md, Semantics 4-5) re-run in numpy from the cache.

The decoder graph does not output which regions it selected (the GazeAttention node's
outputs are fixed by the plugin contract). An export made with `--gaze-map-outputs`
adds each layer's rotated queries as extra graph outputs; with the descriptor sums the
runtime already holds and the slot metadata it owns, the selection follows exactly:
score = q . (sum / count) (max over the group's heads for kv_head routing), top-k of eligible regions,
ties to the lower index. Scores within rounding of each other may break differently
than inside the graph, as docs/GAZE_SEMANTICS.md allows.
"""

from __future__ import annotations

import numpy as np

from gaze_edge.reference import select_regions

from .cache import SlotState


def select_from_cache(query: np.ndarray, desc_sums: np.ndarray, slots: SlotState, query_pos: np.ndarray,
                      top_k: int, routing: str = "kv_head") -> np.ndarray:
    """Regions selected [B, H, R] (bool) by gaze queries [B, Hq, D] at positions query_pos [B].

    H = Hkv for `kv_head` routing (score: max over the group), Hq for `query_head` (each head its own).
    Eligibility and means come from the runtime's region tables (count, last position).
    """
    batch, heads, dim = query.shape
    kv_heads, num_regions = desc_sums.shape[1], desc_sums.shape[2]
    group = heads // kv_heads
    counts = slots.region_count[:, :num_regions]
    means = desc_sums / np.maximum(counts, 1)[:, None, :, None].astype(np.float32)
    q = query.astype(np.float32).reshape(batch, kv_heads, group, dim)
    scores = np.einsum("bhgd,bhrd->bhgr", q, means.astype(np.float32))  # [B, Hkv, G, R]
    scores = scores.max(2) if routing == "kv_head" else scores.reshape(batch, heads, num_regions)
    eligible = (counts > 0) & (slots.region_last[:, :num_regions] < query_pos[:, None])
    out = np.zeros(scores.shape, dtype=bool)
    for b in range(batch):
        for h in range(scores.shape[1]):
            out[b, h] = select_regions(scores[b, h], eligible[b], top_k)
    return out
