"""CUDA kernels (through libgaze_kernels.so) vs gaze_edge.reference, on fresh random inputs.

Each case is laid out as the runtime lays out a call: a static cache of S slots holding the
sequence so far, the T new tokens' slot metadata written, write_offset = first new slot,
past descriptor sums of the tokens already in the cache. Outputs are compared with the
float64 reference (relative error 1e-2 for fp16/bf16, 1e-4 for fp32, GAZE_SPEC), the cache
write exactly, descriptor sums to fp32 accuracy, and the selected regions: exactly where
the k-th and (k+1)-th scores are separated, and otherwise the kernel's choice must be a
valid top-k (then the output is checked against attention over the kernel's own choice).
Skips with "no CUDA GPU" when there is none (torch with CUDA is used for device memory).
"""

from __future__ import annotations

import numpy as np
import pytest

from gaze_edge.reference import gaze_attention_reference
from tests.gaze_cases import GazeCase, fresh_seed, make_case
from tests.test_plugin_build import gk, kernel_library

TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}


def _cuda_torch():  # noqa: ANN202 - torch is optional here
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch if torch.cuda.is_available() and torch.cuda.device_count() > 0 else None
    except Exception:  # a broken driver must skip, not crash
        return None


@pytest.fixture(scope="module")
def cuda():  # noqa: ANN201
    torch = _cuda_torch()
    if torch is None:
        pytest.skip("no CUDA GPU (torch with CUDA not available)")
    lib = gk.GazeKernels(kernel_library())
    if lib.cuda_device_count() < 1:
        pytest.skip(f"no CUDA GPU visible to libgaze_kernels.so: {lib.last_error()}")
    return torch, lib


