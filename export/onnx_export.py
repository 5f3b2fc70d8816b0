"""PyTorch model -> ONNX graphs: the decoder (one graph, prefill and decode) and the vision encoder.

The decoder's attention is the torch custom op ``gaze::attention``; the dynamo exporter
translates it (custom_translation_table) to one ``gaze::GazeAttention`` node per layer,
and the FunctionProto of export/gaze_function.py is appended to the model afterwards.
Inputs, outputs and layouts: docs/ONNX_CONTRACT.md.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from gaze_edge.model.gaze_op import KeyLayout, gaze_attention
from gaze_edge.model.modeling import GazeForConditionalGeneration

from . import gaze_function as gf
from .node import DECODER_CALL_INPUTS, TOP_K_METADATA, max_region_tokens

# The exporter logs one warning per torchvision op it cannot register; we use none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

# ------------------------------------------------------------------- the custom op


@torch.library.custom_op("gaze::attention", mutates_args=())
def gaze_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_desc: torch.Tensor,
    write_offset: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_valid: torch.Tensor,
    slot_region: torch.Tensor,
    slot_image: torch.Tensor,
    gaze: torch.Tensor,
    dense_slots: torch.Tensor,
    region_slots: torch.Tensor,
    region_count: torch.Tensor,
    region_last: torch.Tensor,
    top_k: int,
    max_region_tokens: int,
    routing: int,
    context_attention: int,
    scale: float,
    plugin_namespace: str,
    plugin_version: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GazeAttention node semantics in PyTorch (KV write, descriptor sums, model/gaze_op attention).

    Computed from the per-slot metadata alone: the runtime's derived tables (dense_slots, region_*)
    are not used here, so an ONNX Runtime run of the function body, which reads only those
    tables, checks the tables and the body together against this.
    """
    offset = int(write_offset.reshape(-1)[0])
    length = query.shape[2]
    new = slice(offset, offset + length)
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, new] = key.to(past_key.dtype)
    present_value[:, :, new] = value.to(past_value.dtype)
    num_regions = past_desc.shape[2]
    regions = torch.arange(num_regions, device=query.device)
    new_valid = slot_valid[:, new]
    onehot = (slot_region[:, None, new] == regions[None, :, None]) & new_valid[:, None, :]
    present_desc = past_desc + torch.einsum("brt,bhtd->bhrd", onehot.float(), key.float())
    keys = KeyLayout(slot_pos, slot_region, slot_valid, num_regions, image=slot_image)
    new_region, new_image = slot_region[:, new], slot_image[:, new]
    context_image = torch.where((new_region < 0) & (new_image >= 0), new_image, torch.full_like(new_image, -1))
    # gaze_attention recomputes the region means from the cache: the same values as the sums / counts.
    result = gaze_attention(query, present_key, present_value, slot_pos[:, new], gaze & new_valid, keys, top_k,
                            q_context_image=context_image, routing=_name(gf.ROUTING, routing),
                            context_attention=_name(gf.CONTEXT_ATTENTION, context_attention))
    if abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"scale {scale} differs from 1/sqrt(head_dim); the PyTorch model has no other")
    return result.out.to(query.dtype).contiguous(), present_key, present_value, present_desc


def _name(table: dict[str, int], value: int) -> str:
    return next(name for name, v in table.items() if v == value)


@gaze_attention_op.register_fake
def _(query, key, value, past_key, past_value, past_desc, *args):
    return (torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value),
            torch.empty_like(past_desc))


def _make_translation() -> Any:
    """The onnxscript function that turns ``gaze::attention`` into a ``gaze::GazeAttention`` node."""
    from onnxscript.values import Opset

    gf.register_schema()
    gaze_opset = Opset(gf.DOMAIN, gf.OPSET_VERSION)

    def gaze_attention_translation(
        query, key, value, past_key, past_value, past_desc, write_offset, slot_pos, slot_valid, slot_region,
        slot_image, gaze, dense_slots, region_slots, region_count, region_last,
        top_k: int, max_region_tokens: int, routing: int, context_attention: int, scale: float,
        plugin_namespace: str, plugin_version: str,
    ):
        return gaze_opset.GazeAttention(
            query, key, value, past_key, past_value, past_desc, write_offset, slot_pos, slot_valid, slot_region,
            slot_image, gaze, dense_slots, region_slots, region_count, region_last,
            top_k=top_k, max_region_tokens=max_region_tokens, routing=routing, context_attention=context_attention,
            scale=scale, plugin_namespace=plugin_namespace, plugin_version=plugin_version, _outputs=4,
        )

    return gaze_attention_translation


# --------------------------------------------------------------- export modules


