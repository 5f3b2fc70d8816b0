"""The `gaze::GazeAttention` node (version 2): its schema and its FunctionProto body of standard ONNX ops.

The body implements docs/GAZE_SEMANTICS.md with the choices of docs/ONNX_CONTRACT.md and
reads only what it attends (the contract's cost rule):
- KV write and descriptor update with ScatterND at the new slots only (in place when the
  runtime binds present and past to one buffer);
- a call without gaze queries (prefill) runs causal attention over the written slots
  [0, write_offset + T) and never gathers a region; context tokens may be limited to their
  own image (`context_attention`);
- a call of gaze queries only (decode) reads the dense slots by index (the runtime's
  `dense_slots` list), scores the R descriptors (means = sums / `region_count`), picks the
  top-k eligible regions with TopK (ONNX TopK puts the lower index first among equals: the
  tie rule) per KV head or per query head (`routing`), and gathers only those regions'
  slots (`region_slots`);
- a call that mixes both computes both and picks per query.
All arithmetic is fp32 whatever the cache dtype (fp32 softmax accumulation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .node import (
    CONTEXT_ATTENTION,
    DOMAIN,
    MIN_OPSET,
    OP_TYPE,
    OPSET_VERSION,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    ROUTING,
)

__all__ = ["CONTEXT_ATTENTION", "DOMAIN", "MIN_OPSET", "OP_TYPE", "OPSET_VERSION", "PLUGIN_NAMESPACE",
           "PLUGIN_VERSION", "ROUTING"]

IR_VERSION = 10  # ONNX Runtime 1.2x reads up to 10/11; TensorRT 10 parsers too

INPUTS = (
    "query",  # [B, Hq, T, D] rotary applied, cache dtype
    "key",  # [B, Hkv, T, D] new keys, rotary applied
    "value",  # [B, Hkv, T, D] new values
    "past_key",  # [B, Hkv, S, D]
    "past_value",  # [B, Hkv, S, D]
    "past_desc",  # [B, Hkv, R, D] float32 running sums of region keys
    "write_offset",  # [1] int64: first slot written by this call
    "slot_pos",  # [B, S] int64 rotary position of each slot (new tokens included)
    "slot_valid",  # [B, S] bool (new tokens included)
    "slot_region",  # [B, S] int64 region id, -1 dense
    "slot_image",  # [B, S] int64 image/frame index of a visual or context token, -1 otherwise
    "gaze",  # [B, T] bool: the new token is a gaze query
    "dense_slots",  # [B, N] int64: the valid dense slots written so far (this call's included), -1 padding
    "region_slots",  # [B, R, M] int64: the slots of each region, -1 padding
    "region_count",  # [B, R] int64: valid tokens per region
    "region_last",  # [B, R] int64: largest position of a region's tokens (-1: empty)
)
OUTPUTS = ("output", "present_key", "present_value", "present_desc")
INT_ATTRIBUTES = ("top_k", "max_region_tokens", "routing", "context_attention")
FLOAT_ATTRIBUTES = ("scale",)
STRING_ATTRIBUTES = ("plugin_namespace", "plugin_version")
NEG = -3.0e38  # finite "minus infinity" for masked logits (the body computes in fp32)
_TYPES = {
    "query": "T", "key": "T", "value": "T", "past_key": "T", "past_value": "T", "past_desc": "TD",
    "slot_valid": "TB", "gaze": "TB",
}


def op_schema() -> onnx.defs.OpSchema:
    """OpSchema of gaze::GazeAttention v2; every attribute required (exporters strip defaults)."""
    attr = onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    formal = onnx.defs.OpSchema.FormalParameter
    inputs = [formal(name, _TYPES.get(name, "TI")) for name in INPUTS]
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
            ("TI", ["tensor(int64)"], "layout tables"),
            ("TB", ["tensor(bool)"], "flags"),
        ],
        attributes=[
            attr("top_k", kind.INT, "regions kept per gaze query and KV head (or query head)", required=True),
            attr("max_region_tokens", kind.INT, "rh * rw * rt: most tokens a region holds", required=True),
            attr("routing", kind.INT, "0: one selection per KV head (kv_head), 1: per query head", required=True),
            attr("context_attention", kind.INT, "0: context tokens causal, 1: only their own image", required=True),
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
    """A tiny node builder: every call adds one node and returns its output name.

    `branch` builds an If subgraph with a child builder that shares the name counter, so
    names stay unique across the whole function (subgraphs read outer names directly).
    """

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    counter: list[int] = field(default_factory=lambda: [0])
    consts: dict[str, str] = field(default_factory=dict)

    def _name(self, stem: str) -> str:
        self.counter[0] += 1
        return f"_{stem}{self.counter[0]}"

    def __call__(self, op: str, *inputs: str, **attrs: Any) -> str:
        return self.multi(op, *inputs, n_out=1, **attrs)[0]

    def multi(self, op: str, *inputs: str, n_out: int, **attrs: Any) -> list[str]:
        stem = self._name(op.lower())
        outs = [f"{stem}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs

    def const(self, value: np.ndarray | np.generic | float | int) -> str:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def ref_attr(self, kind: str, attribute: str) -> str:
        """A Constant whose value is the calling node's attribute (value_int / value_float)."""
        name = self._name(f"attr_{attribute}_")
        attr = onnx.AttributeProto()
        attr.name = kind
        attr.ref_attr_name = attribute
        attr.type = onnx.AttributeProto.INT if kind == "value_int" else onnx.AttributeProto.FLOAT
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(attr)
        self.nodes.append(node)
        return name

    def branch(self, emit: Callable[[_Body], str], result: str) -> onnx.GraphProto:
        """A subgraph whose one output, named `result`, is what `emit` computes."""
        child = _Body(counter=self.counter)
        value = emit(child)
        child.nodes.append(helper.make_node("Identity", [value], [result]))
        return helper.make_graph(child.nodes, self._name("branch"), [],
                                 [helper.make_tensor_value_info(result, TensorProto.FLOAT, None)])

    def if_(self, cond: str, then: Callable[[_Body], str], otherwise: Callable[[_Body], str]) -> str:
        out = self._name("if")
        self.nodes.append(helper.make_node("If", [cond], [out], then_branch=self.branch(then, out + "_then"),
                                           else_branch=self.branch(otherwise, out + "_else")))
        return out

    def masked_softmax_sum(self, parts: list[tuple[str, str, str]]) -> str:
        """One softmax over several key sets, each (logits [..., n], mask broadcastable to them, values [..., n, D]).

        Returns the jointly normalised weights times the values, summed over the sets [..., D]. Masked
        logits become a large negative number, so they get weight 0 as long as the query sees one key;
        every valid query sees at least itself, and a padding query's output is unspecified.
        """
        neg = self.const(np.float32(NEG))
        masked = [self("Where", mask, logits, neg) for logits, mask, _ in parts]
        sizes = [self("Shape", m, start=-1) for m in masked]
        weights = self.multi("Split", self("Softmax", self("Concat", *masked, axis=-1), axis=-1),
                             self("Concat", *sizes, axis=0), axis=-1, n_out=len(parts))
        total = ""
        for w, (_, _, values) in zip(weights, parts, strict=True):
            part_out = self("MatMul", w, values)
            total = part_out if not total else self("Add", total, part_out)
        return total


