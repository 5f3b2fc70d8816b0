"""`gaze export CKPT -o OUT`: checkpoint -> validated ONNX export folder, written atomically.

Every option is checked while parsing (gaze_edge/cli_args.py), then the plan (`plan_export`:
checkpoint files, the model's size against this machine's memory, a max sequence length that
holds at least one prompt) before anything is written. Everything is written into a
`.OUT.partial-*` folder beside OUT and moved into place with os.replace only once complete and
validated; on any failure, Ctrl-C, SIGTERM or SIGHUP the partial folder is removed.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaze_edge import cli_args as ca
from gaze_edge import console
from gaze_edge.atomic import check_new_folder, move_folder_into_place, partial_folder
from gaze_edge.errors import CheckpointError, GazeError, InputError, RunError
from gaze_edge.jsonfile import read_json_object

from . import node as gf

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
MAX_OPSET = 23  # torch.onnx's ONNX_MAX_OPSET
RUNTIME_CONFIG = "gaze_config.json"
REPORT = "validation_report.json"


class ExportError(GazeError):
    """The export cannot be written as asked (output folder, checkpoint, options): exit 2."""


class ExportFailedError(ExportError, RunError):
    """The export ran and failed: the graphs do not pass onnx.checker or disagree with PyTorch (exit 1)."""


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `export` subcommand to a `gaze` argparse subparsers object."""
    p = subparsers.add_parser("export", help="export a checkpoint to validated ONNX (GazeAttention nodes)")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (config.json, model.safetensors, tokenizer...)")
    p.add_argument("-o", "--output", type=Path, required=True, help="export folder to create")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and KV cache dtype")
    p.add_argument("--opset", type=ca.int_in(gf.MIN_OPSET, MAX_OPSET), default=18,
                   help=f"ONNX opset ({gf.MIN_OPSET} .. {MAX_OPSET})")
    p.add_argument("--max-seq-len", type=ca.int_in(2), default=None,
                   help="KV cache capacity the runtime allocates (default: max_position_embeddings); must hold "
                        "one prompt with one image and a new token")
    p.add_argument("--max-images", type=ca.int_in(1, 1024), default=4, help="most images or frames per sequence")
    p.add_argument("--trt-compat", action="store_true",
                   help="omit the FunctionProto (TensorRT <= 10.6 would run it instead of the plugin)")
    p.add_argument("--external-data", action="store_true",
                   help="always store weights as external data (automatic above 2 GB)")
    p.add_argument("--gaze-map-outputs", action="store_true",
                   help="also output each layer's rotated queries (gaze_query.N) so the runtime can draw gaze maps")
    p.add_argument("--validate-scenes", type=ca.int_in(1, 10_000), default=4,
                   help="held-out scenes for the greedy check")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run_export)
    return p


def _progress(step: int, total: int, message: str) -> None:
    """A progress line on stderr (hidden by -q); stdout carries only the final `wrote OUT` line."""
    console.progress(f"[{step}/{total}] {message}")


def _check_options(args: argparse.Namespace) -> None:
    """The options' ranges (also checked by the parser's types: run_export may be called with a built Namespace)."""
    if not gf.MIN_OPSET <= args.opset <= MAX_OPSET:
        raise InputError(f"--opset {args.opset} is not supported: the GazeAttention function needs opset "
                         f"{gf.MIN_OPSET} .. {MAX_OPSET}")
    if args.max_images < 1:
        raise InputError("--max-images must be at least 1")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise InputError("--max-seq-len must be at least 2")
    if args.validate_scenes < 1:
        raise InputError("--validate-scenes must be at least 1")


@dataclass(frozen=True)
class ExportPlan:
    """What was checked before anything is written: the sequence length and the shortest prompt."""

    max_seq_len: int
    min_prompt_tokens: int  # the default prompt with one image


def plan_export(ckpt: Path, args: argparse.Namespace) -> ExportPlan:
    """Check the checkpoint against the options and this machine, without torch and before any file is written."""
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist; pass a folder with config.json, "
                              "model.safetensors and the tokenizer files (e.g. checkpoints/gaze-tiny)")
    for name in ("config.json", "model.safetensors", *COPIED_FILES):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt} has no {name}; the export needs it")
    config = read_json_object(ckpt / "config.json", CheckpointError, "restore it from the original checkpoint")
    ca.check_checkpoint_fits(ckpt, CheckpointError)
    max_seq_len = args.max_seq_len
    if max_seq_len is None:
        positions = config.get("max_position_embeddings")
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < 2:
            raise CheckpointError(f"{ckpt / 'config.json'} has no usable max_position_embeddings ({positions!r}); "
                                  "pass --max-seq-len")
        max_seq_len = positions
    from gaze_edge.model.processing import GazeProcessor  # torch-free

    processor = GazeProcessor.from_pretrained(ckpt)  # CheckpointError names a bad tokenizer or template
    shortest = len(processor.encode(processor.prompt(num_images=1)))
    if max_seq_len < shortest + 1:
        raise ExportError(f"--max-seq-len {max_seq_len} cannot hold one prompt: the default prompt with one image "
                          f"is {shortest} tokens, plus at least one new token; use --max-seq-len {shortest + 1} "
                          f"or more (captions of 32 tokens need {shortest + 32})")
    _check_runtime_memory(config, args, max_seq_len)
    return ExportPlan(max_seq_len, shortest)


