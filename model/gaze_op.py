"""Gaze Attention in PyTorch: descriptors, region selection and sparse attention.

One function, `gaze_attention`, implements spec v2 (docs/GAZE_SEMANTICS.md) for a layer,
over the whole key set visible to the call (the KV cache plus the new tokens). It is
written with masks so the same code serves training (teacher forcing, all tokens at
once) and cached generation (a few new queries against the cache); it is the PyTorch
member of the implementations and is tested against gaze_edge.reference.

The steps, in the spec's order: which keys each query may see at all (causal, and for
``own_image`` context tokens only their own image); region descriptors and selection
for gaze queries (per KV head or per query head, by ``routing``); softmax over the
visible dense keys plus the selected regions' tokens.

Descriptors are recomputed from the cached keys on every call: the spec's mean of the
region's keys, summed in the same order whatever the chunking, which keeps prefill
and token-by-token decoding bit-for-bit comparable. Deployment backends keep them
beside the cache instead (docs/ONNX_CONTRACT.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gaze_edge.reference import CONTEXT_ATTENTIONS, ROUTINGS


@dataclass
class KeyLayout:
    """Where each key slot sits [B, Tk]: rotary position, region (-1 dense), validity, image.

    ``image``: image/frame index of a visual or context token, -1 otherwise; only
    ``context_attention = own_image`` reads it.
    """

    pos: torch.Tensor
    region: torch.Tensor
    valid: torch.Tensor
    num_regions: int
    image: torch.Tensor | None = None


@dataclass
class GazeAttentionOutput:
    out: torch.Tensor  # [B, Hq, Tq, D]
    selected: torch.Tensor | None  # [B, Hsel, Tq, R] bool, gaze queries only; Hsel = Hkv (kv_head) or Hq
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


def visible_keys(
    q_pos: torch.Tensor,
    gaze: torch.Tensor,
    keys: KeyLayout,
    q_context_image: torch.Tensor | None,
    context_attention: str,
) -> torch.Tensor:
    """Keys each query may see before any region selection [B, Tq, Tk].

    Causal for every query; with ``own_image`` a context token (never a gaze query) sees
    only the visual and context tokens of its own image/frame.
    """
    visible = keys.valid[:, None, :] & (keys.pos[:, None, :] <= q_pos[:, :, None])
    if context_attention == "own_image" and q_context_image is not None:
        if keys.image is None:
            raise ValueError("context_attention='own_image' needs KeyLayout.image (the image of every key)")
        is_context = (q_context_image >= 0) & ~gaze
        own = keys.image[:, None, :] == q_context_image[:, :, None]
        visible = visible & (own | ~is_context[:, :, None])
    return visible


def gaze_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    gaze: torch.Tensor,
    keys: KeyLayout,
    top_k: int,
    want_aux: bool = False,
    *,
    q_context_image: torch.Tensor | None = None,
    routing: str = "kv_head",
    context_attention: str = "causal",
) -> GazeAttentionOutput:
    """q [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D] (rotary applied); q_pos, gaze, q_context_image [B, Tq].

    ``q_context_image``: the image/frame of a query that is a context token, -1 otherwise
    (None: no query is). ``selected`` is [B, Hsel, Tq, R], Hsel = Hkv (kv_head) or Hq (query_head).
    """
    _check_modes(routing, context_attention)
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = dim**-0.5
    visible = visible_keys(q_pos, gaze, keys, q_context_image, context_attention)  # [B, Tq, Tk]
    qg = q.reshape(batch, kv_heads, group, q_len, dim)
    logits = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, Tk]

    selected = None
    aux = None
    mask = visible[:, None, None]  # [B, 1, 1, Tq, Tk]: dense queries
    if keys.num_regions > 0 and bool(gaze.any()):
        # S selections per KV head: 1 shared by the group (kv_head) or one per query head (query_head).
        scores, eligible, onehot = _selection_scores(qg, k, keys, q_pos, gaze, routing)  # [B, Hkv, S, Tq, R]
        chosen = select_regions(scores, eligible, top_k)
        region_of_key = keys.region.clamp(min=0)[:, None, None, None, :].expand(*chosen.shape[:-1], k_len)
        key_chosen = torch.gather(chosen, -1, region_of_key) & (keys.region >= 0)[:, None, None, None, :]
        gaze_keys = mask & ((keys.region < 0)[:, None, None, None, :] | key_chosen)  # [B, Hkv, S, Tq, Tk]
        mask = torch.where(gaze[:, None, None, :, None], gaze_keys, mask)
        selected = chosen.flatten(1, 2)
        if want_aux:
            aux = _selection_aux_loss(logits, visible, onehot, scores * scale, eligible)

    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # queries with no visible key (padding)
    out = torch.matmul(probs.to(v.dtype), v[:, :, None]).reshape(batch, q_heads, q_len, dim)
    return GazeAttentionOutput(out=out, selected=selected, aux_loss=aux)


def _check_modes(routing: str, context_attention: str) -> None:
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if context_attention not in CONTEXT_ATTENTIONS:
        raise ValueError(f"context_attention must be one of {CONTEXT_ATTENTIONS}, got {context_attention!r}")


def _selection_scores(
    qg: torch.Tensor, k: torch.Tensor, keys: KeyLayout, q_pos: torch.Tensor, gaze: torch.Tensor, routing: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection scores and eligibility [B, Hkv, S, Tq, R] and region membership [B, R, Tk].

    S = 1 for kv_head (the max over the group's query heads), S = G for query_head.
    """
    desc, onehot, count, last = region_statistics(k, keys)
    eligible = (count > 0)[:, None, :] & (last[:, None, :] < q_pos[:, :, None]) & gaze[:, :, None]  # [B, Tq, R]
    scores = torch.einsum("bhgtd,bhrd->bhgtr", qg.float(), desc)
    if routing == "kv_head":
        scores = scores.amax(2, keepdim=True)
    return scores, eligible[:, None, None].expand_as(scores), onehot