def _shape(n: _Body, tensor: str, start: int, end: int | None = None) -> str:
    return n("Shape", tensor, start=start, end=start + 1 if end is None else end)


def build_function(opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The FunctionProto `gaze.GazeAttention`; `opset` must equal the model's default-domain opset."""
    if opset < MIN_OPSET:
        raise ValueError(f"the GazeAttention body needs ONNX opset >= {MIN_OPSET}, got {opset}")
    n = _Body()
    f32 = TensorProto.FLOAT

    # Sizes: B and T from query, Hkv and S from the cache, R from the descriptors, D from query.
    batch, q_len, dim = _shape(n, "query", 0), _shape(n, "query", 2), _shape(n, "query", 3)
    kv_heads = _shape(n, "past_key", 1)
    regions = _shape(n, "past_desc", 2)
    q_shape = n("Shape", "query")
    scale = n.ref_attr("value_float", "scale")
    one = n.ints(1)

    # Metadata of the new tokens (slots [o, o + T)).
    end = n("Add", "write_offset", q_len)
    q_pos = n("Slice", "slot_pos", "write_offset", end, one)  # [B, T]
    new_valid = n("Slice", "slot_valid", "write_offset", end, one)
    new_region = n("Slice", "slot_region", "write_offset", end, one)
    new_image = n("Slice", "slot_image", "write_offset", end, one)
    gaze_q = n("And", "gaze", new_valid)  # [B, T]
    dense_q = n("And", new_valid, n("Not", "gaze"))

    # 1. KV write at the new slots only: ScatterND with indices (b, h, o + t).
    s0, s1 = n.const(np.int64(0)), n.const(np.int64(1))  # scalars for Range

    def arange(size: str) -> str:
        return n("Range", s0, n("Squeeze", size), s1)

    def grid_index(last: str) -> str:
        """[B, Hkv, T, 3] indices (b, h, last[b, t]) for a [B, T] int64 `last`."""
        bht = n("Concat", batch, kv_heads, q_len, axis=0)
        b_ids = n("Expand", n("Unsqueeze", arange(batch), n.ints(1, 2)), bht)
        h_ids = n("Expand", n("Unsqueeze", arange(kv_heads), n.ints(0, 2)), bht)
        l_ids = n("Expand", n("Unsqueeze", last, one), bht)
        return n("Concat", *(n("Unsqueeze", x, n.ints(-1)) for x in (b_ids, h_ids, l_ids)), axis=-1)

    new_slots = n("Expand", n("Add", arange(q_len), "write_offset"), n("Concat", batch, q_len, axis=0))  # [B, T]
    kv_index = grid_index(new_slots)
    n.nodes.append(helper.make_node("ScatterND", ["past_key", kv_index, n("CastLike", "key", "past_key")],
                                    ["present_key"]))
    n.nodes.append(helper.make_node("ScatterND", ["past_value", kv_index, n("CastLike", "value", "past_value")],
                                    ["present_value"]))

    # 2. Descriptor sums: each new valid visual key is added to its region's row (dense tokens add zeros to
    # row 0, which leaves it bit-identical), so a region fed over several calls accumulates.
    visual_new = n("And", new_valid, n("GreaterOrEqual", new_region, n.ints(0)))  # [B, T]
    desc_index = grid_index(n("Max", new_region, n.ints(0)))
    desc_add = n("Mul", n("Cast", "key", to=f32), n("Unsqueeze", n("Cast", visual_new, to=f32), n.ints(1, 3)))
    n.nodes.append(helper.make_node("ScatterND", ["past_desc", desc_index, desc_add], ["present_desc"],
                                    reduction="add"))

    q = n("Cast", "query", to=f32)
    q5 = n("Reshape", q, n("Concat", batch, kv_heads, n.ints(-1), q_len, dim, axis=0))  # [B, Hkv, G, T, D]
    q4 = n("Reshape", q, n("Concat", batch, kv_heads, n.ints(-1), dim, axis=0))  # [B, Hkv, G*T, D]

    def scores(b: _Body, keys: str) -> str:
        """q . k for every query head of a group against shared keys [B, Hkv, L, D] -> [B, Hkv, G, T, L].

        One [G*T, D] x [D, L] product per KV head: the keys are read once for the whole group (a
        broadcast [B, Hkv, G, T, D] x [B, Hkv, 1, D, L] product would read them G times).
        """
        product = b("MatMul", q4, b("Transpose", keys, perm=[0, 1, 3, 2]))  # [B, Hkv, G*T, L]
        return b("Reshape", product, b("Concat", batch, kv_heads, b.ints(-1), q_len,
                                       b("Shape", keys, start=2, end=3), axis=0))

    def group_values(b: _Body, weights: str, values: str) -> str:
        """weights [B, Hkv, G, T, L] x shared values [B, Hkv, L, D] -> [B, Hq, T, D], values read once."""
        flat = b("Reshape", weights, b("Concat", batch, kv_heads, b.ints(-1), b("Shape", values, start=2, end=3),
                                       axis=0))
        return b("Reshape", b("MatMul", flat, values), q_shape)

    def dense_path(b: _Body) -> str:
        """Causal attention over the written slots [0, o + T); context tokens optionally only their own image."""
        keys = b("Cast", b("Slice", "present_key", b.ints(0), end, b.ints(2)), to=f32)  # [B, Hkv, L, D]
        values = b("Cast", b("Slice", "present_value", b.ints(0), end, b.ints(2)), to=f32)
        pos = b("Slice", "slot_pos", b.ints(0), end, b.ints(1))  # [B, L]
        valid = b("Slice", "slot_valid", b.ints(0), end, b.ints(1))
        image = b("Slice", "slot_image", b.ints(0), end, b.ints(1))
        causal = b("And", b("Unsqueeze", valid, b.ints(1)),
                   b("LessOrEqual", b("Unsqueeze", pos, b.ints(1)), b("Unsqueeze", q_pos, b.ints(2))))  # [B, T, L]
        own = b("Equal", b.ref_attr("value_int", "context_attention"),
                b.const(np.int64(CONTEXT_ATTENTION["own_image"])))
        is_context = b("And", b("GreaterOrEqual", new_image, b.ints(0)), b("Less", new_region, b.ints(0)))
        context_q = b("And", own, is_context)  # [B, T] queries limited to their own image
        same_image = b("Equal", b("Unsqueeze", image, b.ints(1)), b("Unsqueeze", new_image, b.ints(2)))  # [B, T, L]
        mask = b("And", causal, b("Or", b("Not", b("Unsqueeze", context_q, b.ints(2))), same_image))
        logits = b("Mul", scores(b, keys), scale)  # [B, Hkv, G, T, L]
        # Every valid query sees at least itself, so the masked softmax is one fused Softmax.
        weights = b("Softmax", b("Where", b("Unsqueeze", mask, b.ints(1, 2)), logits, b.const(np.float32(NEG))),
                    axis=-1)
        return group_values(b, weights, values)

    def gaze_path(b: _Body) -> str:
        """Dense slots by index + the top-k regions' slots by index; never a full-width product."""
        dense_ok = b("GreaterOrEqual", "dense_slots", b.ints(0))  # [B, N]
        dense_idx = b("Max", "dense_slots", b.ints(0))
        dense_pos = b("GatherElements", "slot_pos", dense_idx, axis=1)
        dense_mask = b("And", b("Unsqueeze", dense_ok, b.ints(1)),
                       b("LessOrEqual", b("Unsqueeze", dense_pos, b.ints(1)), b("Unsqueeze", q_pos, b.ints(2))))
        n_dense = b("Shape", "dense_slots", start=1, end=2)
        gather_dense = b("Expand", b("Unsqueeze", dense_idx, b.ints(1, 3)),
                         b("Concat", batch, kv_heads, n_dense, b.ints(1), axis=0))  # [B, Hkv, N, 1]
        k_dense = b("Cast", b("GatherND", "present_key", gather_dense, batch_dims=2), to=f32)  # [B, Hkv, N, D]
        v_dense = b("Cast", b("GatherND", "present_value", gather_dense, batch_dims=2), to=f32)
        logits_dense = b("Mul", scores(b, k_dense), scale)  # [B, Hkv, G, T, N]

        # Selection: means = sums / counts; eligible: holds a token, all before the query.
        count = "region_count"
        means = b("Div", "present_desc", b("Unsqueeze", b("Cast", b("Max", count, b.ints(1)), to=f32), b.ints(1, 3)))
        eligible = b("And", b("Unsqueeze", b("Greater", count, b.ints(0)), b.ints(1)),
                     b("Less", b("Unsqueeze", "region_last", b.ints(1)), b("Unsqueeze", q_pos, b.ints(2))))
        eligible = b("And", eligible, b("Unsqueeze", gaze_q, b.ints(2)))  # [B, T, R]
        raw = scores(b, means)  # [B, Hkv, G, T, R]
        top_k = b("Min", b("Reshape", b.ref_attr("value_int", "top_k"), b.ints(1)), regions)

        def region_keys(c: _Body, selected: str, ok: str, per: str) -> tuple[str, str, str]:
            """Keys, values and mask of the selected regions' slots: [..., k * M, D] grouped by `per` rows."""
            flat = c("Reshape", selected, c("Concat", batch, c.ints(-1, 1), axis=0))  # [B, X, 1]
            slots = c("GatherND", "region_slots", flat, batch_dims=1)  # [B, X, M]
            slot_ok = c("And", c("GreaterOrEqual", slots, c.ints(0)), c("Unsqueeze", c("Reshape", ok, c(
                "Concat", batch, c.ints(-1), axis=0)), c.ints(-1)))  # [B, X, M]
            index = c("Reshape", c("Max", slots, c.ints(0)), c("Concat", batch, kv_heads, c.ints(-1, 1), axis=0))
            shape = c("Concat", batch, kv_heads, per, c.ints(-1), dim, axis=0)
            k_sel = c("Reshape", c("Cast", c("GatherND", "present_key", index, batch_dims=2), to=f32), shape)
            v_sel = c("Reshape", c("Cast", c("GatherND", "present_value", index, batch_dims=2), to=f32), shape)
            mask = c("Reshape", slot_ok, c("Concat", batch, kv_heads, per, c.ints(-1), axis=0))
            return k_sel, v_sel, mask

        def kv_head(c: _Body) -> str:
            """One selection per KV head (max over its query heads), shared by the group: one read serves G."""
            scores = c("ReduceMax", raw, c.ints(2), keepdims=0)  # [B, Hkv, T, R]
            masked = c("Where", c("Unsqueeze", eligible, c.ints(1)), scores, c.const(np.float32(-np.inf)))
            vals, selected = c.multi("TopK", masked, top_k, axis=-1, largest=1, sorted=1, n_out=2)  # [B,Hkv,T,k]
            ok = c("Not", c("IsInf", vals, detect_positive=0))
            k_sel, v_sel, mask = region_keys(c, selected, ok, q_len)  # [B, Hkv, T, n, D], mask [B, Hkv, T, n]
            q_t = c("Transpose", q5, perm=[0, 1, 3, 2, 4])  # [B, Hkv, T, G, D]
            logits_sel = c("Mul", c("MatMul", q_t, c("Transpose", k_sel, perm=[0, 1, 2, 4, 3])), scale)
            out = c.masked_softmax_sum([
                (c("Transpose", logits_dense, perm=[0, 1, 3, 2, 4]),
                 c("Unsqueeze", c("Unsqueeze", dense_mask, c.ints(1)), c.ints(3)), c("Unsqueeze", v_dense, c.ints(2))),
                (logits_sel, c("Unsqueeze", mask, c.ints(3)), v_sel),
            ])  # [B, Hkv, T, G, D]
            return c("Reshape", c("Transpose", out, perm=[0, 1, 3, 2, 4]), q_shape)

        def query_head(c: _Body) -> str:
            """Each query head its own selection (and its own gather)."""
            masked = c("Where", c("Unsqueeze", eligible, c.ints(1, 2)), raw, c.const(np.float32(-np.inf)))
            vals, selected = c.multi("TopK", masked, top_k, axis=-1, largest=1, sorted=1, n_out=2)  # [B,Hkv,G,T,k]
            ok = c("Not", c("IsInf", vals, detect_positive=0))
            rows = c("Mul", c("Shape", q5, start=2, end=3), q_len)  # G * T
            k_sel, v_sel, mask = region_keys(c, selected, ok, rows)  # [B, Hkv, G*T, n, D]
            q_rows = c("Reshape", q5, c("Concat", batch, kv_heads, rows, c.ints(1), dim, axis=0))  # [B,Hkv,GT,1,D]
            logits_sel = c("Mul", c("MatMul", q_rows, c("Transpose", k_sel, perm=[0, 1, 2, 4, 3])), scale)
            rows_shape = c("Concat", batch, kv_heads, rows, c.ints(1, -1), axis=0)
            dense_rows = c("Reshape", logits_dense, rows_shape)  # [B, Hkv, GT, 1, N]
            dense_mask_rows = c("Unsqueeze", c("Unsqueeze", dense_mask, c.ints(1)), c.ints(1))  # [B,1,1,T,N]
            dense_mask_rows = c("Reshape", c("Expand", dense_mask_rows, c("Shape", logits_dense)), rows_shape)
            out = c.masked_softmax_sum([
                (dense_rows, dense_mask_rows, c("Unsqueeze", v_dense, c.ints(2))),
                (logits_sel, c("Unsqueeze", mask, c.ints(3)), v_sel),
            ])  # [B, Hkv, GT, 1, D]
            return c("Reshape", out, q_shape)

        per_query_head = b("Equal", b.ref_attr("value_int", "routing"), b.const(np.int64(ROUTING["query_head"])))
        return b.if_(per_query_head, query_head, kv_head)

    def mixed(b: _Body) -> str:
        return b("Where", b("Unsqueeze", gaze_q, b.ints(1, 3)), gaze_path(b), dense_path(b))

    any_gaze = n("Cast", n("ReduceMax", n("Cast", gaze_q, to=TensorProto.INT32), keepdims=0), to=TensorProto.BOOL)
    any_dense = n("Cast", n("ReduceMax", n("Cast", dense_q, to=TensorProto.INT32), keepdims=0), to=TensorProto.BOOL)
    out = n.if_(n("Not", any_gaze), dense_path,
                lambda b: b.if_(b("Not", any_dense), gaze_path, mixed))
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
    routing: str = "kv_head",
    context_attention: str = "causal",
    name: str | None = None,
    plugin_namespace: str = PLUGIN_NAMESPACE,
    plugin_version: str = PLUGIN_VERSION,
) -> onnx.NodeProto:
    """A GazeAttention node with every attribute set explicitly (routing/context_attention by config name)."""
    if routing not in ROUTING or context_attention not in CONTEXT_ATTENTION:
        raise ValueError(f"routing {routing!r} / context_attention {context_attention!r}: expected one of "
                         f"{sorted(ROUTING)} / {sorted(CONTEXT_ATTENTION)}")
    return helper.make_node(
        OP_TYPE,
        inputs,
        outputs,
        name=name,
        domain=DOMAIN,
        top_k=int(top_k),
        max_region_tokens=int(max_region_tokens),
        routing=ROUTING[routing],
        context_attention=CONTEXT_ATTENTION[context_attention],
        scale=float(scale),
        plugin_namespace=plugin_namespace,
        plugin_version=plugin_version,
    )


