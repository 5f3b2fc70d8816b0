"""Random gaze-attention problems in the layout of a real prompt, shared by the op tests.

A sequence is: left padding, a text prefix, then per image its visual tokens
(row-major) and context tokens followed by some text, and finally the generated (gaze)
tokens. With ``video=True`` the images are the frames of one video: frames follow each
other with only their context tokens between them, text comes after the last frame, and
regions span ``region_frames`` consecutive frames. Queries are the last `query_len`
tokens, so a case is a prefill chunk or a decode step.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from gaze_edge.reference import region_index_map_frames, regions_for_frames, regions_per_image


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
    k_image: np.ndarray  # [B, Tk] image/frame of a visual or context token, -1 otherwise
    q_context_image: np.ndarray  # [B, Tq] image/frame of a context-token query, -1 otherwise
    routing: str = "kv_head"
    context_attention: str = "causal"

    def reference_kwargs(self) -> dict:
        return dict(
            q_pos=self.q_pos, k_pos=self.k_pos, k_region=self.k_region, k_valid=self.k_valid,
            gaze=self.gaze, top_k=self.top_k, num_regions=self.num_regions,
            k_image=self.k_image, q_context_image=self.q_context_image,
            routing=self.routing, context_attention=self.context_attention,
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
    *,
    video: bool = False,
    region_frames: int = 1,
    routing: str = "kv_head",
    context_attention: str = "causal",
) -> GazeCase:
    """`images[b]` images (or frames) in sequence b (fewer = padding regions, more left padding)."""
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    gh, gw = grid
    tokens = gh * gw
    r_img = regions_per_image(gh, gw, *region)
    layouts = []
    for b in range(batch):
        count = images[b % len(images)]
        # Separate images never share a region, whatever region_frames says.
        rmap = region_index_map_frames(gh, gw, *region, count, region_frames if video else 1)
        region_ids = [-1] * int(rng.integers(1, 4))  # text prefix
        image_ids = [-1] * len(region_ids)
        for i in range(count):
            gap = 0 if video and i < count - 1 else int(rng.integers(1, 3))  # text after the image
            region_ids += list(rmap[i * tokens : (i + 1) * tokens]) + [-1] * context + [-1] * gap
            image_ids += [i] * (tokens + context) + [-1] * gap
        region_ids += [-1] * generated
        image_ids += [-1] * generated
        gaze = [False] * (len(region_ids) - generated) + [True] * generated
        layouts.append((region_ids, image_ids, gaze))
    length = max(len(r) for r, _, _ in layouts)
    k_region = np.full((batch, length), -1, dtype=np.int64)
    k_image = np.full((batch, length), -1, dtype=np.int64)
    k_valid = np.zeros((batch, length), dtype=bool)
    gaze_all = np.zeros((batch, length), dtype=bool)
    for b, (region_ids, image_ids, gaze) in enumerate(layouts):
        pad = length - len(region_ids)
        k_region[b, pad:] = region_ids
        k_image[b, pad:] = image_ids
        k_valid[b, pad:] = True
        gaze_all[b, pad:] = gaze
    k_pos = np.clip(np.cumsum(k_valid, axis=1) - 1, 0, None).astype(np.int64)
    context_image = np.where((k_image >= 0) & (k_region < 0), k_image, -1)
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
    if video:
        num_regions = max(regions_for_frames(gh, gw, *region, n, region_frames) for n in images)
    else:
        num_regions = max(images) * r_img
    queries = slice(length - query_len, length)
    return GazeCase(
        seed=seed, q=q, k=k, v=v,
        q_pos=k_pos[:, queries], k_pos=k_pos, k_region=k_region, k_valid=k_valid,
        gaze=gaze_all[:, queries] & k_valid[:, queries],
        num_regions=num_regions, top_k=top_k,
        k_image=k_image, q_context_image=context_image[:, queries],
        routing=routing, context_attention=context_attention,
    )