def _attention_given_selection(case: GazeCase, q: np.ndarray, k: np.ndarray, v: np.ndarray, selected: np.ndarray,
                               scale: float) -> np.ndarray:
    """Float64 attention of GAZE_SPEC with a given selection [B, Hkv, Tq, R] (for ambiguous top-k)."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = np.zeros((B, Hq, Tq, D))
    for b in range(B):
        for t in range(Tq):
            p = case.q_pos[b, t]
            causal = case.k_valid[b] & (case.k_pos[b] <= p)
            for h in range(Hkv):
                keys = causal.copy()
                if case.gaze[b, t]:
                    visual = case.k_region[b] >= 0
                    in_sel = np.zeros_like(keys)
                    in_sel[visual] = selected[b, h, t][case.k_region[b][visual]]
                    keys = causal & (~visual | in_sel)
                if not keys.any():
                    continue
                for g in range(h * G, (h + 1) * G):
                    logits = k[b, h, keys] @ q[b, g, t] * scale
                    w = np.exp(logits - logits.max())
                    out[b, g, t] = (w / w.sum()) @ v[b, h, keys]
    return out


def run_case(cuda, case: GazeCase, dtype: str, extra_slots: int = 5, inplace: bool = True) -> dict:  # noqa: ANN001
    torch, lib = cuda
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    dev = torch.device("cuda")
    B, Hq, Tq, D = case.q.shape
    Hkv, L = case.k.shape[1], case.k.shape[2]
    S, R, o = L + extra_slots, case.num_regions, L - Tq
    mrt = int(max(np.bincount(case.k_region[b][case.k_valid[b] & (case.k_region[b] >= 0)], minlength=1).max()
                  for b in range(B)))
    scale = 1.0 / np.sqrt(D)

    def on_device(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(dev, tdt)

    # Round inputs to the kernel dtype first: the reference then sees exactly what the kernel sees.
    q_d, k_d, v_d = on_device(case.q), on_device(case.k), on_device(case.v)
    q64, k64, v64 = (x.double().cpu().numpy() for x in (q_d, k_d, v_d))
    past_k = torch.zeros((B, Hkv, S, D), dtype=tdt, device=dev)
    past_v = torch.zeros_like(past_k)
    past_k[:, :, :o] = k_d[:, :, :o]
    past_v[:, :, :o] = v_d[:, :, :o]
    slot_pos = np.zeros((B, S), np.int64)
    slot_region = np.full((B, S), -1, np.int64)
    slot_valid = np.zeros((B, S), bool)
    slot_pos[:, :L], slot_region[:, :L], slot_valid[:, :L] = case.k_pos, case.k_region, case.k_valid
    k32 = k64.astype(np.float32)
    desc0 = np.zeros((B, Hkv, R, D), np.float32)
    desc1 = np.zeros((B, Hkv, R, D), np.float64)
    for b in range(B):
        for s in range(L):
            r = case.k_region[b, s]
            if case.k_valid[b, s] and r >= 0:
                desc1[b, :, r] += k64[b, :, s]
                if s < o:
                    desc0[b, :, r] += k32[b, :, s]
    past_desc = torch.from_numpy(desc0).to(dev)
    present_k = past_k if inplace else torch.full_like(past_k, 7.0)
    present_v = past_v if inplace else torch.full_like(past_v, 7.0)
    present_desc = past_desc if inplace else torch.full_like(past_desc, 7.0)
    new_k, new_v = k_d[:, :, o:].contiguous(), v_d[:, :, o:].contiguous()
    meta = {name: torch.from_numpy(x).to(dev) for name, x in (
        ("slot_pos", slot_pos), ("slot_region", slot_region), ("slot_valid", slot_valid),
        ("gaze", np.ascontiguousarray(case.gaze)), ("write_offset", np.array([o], np.int64)))}
    out = torch.full((B, Hq, Tq, D), float("nan"), dtype=tdt, device=dev)
    kmax = min(case.top_k, R)
    sel = torch.full((B, Hkv, Tq, kmax), -2, dtype=torch.int32, device=dev)
    nsel = torch.full((B, Hkv, Tq), -2, dtype=torch.int32, device=dev)

    problem = gk.Problem(batch=B, new_tokens=Tq, cache_len=S, num_regions=R, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                         dtype=gk.DTYPE_CODES[dtype], top_k=case.top_k, max_region_tokens=mrt)
    attrs = gk.Attrs(case.top_k, mrt, scale)
    ws_bytes = lib.workspace_size(problem)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    tensors = gk.Tensors(
        q_d.data_ptr(), new_k.data_ptr(), new_v.data_ptr(), past_k.data_ptr(), past_v.data_ptr(),
        past_desc.data_ptr(), meta["slot_pos"].data_ptr(), meta["slot_region"].data_ptr(),
        meta["slot_valid"].data_ptr(), meta["gaze"].data_ptr(), meta["write_offset"].data_ptr(), out.data_ptr(),
        present_k.data_ptr(), present_v.data_ptr(), present_desc.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    lib.forward(problem, attrs, tensors, ws.data_ptr(), ws_bytes, stream, sel.data_ptr(), nsel.data_ptr())
    assert lib.device_errors(problem, ws.data_ptr(), stream) == 0
    torch.cuda.synchronize()

    ref = gaze_attention_reference(q64, k64, v64, **case.reference_kwargs(), scale=scale)
    got = {"out": out.double().cpu().numpy(), "sel": sel.cpu().numpy(), "nsel": nsel.cpu().numpy(),
           "present_k": present_k.cpu(), "present_v": present_v.cpu(), "present_desc": present_desc.cpu().numpy()}
    # Cache: new slots written exactly, others unchanged.
    assert torch.equal(got["present_k"][:, :, :L].to(dev), k_d) and torch.equal(got["present_v"][:, :, :L].to(dev), v_d)
    assert torch.all(got["present_k"][:, :, L:] == 0).item()  # copied from past when not in place
    np.testing.assert_allclose(got["present_desc"], desc1, rtol=1e-5, atol=1e-4)

    # Selection.
    kernel_sel = np.zeros_like(ref.selected)
    ambiguous = False
    for b in range(B):
        for h in range(Hkv):
            for t in range(Tq):
                n = got["nsel"][b, h, t]
                if not case.gaze[b, t]:
                    assert n == 0
                    continue
                picked = got["sel"][b, h, t, :n]
                assert len(set(picked.tolist())) == n and (picked >= 0).all()
                kernel_sel[b, h, t, picked] = True
                want = ref.selected[b, h, t]
                assert n == want.sum(), "number selected = min(top_k, eligible)"
                if (kernel_sel[b, h, t] != want).any():
                    # Accept only a near-tie at the boundary: every differing region scores within
                    # rounding of the k-th selected reference score.
                    score = ref.scores[b, h, t]
                    kth = score[want].min()
                    differ = kernel_sel[b, h, t] != want
                    tol = 1e-3 * max(1.0, np.abs(score[want]).max())  # same rounded inputs: fp32 sums only
                    assert np.all(np.abs(score[differ] - kth) <= tol), (b, h, t, score[differ], kth)
                    ambiguous = True
    expected = ref.out if not ambiguous else _attention_given_selection(case, q64, k64, v64, kernel_sel, scale)
    rows = np.broadcast_to(case.k_valid[:, None, L - Tq:, None], expected.shape)  # padding queries: unspecified
    diff = np.linalg.norm((got["out"] - expected)[rows]) / np.linalg.norm(expected[rows])
    assert diff <= TOL[dtype], f"relative error {diff:.3g} > {TOL[dtype]} (seed {case.seed})"
    return got


CASES = [
    # (dtype, head_dim, group, batch, query_len, grid, region, images, top_k)
    ("float16", 64, 1, 1, 1, (5, 5), (2, 2), (1,), 3),
    ("float16", 128, 2, 3, 1, (9, 7), (3, 2), (1, 2, 3), 4),
    ("bfloat16", 64, 4, 2, 1, (8, 8), (2, 2), (2, 1), 5),
    ("bfloat16", 128, 7, 2, 3, (6, 5), (4, 3), (1, 2), 2),
    ("float32", 64, 8, 4, 2, (5, 5), (2, 2), (1, 2), 3),
    ("float32", 128, 3, 1, 8, (7, 7), (3, 3), (2,), 40),  # top_k > R: gaze sees every key
    ("float16", 128, 8, 8, 1, (12, 12), (2, 2), (1, 2), 7),
    ("bfloat16", 64, 6, 5, 1, (10, 10), (3, 3), (1, 3), 5),
    ("float16", 64, 2, 2, None, (6, 6), (2, 2), (1, 2), 3),  # whole prompt as one prefill chunk
    ("bfloat16", 128, 5, 2, 20, (6, 6), (2, 3), (2, 1), 4),  # prefill chunk with gaze queries
]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "dim", "group", "batch", "qlen", "grid", "region", "images", "top_k"), CASES)
def test_kernels_match_reference(cuda, dtype: str, dim: int, group: int, batch: int, qlen: int | None,  # noqa: ANN001
                                 grid: tuple, region: tuple, images: tuple, top_k: int) -> None:
    case = make_case(fresh_seed(), batch=batch, kv_heads=2, group=group, dim=dim, grid=grid, region=region,
                     images=images, generated=max(4, qlen or 0), query_len=qlen, top_k=top_k)
    run_case(cuda, case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(("grid", "region"), [((64, 64), (2, 2)), ((64, 64), (1, 1))])  # R = 1024, 4096
def test_many_regions(cuda, dtype: str, grid: tuple, region: tuple) -> None:  # noqa: ANN001
    case = make_case(fresh_seed(), batch=2, kv_heads=2, group=4, dim=128, grid=grid, region=region, images=(1,),
                     generated=2, query_len=1, top_k=max(1, (grid[0] * grid[1]) // (region[0] * region[1]) // 10))
    run_case(cuda, case, dtype)


@pytest.mark.gpu
def test_not_in_place_copies_past_into_present(cuda) -> None:  # noqa: ANN001
    case = make_case(fresh_seed(), batch=2, kv_heads=2, group=2, dim=64, query_len=1)
    run_case(cuda, case, "float16", inplace=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_exact_ties_go_to_the_lower_region(cuda, dtype: str) -> None:  # noqa: ANN001
    """Regions with bitwise-identical keys score identically; the lower index must win."""
    case = make_case(fresh_seed(), batch=1, kv_heads=2, group=2, dim=64, grid=(4, 4), region=(2, 2), images=(1,),
                     query_len=1, top_k=1)
    members = [np.flatnonzero(case.k_region[0] == r) for r in range(case.num_regions)]
    for r in (1, 2, 3):  # every region becomes a copy of region 0
        case.k[0][:, members[r]] = case.k[0][:, members[0]]
    got = run_case(cuda, case, dtype)
    assert (got["sel"][0, :, 0, 0] == 0).all()


@pytest.mark.gpu
def test_device_errors_are_reported(cuda) -> None:  # noqa: ANN001
    """A region over max_region_tokens is flagged, not silently truncated."""
    case = make_case(fresh_seed(), batch=1, kv_heads=1, group=1, dim=64, grid=(4, 4), region=(2, 2), images=(1,),
                     query_len=1)
    with pytest.raises(gk.GazeKernelError, match="max_region_tokens"):
        _run_with_mrt(cuda, case, mrt=2)


def _run_with_mrt(cuda, case: GazeCase, mrt: int) -> None:  # noqa: ANN001
    torch, lib = cuda
    dev = torch.device("cuda")
    B, Hq, Tq, D = case.q.shape
    Hkv, L = case.k.shape[1], case.k.shape[2]
    f16 = torch.float16
    q = torch.from_numpy(case.q).to(dev, f16)
    kv = torch.zeros((B, Hkv, L, D), dtype=f16, device=dev)
    new = torch.zeros((B, Hkv, Tq, D), dtype=f16, device=dev)
    desc = torch.zeros((B, Hkv, case.num_regions, D), dtype=torch.float32, device=dev)
    pos, reg = torch.from_numpy(case.k_pos).to(dev), torch.from_numpy(case.k_region).to(dev)
    valid, gz = torch.from_numpy(case.k_valid).to(dev), torch.from_numpy(np.ascontiguousarray(case.gaze)).to(dev)
    off = torch.tensor([L - Tq], dtype=torch.int64, device=dev)
    out = torch.empty_like(q)
    problem = gk.Problem(batch=B, new_tokens=Tq, cache_len=L, num_regions=case.num_regions, q_heads=Hq,
                         kv_heads=Hkv, head_dim=D, dtype=gk.F16, top_k=case.top_k, max_region_tokens=mrt)
    ws_bytes = lib.workspace_size(problem)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    t = gk.Tensors(q.data_ptr(), new.data_ptr(), new.data_ptr(), kv.data_ptr(), kv.data_ptr(), desc.data_ptr(),
                   pos.data_ptr(), reg.data_ptr(), valid.data_ptr(), gz.data_ptr(), off.data_ptr(), out.data_ptr(),
                   kv.data_ptr(), kv.data_ptr(), desc.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    lib.forward(problem, gk.Attrs(case.top_k, mrt, 0.125), t, ws.data_ptr(), ws_bytes, stream)
    lib.device_errors(problem, ws.data_ptr(), stream)
