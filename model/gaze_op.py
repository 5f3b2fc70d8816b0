"""Gaze Attention in PyTorch: descriptors, region selection and sparse attention.

One function, `gaze_attention`, implements ../shared/GAZE_SPEC.md for a layer, over the
whole key set visible to the call (the KV cache plus the new tokens). It is written
with masks so the same code serves training (teacher forcing, all tokens at once) and
cached generation (a few new queries against the cache); it is the PyTorch member of
the five implementations and is tested against gaze_edge.reference.

Descriptors are recomputed from the cached keys on every call: the spec's mean of the
region's keys, summed in the same order whatever the chunking, which keeps prefill
and token-by-token decoding bit-for-bit comparable. Deployment backends keep them
beside the cache instead (docs/ONNX_CONTRACT.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KeyLayout:
    """Where each key slot sits: rotary position, region (-1 dense) and validity. [B, Tk]."""

    pos: torch.Tensor
    region: torch.Tensor
    valid: torch.Tensor
    num_regions: int


@dataclass
class GazeAttentionOutput:
    out: torch.Tensor  # [B, Hq, Tq, D]
    selected: torch.Tensor | None  # [B, Hkv, Tq, R] bool, gaze queries only
    aux_loss: torch.Tensor | None  # KL(dense region mass || selection scores), training only


def region_statistics(
    k: torch.Tensor, keys: KeyLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Descriptors [B, Hkv, R, D] (fp32), member one-hot [B, R, Tk], token count and last position [B, R]."""
    regions = torch.arange(keys.num_regions, device=k.device)
    onehot = (keys.region[:, None, :] == regions[None, :, None]) & keys.valid[:, None, :]
    count = onehot.sum(-1)
    weights = onehot.float() / count.clamp(min=1)[..., None].float()
    desc = torch.einsum("brt,bhtd->bhrd", weights, k.float())
    last = torch.where(onehot, keys.pos[:, None, :], torch.full_like(keys.pos[:, None, :], -1)).amax(-1)
    return desc, onehot, count, last


def select_regions(scores: torch.Tensor, eligible: torch.Tensor, top_k: int) -> torch.Tensor:
    """The k best eligible regions per row as a bool mask; ties go to the lower index."""
    num_regions = scores.shape[-1]
    k = min(top_k, num_regions)
    masked = scores.masked_fill(~eligible, float("-inf"))
    # A stable descending sort keeps equal scores in ascending region order.
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    selected = torch.zeros_like(eligible).scatter(-1, order, True)
    return selected & eligible


def gaze_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    gaze: torch.Tensor,
    keys: KeyLayout,
    top_k: int,
    want_aux: bool = False,
) -> GazeAttentionOutput:
    """q [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D] (rotary applied); q_pos, gaze [B, Tq]."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = dim**-0.5
    causal = keys.valid[:, None, :] & (keys.pos[:, None, :] <= q_pos[:, :, None])  # [B, Tq, Tk]
    qg = q.reshape(batch, kv_heads, group, q_len, dim)
    logits = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, Tk]

    selected = None
    aux = None
    mask = causal[:, None, None]
    if keys.num_regions > 0 and bool(gaze.any()):
        scores, eligible, onehot = _selection_scores(qg, k, keys, q_pos, gaze)
        selected = select_regions(scores, eligible, top_k)
        region_of_key = keys.region.clamp(min=0)[:, None, None, :].expand(batch, kv_heads, q_len, k_len)
        key_selected = torch.gather(selected, -1, region_of_key) & (keys.region >= 0)[:, None, None, :]
        gaze_keys = causal[:, None] & ((keys.region < 0)[:, None, None, :] | key_selected)
        mask = torch.where(gaze[:, None, :, None], gaze_keys, causal[:, None])[:, :, None]
        if want_aux:
            aux = _selection_aux_loss(logits, causal, onehot, scores * scale, eligible)

    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # queries with no visible key (padding)
    out = torch.matmul(probs.to(v.dtype), v[:, :, None]).reshape(batch, q_heads, q_len, dim)
    return GazeAttentionOutput(out=out, selected=selected, aux_loss=aux)


def _selection_scores(
    qg: torch.Tensor, k: torch.Tensor, keys: KeyLayout, q_pos: torch.Tensor, gaze: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection scores and eligibility [B, Hkv, Tq, R] (max over the group) and region membership [B, R, Tk]."""
    desc, onehot, count, last = region_statistics(k, keys)
    eligible = (count > 0)[:, None, :] & (last[:, None, :] < q_pos[:, :, None])  # [B, Tq, R]
    scores = torch.einsum("bhgtd,bhrd->bhgtr", qg.float(), desc).amax(2)  # [B, Hkv, Tq, R]
    eligible = (eligible[:, None] & gaze[:, None, :, None]).expand_as(scores)
    return scores, eligible, onehot


