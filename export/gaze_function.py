"""The `gaze::GazeAttention` node: its schema and its FunctionProto body of standard ONNX ops.

The body implements ../shared/GAZE_SPEC.md with the choices of docs/ONNX_CONTRACT.md:
KV write at ``write_offset``, running fp32 descriptor sums, eligibility from the
runtime's slot metadata, region selection by TopK (ONNX TopK breaks ties to the lower
index, the spec's rule), and attention of gaze queries over the dense slots plus only
the gathered tokens of the selected regions (GatherND). All arithmetic is fp32 whatever
the cache dtype (fp32 softmax accumulation, as the spec asks of fp16 kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .node import DOMAIN, MIN_OPSET, OP_TYPE, OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = ["DOMAIN", "MIN_OPSET", "OP_TYPE", "OPSET_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_VERSION"]

IR_VERSION = 10  # ONNX Runtime 1.2x reads up to 10/11; TensorRT 10 parsers too

INPUTS = (
    "query",  # [B, Hq, T, D] rotary applied, cache dtype
    "key",  # [B, Hkv, T, D] new keys, rotary applied
    "value",  # [B, Hkv, T, D] new values
    "past_key",  # [B, Hkv, S, D]
    "past_value",  # [B, Hkv, S, D]
    "past_desc",  # [B, Hkv, R, D] float32 running sums of region keys
    "slot_pos",  # [B, S] int64 rotary position of each slot (new tokens included)
    "slot_region",  # [B, S] int64 region id, -1 dense
    "slot_valid",  # [B, S] bool (new tokens included)
    "gaze",  # [B, T] bool: the new token is a gaze query
    "write_offset",  # [1] int64: first slot written by this call
)
OUTPUTS = ("output", "present_key", "present_value", "present_desc")
INT_ATTRIBUTES = ("top_k", "max_region_tokens")
FLOAT_ATTRIBUTES = ("scale",)
STRING_ATTRIBUTES = ("plugin_namespace", "plugin_version")
NEG = -3.0e38  # finite "minus infinity" for masked logits (the body computes in fp32)


def op_schema() -> onnx.defs.OpSchema:
    """OpSchema of gaze::GazeAttention v1; every attribute required (exporters strip defaults)."""
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    formal = onnx.defs.OpSchema.FormalParameter
    inputs = [formal(name, "T" if i < 5 else ("TD" if name == "past_desc" else ("TB" if name in {
        "slot_valid", "gaze"} else "TI"))) for i, name in enumerate(INPUTS)]
    outputs = [formal("output", "T"), formal("present_key", "T"), formal("present_value", "T"),
               formal("present_desc", "TD")]
    return onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        doc="Gaze attention of one decoder layer: KV write, descriptor update, region selection, sparse attention.",
        inputs=inputs,
        outputs=outputs,
        type_constraints=[
            ("T", float_types, "activations and KV cache"),
            ("TD", ["tensor(float)"], "descriptor sums"),
            ("TI", ["tensor(int64)"], "layout metadata"),
            ("TB", ["tensor(bool)"], "flags"),
        ],
        attributes=[
            attr("top_k", kind.INT, "regions kept per gaze query and KV head", required=True),
            attr("max_region_tokens", kind.INT, "rh * rw: most tokens a region holds", required=True),
            attr("scale", kind.FLOAT, "softmax scale, 1/sqrt(D)", required=True),
            attr("plugin_namespace", kind.STRING, "TensorRT plugin namespace", required=True),
            attr("plugin_version", kind.STRING, "TensorRT plugin version", required=True),
        ],
    )


def register_schema() -> None:
    """Register the schema with onnx once (shape inference, checker and onnxscript know the op)."""
    try:
        onnx.defs.get_schema(OP_TYPE, OPSET_VERSION, DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(op_schema())


@dataclass
class _Body:
    """A tiny node builder: every call adds one node and returns its output name."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    count: int = 0

    def __call__(self, op: str, *inputs: str, **attrs: Any) -> str:
        return self.multi(op, *inputs, n_out=1, **attrs)[0]

    def multi(self, op: str, *inputs: str, n_out: int, **attrs: Any) -> list[str]:
        self.count += 1
        outs = [f"_{op.lower()}{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs

    def const(self, value: np.ndarray | np.generic | float | int) -> str:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.count += 1
        name = f"_const{self.count}"
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        return name

    def ref_attr(self, kind: str, attribute: str) -> str:
        """A Constant whose value is the calling node's attribute (value_int / value_float)."""
        self.count += 1
        name = f"_attr_{attribute}"
        attr = onnx.AttributeProto()
        attr.name = kind
        attr.ref_attr_name = attribute
        attr.type = onnx.AttributeProto.INT if kind == "value_int" else onnx.AttributeProto.FLOAT
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(attr)
        self.nodes.append(node)
        return name


def build_function(opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The FunctionProto `gaze.GazeAttention`; `opset` must equal the model's default-domain opset."""
    if opset < MIN_OPSET:
        raise ValueError(f"the GazeAttention body needs ONNX opset >= {MIN_OPSET}, got {opset}")
    n = _Body()
    f32 = TensorProto.FLOAT
    i64 = np.int64
    ax = {k: n.const(np.array(v, dtype=i64)) for k, v in {
        "0": [0], "1": [1], "2": [2], "3": [3], "m1": [-1], "1_3": [1, 3], "0_2": [0, 2], "big": [2**62]}.items()}

    q = n("Cast", "query", to=f32)
    k_new = n("Cast", "key", to=f32)
    scale = n.ref_attr("value_float", "scale")
    top_k = n("Reshape", n.ref_attr("value_int", "top_k"), ax["1"])
    max_tokens = n("Reshape", n.ref_attr("value_int", "max_region_tokens"), ax["1"])

    # Sizes: B and T from query, Hkv and S from the cache, R from the descriptors, D from query.
    q_shape = n("Shape", "query")
    batch = n("Shape", "query", start=0, end=1)
    q_len = n("Shape", "query", start=2, end=3)
    dim = n("Shape", "query", start=3, end=4)
    kv_heads = n("Shape", "past_key", start=1, end=2)
    slots = n("Shape", "past_key", start=2, end=3)
    regions = n("Shape", "past_desc", start=2, end=3)

    # 1. KV write: slots [write_offset, write_offset + T) take the new keys and values.
    end = n("Add", "write_offset", q_len)
    present = {}
    for cache, new in (("past_key", "key"), ("past_value", "value")):
        before = n("Slice", cache, ax["0"], "write_offset", ax["2"])
        after = n("Slice", cache, end, ax["big"], ax["2"])
        present[cache] = n("Concat", before, n("CastLike", new, cache), after, axis=2)
    n.nodes.append(helper.make_node("Identity", [present["past_key"]], ["present_key"]))
    n.nodes.append(helper.make_node("Identity", [present["past_value"]], ["present_value"]))

    # Metadata of the new tokens (their slots) and of all slots.
    q_pos = n("Slice", "slot_pos", "write_offset", end, ax["1"])  # [B, T]
    new_region = n("Slice", "slot_region", "write_offset", end, ax["1"])
    new_valid = n("Slice", "slot_valid", "write_offset", end, ax["1"])
    region_ids = n("Range", n.const(np.array(0, dtype=i64)), n("Squeeze", regions, ax["0"]),
                   n.const(np.array(1, dtype=i64)))  # [R]
    region_col = n("Unsqueeze", region_ids, ax["0_2"])  # [1, R, 1]

    # 2. Descriptor update: running fp32 sums of the new valid keys per region.
    onehot_new = n("And", n("Equal", n("Unsqueeze", new_region, ax["1"]), region_col),
                   n("Unsqueeze", new_valid, ax["1"]))  # [B, R, T]
    desc_add = n("MatMul", n("Unsqueeze", n("Cast", onehot_new, to=f32), ax["1"]), k_new)  # [B, Hkv, R, D]
    n.nodes.append(helper.make_node("Add", ["past_desc", desc_add], ["present_desc"]))

    # Region statistics over every slot: token count and last position (eligibility).
    onehot = n("And", n("Equal", n("Unsqueeze", "slot_region", ax["1"]), region_col),
               n("Unsqueeze", "slot_valid", ax["1"]))  # [B, R, S]
    count = n("ReduceSum", n("Cast", onehot, to=f32), ax["m1"], keepdims=0)  # [B, R]
    last = n("ReduceMax", n("Where", onehot, n("Unsqueeze", "slot_pos", ax["1"]), n.const(np.array(-1, dtype=i64))),
             ax["m1"], keepdims=0)  # [B, R]
    desc = n("Div", "present_desc", n("Unsqueeze", n("Max", count, n.const(1.0)), ax["1_3"]))  # means

    # 3. Selection: score[h, r] = max over the group's heads of q . d, eligible regions only.
    q5 = n("Reshape", q, n("Concat", batch, kv_heads, ax["m1"], q_len, dim, axis=0))  # [B, Hkv, G, T, D]
    desc_t = n("Unsqueeze", n("Transpose", desc, perm=[0, 1, 3, 2]), ax["2"])  # [B, Hkv, 1, D, R]
    scores = n("ReduceMax", n("MatMul", q5, desc_t), ax["2"], keepdims=0)  # [B, Hkv, T, R]
    gaze_q = n("And", "gaze", new_valid)  # [B, T]
    eligible = n("And", n("Unsqueeze", n("Greater", count, n.const(0.0)), ax["1"]),
                 n("Less", n("Unsqueeze", last, ax["1"]), n("Unsqueeze", q_pos, ax["2"])))  # [B, T, R]
    eligible = n("Unsqueeze", n("And", eligible, n("Unsqueeze", gaze_q, ax["2"])), ax["1"])  # [B, 1, T, R]
    masked = n("Where", eligible, scores, n.const(np.float32(-np.inf)))
    k = n("Min", top_k, regions)
    top_vals, selected = n.multi("TopK", masked, k, axis=-1, largest=1, sorted=1, n_out=2)  # [B, Hkv, T, k]
    selected_ok = n("Not", n("IsInf", top_vals, detect_positive=0))

    # Member slots of each region [B, R, M] in ascending slot order (storage order is free).
    slot_ids = n("Range", n.const(np.array(0, dtype=i64)), n("Squeeze", slots, ax["0"]),
                 n.const(np.array(1, dtype=i64)))
    member_key = n("Mul", n("Cast", onehot, to=TensorProto.INT64), n("Sub", slots, slot_ids))  # [B, R, S]
    m = n("Min", max_tokens, slots)
    member_vals, member_slots = n.multi("TopK", member_key, m, axis=-1, largest=1, sorted=1, n_out=2)
    member_ok = n("Greater", member_vals, n.const(np.array(0, dtype=i64)))

    # 4. Gather only the selected regions' tokens: [B, Hkv, T, k * M].
    sel_flat = n("Reshape", selected, n("Concat", batch, ax["m1"], ax["1"], axis=0))  # [B, Hkv*T*k, 1]
    g_slots = n("GatherND", member_slots, sel_flat, batch_dims=1)  # [B, Hkv*T*k, M]
    g_ok = n("GatherND", member_ok, sel_flat, batch_dims=1)
    g_index = n("Reshape", g_slots, n("Concat", batch, kv_heads, ax["m1"], ax["1"], axis=0))
    gathered_shape = n("Concat", batch, kv_heads, q_len, ax["m1"], dim, axis=0)
    k_all = n("Cast", "present_key", to=f32)
    v_all = n("Cast", "present_value", to=f32)
    k_sel = n("Reshape", n("GatherND", k_all, g_index, batch_dims=2), gathered_shape)  # [B, Hkv, T, n, D]
    v_sel = n("Reshape", n("GatherND", v_all, g_index, batch_dims=2), gathered_shape)
    g_ok = n("Reshape", g_ok, n("Concat", batch, kv_heads, q_len, k, m, axis=0))  # [B, Hkv, T, k, M]
    ok_sel = n("And", g_ok, n("Unsqueeze", selected_ok, ax["m1"]))
    ok_sel = n("Reshape", ok_sel, n("Concat", batch, kv_heads, q_len, ax["m1"], axis=0))  # [B, Hkv, T, n]
    mask_sel = n("Unsqueeze", ok_sel, ax["3"])  # [B, Hkv, T, 1, n]

    # 5. Attention. Dense part over the cache slots (causal; gaze queries skip visual slots),
    # selected part over the gathered tokens; one softmax over both.
    q_t = n("Transpose", q5, perm=[0, 1, 3, 2, 4])  # [B, Hkv, T, G, D]
    logits_sel = n("Mul", n("MatMul", q_t, n("Transpose", k_sel, perm=[0, 1, 2, 4, 3])), scale)  # [B,Hkv,T,G,n]
    k_t = n("Unsqueeze", n("Transpose", k_all, perm=[0, 1, 3, 2]), ax["2"])  # [B, Hkv, 1, D, S]
    logits_dense = n("Mul", n("MatMul", q_t, k_t), scale)  # [B, Hkv, T, G, S]
    causal = n("And", n("Unsqueeze", "slot_valid", ax["1"]),
               n("LessOrEqual", n("Unsqueeze", "slot_pos", ax["1"]), n("Unsqueeze", q_pos, ax["2"])))  # [B, T, S]
    is_dense = n("Unsqueeze", n("Less", "slot_region", n.const(np.array(0, dtype=i64))), ax["1"])  # [B, 1, S]
    mask_dense = n("And", causal, n("Or", is_dense, n("Not", n("Unsqueeze", gaze_q, ax["2"]))))
    mask_dense = n("Unsqueeze", mask_dense, n.const(np.array([1, 3], dtype=i64)))  # [B, 1, T, 1, S]

    neg = n.const(np.float32(NEG))
    ld = n("Where", mask_dense, logits_dense, neg)
    ls = n("Where", mask_sel, logits_sel, neg)
    peak = n("Max", n("ReduceMax", ld, ax["m1"], keepdims=1), n("ReduceMax", ls, ax["m1"], keepdims=1))
    wd = n("Mul", n("Exp", n("Sub", ld, peak)), n("Cast", mask_dense, to=f32))
    ws = n("Mul", n("Exp", n("Sub", ls, peak)), n("Cast", mask_sel, to=f32))
    denom = n("Add", n("ReduceSum", wd, ax["m1"], keepdims=1), n("ReduceSum", ws, ax["m1"], keepdims=1))
    out_dense = n("MatMul", wd, n("Unsqueeze", v_all, ax["2"]))  # [B, Hkv, T, G, D]
    out_sel = n("MatMul", ws, v_sel)  # [B, Hkv, T, G, D]
    # A query with no visible key (padding) has denom 0 and outputs zeros.
    out = n("Div", n("Add", out_dense, out_sel), n("Max", denom, n.const(1e-30)))
    out = n("Reshape", n("Transpose", out, perm=[0, 1, 3, 2, 4]), q_shape)  # [B, Hq, T, D]
    n.nodes.append(helper.make_node("CastLike", [out, "query"], ["output"]))

    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(INPUTS),
        list(OUTPUTS),
        n.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[*INT_ATTRIBUTES, *FLOAT_ATTRIBUTES, *STRING_ATTRIBUTES],
    )


def make_node(
    inputs: list[str],
    outputs: list[str],
    *,
    top_k: int,
    max_region_tokens: int,
    scale: float,
    name: str | None = None,
    plugin_namespace: str = PLUGIN_NAMESPACE,
    plugin_version: str = PLUGIN_VERSION,
) -> onnx.NodeProto:
    """A GazeAttention node with every attribute set explicitly."""
    return helper.make_node(
        OP_TYPE,
        inputs,
        outputs,
        name=name,
        domain=DOMAIN,
        top_k=int(top_k),
        max_region_tokens=int(max_region_tokens),
        scale=float(scale),
        plugin_namespace=plugin_namespace,
        plugin_version=plugin_version,
    )


def single_node_model(
    *,
    top_k: int,
    max_region_tokens: int,
    scale: float,
    dtype: int = TensorProto.FLOAT,
    opset: int = MIN_OPSET,
) -> onnx.ModelProto:
    """A model of one GazeAttention node plus its function (tests run it in ONNX Runtime)."""
    types = {
        "query": dtype, "key": dtype, "value": dtype, "past_key": dtype, "past_value": dtype,
        "past_desc": TensorProto.FLOAT, "slot_pos": TensorProto.INT64, "slot_region": TensorProto.INT64,
        "slot_valid": TensorProto.BOOL, "gaze": TensorProto.BOOL, "write_offset": TensorProto.INT64,
    }
    shapes: dict[str, list[str | int | None]] = {
        "query": ["B", "Hq", "T", "D"], "key": ["B", "Hkv", "T", "D"], "value": ["B", "Hkv", "T", "D"],
        "past_key": ["B", "Hkv", "S", "D"], "past_value": ["B", "Hkv", "S", "D"], "past_desc": ["B", "Hkv", "R", "D"],
        "slot_pos": ["B", "S"], "slot_region": ["B", "S"], "slot_valid": ["B", "S"], "gaze": ["B", "T"],
        "write_offset": [1], "output": ["B", "Hq", "T", "D"], "present_key": ["B", "Hkv", "S", "D"],
        "present_value": ["B", "Hkv", "S", "D"], "present_desc": ["B", "Hkv", "R", "D"],
    }
    out_types = {"output": dtype, "present_key": dtype, "present_value": dtype, "present_desc": TensorProto.FLOAT}
    node = make_node(list(INPUTS), list(OUTPUTS), top_k=top_k, max_region_tokens=max_region_tokens, scale=scale)
    graph = helper.make_graph(
        [node],
        "gaze_attention",
        [helper.make_tensor_value_info(name, types[name], shapes[name]) for name in INPUTS],
        [helper.make_tensor_value_info(name, out_types[name], shapes[name]) for name in OUTPUTS],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=[build_function(opset)],
        ir_version=IR_VERSION,
    )
