"""Gaze Attention semantics (docs/GAZE_SEMANTICS.md): the numpy reference, and PyTorch against it.

Every case draws fresh random inputs; a failure names its seed (make_case(seed=...) replays it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gaze_edge.model.gaze_op import KeyLayout, gaze_attention, region_coverage
from gaze_edge.reference import (
    gaze_attention_reference,
    region_index_map,
    region_index_map_frames,
    regions_for_frames,
    regions_per_image,
)
from tests.gaze_cases import GazeCase, make_case

MODES = [
    dict(routing="kv_head", context_attention="causal"),  # v1
    dict(routing="kv_head", context_attention="own_image"),
    dict(routing="query_head", context_attention="causal"),
    dict(routing="query_head", context_attention="own_image"),
]
MODE_IDS = [f"{m['routing']}-{m['context_attention']}" for m in MODES]


def run_torch(case: GazeCase, dtype: torch.dtype = torch.float64, top_k: int | None = None):
    keys = KeyLayout(
        torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region), torch.from_numpy(case.k_valid),
        case.num_regions, torch.from_numpy(case.k_image),
    )
    return gaze_attention(
        torch.from_numpy(case.q).to(dtype), torch.from_numpy(case.k).to(dtype), torch.from_numpy(case.v).to(dtype),
        torch.from_numpy(case.q_pos), torch.from_numpy(case.gaze), keys,
        case.top_k if top_k is None else top_k,
        q_context_image=torch.from_numpy(case.q_context_image),
        routing=case.routing, context_attention=case.context_attention,
    )


def run_reference(case: GazeCase):
    return gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())


def run(impl: str, case: GazeCase) -> np.ndarray:
    return run_reference(case).out if impl == "reference" else run_torch(case).out.numpy()


def replace(case: GazeCase, **fields) -> GazeCase:
    return dataclasses.replace(case, **fields)


def dense_twin(case: GazeCase) -> np.ndarray:
    """Attention with every key a dense query may see, written independently of both implementations."""
    b_, hq, tq, d = case.q.shape
    group = hq // case.k.shape[1]
    out = np.zeros_like(case.q)
    for b in range(b_):
        for g in range(hq):
            for t in range(tq):
                keys = case.k_valid[b] & (case.k_pos[b] <= case.q_pos[b, t])
                if case.context_attention == "own_image" and case.q_context_image[b, t] >= 0:
                    keys &= case.k_image[b] == case.q_context_image[b, t]
                if not keys.any():
                    continue
                logits = case.k[b, g // group, keys] @ case.q[b, g, t] / np.sqrt(d)
                w = np.exp(logits - logits.max())
                out[b, g, t] = (w / w.sum()) @ case.v[b, g // group, keys]
    return out


def brute_force(case: GazeCase) -> tuple[np.ndarray, dict[tuple[int, int, int], set[int]]]:
    """The spec read literally, in plain Python over sets of slots: an independent check of the reference.

    Returns the output and, per (batch, selecting head, query) of every gaze query, the selected regions.
    """
    batch, q_heads, q_len, dim = case.q.shape
    group = q_heads // case.k.shape[1]
    out = np.zeros_like(case.q)
    chosen: dict[tuple[int, int, int], set[int]] = {}
    for b in range(batch):
        slots = [s for s in range(case.k.shape[2]) if case.k_valid[b, s]]
        members = {r: [s for s in slots if case.k_region[b, s] == r] for r in range(case.num_regions)}
        for t in range(q_len):
            p = case.q_pos[b, t]
            eligible = [r for r, m in members.items() if m and all(case.k_pos[b, s] < p for s in m)]
            for g in range(q_heads):
                h = g // group
                earlier = [s for s in slots if case.k_pos[b, s] <= p]
                own = case.q_context_image[b, t]
                if case.context_attention == "own_image" and own >= 0:
                    keys = [s for s in earlier if case.k_image[b, s] == own]
                elif case.gaze[b, t]:
                    heads = [g] if case.routing == "query_head" else list(range(h * group, (h + 1) * group))
                    score = {}
                    for r in eligible:
                        d = sum(case.k[b, h, s] for s in members[r]) / len(members[r])
                        score[r] = max(float(case.q[b, x, t] @ d) for x in heads)
                    best = set(sorted(eligible, key=lambda r: (-score[r], r))[: case.top_k])
                    chosen[(b, g if case.routing == "query_head" else h, t)] = best
                    keys = [s for s in earlier if case.k_region[b, s] < 0 or case.k_region[b, s] in best]
                else:
                    keys = earlier
                if keys:
                    logits = np.array([case.q[b, g, t] @ case.k[b, h, s] for s in keys]) / np.sqrt(dim)
                    w = np.exp(logits - logits.max())
                    out[b, g, t] = sum(wi * case.v[b, h, s] for wi, s in zip(w / w.sum(), keys, strict=True))
    return out, chosen


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------ layout


def test_ragged_region_map():
    rmap = region_index_map(5, 5, 2, 2).reshape(5, 5)
    assert regions_per_image(5, 5, 2, 2) == 9
    assert rmap[0].tolist() == [0, 0, 1, 1, 2]
    assert rmap[4].tolist() == [6, 6, 7, 7, 8]
    sizes = np.bincount(rmap.reshape(-1))
    assert sizes.tolist() == [4, 4, 2, 4, 4, 2, 2, 2, 1]


def test_region_map_of_frame_groups():
    """2 x 3 grid, 1 x 2 regions (ragged column), 5 frames in groups of 2: the last group holds one frame."""
    rmap = region_index_map_frames(2, 3, 1, 2, frames=5, region_frames=2).reshape(5, 2, 3)
    assert rmap[0].tolist() == rmap[1].tolist() == [[0, 0, 1], [2, 2, 3]]
    assert rmap[2].tolist() == rmap[3].tolist() == [[4, 4, 5], [6, 6, 7]]
    assert rmap[4].tolist() == [[8, 8, 9], [10, 10, 11]]
    assert regions_for_frames(2, 3, 1, 2, 5, 2) == 12 == 3 * regions_per_image(2, 3, 1, 2)
    assert np.bincount(rmap.reshape(-1)).tolist() == [4, 2, 4, 2] * 2 + [2, 1, 2, 1]
    # One frame per group is one image after another.
    single = region_index_map_frames(5, 5, 2, 2, frames=3, region_frames=1)
    assert single.tolist() == [i * 9 + r for i in range(3) for r in region_index_map(5, 5, 2, 2)]


def test_descriptors_are_region_means():
    case = make_case(grid=(5, 5), region=(2, 2), images=(2,), batch=1)
    ref = run_reference(case)
    for r in (0, 2, 8, 9 + 8):  # full, ragged column, 1-token corner, second image's corner
        members = case.k_region[0] == r
        np.testing.assert_allclose(ref.descriptors[0, :, r], case.k[0][:, members].mean(axis=1))


def test_descriptor_of_a_frame_group_is_the_mean_over_its_frames():
    case = make_case(grid=(4, 4), region=(2, 2), images=(3,), batch=1, video=True, region_frames=2)
    ref = run_reference(case)
    assert case.num_regions == 8
    for r in (0, 3, 4, 7):
        members = case.k_region[0] == r
        assert members.sum() == (8 if r < 4 else 4)  # 2 frames x 4 tokens, then the 1-frame last group
        assert set(case.k_image[0, members]) == ({0, 1} if r < 4 else {2})
        np.testing.assert_allclose(ref.descriptors[0, :, r], case.k[0][:, members].mean(axis=1))


# ------------------------------------------------------- spec identities


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("video", [False, True])
def test_top_k_at_least_regions_equals_dense(impl, mode, video):
    case = make_case(top_k=100, images=(3, 2), video=video, region_frames=2, **mode)
    assert rel_err(run(impl, case), dense_twin(case)) < 1e-12, f"seed {case.seed}"


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
def test_dense_tokens_always_attended_and_unselected_regions_never(impl, routing):
    case = make_case(top_k=1, batch=1, images=(2,), query_len=1, routing=routing)
    base = run(impl, case)
    sel = run_reference(case).selected[0]  # [Hsel, 1, R]
    for slot in np.flatnonzero(case.k_region[0] >= 0):
        r = case.k_region[0, slot]
        changed = replace(case, v=case.v.copy())
        changed.v[0, :, slot] += 10.0
        moved = np.abs(run(impl, changed) - base).reshape(sel.shape[0], -1).max(-1)  # per selecting head
        for h in range(sel.shape[0]):
            assert (moved[h] > 1e-9) == bool(sel[h, 0, r]), f"seed {case.seed}, slot {slot}, head {h}"
    for slot in np.flatnonzero((case.k_region[0] < 0) & case.k_valid[0]):  # text and context tokens
        changed = replace(case, v=case.v.copy())
        changed.v[0, :, slot] += 10.0
        assert np.abs(run(impl, changed) - base).min() > 1e-9, f"dense slot {slot} ignored (seed {case.seed})"


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("video", [False, True])
def test_own_image_context_token_sees_only_its_own_image(impl, video):
    """Brute force: move each value by a lot; a context query's output moves exactly for its own image's slots."""
    case = make_case(batch=1, images=(3,), video=video, region_frames=2, context=2, query_len=None,
                     context_attention="own_image")
    causal = replace(case, context_attention="causal")
    queries = np.flatnonzero(case.q_context_image[0] >= 0)
    assert len(queries) == 3 * 2
    base, base_causal = run(impl, case), run(impl, causal)
    for slot in np.flatnonzero(case.k_valid[0]):
        changed = replace(case, v=case.v.copy())
        changed.v[0, :, slot] += 10.0
        moved = np.abs(run(impl, changed) - base)[0][:, queries].max(axis=(0, 2)) > 1e-9  # per context query
        own = case.k_image[0, slot] == case.q_context_image[0, queries]
        want = own & (case.k_pos[0, slot] <= case.q_pos[0, queries])
        assert moved.tolist() == want.tolist(), f"seed {case.seed}, slot {slot}"
        if case.k_image[0, slot] < 0 and case.k_pos[0, slot] < case.q_pos[0, queries[0]]:  # text before image 0
            moved_causal = np.abs(run(impl, replace(changed, context_attention="causal")) - base_causal)
            assert moved_causal[0][:, queries].min() > 1e-9, "with causal context tokens text must count"


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_group_shares_one_selection_by_max_score(impl):
    """Head 0 prefers region 1, head 1 prefers region 2 more strongly: with kv_head both read region 2;
    with query_head each reads its own."""
    case = make_case(batch=1, kv_heads=1, group=2, images=(1,), query_len=1, top_k=1, dim=8)
    d = 8
    case.k[:] = 0.0
    for slot in np.flatnonzero(case.k_region[0] >= 0):
        case.k[0, 0, slot, case.k_region[0, slot] % d] = 1.0  # descriptor of region r is e_(r mod d)
    case.q[0, 0, 0] = 0.0
    case.q[0, 0, 0, 1] = 2.0
    case.q[0, 1, 0] = 0.0
    case.q[0, 1, 0, 2] = 3.0
    per_head = replace(case, routing="query_head")
    for c, want in ((case, [[2]]), (per_head, [[1], [2]])):
        ref = run_reference(c)
        assert [np.flatnonzero(s).tolist() for s in ref.selected[0, :, 0]] == want
        if impl == "torch":
            got = run_torch(c)
            assert [np.flatnonzero(s).tolist() for s in got.selected[0, :, 0].numpy()] == want
            np.testing.assert_allclose(got.out.numpy(), ref.out, rtol=1e-12, atol=1e-12)
    # Head 0 reads another region under query_head, head 1 the same one: only head 0's output moves.
    a, b = run(impl, case), run(impl, per_head)
    assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-6 and np.abs(a[0, 1] - b[0, 1]).max() < 1e-12


def test_query_head_selections_differ_per_head_on_random_inputs():
    """Query heads of one group disagree somewhere; kv_head's shared choice is each head's best by the max."""
    case = make_case(batch=2, kv_heads=2, group=4, images=(2, 2), query_len=4, top_k=2, routing="query_head")
    sel = run_reference(case).selected.reshape(2, 2, 4, 4, -1)  # [B, Hkv, G, Tq, R]
    assert (sel != sel[:, :, :1]).any(), f"seed {case.seed}: every head of every group chose alike"
    np.testing.assert_array_equal(run_torch(case).selected.numpy(), sel.reshape(2, 8, 4, -1))


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
def test_ties_go_to_lower_region_index(impl, routing):
    case = make_case(batch=1, kv_heads=1, group=2, images=(1,), grid=(4, 4), region=(2, 2), query_len=1, top_k=2,
                     routing=routing)
    visual = case.k_region[0] >= 0
    case.k[0, 0, visual] = 1.0  # every descriptor identical: all scores tie
    selected = run_reference(case).selected if impl == "reference" else run_torch(case).selected.numpy()
    assert [np.flatnonzero(s).tolist() for s in selected[0, :, 0]] == [[0, 1]] * selected.shape[1]


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_batch_padding_regions_never_selected(impl):
    """Sequence 1 has one image, so regions 9..17 are padding; their zero descriptor would win."""
    case = make_case(batch=2, images=(2, 1), query_len=1, top_k=12)
    visual = case.k_region >= 0
    case.k[visual[:, None, :].repeat(case.k.shape[1], 1)] -= 100.0  # real regions score far below 0
    case.q[:] = np.abs(case.q)
    selected = run_reference(case).selected if impl == "reference" else run_torch(case).selected.numpy()
    assert not selected[1, :, :, 9:].any()
    assert selected[1, :, :, :9].all()  # k = 12 > 9 real regions: all of them
    assert selected[0].sum(-1).tolist() == [[12]] * case.k.shape[1]


def test_regions_of_later_images_are_not_eligible():
    """A gaze query placed before the second image cannot select its regions."""
    case = make_case(batch=1, images=(2,), query_len=None, top_k=18)
    first_image_end = int(np.flatnonzero(case.k_region[0] == 9)[0])  # first token of image 2
    gaze = np.zeros_like(case.gaze)
    gaze[0, first_image_end - 1] = True  # a text token between the images
    case = replace(case, gaze=gaze)
    ref = run_reference(case)
    assert ref.selected[0, :, first_image_end - 1, :9].all()
    assert not ref.selected[0, :, first_image_end - 1, 9:].any()
    np.testing.assert_allclose(run_torch(case).selected.numpy(), ref.selected)


@pytest.mark.parametrize("region_frames", [1, 2])
def test_a_frame_group_is_eligible_only_once_all_its_frames_are_in(region_frames):
    """A gaze query right after frame 0's context tokens: frame 0's regions are eligible only with rt = 1."""
    case = make_case(batch=1, images=(2,), video=True, region_frames=region_frames, query_len=None, top_k=99)
    after_frame_0 = int(np.flatnonzero(case.k_image[0] == 1)[0])  # first token of frame 1
    case.k_image[0, after_frame_0] = -1  # that slot becomes a text token asking a gaze query
    case.k_region[0, after_frame_0] = -1
    gaze = np.zeros_like(case.gaze)
    gaze[0, after_frame_0] = True
    case = replace(case, gaze=gaze)
    ref = run_reference(case)
    want = np.arange(case.num_regions) < (9 if region_frames == 1 else 0)
    assert (ref.selected[0, :, after_frame_0] == want).all(), f"seed {case.seed}"
    np.testing.assert_array_equal(run_torch(case).selected.numpy(), ref.selected)


def test_invalid_arguments_are_refused():
    case = make_case(batch=1, images=(1,), query_len=None)
    with pytest.raises(ValueError, match="routing"):
        run_reference(replace(case, routing="per_token"))
    with pytest.raises(ValueError, match="routing"):
        run_torch(replace(case, routing="per_token"))
    with pytest.raises(ValueError, match="context_attention"):
        run_torch(replace(case, context_attention="image"))
    with pytest.raises(ValueError, match="k_image"):
        gaze_attention_reference(case.q, case.k, case.v,
                                 **{**case.reference_kwargs(), "context_attention": "own_image", "k_image": None})
    keys = KeyLayout(torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region), torch.from_numpy(case.k_valid),
                     case.num_regions)  # no image index
    with pytest.raises(ValueError, match="KeyLayout.image"):
        gaze_attention(torch.from_numpy(case.q), torch.from_numpy(case.k), torch.from_numpy(case.v),
                       torch.from_numpy(case.q_pos), torch.from_numpy(case.gaze), keys, 2,
                       q_context_image=torch.from_numpy(case.q_context_image), context_attention="own_image")
    both = case.q_context_image >= 0
    with pytest.raises(ValueError, match="both a gaze query and a context token"):
        run_reference(replace(case, gaze=case.gaze | both))


# ------------------------------------------------------- parity with reference

SHAPES = {
    "prefill-ragged": dict(grid=(5, 5), region=(2, 2), images=(1, 2), query_len=None),
    "chunk": dict(grid=(6, 4), region=(3, 3), images=(3, 1), query_len=5),  # a chunk of gaze queries
    "decode": dict(grid=(4, 4), region=(2, 2), images=(2, 2), query_len=1),
    "frames-rt1": dict(grid=(3, 4), region=(2, 2), images=(3, 2), query_len=None, video=True, region_frames=1),
    "frames-rt2": dict(grid=(3, 3), region=(2, 2), images=(3, 4), query_len=None, video=True, region_frames=2),
}


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_torch_matches_reference_fp64(group, shape, mode):
    case = make_case(group=group, **shape, **mode)
    ref = run_reference(case)
    got = run_torch(case)
    np.testing.assert_array_equal(got.selected.numpy(), ref.selected, err_msg=f"seed {case.seed}")
    assert rel_err(got.out.numpy(), ref.out) < 1e-12, f"seed {case.seed}"


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_torch_matches_reference_fp32(group, mode):
    case = make_case(group=group, images=(2, 3), dim=32, query_len=None, top_k=4, video=group == 2, region_frames=2,
                     **mode)
    ref = run_reference(case)
    got = run_torch(case, torch.float32)
    sel = got.selected.numpy()
    same = (sel == ref.selected).all(-1)  # [B, Hsel, Tq]
    for b, s, t in zip(*np.nonzero(~same), strict=True):
        # Either choice is right only where the swapped regions' scores are within rounding.
        swapped = np.flatnonzero(sel[b, s, t] != ref.selected[b, s, t])
        scores = ref.scores[b, s, t, swapped]
        assert scores.max() - scores.min() < 1e-4 * np.abs(ref.scores[b, s, t]).max(), f"seed {case.seed}"
    # Compare the outputs of heads whose selection matched (a different choice is a different answer).
    per_group = case.q.shape[1] // sel.shape[1]
    head_ok = np.repeat(same, per_group, axis=1)  # [B, Hq, Tq]
    out = got.out.numpy()
    assert head_ok.mean() > 0.9, f"seed {case.seed}: too many near-ties to compare"
    assert rel_err(out[head_ok], ref.out[head_ok]) < 1e-4, f"seed {case.seed}"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", [dict(images=(1, 2)), dict(images=(3, 2), video=True, region_frames=2)],
                         ids=["images", "frames-rt2"])
def test_reference_matches_brute_force(mode, shape):
    case = make_case(batch=2, kv_heads=2, group=2, dim=4, grid=(3, 3), region=(2, 2), context=1, generated=3,
                     top_k=2, query_len=None, **shape, **mode)
    ref = run_reference(case)
    out, chosen = brute_force(case)
    assert rel_err(ref.out, out) < 1e-12, f"seed {case.seed}"
    want = np.zeros_like(ref.selected)
    for (b, s, t), regions in chosen.items():
        want[b, s, t, sorted(regions)] = True
    np.testing.assert_array_equal(ref.selected, want, err_msg=f"seed {case.seed}")
    assert len(chosen) == case.gaze.sum() * ref.selected.shape[1]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_split_into_calls_gives_the_same_result(mode):
    """Prefill in chunks or one token per call, each call seeing only the cache so far, equals one call.

    Padding queries are left out: their output is unspecified (in one call a left-padding query
    at position 0 sees the first real token, which a chunked call has not written yet).
    """
    case = make_case(batch=2, images=(2, 3), video=True, region_frames=2, query_len=None, generated=4, **mode)
    whole = run_torch(case)
    length = case.k.shape[2]
    real = case.k_valid[:, None, :].repeat(case.q.shape[1], 1)  # [B, Hq, Tq]: every slot is a query here
    for sizes in ([7, 20, 1, 13], [1] * length):
        ends = [e for e in np.cumsum(sizes) if e < length] + [length]
        outs, selected, start = [], torch.zeros_like(whole.selected), 0
        for end in ends:
            part = replace(
                case, q=case.q[:, :, start:end], q_pos=case.q_pos[:, start:end], gaze=case.gaze[:, start:end],
                q_context_image=case.q_context_image[:, start:end], k=case.k[:, :, :end], v=case.v[:, :, :end],
                k_pos=case.k_pos[:, :end], k_region=case.k_region[:, :end], k_valid=case.k_valid[:, :end],
                k_image=case.k_image[:, :end],
            )
            got = run_torch(part)
            outs.append(got.out)
            if got.selected is not None:
                selected[:, :, start:end] = got.selected
            start = end
        out = torch.cat(outs, 2).numpy()
        assert rel_err(out[real], whole.out.numpy()[real]) < 1e-12, f"seed {case.seed}, {sizes}"
        assert torch.equal(selected, whole.selected), f"seed {case.seed}, {sizes}"


# ------------------------------------------------------- coverage and auxiliary loss per routing


def test_region_coverage_per_query_head_counts_each_heads_own_mass():
    """query_head: coverage at budget top_k = the share of head g's dense visual mass in Sel[g]."""
    case = make_case(batch=2, group=3, images=(2, 1), query_len=3, top_k=2, routing="query_head")
    keys = KeyLayout(torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region), torch.from_numpy(case.k_valid),
                     case.num_regions, torch.from_numpy(case.k_image))
    cov = region_coverage(torch.from_numpy(case.q), torch.from_numpy(case.k), torch.from_numpy(case.q_pos),
                          torch.from_numpy(case.gaze), keys, routing="query_head")
    selected = run_reference(case).selected  # [B, Hq, Tq, R]
    assert cov.visual.shape == (*selected.shape[:3], case.num_regions) and cov.rows.numpy().all()
    group = case.q.shape[1] // case.k.shape[1]
    for b, g, t in np.ndindex(*selected.shape[:3]):
        seen = case.k_valid[b] & (case.k_pos[b] <= case.q_pos[b, t])
        logits = case.k[b, g // group] @ case.q[b, g, t] / np.sqrt(case.q.shape[-1])
        w = np.where(seen, np.exp(logits - logits[seen].max()), 0.0)
        mass = np.bincount(case.k_region[b][case.k_region[b] >= 0], (w / w.sum())[case.k_region[b] >= 0],
                           minlength=case.num_regions)
        want = mass[selected[b, g, t]].sum() / mass.sum()  # every region is eligible after the prompt
        assert abs(float(cov.visual[b, g, t, case.top_k - 1]) - want) < 1e-9, f"seed {case.seed}"


def test_aux_loss_per_query_head_equals_per_kv_head_for_groups_of_one():
    case = make_case(batch=2, group=1, images=(2, 1), query_len=4, top_k=2)
    losses = []
    for routing in ("kv_head", "query_head"):
        keys = KeyLayout(torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region),
                         torch.from_numpy(case.k_valid), case.num_regions, torch.from_numpy(case.k_image))
        q = torch.from_numpy(case.q).float().requires_grad_()
        got = gaze_attention(q, torch.from_numpy(case.k).float(), torch.from_numpy(case.v).float(),
                             torch.from_numpy(case.q_pos), torch.from_numpy(case.gaze), keys, case.top_k,
                             want_aux=True, routing=routing)
        assert got.aux_loss is not None and got.aux_loss.item() > 0
        got.aux_loss.backward()
        assert q.grad is not None and float(q.grad.abs().sum()) > 0
        losses.append(got.aux_loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6), f"seed {case.seed}"