@dataclass
class RegionCoverage:
    """How much dense attention mass the gaze selection keeps, for every budget k = 1..R at once.

    ``visual[b, h, t, j]``: of the dense attention mass that query t (averaged over the query
    heads of KV head h) puts on eligible visual regions, the share held by the j+1 regions the
    selection rule ranks first (descriptor scores, ties to the lower index). ``kept``: the
    same budget's share of *all* attention mass (dense tokens always kept). ``rows`` [B, Hkv, Tq]
    marks gaze queries with at least one eligible region; other rows are meaningless.
    """

    visual: torch.Tensor
    kept: torch.Tensor
    rows: torch.Tensor


def region_coverage(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, gaze: torch.Tensor, keys: KeyLayout
) -> RegionCoverage:
    """Coverage curves of the gaze queries in a call (q [B, Hq, Tq, D], k [B, Hkv, Tk, D], rotary applied)."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, q_heads // kv_heads, q_len, dim)
    scores, eligible, onehot = _selection_scores(qg, k, keys, q_pos, gaze)
    causal = keys.valid[:, None, :] & (keys.pos[:, None, :] <= q_pos[:, :, None])
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; fp64 inputs stay fp64 (tests)
    logits = torch.matmul(qg.to(acc), k[:, :, None].to(acc).transpose(-1, -2)) * dim**-0.5
    dense = torch.nan_to_num(torch.softmax(logits.masked_fill(~causal[:, None, None], float("-inf")), -1), nan=0.0)
    mass = torch.einsum("bhgqt,brt->bhqr", dense, onehot.to(acc)) / qg.shape[2]  # mean over the group
    mass = mass * eligible
    order = torch.sort(scores.masked_fill(~eligible, float("-inf")), dim=-1, descending=True, stable=True).indices
    captured = torch.gather(mass, -1, order).cumsum(-1)  # mass of the top-1, top-2, ... regions
    visual_total = mass.sum(-1, keepdim=True)
    visual = torch.where(visual_total > 0, captured / visual_total.clamp(min=1e-30), torch.ones_like(captured))
    kept = (1.0 - visual_total) + captured
    return RegionCoverage(visual=visual, kept=kept, rows=eligible.any(-1))


def _selection_aux_loss(
    logits: torch.Tensor,
    causal: torch.Tensor,
    onehot: torch.Tensor,
    scaled_scores: torch.Tensor,
    eligible: torch.Tensor,
) -> torch.Tensor:
    """KL from the dense attention mass per region to the softmax of the selection scores.

    Teaches descriptor scores to rank regions the way full attention would weigh them,
    so hard top-k keeps the mass that matters. The target is detached.
    """
    with torch.no_grad():
        dense = torch.softmax(logits.masked_fill(~causal[:, None, None], float("-inf")), dim=-1)
        dense = torch.nan_to_num(dense, nan=0.0)
        mass = torch.einsum("bhgqt,brt->bhqr", dense.float(), onehot.float())
        mass = mass * eligible
        target = mass / mass.sum(-1, keepdim=True).clamp(min=1e-9)
    rows = eligible.any(-1)  # [B, Hkv, Tq]
    if not bool(rows.any()):
        return scaled_scores.sum() * 0.0
    log_pred = F.log_softmax(scaled_scores.masked_fill(~eligible, float("-inf")), dim=-1)
    log_pred = log_pred.masked_fill(~eligible, 0.0)
    kl = (target * (torch.log(target.clamp(min=1e-9)) - log_pred)).sum(-1)
    return kl[rows].mean()