def _processor(ckpt: Path, cls: Any) -> Any:
    import jinja2

    try:
        return cls.from_pretrained(ckpt)
    except jinja2.TemplateError as exc:
        raise CheckpointError(f"{ckpt / 'tokenizer_config.json'} has a chat_template that is not a valid Jinja "
                          f"template ({exc}); restore it from the original checkpoint") from exc


def _check_runtime_memory(config: dict[str, Any], args: argparse.Namespace, max_seq_len: int) -> None:
    """One sequence at max_seq_len (KV cache + descriptors for max_images) must fit this machine's memory."""
    from gaze_edge.runtime.folder import sequence_bytes

    fields = ("num_hidden_layers", "num_key_value_heads", "head_dim")
    values = [config.get(f) for f in fields]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return  # the checkpoint loader names a bad field
    layers, kv_heads, head_dim = (int(v) for v in values)  # type: ignore[arg-type]
    regions = 0
    size, patch, region = config.get("image_size"), config.get("patch_size"), config.get("region_size")
    if isinstance(size, int) and isinstance(patch, int) and patch > 0 and isinstance(region, list) \
            and len(region) == 2 and all(isinstance(r, int) and r > 0 for r in region):
        from gaze_edge.reference import regions_per_image

        grid = size // patch
        regions = args.max_images * regions_per_image(grid, grid, region[0], region[1])
    need = sequence_bytes(layers, kv_heads, head_dim, 2 if args.dtype == "fp16" else 4, max_seq_len, regions)
    have = ca.total_memory_bytes()
    if have is not None and need > have:
        raise ExportError(f"--max-seq-len {max_seq_len} needs {ca.gib(need)} of KV cache for one sequence; this "
                          f"machine has {ca.gib(have)}: use a smaller --max-seq-len")


def run_export(args: argparse.Namespace) -> int:
    """Entry point of `gaze export`; returns the exit status."""
    _check_options(args)
    out = Path(args.output)
    check_new_folder(out, args.force, ExportError)
    ckpt = Path(args.checkpoint)
    plan = plan_export(ckpt, args)
    with partial_folder(out, ExportError) as tmp:
        report = _export_into(tmp, ckpt, args, plan)
        move_folder_into_place(tmp, out, ExportError, "the export")
    print(f"wrote {out} (validation: prefill logits rel err {report['prefill_logits_rel_err']:.2e}, "
          f"greedy identical {report['greedy_identical']})", flush=True)
    return 0


def _export_into(folder: Path, ckpt: Path, args: argparse.Namespace, plan: ExportPlan) -> dict[str, Any]:
    import torch

    from gaze_edge.model.checkpoint import load_checkpoint

    from . import onnx_export as ox
    from .validate import validate_export

    total = 6
    start = time.perf_counter()
    _progress(1, total, f"loading {ckpt}")
    model, processor = load_checkpoint(ckpt)  # CheckpointError names missing files or a wrong model type
    config = model.config
    max_seq_len = plan.max_seq_len
    export_model = copy.deepcopy(model).half() if args.dtype == "fp16" else model
    external = True if args.external_data else None
    try:
        _progress(2, total, f"exporting decoder.onnx ({config.num_hidden_layers} GazeAttention layers, {args.dtype})")
        ox.export_decoder(export_model, folder / "decoder.onnx", max_images=args.max_images, opset=args.opset,
                          trt_compat=args.trt_compat, external_data=external,
                          gaze_query_outputs=getattr(args, "gaze_map_outputs", False))
        _progress(3, total, "exporting vision.onnx and embed_tokens.npy")
        ox.export_vision(export_model, folder / "vision.onnx", opset=args.opset, external_data=external)
        ox.export_embeddings(export_model, folder / "embed_tokens.npy")
    except OSError as exc:
        raise ExportFailedError(f"cannot write the export: {exc}") from exc
    del export_model
    _progress(4, total, "checking graphs (onnx.checker full_check)")
    check_graphs(folder, config.num_hidden_layers, with_function=not args.trt_compat)
    for name in COPIED_FILES:
        shutil.copy2(ckpt / name, folder / name)
    runtime = runtime_config(config, processor, args, max_seq_len)
    runtime["model"]["decoder"]["weights"] = decoder_weight_bytes(model, 2 if args.dtype == "fp16" else 4)
    (folder / RUNTIME_CONFIG).write_text(json.dumps(runtime, indent=2) + "\n")
    _progress(5, total, f"validating against PyTorch on {args.validate_scenes} held-out scenes (ONNX Runtime)")
    if args.trt_compat:
        report: dict[str, Any] = {"passed": True, "skipped": "--trt-compat graphs have no FunctionProto: "
                                  "ONNX Runtime cannot run GazeAttention; validate the default export"}
        report.update(prefill_logits_rel_err=float("nan"), greedy_identical="n/a")
    else:
        with torch.no_grad():
            report = validate_export(folder, model, processor, dtype=args.dtype, scenes=args.validate_scenes)
    report["checkpoint"] = str(ckpt.resolve())
    report["export_seconds"] = round(time.perf_counter() - start, 1)
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if not report["passed"]:
        raise ExportFailedError(
            f"validation failed: prefill logits rel err {report['prefill_logits_rel_err']:.2e}, decode "
            f"{report['decode_logits_rel_err']:.2e} (tolerance {report['tolerance']}), greedy identical "
            f"{report['greedy_identical']}; nothing was written"
        )
    _progress(6, total, "done")
    return report