INPUT_SHAPES: dict[str, list[str | int | None]] = {
    "query": ["B", "Hq", "T", "D"], "key": ["B", "Hkv", "T", "D"], "value": ["B", "Hkv", "T", "D"],
    "past_key": ["B", "Hkv", "S", "D"], "past_value": ["B", "Hkv", "S", "D"], "past_desc": ["B", "Hkv", "R", "D"],
    "write_offset": [1], "slot_pos": ["B", "S"], "slot_valid": ["B", "S"], "slot_region": ["B", "S"],
    "slot_image": ["B", "S"], "gaze": ["B", "T"], "dense_slots": ["B", "N"], "region_slots": ["B", "R", "M"],
    "region_count": ["B", "R"], "region_last": ["B", "R"],
}


def single_node_model(
    *,
    top_k: int,
    max_region_tokens: int,
    scale: float,
    routing: str = "kv_head",
    context_attention: str = "causal",
    dtype: int = TensorProto.FLOAT,
    opset: int = MIN_OPSET,
) -> onnx.ModelProto:
    """A model of one GazeAttention node plus its function (tests run it in ONNX Runtime)."""
    kinds = {"T": dtype, "TD": TensorProto.FLOAT, "TB": TensorProto.BOOL, "TI": TensorProto.INT64}
    out_shapes = {"output": INPUT_SHAPES["query"], "present_key": INPUT_SHAPES["past_key"],
                  "present_value": INPUT_SHAPES["past_value"], "present_desc": INPUT_SHAPES["past_desc"]}
    out_types = {"output": dtype, "present_key": dtype, "present_value": dtype, "present_desc": TensorProto.FLOAT}
    node = make_node(list(INPUTS), list(OUTPUTS), top_k=top_k, max_region_tokens=max_region_tokens, scale=scale,
                     routing=routing, context_attention=context_attention)
    graph = helper.make_graph(
        [node],
        "gaze_attention",
        [helper.make_tensor_value_info(name, kinds[_TYPES.get(name, "TI")], INPUT_SHAPES[name]) for name in INPUTS],
        [helper.make_tensor_value_info(name, out_types[name], out_shapes[name]) for name in OUTPUTS],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=[build_function(opset)],
        ir_version=IR_VERSION,
    )
