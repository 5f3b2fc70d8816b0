"""The GazeAttention FunctionProto body in ONNX Runtime against the numpy reference (docs/GAZE_SEMANTICS.md).

Each case is fed to a one-node model the way a runtime drives the decoder: a static
cache of capacity S (more slots than tokens), empty at first, then calls over
consecutive chunks of the sequence, each call's present buffers becoming the next
call's past. Every call's output is compared with the reference over the whole sequence.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gaze_edge.export.gaze_function import (
    DOMAIN,
    OP_TYPE,
    build_function,
    register_schema,
    single_node_model,
)
from gaze_edge.reference import gaze_attention_reference
from gaze_edge.runtime.cache import SlotState
from tests.gaze_cases import GazeCase, make_case

_SESSIONS: dict[tuple, ort.InferenceSession] = {}


def session(top_k: int, max_region_tokens: int, scale: float, routing: str = "kv_head",
            context_attention: str = "causal") -> ort.InferenceSession:
    key = (top_k, max_region_tokens, scale, routing, context_attention)
    if key not in _SESSIONS:
        model = single_node_model(top_k=top_k, max_region_tokens=max_region_tokens, scale=scale, routing=routing,
                                  context_attention=context_attention)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_in_chunks(case: GazeCase, chunks: list[int], spare_slots: int = 3, region_tokens: int = 4,
                  routing: str = "kv_head", context_attention: str = "causal",
                  log: list[dict] | None = None) -> np.ndarray:
    """Feed the whole sequence call by call (chunk sizes `chunks`, the rest one token per call).

    The layout tables come from the runtime's own SlotState, as in deployment.
    """
    batch, kv_heads, length, dim = case.k.shape
    capacity = length + spare_slots
    q_all = np.random.default_rng(case.seed).standard_normal((batch, case.q.shape[1], length, dim))
    q_all[:, :, length - case.q.shape[2] :] = case.q  # the reference's queries are the last ones
    gaze_all = np.zeros((batch, length), dtype=bool)
    gaze_all[:, length - case.gaze.shape[1] :] = case.gaze
    past_k = np.zeros((batch, kv_heads, capacity, dim), dtype=np.float32)
    past_v = np.zeros_like(past_k)
    past_desc = np.zeros((batch, kv_heads, case.num_regions, dim), dtype=np.float32)
    slots = SlotState(batch, capacity, case.num_regions, region_tokens)
    sess = session(case.top_k, region_tokens, 1.0 / np.sqrt(dim), routing, context_attention)
    sizes = list(chunks)
    while sum(sizes) < length:
        sizes.append(1)
    outputs, offset = [], 0
    for size in sizes:
        if offset >= length:
            break
        sl = slice(offset, min(offset + size, length))
        # The runtime writes the layout of the new tokens before the call.
        offset = slots.write(case.k_pos[:, sl], case.k_region[:, sl], case.k_valid[:, sl], case.k_image[:, sl])
        feeds = {
            "query": q_all[:, :, sl].astype(np.float32),
            "key": case.k[:, :, sl].astype(np.float32),
            "value": case.v[:, :, sl].astype(np.float32),
            "past_key": past_k, "past_value": past_v, "past_desc": past_desc,
            "gaze": gaze_all[:, sl], "write_offset": np.array([offset], dtype=np.int64),
            **slots.tables(),
        }
        if log is not None:
            log.append({k: np.array(v) for k, v in feeds.items()})
        out, past_k, past_v, past_desc = sess.run(None, feeds)
        assert past_k.shape == (batch, kv_heads, capacity, dim)  # same buffer shape in and out
        outputs.append(out)
        offset = sl.stop
    full = np.concatenate(outputs, axis=2)
    return full[:, :, length - case.q.shape[2] :]


def check(case: GazeCase, chunks: list[int], region_tokens: int = 4) -> None:
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    out = run_in_chunks(case, chunks, region_tokens=region_tokens, routing=case.routing,
                        context_attention=case.context_attention)
    # Padding queries' outputs are unspecified (docs/ONNX_CONTRACT.md): the reference lets a padding
    # query at position 0 see the first real token, which a chunked call has not written yet.
    valid_q = np.broadcast_to(case.k_valid[:, None, -case.q.shape[2] :, None], out.shape)
    err = rel_err(np.where(valid_q, out, 0), np.where(valid_q, ref.out, 0))
    assert err < 1e-4, f"seed {case.seed}: relative error {err:.2e}"


def all_nodes(nodes, path: str = "") -> list[tuple[str, onnx.NodeProto]]:
    """Every node of a body with the If-branch path it sits in ("" top level, "/then", "/then/else", ...)."""
    out = []
    for node in nodes:
        out.append((path, node))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += all_nodes(attr.g.node, f"{path}/{attr.name.split('_')[0]}")
    return out


def test_function_is_well_formed():
    register_schema()
    model = single_node_model(top_k=2, max_region_tokens=4, scale=0.25)
    onnx.checker.check_model(model, full_check=True)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    ops = {node.op_type for _, node in all_nodes(build_function().node)}
    assert {"TopK", "GatherND", "ScatterND", "If"} <= ops


def test_body_reads_only_what_it_attends():
    """The cost rule, structurally: the cache is written by ScatterND only (new slots), read by the gaze path
    only through GatherND (dense slots by index, selected regions by index), and never read whole by it."""
    nodes = all_nodes(build_function().node)
    readers: dict[str, set[tuple[str, str]]] = {}
    for path, node in nodes:
        for i, name in enumerate(node.input):
            if node.op_type == "Shape" or (node.op_type == "CastLike" and i == 1):
                continue  # metadata only: the shape, the element type
            readers.setdefault(name, set()).add((path, node.op_type))
    assert readers["past_key"] == {("", "ScatterND")} and readers["past_value"] == {("", "ScatterND")}
    assert readers["past_desc"] == {("", "ScatterND")}
    # /else = "the call has gaze queries"; its /then = gaze queries only. The dense branch is /then.
    gaze_only = {op for path, op in readers["present_key"] if path.startswith("/else/then")}
    dense_only = {op for path, op in readers["present_key"] if path == "/then"}
    assert gaze_only == {"GatherND"}, gaze_only
    assert dense_only == {"Slice"}, dense_only  # causal prefill reads the written prefix [0, o + T)
    # No region gather in the dense branch.
    assert not any(node.op_type == "GatherND" for path, node in nodes if path == "/then")


MODES = [(r, c) for r in ("kv_head", "query_head") for c in ("causal", "own_image")]


@pytest.mark.parametrize(("routing", "context_attention"), MODES)
@pytest.mark.parametrize("chunks", [[-5], [4, 7, 2], [1]])
def test_v2_modes_match_reference(routing: str, context_attention: str, chunks: list[int]):
    """Both routings x both context modes, ragged regions, several images, batch padding, any split into calls
    (a negative chunk: the whole prompt, then single gaze steps)."""
    case = make_case(batch=2, kv_heads=2, group=3, grid=(5, 5), region=(2, 2), images=(1, 3), generated=4,
                     top_k=2, routing=routing, context_attention=context_attention)
    length = case.k.shape[2]
    check(case, chunks=[length + c if c < 0 else c for c in chunks])


@pytest.mark.parametrize(("routing", "context_attention"), MODES)
def test_video_regions_spanning_frames(routing: str, context_attention: str):
    """Frames grouped two at a time per region (rt = 2): a region's tokens arrive in two frames."""
    case = make_case(batch=2, kv_heads=1, group=2, grid=(4, 4), region=(2, 2), images=(4, 3), generated=3,
                     top_k=2, video=True, region_frames=2, routing=routing, context_attention=context_attention)
    length = case.k.shape[2]
    check(case, chunks=[length - 3], region_tokens=8)
    check(case, chunks=[5, 9, 11], region_tokens=8)