def check_graphs(folder: Path, num_layers: int, with_function: bool) -> None:
    """onnx.checker full_check on both graphs; one GazeAttention node per layer; the function iff expected."""
    import onnx

    from . import gaze_function
    from . import onnx_export as ox

    gaze_function.register_schema()
    for name in ("decoder.onnx", "vision.onnx"):
        try:
            onnx.checker.check_model(str(folder / name), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportFailedError(f"{name} fails onnx.checker: {exc}") from exc
    proto = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    nodes = ox.gaze_nodes(proto)
    if len(nodes) != num_layers:
        raise ExportFailedError(f"decoder.onnx has {len(nodes)} GazeAttention nodes, expected one per layer "
                                f"({num_layers})")
    has_function = any(f.domain == gf.DOMAIN and f.name == gf.OP_TYPE for f in proto.functions)
    if has_function != with_function:
        raise ExportFailedError(f"decoder.onnx {'lacks' if with_function else 'carries'} the GazeAttention "
                                "FunctionProto")


def decoder_weight_bytes(model: Any, itemsize: int) -> dict[str, int]:
    """Decoder weight bytes in the export's dtype: one layer (layer 0; all layers have the same shapes) and the rest
    (final norm, lm_head). gaze profile --project-layers projects a model with more layers from them."""
    layer = sum(p.numel() for p in model.layers[0].parameters()) * itemsize
    other = (sum(p.numel() for p in model.norm.parameters()) + model.lm_head.weight.numel()) * itemsize
    return {"per_layer_bytes": int(layer), "other_bytes": int(other)}


def runtime_config(config: Any, processor: Any, args: argparse.Namespace, max_seq_len: int) -> dict[str, Any]:
    """The runtime config (gaze_config.json): shapes, dtypes, special tokens, template, gaze layout, search."""
    rh, rw = config.region_size
    num_regions = args.max_images * config.regions_per_image
    layers = config.num_hidden_layers
    cache_dtype = "float16" if args.dtype == "fp16" else "float32"
    return {
        "format": "gaze-edge-onnx",
        "format_version": 2,
        "model": {
            "type": config.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "rope_theta": config.rope_theta,
            "context_length": max_seq_len,
            "dtype": cache_dtype,
            "decoder": {
                "filename": "decoder.onnx",
                "inputs": {**{name: name for name in gf.DECODER_CALL_INPUTS},
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                           "past_desc_names": "past_key_values.%d.desc"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value", "present_desc_names": "present.%d.desc"},
                "kv_cache": {"layout": "[batch, kv_heads, max_seq_len, head_dim]", "dtype": cache_dtype,
                             "max_seq_len": max_seq_len, "past_present_share_buffer": True},
                "descriptors": {"layout": "[batch, kv_heads, num_regions, head_dim]", "dtype": "float32",
                                "content": "running sums of the region's keys", "num_regions": num_regions},
                "function_included": not args.trt_compat,
                "gaze_query_outputs": bool(getattr(args, "gaze_map_outputs", False)),
                "opset": args.opset,
            },
            "vision": {"filename": "vision.onnx", "input": "pixel_values", "output": "image_embeds",
                       "image_size": config.image_size, "tokens_per_image": config.tokens_per_image,
                       "dtype": cache_dtype},
            "embedding": {"filename": "embed_tokens.npy", "shape": [config.vocab_size, config.hidden_size],
                          "dtype": cache_dtype},
        },
        "gaze": {
            "grid": [config.grid_size, config.grid_size],
            "region_size": [rh, rw],
            "regions_per_image": config.regions_per_image,
            "max_images": args.max_images,
            "top_k_per_layer": [config.layer_top_k(i) for i in range(layers)],
            "num_context_tokens": config.num_context_tokens,
            "context_token_ids": list(config.context_token_ids),
            "routing": config.routing,
            "context_attention": config.context_attention,
            "region_frames": config.region_frames,
            "max_region_tokens": gf.max_region_tokens(config),
            "node": {"domain": gf.DOMAIN, "op_type": gf.OP_TYPE, "version": gf.OPSET_VERSION,
                     "plugin_namespace": gf.PLUGIN_NAMESPACE, "plugin_version": gf.PLUGIN_VERSION},
        },
        "special_tokens": {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "image_token_id": config.image_token_id,
            "assistant_token_id": config.assistant_token_id,
        },
        "chat_template": processor.chat_template,
        "search": {"max_length": max_seq_len, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                   "repetition_penalty": 1.0, "num_beams": 1, "suppress_token_ids": config.never_generated_ids},
    }