@dataclass(frozen=True)
class DecoderSpec:
    """Names and sizes of the decoder graph's cache tensors (docs/ONNX_CONTRACT.md)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    num_regions: int  # R: max_images * regions_per_image (frames: per group of region_frames)
    max_region_tokens: int  # M = rh * rw * rt

    @staticmethod
    def past_names(layer: int) -> list[str]:
        return [f"past_key_values.{layer}.{kind}" for kind in ("key", "value", "desc")]

    @staticmethod
    def present_names(layer: int) -> list[str]:
        return [f"present.{layer}.{kind}" for kind in ("key", "value", "desc")]

    def input_names(self) -> list[str]:
        names = list(DECODER_CALL_INPUTS)
        for layer in range(self.num_layers):
            names += self.past_names(layer)
        return names

    def output_names(self, gaze_query_outputs: bool = False) -> list[str]:
        names = ["logits"]
        for layer in range(self.num_layers):
            names += self.present_names(layer)
        if gaze_query_outputs:
            names += [f"gaze_query.{layer}" for layer in range(self.num_layers)]
        return names


class GazeDecoderForExport(nn.Module):
    """The decoder of a GazeForConditionalGeneration over a static cache, as the ONNX graph computes it."""

    def __init__(self, model: GazeForConditionalGeneration, plugin_namespace: str, plugin_version: str,
                 gaze_query_outputs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.plugin_namespace = plugin_namespace
        self.plugin_version = plugin_version
        # Optional extra outputs (after all presents): each layer's rotated queries [B, Hq, T, D], from
        # which the runtime re-runs the selection rule for gaze maps; the GazeAttention node is unchanged.
        self.gaze_query_outputs = gaze_query_outputs

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        logits_positions: torch.Tensor,
        write_offset: torch.Tensor,
        slot_pos: torch.Tensor,
        slot_valid: torch.Tensor,
        slot_region: torch.Tensor,
        slot_image: torch.Tensor,
        gaze: torch.Tensor,
        dense_slots: torch.Tensor,
        region_slots: torch.Tensor,
        region_count: torch.Tensor,
        region_last: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        config = self.model.config
        batch, length, _ = inputs_embeds.shape
        slots = write_offset + torch.arange(length, device=inputs_embeds.device)
        q_pos = slot_pos.index_select(1, slots)  # [B, T] rotary positions of the new tokens
        tables = (write_offset, slot_pos, slot_valid, slot_region, slot_image, gaze, dense_slots, region_slots,
                  region_count, region_last)
        routing = gf.ROUTING[config.routing]
        context_attention = gf.CONTEXT_ATTENTION[config.context_attention]
        x = inputs_embeds
        presents: list[torch.Tensor] = []
        queries: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            # The model's own projections (q/k/v, Qwen3's q/k norm, rotary) and MLP: nothing re-implemented.
            q, k, v = attn.project(layer.input_layernorm(x), q_pos)
            out, present_key, present_value, present_desc = torch.ops.gaze.attention(
                q, k, v, past[3 * i], past[3 * i + 1], past[3 * i + 2], *tables,
                config.layer_top_k(i), max_region_tokens(config), routing, context_attention,
                attn.head_dim**-0.5, self.plugin_namespace, self.plugin_version,
            )
            presents += [present_key, present_value, present_desc]
            queries.append(q)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        # Only the positions asked for reach the final norm and lm_head (prefill: the last one).
        logits = self.model.lm_head(self.model.norm(x.index_select(1, logits_positions)))
        return (logits, *presents, *(queries if self.gaze_query_outputs else []))


class VisionForExport(nn.Module):
    """pixel_values [N, 3, H, W] -> projected visual embeddings [N, tokens_per_image, hidden]."""

    def __init__(self, model: GazeForConditionalGeneration) -> None:
        super().__init__()
        self.vision = model.vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)


# --------------------------------------------------------------------- exporting


def decoder_spec(model: GazeForConditionalGeneration, max_images: int) -> DecoderSpec:
    config = model.config
    return DecoderSpec(
        num_layers=config.num_hidden_layers,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        num_regions=max_images * config.regions_per_image,
        max_region_tokens=max_region_tokens(config),
    )


def dummy_decoder_inputs(
    model: GazeForConditionalGeneration, spec: DecoderSpec, batch: int = 2, length: int = 3, slots: int = 11,
) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: every dynamic size >= 2 and all different, so none is specialised."""
    config = model.config
    dtype = next(model.parameters()).dtype
    regions = max(spec.num_regions, 1)
    rmap = torch.arange(slots) % regions - 1  # some dense (-1), some visual slots
    dense = 5  # N: every dynamic size distinct and >= 2
    inputs: list[torch.Tensor] = [
        torch.randn(batch, length, config.hidden_size, dtype=dtype),
        torch.tensor([length - 1, 0, 1, length - 1], dtype=torch.int64),  # logits_positions (4: distinct size)
        torch.tensor([slots - length - 1], dtype=torch.int64),
        torch.arange(slots).repeat(batch, 1),
        torch.ones(batch, slots, dtype=torch.bool),
        rmap.repeat(batch, 1),
        torch.where(rmap >= 0, 0, -1).repeat(batch, 1),
        torch.ones(batch, length, dtype=torch.bool),
        torch.arange(dense).repeat(batch, 1),
        torch.full((batch, regions, spec.max_region_tokens), -1, dtype=torch.int64),
        torch.zeros(batch, regions, dtype=torch.int64),
        torch.full((batch, regions), -1, dtype=torch.int64),
    ]
    for _ in range(spec.num_layers):
        inputs += [
            torch.randn(batch, spec.kv_heads, slots, spec.head_dim, dtype=dtype),
            torch.randn(batch, spec.kv_heads, slots, spec.head_dim, dtype=dtype),
            torch.randn(batch, spec.kv_heads, spec.num_regions, spec.head_dim, dtype=torch.float32),
        ]
    return tuple(inputs)


