"""Gaze Attention semantics (GAZE_SPEC.md): the numpy reference, and PyTorch against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaze_edge.model.gaze_op import KeyLayout, gaze_attention
from gaze_edge.reference import gaze_attention_reference, region_index_map, regions_per_image
from tests.gaze_cases import GazeCase, make_case


def run_torch(case: GazeCase, dtype: torch.dtype = torch.float64, top_k: int | None = None):
    keys = KeyLayout(
        torch.from_numpy(case.k_pos), torch.from_numpy(case.k_region), torch.from_numpy(case.k_valid),
        case.num_regions,
    )
    return gaze_attention(
        torch.from_numpy(case.q).to(dtype), torch.from_numpy(case.k).to(dtype), torch.from_numpy(case.v).to(dtype),
        torch.from_numpy(case.q_pos), torch.from_numpy(case.gaze), keys,
        case.top_k if top_k is None else top_k,
    )


def dense_causal(case: GazeCase) -> np.ndarray:
    """Plain causal softmax attention written independently of both implementations."""
    b_, hq, tq, d = case.q.shape
    group = hq // case.k.shape[1]
    out = np.zeros_like(case.q)
    for b in range(b_):
        for g in range(hq):
            for t in range(tq):
                keys = case.k_valid[b] & (case.k_pos[b] <= case.q_pos[b, t])
                if not keys.any():
                    continue
                logits = case.k[b, g // group, keys] @ case.q[b, g, t] / np.sqrt(d)
                w = np.exp(logits - logits.max())
                out[b, g, t] = (w / w.sum()) @ case.v[b, g // group, keys]
    return out


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


def test_descriptors_are_region_means():
    case = make_case(grid=(5, 5), region=(2, 2), images=(2,), batch=1)
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    for r in (0, 2, 8, 9 + 8):  # full, ragged column, 1-token corner, second image's corner
        members = case.k_region[0] == r
        np.testing.assert_allclose(ref.descriptors[0, :, r], case.k[0][:, members].mean(axis=1))


# ------------------------------------------------------- spec identities


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_top_k_at_least_regions_equals_dense(impl):
    case = make_case(top_k=100)
    if impl == "reference":
        out = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs()).out
    else:
        out = run_torch(case).out.numpy()
    assert rel_err(out, dense_causal(case)) < 1e-12, f"seed {case.seed}"


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_dense_tokens_always_attended_and_unselected_regions_never(impl):
    case = make_case(top_k=1, batch=1, images=(2,), query_len=1)
    run = (
        (lambda c: gaze_attention_reference(c.q, c.k, c.v, **c.reference_kwargs()).out)
        if impl == "reference"
        else (lambda c: run_torch(c).out.numpy())
    )
    base = run(case)
    sel = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs()).selected[0]  # [Hkv, 1, R]
    for slot in np.flatnonzero(case.k_region[0] >= 0):
        r = case.k_region[0, slot]
        changed = GazeCase(**{**case.__dict__, "v": case.v.copy()})
        changed.v[0, :, slot] += 10.0
        moved = np.abs(run(changed) - base).reshape(case.k.shape[1], -1).max(-1)  # per KV head group
        for h in range(case.k.shape[1]):
            assert (moved[h] > 1e-9) == bool(sel[h, 0, r]), f"seed {case.seed}, slot {slot}, head {h}"
    for slot in np.flatnonzero((case.k_region[0] < 0) & case.k_valid[0]):  # text and context tokens
        changed = GazeCase(**{**case.__dict__, "v": case.v.copy()})
        changed.v[0, :, slot] += 10.0
        assert np.abs(run(changed) - base).min() > 1e-9, f"dense slot {slot} ignored (seed {case.seed})"


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_group_shares_one_selection_by_max_score(impl):
    """Head 0 prefers region 1, head 1 prefers region 2 more strongly: both read region 2."""
    case = make_case(batch=1, kv_heads=1, group=2, images=(1,), query_len=1, top_k=1, dim=8)
    d = 8
    case.k[:] = 0.0
    for slot in np.flatnonzero(case.k_region[0] >= 0):
        case.k[0, 0, slot, case.k_region[0, slot] % d] = 1.0  # descriptor of region r is e_(r mod d)
    case.q[0, 0, 0] = 0.0
    case.q[0, 0, 0, 1] = 2.0
    case.q[0, 1, 0] = 0.0
    case.q[0, 1, 0, 2] = 3.0
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    assert np.flatnonzero(ref.selected[0, 0, 0]).tolist() == [2]
    out = ref.out if impl == "reference" else run_torch(case).out.numpy()
    np.testing.assert_allclose(out, ref.out, rtol=1e-12, atol=1e-12)
    if impl == "torch":
        assert np.flatnonzero(run_torch(case).selected[0, 0, 0].numpy()).tolist() == [2]


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_ties_go_to_lower_region_index(impl):
    case = make_case(batch=1, kv_heads=1, group=1, images=(1,), grid=(4, 4), region=(2, 2), query_len=1, top_k=2)
    visual = case.k_region[0] >= 0
    case.k[0, 0, visual] = 1.0  # every descriptor identical: all scores tie
    if impl == "reference":
        selected = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs()).selected
    else:
        selected = run_torch(case).selected.numpy()
    assert np.flatnonzero(selected[0, 0, 0]).tolist() == [0, 1]


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_batch_padding_regions_never_selected(impl):
    """Sequence 1 has one image, so regions 9..17 are padding; their zero descriptor would win."""
    case = make_case(batch=2, images=(2, 1), query_len=1, top_k=12)
    visual = case.k_region >= 0
    case.k[visual[:, None, :].repeat(case.k.shape[1], 1)] -= 100.0  # real regions score far below 0
    case.q[:] = np.abs(case.q)
    if impl == "reference":
        selected = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs()).selected
    else:
        selected = run_torch(case).selected.numpy()
    assert not selected[1, :, :, 9:].any()
    assert selected[1, :, :, :9].all()  # k = 12 > 9 real regions: all of them
    assert selected[0].sum(-1).tolist() == [[12]] * case.k.shape[1]


def test_regions_of_later_images_are_not_eligible():
    """A gaze query placed before the second image cannot select its regions."""
    case = make_case(batch=1, images=(2,), query_len=None, top_k=18)
    first_image_end = int(np.flatnonzero(case.k_region[0] == 9)[0])  # first token of image 2
    gaze = np.zeros_like(case.gaze)
    gaze[0, first_image_end - 1] = True  # a text token between the images
    case = GazeCase(**{**case.__dict__, "gaze": gaze})
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    assert ref.selected[0, :, first_image_end - 1, :9].all()
    assert not ref.selected[0, :, first_image_end - 1, 9:].any()
    np.testing.assert_allclose(run_torch(case).selected.numpy(), ref.selected)


# ------------------------------------------------------- parity with reference


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize(
    "shape",
    [
        dict(grid=(5, 5), region=(2, 2), images=(1, 2), query_len=None),  # whole prefill, ragged
        dict(grid=(6, 4), region=(3, 3), images=(3, 1), query_len=5),  # a chunk of gaze queries
        dict(grid=(4, 4), region=(2, 2), images=(2, 2), query_len=1),  # a decode step
    ],
)
def test_torch_matches_reference_fp64(group, shape):
    case = make_case(group=group, **shape)
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    got = run_torch(case)
    np.testing.assert_array_equal(got.selected.numpy(), ref.selected, err_msg=f"seed {case.seed}")
    assert rel_err(got.out.numpy(), ref.out) < 1e-12, f"seed {case.seed}"


@pytest.mark.parametrize("group", [1, 2, 7])
def test_torch_matches_reference_fp32(group):
    case = make_case(group=group, images=(2, 3), dim=32, query_len=6, top_k=4)
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    got = run_torch(case, torch.float32)
    sel = got.selected.numpy()
    same = (sel == ref.selected).all(-1)  # [B, Hkv, Tq]
    for b, h, t in zip(*np.nonzero(~same), strict=True):
        # Either choice is right only where the swapped regions' scores are within rounding.
        swapped = np.flatnonzero(sel[b, h, t] != ref.selected[b, h, t])
        scores = ref.scores[b, h, t, swapped]
        assert scores.max() - scores.min() < 1e-4 * np.abs(ref.scores[b, h, t]).max(), f"seed {case.seed}"
    group_ok = same.all(1)  # compare outputs of queries whose heads all selected alike
    for b in range(case.q.shape[0]):
        out, want = got.out.numpy()[b][:, group_ok[b]], ref.out[b][:, group_ok[b]]
        assert rel_err(out, want) < 1e-4, f"seed {case.seed}"