@pytest.mark.parametrize(("routing", "context_attention"), MODES)
def test_top_k_at_least_r_equals_dense(routing: str, context_attention: str):
    """With top_k >= R every gaze query sees what it could see densely, in every mode."""
    case = make_case(batch=2, kv_heads=2, group=2, images=(2, 1), generated=3, top_k=99, routing=routing,
                     context_attention=context_attention)
    length = case.k.shape[2]
    out = run_in_chunks(case, [length - 3], routing=routing, context_attention=context_attention)
    dense = gaze_attention_reference(case.q, case.k, case.v, **{**case.reference_kwargs(),
                                                                  "gaze": np.zeros_like(case.gaze)})
    valid_q = np.broadcast_to(case.k_valid[:, None, -case.q.shape[2] :, None], out.shape)
    assert rel_err(np.where(valid_q, out, 0), np.where(valid_q, dense.out, 0)) < 1e-4, f"seed {case.seed}"


@pytest.mark.parametrize("group", [1, 2, 7])
def test_prefill_then_decode_matches_reference(group: int):
    """Several images per sequence, ragged 5x5 grid in 2x2 regions, batch padding (fewer images)."""
    case = make_case(batch=2, kv_heads=2, group=group, grid=(5, 5), region=(2, 2), images=(1, 3), generated=5,
                     top_k=3, query_len=None)
    length = case.k.shape[2]
    check(case, chunks=[length - 5])  # prefill, then five single-token gaze steps