def _decoder_dynamic_shapes(spec: DecoderSpec) -> tuple[Any, ...]:
    dim = torch.export.Dim
    batch, length, slots = dim("batch", min=1), dim("sequence_length", min=1), dim("cache_length", min=2)
    dense, positions = dim("dense_length", min=1), dim("logits_length", min=1)
    shapes: list[Any] = [
        {0: batch, 1: length},  # inputs_embeds
        {0: positions},  # logits_positions
        None,  # write_offset
        {0: batch, 1: slots},  # slot_pos
        {0: batch, 1: slots},  # slot_valid
        {0: batch, 1: slots},  # slot_region
        {0: batch, 1: slots},  # slot_image
        {0: batch, 1: length},  # gaze
        {0: batch, 1: dense},  # dense_slots
        {0: batch},  # region_slots
        {0: batch},  # region_count
        {0: batch},  # region_last
    ]
    past = [{0: batch, 2: slots}, {0: batch, 2: slots}, {0: batch}] * spec.num_layers
    return (*shapes, tuple(past))


PROTOBUF_LIMIT = 2_000_000_000  # bytes; above this a model must use external data


def export_decoder(
    model: GazeForConditionalGeneration,
    path: Path,
    *,
    max_images: int,
    opset: int,
    trt_compat: bool = False,
    external_data: bool | None = None,
    plugin_namespace: str = gf.PLUGIN_NAMESPACE,
    plugin_version: str = gf.PLUGIN_VERSION,
    gaze_query_outputs: bool = False,
) -> None:
    """Write the decoder graph to `path`; it carries the GazeAttention FunctionProto unless `trt_compat`.

    `gaze_query_outputs` appends outputs `gaze_query.{i}` (rotated queries) for the runtime's gaze maps.
    """
    spec = decoder_spec(model, max_images)
    wrapper = GazeDecoderForExport(model, plugin_namespace, plugin_version, gaze_query_outputs).eval()
    program = _export(
        wrapper,
        dummy_decoder_inputs(model, spec),
        input_names=spec.input_names(),
        output_names=spec.output_names(gaze_query_outputs),
        dynamic_shapes=_decoder_dynamic_shapes(spec),
        custom_translation_table={torch.ops.gaze.attention.default: _make_translation()},
        opset_version=opset,
    )
    functions = [] if trt_compat else [gf.build_function(opset)]
    decoder_parts = nn.ModuleList([model.layers, model.norm, model.lm_head])
    top_k = [model.config.layer_top_k(i) for i in range(model.config.num_hidden_layers)]
    _save(program, path, opset, _wants_external(decoder_parts, external_data), functions,
          {TOP_K_METADATA: json.dumps(top_k)})


def export_vision(model: GazeForConditionalGeneration, path: Path, *, opset: int,
                  external_data: bool | None = None) -> None:
    """Write the vision encoder (pixels -> projected visual embeddings) to `path`."""
    config = model.config
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(2, 3, config.image_size, config.image_size, dtype=dtype)
    program = _export(
        VisionForExport(model).eval(),
        (pixels,),
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_shapes=({0: torch.export.Dim("num_images", min=1)},),
        opset_version=opset,
    )
    _save(program, path, opset, _wants_external(model.vision, external_data), [])


def export_embeddings(model: GazeForConditionalGeneration, path: Path) -> None:
    """The token embedding table [V, H] as .npy in the model dtype (the decoder takes inputs_embeds)."""
    table = model.embed_tokens.weight.detach().cpu().numpy()
    with open(path, "wb") as f:
        np.save(f, table)


def _export(module: nn.Module, args: tuple[Any, ...], **kwargs: Any) -> Any:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            optimize=False,  # onnxscript's optimizer would inline model-local functions away
            verbose=False,
            **kwargs,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program


def _wants_external(module: nn.Module, forced: bool | None) -> bool:
    if forced is not None:
        return forced
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return size > PROTOBUF_LIMIT


def _save(program: Any, path: Path, opset: int, external: bool, functions: list[onnx.FunctionProto],
          metadata: dict[str, str] | None = None) -> None:
    """Save, then pin the IR version, attach functions and metadata without touching the external weights."""
    program.save(str(path), external_data=external)
    proto = onnx.load(str(path), load_external_data=False)
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise RuntimeError(f"asked for ONNX opset {opset}, the exporter wrote {got}")
    proto.ir_version = min(proto.ir_version, gf.IR_VERSION)
    del proto.functions[:]
    proto.functions.extend(functions)
    onnx.helper.set_model_props(proto, metadata or {})
    onnx.save(proto, str(path))


def gaze_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.domain == gf.DOMAIN and n.op_type == gf.OP_TYPE]