@dataclass
class RegionCoverage:
    """How much dense attention mass the gaze selection keeps, for every budget k = 1..R at once.

    ``visual[b, s, t, j]``: of the dense attention mass that query t puts on eligible visual
    regions (kv_head: averaged over the query heads of KV head s; query_head: of query head s),
    the share held by the j+1 regions the selection rule ranks first (descriptor scores, ties
    to the lower index). ``kept``: the same budget's share of *all* attention mass (dense
    tokens always kept). ``rows`` [B, Hsel, Tq] marks gaze queries with at least one eligible
    region; other rows are meaningless.
    """

    visual: torch.Tensor
    kept: torch.Tensor
    rows: torch.Tensor


def region_coverage(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    gaze: torch.Tensor,
    keys: KeyLayout,
    *,
    routing: str = "kv_head",
) -> RegionCoverage:
    """Coverage curves of the gaze queries in a call (q [B, Hq, Tq, D], k [B, Hkv, Tk, D], rotary applied).

    Gaze queries attend causally whatever ``context_attention`` says, so the dense mass here
    is plain causal attention.
    """
    _check_modes(routing, "causal")
    batch, q_heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, q_heads // kv_heads, q_len, dim)
    scores, eligible, onehot = _selection_scores(qg, k, keys, q_pos, gaze, routing)
    causal = keys.valid[:, None, :] & (keys.pos[:, None, :] <= q_pos[:, :, None])
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; fp64 inputs stay fp64 (tests)
    logits = torch.matmul(qg.to(acc), k[:, :, None].to(acc).transpose(-1, -2)) * dim**-0.5
    dense = torch.nan_to_num(torch.softmax(logits.masked_fill(~causal[:, None, None], float("-inf")), -1), nan=0.0)
    mass = torch.einsum("bhgqt,brt->bhgqr", dense, onehot.to(acc))
    if routing == "kv_head":
        mass = mass.mean(2, keepdim=True)  # one selection serves the group: its mean mass
    mass = (mass * eligible).flatten(1, 2)
    scores, eligible = scores.flatten(1, 2), eligible.flatten(1, 2)
    order = torch.sort(scores.masked_fill(~eligible, float("-inf")), dim=-1, descending=True, stable=True).indices
    captured = torch.gather(mass, -1, order).cumsum(-1)  # mass of the top-1, top-2, ... regions
    visual_total = mass.sum(-1, keepdim=True)
    visual = torch.where(visual_total > 0, captured / visual_total.clamp(min=1e-30), torch.ones_like(captured))
    kept = (1.0 - visual_total) + captured
    return RegionCoverage(visual=visual, kept=kept, rows=eligible.any(-1))


def _selection_aux_loss(
    logits: torch.Tensor,
    visible: torch.Tensor,
    onehot: torch.Tensor,
    scaled_scores: torch.Tensor,
    eligible: torch.Tensor,
) -> torch.Tensor:
    """KL from the dense attention mass per region to the softmax of the selection scores.

    Teaches descriptor scores to rank regions the way full attention would weigh them,
    so hard top-k keeps the mass that matters. The target is detached. Scores and
    eligibility are [B, Hkv, S, Tq, R]; with one selection per group (S = 1) the target is
    the group's summed mass.
    """
    with torch.no_grad():
        dense = torch.softmax(logits.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
        dense = torch.nan_to_num(dense, nan=0.0)
        mass = torch.einsum("bhgqt,brt->bhgqr", dense.float(), onehot.float())
        if scaled_scores.shape[2] == 1:
            mass = mass.sum(2, keepdim=True)
        mass = mass * eligible
        target = mass / mass.sum(-1, keepdim=True).clamp(min=1e-9)
    rows = eligible.any(-1)  # [B, Hkv, S, Tq]
    if not bool(rows.any()):
        return scaled_scores.sum() * 0.0
    log_pred = F.log_softmax(scaled_scores.masked_fill(~eligible, float("-inf")), dim=-1)
    log_pred = log_pred.masked_fill(~eligible, 0.0)
    kl = (target * (torch.log(target.clamp(min=1e-9)) - log_pred)).sum(-1)
    return kl[rows].mean()