@pytest.mark.parametrize("chunks", [[1], [4, 7, 2], [9, 9, 9, 9, 9, 9]])
def test_any_split_into_calls_gives_the_same_result(chunks: list[int]):
    case = make_case(batch=3, kv_heads=1, group=2, grid=(3, 4), region=(2, 3), images=(2, 1, 0), generated=4,
                     top_k=2)
    check(case, chunks=chunks, region_tokens=6)


@pytest.mark.parametrize("top_k", [1, 4, 50])
def test_top_k_values(top_k: int):
    """top_k 50 >= R: every gaze query sees every key (dense)."""
    case = make_case(batch=2, kv_heads=2, group=2, images=(2, 2), generated=3, top_k=top_k)
    length = case.k.shape[2]
    check(case, chunks=[length - 3])


def test_ties_go_to_the_lower_region():
    """Regions with identical keys score the same; the lower index must win at the top_k boundary."""
    case = make_case(batch=1, kv_heads=2, group=2, grid=(4, 4), region=(2, 2), images=(1,), generated=3, top_k=1)
    region = case.k_region[0]
    # Every region gets the keys of region 0 (same tokens in the same order): all scores tie.
    first = np.flatnonzero(region == 0)
    for r in range(1, case.num_regions):
        case.k[0, :, np.flatnonzero(region == r)] = case.k[0, :, first]
    ref = gaze_attention_reference(case.q, case.k, case.v, **case.reference_kwargs())
    chosen = ref.selected[0, :, -1]  # [Hkv, R]
    assert chosen[:, 0].all() and chosen.sum() == chosen.shape[0], "reference picks region 0 on a tie"
    length = case.k.shape[2]
    out = run_in_chunks(case, [length - 3])
    assert rel_err(out, ref.out) < 1e-4
    # Picking another region (values differ) would show: the dense output differs clearly.
    dense = gaze_attention_reference(case.q, case.k, case.v, **{**case.reference_kwargs(), "top_k": 99})
    assert rel_err(dense.out, ref.out) > 1e-3


def test_onnx_topk_breaks_ties_to_the_lower_index():
    """The ONNX spec says so; check ONNX Runtime does it, since the function relies on it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    x = rng.integers(0, 3, size=(64, 200)).astype(np.float32)
    x[:, ::7] = -np.inf
    _, idx = sess.run(None, {"x": x, "k": np.array([37], dtype=np.int64)})
    expected = np.argsort(-x, axis=-1, kind="stable")[:, :37]
    np.testing.assert_array_equal(idx, expected)
