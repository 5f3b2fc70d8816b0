"""Random gaze-attention problems in the layout of a real prompt, shared by the op tests.

A sequence is: left padding, a text prefix, then per image its visual tokens
(row-major) and context tokens, some text, and finally the generated (gaze) tokens.
Queries are the last `query_len` tokens, so a case is a prefill chunk or a decode step.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from gaze_edge.reference import region_index_map, regions_per_image


@dataclass
class GazeCase:
    seed: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q_pos: np.ndarray
    k_pos: np.ndarray
    k_region: np.ndarray
    k_valid: np.ndarray
    gaze: np.ndarray
    num_regions: int
    top_k: int

    def reference_kwargs(self) -> dict:
        return dict(
            q_pos=self.q_pos, k_pos=self.k_pos, k_region=self.k_region, k_valid=self.k_valid,
            gaze=self.gaze, top_k=self.top_k, num_regions=self.num_regions,
        )


def fresh_seed() -> int:
    return secrets.randbits(31)


def make_case(
    seed: int | None = None,
    batch: int = 2,
    kv_heads: int = 2,
    group: int = 2,
    dim: int = 16,
    grid: tuple[int, int] = (5, 5),
    region: tuple[int, int] = (2, 2),
    images: tuple[int, ...] = (1, 2),
    context: int = 2,
    generated: int = 4,
    query_len: int | None = None,
    top_k: int = 3,
) -> GazeCase:
    """`images[b]` images in sequence b (fewer images = padding regions, more left padding)."""
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    gh, gw = grid
    rmap = region_index_map(gh, gw, *region)
    r_img = regions_per_image(gh, gw, *region)
    layouts = []
    for b in range(batch):
        region_ids = [-1] * int(rng.integers(1, 4))  # text prefix
        gaze = [False] * len(region_ids)
        for i in range(images[b % len(images)]):
            region_ids += list(i * r_img + rmap) + [-1] * context + [-1] * int(rng.integers(1, 3))
        gaze += [False] * (len(region_ids) - len(gaze))
        region_ids += [-1] * generated
        gaze += [True] * generated
        layouts.append((region_ids, gaze))
    length = max(len(r) for r, _ in layouts)
    k_region = np.full((batch, length), -1, dtype=np.int64)
    k_valid = np.zeros((batch, length), dtype=bool)
    gaze_all = np.zeros((batch, length), dtype=bool)
    for b, (region_ids, gaze) in enumerate(layouts):
        pad = length - len(region_ids)
        k_region[b, pad:] = region_ids
        k_valid[b, pad:] = True
        gaze_all[b, pad:] = gaze
    k_pos = np.clip(np.cumsum(k_valid, axis=1) - 1, 0, None).astype(np.int64)
    query_len = length if query_len is None else query_len
    q_heads = kv_heads * group
    q = rng.standard_normal((batch, q_heads, query_len, dim))
    k = rng.standard_normal((batch, kv_heads, length, dim))
    v = rng.standard_normal((batch, kv_heads, length, dim))
    # Make visual keys carry a per-region signal so descriptors differ clearly.
    bias = rng.standard_normal((batch, kv_heads, max(images) * r_img + 1, dim)) * 1.5
    visual = k_region >= 0
    for b in range(batch):
        k[b][:, visual[b]] += bias[b][:, k_region[b][visual[b]]]
    return GazeCase(
        seed=seed, q=q, k=k, v=v,
        q_pos=k_pos[:, length - query_len :], k_pos=k_pos, k_region=k_region, k_valid=k_valid,
        gaze=gaze_all[:, length - query_len :] & k_valid[:, length - query_len :],
        num_regions=max(images) * r_img, top_k=top_k,
    )

