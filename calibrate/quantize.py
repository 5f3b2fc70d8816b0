"""INT8 quantization of an export folder: `gaze quantize SRC -o DST [--mode int8-weight|int8]`.

Two modes, both in explicit quantization form (QuantizeLinear / DequantizeLinear in the graph, the
form TensorRT's explicit-precision path consumes), both symmetric (zero point 0, which TensorRT
requires), weights per output channel:

* ``int8-weight`` (default): weight-only INT8. Every MatMul/Gemm of the top-level graph whose weight
  is a constant 2-D fp32 initializer gets an INT8 initializer [-127, 127], a per-output-channel
  fp32 scale (max |w| / 127) and an all-zero INT8 zero point feeding
  ``DequantizeLinear(axis=<output channel axis>)`` -> the MatMul. Activations stay fp32. No
  calibration data is needed.
* ``int8``: weights and activations (W8A8) with onnxruntime.quantization.quantize_static
  (QuantFormat.QDQ, per_channel, QInt8 weights and activations, ActivationSymmetric and
  WeightSymmetric), MinMax ranges calibrated on the decoder's and vision graph's exact input
  feeds, recorded from the fp32 export running in the real runtime (calibrate/feeds.py).

Why our own weight-only pass: onnxruntime's MatMulNBitsQuantizer refuses 8 bits in QDQ form for
MatMul (``bits == 8 and QDQ`` raises in onnxruntime/quantization/matmul_nbits_quantizer.py; its
8-bit path emits the ORT-only MatMulNBits contrib op, which TensorRT cannot parse), and
nvidia-modelopt's onnx extra pins onnx 1.21 / onnxruntime-gpu 1.24 / cupy, which conflict with
this project's pins. The pass is small: onnx protos and numpy.

What is never touched: the ``gaze::GazeAttention`` nodes and everything inside the GazeAttention
FunctionProto (its MatMuls are attention arithmetic, and the TensorRT plugin replaces the body);
both are compared byte for byte with SRC before anything is written. ``embed_tokens.npy`` stays
as it is: it is a host-side gather of one row per token (docs/ONNX_CONTRACT.md), never a GPU
matrix product, so INT8 would save host memory only and cost accuracy on every token. The vision
Conv (patch embedding) and MatMuls whose both inputs are activations (vision self-attention) stay
fp32 in both modes (reported as excluded).

Pre-processing (both modes): the dynamo exporter writes each linear layer as
``Transpose(W) -> MatMul``. The transposes are folded into the initializers (``W.T``, exact) so
the weight reaches the MatMul as a constant: otherwise ORT's quantizer sees an activation and
would give the weight one per-tensor scale from calibration, and TensorRT would see DQ ->
Transpose -> MatMul. onnxruntime's own ``quant_pre_process`` is not used: its ORT graph
optimisation step inlines model-local functions, which would replace every GazeAttention node by
its body.

DST is a complete export folder (copy of SRC with quantized graphs, ``gaze_config.json`` with a
``quantization`` block, ``quantization_report.json`` with the quality check), built in a
temporary folder beside DST and moved into place only when complete; any error or Ctrl-C removes
it, and a failed ``--force`` run leaves the old DST intact. The quality check (greedy agreement
with fp32, caption accuracy, teacher-forced logits error, weight bytes) runs on the finished
folder with the torch-free runtime before the move.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gaze_edge.atomic import check_new_folder, move_folder_into_place, partial_folder
from gaze_edge.errors import GazeError, InputError
from gaze_edge.export.node import DOMAIN, OP_TYPE
from gaze_edge.runtime.backend import check_threads
from gaze_edge.runtime.folder import COPIED_FILES, ExportFolder

from .data import DEFAULT_MAX_TOTAL_PIXELS, ImageSet, accuracy, load_image_set

MODES = ("int8-weight", "int8")
DEFAULT_CALIB_COUNT = 32
DEFAULT_HELD_OUT_COUNT = 200
DECODE_STEPS = 8  # decoder calls recorded per calibration batch: the prefill + this many decode steps
GRAPHS = ("decoder", "vision")
REPORT_FILE = "quantization_report.json"
VALIDATION_FILE = "validation_report.json"
QUANTIZABLE = ("MatMul", "Gemm")
QMAX = 127  # symmetric INT8: [-127, 127], zero point 0
METADATA_KEY = "gaze_edge.quantization"

Stage = Callable[[str], None]


class QuantizeError(GazeError):
    """The export cannot be quantized or written, or the quantized graphs broke an invariant."""


# ----------------------------------------------------------------------------- options and inputs


@dataclass
class QuantizeOptions:
    mode: str = "int8-weight"
    images: Path | None = None  # calibration images (needed by --mode int8)
    held_out: Path | None = None  # held-out scenes for the check (else the calibration images)
    held_out_count: int = DEFAULT_HELD_OUT_COUNT
    calib_count: int = DEFAULT_CALIB_COUNT
    force: bool = False
    threads: int | None = None
    decode_steps: int = DECODE_STEPS
    batch: int = 16
    max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS  # per image folder, summed over the images used


def check_options(options: QuantizeOptions) -> None:
    if options.mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    if options.mode == "int8" and options.images is None:
        raise InputError("--mode int8 quantizes activations too and needs calibration images: pass --calib DIR "
                         "(`gaze scenes -o DIR --count 32` writes some), or use --mode int8-weight")
    if options.images is None and options.held_out is None:
        raise InputError("the quantized export is checked against the fp32 one on images: pass --held-out DIR "
                         "(`gaze scenes -o DIR --count 200`) or --calib DIR")
    for name, value in (("--calib-count", options.calib_count), ("--held-out-count", options.held_out_count)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if options.decode_steps < 0 or options.batch < 1:
        raise InputError("decode_steps must be >= 0 and batch >= 1")
    check_threads(options.threads)  # before any image is read (ONNX Runtime would refuse it only later)


def open_source(src: Path) -> ExportFolder:
    """SRC must be an fp32 default export (with the GazeAttention function) that is not quantized already."""
    folder = ExportFolder.open(src)  # ExportFolderError says what is missing and how to make one
    model = folder.config["model"]
    if not model["decoder"].get("function_included", True):
        raise QuantizeError(f"{src} is a --trt-compat export: its decoder has no GazeAttention FunctionProto, so "
                            "ONNX Runtime cannot run it and the quantized graphs could not be checked; quantize the "
                            "default export (`gaze export CKPT -o OUT`, without --trt-compat)")
    if model.get("dtype") != "float32":
        raise QuantizeError(f"{src} is a {model.get('dtype')} export; INT8 scales are computed from fp32 weights and "
                            "TensorRT takes an fp32 Q/DQ graph (its fp16 flag picks the precision of the rest): "
                            "quantize an fp32 export (`gaze export CKPT -o OUT` without --dtype fp16)")
    if "quantization" in folder.config:
        raise QuantizeError(f"{src} is already quantized ({folder.config['quantization'].get('mode')}); "
                            "quantize the fp32 export it was made from")
    return folder


def check_destination(src: Path, dst: Path, force: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r:
        raise InputError(f"-o {dst} is the source export itself; write the quantized export to a new folder")
    if src_r.is_relative_to(dst_r) or dst_r.is_relative_to(src_r):
        raise InputError(f"-o {dst} and the source {src} are nested; write the quantized export beside the source")
    check_new_folder(dst, force, QuantizeError)


# ----------------------------------------------------------------------------- graph I/O


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def load_graph(path: Path) -> tuple[onnx.ModelProto, bool]:
    """Load one graph of an export folder with its external data (only from files inside the folder)."""
    base = path.parent.resolve()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise QuantizeError(f"cannot read {path} ({exc}); re-run `gaze export`") from exc
    external = False
    for tensor in all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        external = True
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base) or target == base:
            raise QuantizeError(f"{path} stores tensor {tensor.name!r} in {location!r}, outside its folder; "
                                "refusing to read it: re-export the model")
        if not target.is_file():
            raise QuantizeError(f"{path} stores tensor {tensor.name!r} in {location}, which is missing; "
                                "copy the whole export folder or re-export")
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(base))
    return model, external


def save_graph(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write a graph; external data (one `<name>.data` file beside it) when SRC used it or it is > 2 GB."""
    if external or initializer_bytes(model) > (2**31 - 2**26):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def gaze_signature(model: onnx.ModelProto) -> list[bytes]:
    """The GazeAttention nodes and every FunctionProto, serialized: must be identical before and after."""
    nodes = [n.SerializeToString(deterministic=True) for n in model.graph.node
             if n.domain == DOMAIN and n.op_type == OP_TYPE]
    return nodes + [f.SerializeToString(deterministic=True) for f in model.functions]


def gaze_node_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


# ----------------------------------------------------------------------------- graph passes


def _uses(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    return uses


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Names read from inside subgraphs (If/Loop/Scan bodies): a rewrite must leave those alone."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            names.update(node.input)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                visit(sub)
    return names


def fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Transpose(perm=[1, 0]) of a 2-D float initializer read only as a MatMul/Gemm weight -> a transposed
    initializer (exact). Returns how many were folded."""
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input} | {o.name for o in graph.output} | _subgraph_names(graph)
    uses = _uses(graph)
    folded: list[onnx.NodeProto] = []
    removed: set[str] = set()
    for node in graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
            continue
        source, out = node.input[0], node.output[0]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        tensor = inits.get(source)
        if (tensor is None or len(tensor.dims) != 2 or perm != [1, 0] or tensor.data_type != TensorProto.FLOAT
                or source in inputs or out in inputs):
            continue
        consumers = uses.get(out, [])
        if not consumers or not all(c.op_type in QUANTIZABLE and list(c.input).index(out) == 1
                                    and list(c.input).count(out) == 1 for c in consumers):
            continue
        name = f"{source}.T"
        if name in inits:
            continue
        weight = numpy_helper.to_array(tensor)
        new = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
        graph.initializer.append(new)
        inits[name] = new
        for consumer in consumers:
            consumer.input[1] = name
        folded.append(node)
        removed.add(out)
        if len(uses.get(source, [])) == 1:  # the transpose was its only reader
            graph.initializer.remove(tensor)
            del inits[source]
    for node in folded:
        graph.node.remove(node)
    _drop_value_info(graph, removed)
    return len(folded)


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


@dataclass
class WeightMatmul:
    """An initializer used only as the weight of MatMul/Gemm nodes, and its output-channel axis."""

    weight: str
    nodes: list[str]
    axis: int


@dataclass
class GraphPlan:
    """What a graph offers the quantizer: weight matmuls, and the matmuls left fp32 (with why)."""

    weights: list[WeightMatmul]
    kept_float: dict[str, str] = field(default_factory=dict)  # node name -> reason

    @property
    def nodes(self) -> list[str]:
        return [n for w in self.weights for n in w.nodes]


def plan_graph(graph: onnx.GraphProto) -> GraphPlan:
    """The MatMul/Gemm nodes whose weight (input 1) is a constant 2-D fp32 initializer, grouped per initializer."""
    inits = {t.name: t for t in graph.initializer}
    blocked = {i.name for i in graph.input} | {o.name for o in graph.output} | _subgraph_names(graph)
    uses = _uses(graph)
    found: dict[str, WeightMatmul] = {}
    kept: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in QUANTIZABLE or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        tensor = inits.get(weight)
        if tensor is None:
            kept[node.name] = "both inputs are activations"
            continue
        if len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
            kept[node.name] = f"weight {weight} is not a 2-D fp32 matrix"
            continue
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = 1
        entry = found.setdefault(weight, WeightMatmul(weight, [], axis))
        if entry.axis != axis:
            entry.axis = -1  # used with two layouts: no single output-channel axis
        entry.nodes.append(node.name)
    plans = []
    for weight, entry in found.items():
        readers = uses.get(weight, [])
        only_weight = all(r.op_type in QUANTIZABLE and list(r.input).count(weight) == 1
                          and list(r.input).index(weight) == 1 for r in readers)
        if entry.axis < 0 or not only_weight or weight in blocked:
            for name in entry.nodes:
                kept[name] = f"weight {weight} is also used elsewhere or in two layouts"
            continue
        plans.append(entry)
    return GraphPlan(plans, kept)


@dataclass
class WeightStats:
    matrices: int = 0
    float_bytes: int = 0  # the quantized matrices in fp32
    int8_bytes: int = 0  # the same as INT8 + scales + zero points


def quantize_weights(model: onnx.ModelProto, plan: GraphPlan) -> WeightStats:
    """Weight-only INT8: W -> (W_q int8, scale fp32 [N], zero point int8 [N]) -> DequantizeLinear(axis) -> MatMul."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    stats = WeightStats()
    new_nodes = []
    for entry in plan.weights:
        tensor = inits[entry.weight]
        w = numpy_helper.to_array(tensor).astype(np.float32)
        reduce = 1 - entry.axis  # the input axis of a 2-D weight
        amax = np.abs(w).max(axis=reduce)
        scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / np.expand_dims(scale, reduce)), -QMAX, QMAX).astype(np.int8)
        names = (f"{entry.weight}_quantized", f"{entry.weight}_scale", f"{entry.weight}_zero_point",
                 f"{entry.weight}_dequantized")
        if any(n in inits for n in names):
            raise QuantizeError(f"{entry.weight}: the graph already holds {names}; is it quantized already?")
        added = [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                 numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), names[2])]
        graph.initializer.extend(added)
        graph.initializer.remove(tensor)
        new_nodes.append(helper.make_node("DequantizeLinear", list(names[:3]), [names[3]],
                                          name=f"{entry.weight}_DequantizeLinear", axis=entry.axis))
        for node in graph.node:
            if node.name in entry.nodes:
                node.input[1] = names[3]
        stats.matrices += 1
        stats.float_bytes += _tensor_bytes(tensor)
        stats.int8_bytes += sum(_tensor_bytes(t) for t in added)
    # DequantizeLinear reads only initializers: first in the node list keeps the graph topologically sorted.
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    return stats


@contextlib.contextmanager
def _quiet_ort_quantizer() -> Iterator[None]:
    """onnxruntime.quantization asks, on the root logger, for its pre-processing (which would inline our
    function, see the module docstring); drop that one advice during the call."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-process" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    for handler in root.handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        for handler in root.handlers:
            handler.removeFilter(drop)


def quantize_w8a8(model: onnx.ModelProto, plan: GraphPlan, feeds: Sequence[Path], exclude: list[str],
                  scratch: Path, external: bool) -> onnx.ModelProto:
    """onnxruntime quantize_static (QDQ, symmetric INT8, per-channel weights) of the planned MatMuls."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .feeds import NpzFeedReader

    if not plan.nodes:
        return model
    if not feeds:
        raise QuantizeError("no calibration feeds were recorded; check the --calib folder")
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / "quantized.onnx"
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # Q/DQ on the inputs of each MatMul only (TensorRT fuses those into an INT8 GEMM); the output stays fp32.
        "OpTypesToExcludeOutputQuantization": list(QUANTIZABLE),
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        "CalibMaxIntermediateOutputs": 16,
    }
    try:
        with _quiet_ort_quantizer():
            quantize_static(model, str(out), NpzFeedReader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(QUANTIZABLE), nodes_to_quantize=plan.nodes,
                            nodes_to_exclude=exclude, use_external_data_format=external,
                            calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    except GazeError:
        raise
    except Exception as exc:  # onnxruntime's quantizer raises plain ValueError/RuntimeError/Fail
        raise QuantizeError(f"onnxruntime quantize_static failed on the graph: {exc}") from exc
    quantized, _ = load_graph(out)
    return quantized


def check_zero_points(model: onnx.ModelProto) -> int:
    """Every Q/DQ zero point is 0 (symmetric; TensorRT's requirement). Returns the number of Q/DQ nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or zp.data_type != TensorProto.INT8 or numpy_helper.to_array(zp).any():
                raise QuantizeError(f"{node.name} has a zero point that is not INT8 zero; TensorRT needs "
                                    "symmetric quantization")
    return count


# ----------------------------------------------------------------------------- the check


def _stop_ids(rt: Any) -> list[int]:
    return [int(rt.folder.tokens.eos)]


def _trim(tokens: np.ndarray, lengths: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in row[:n]) for row, n in zip(tokens, lengths, strict=True)]


def quality_report(reference: Path, quantized: Path, images: ImageSet, source: str, *, batch: int = 16,
                   max_new_tokens: int = 32, threads: int | None = None,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Greedy agreement, accuracy and teacher-forced logits error of `quantized` vs the fp32 `reference`."""
    from dataclasses import replace

    from gaze_edge.runtime.generate import GazeRuntime, Prompt

    from .feeds import forced_logits, sequence_lengths

    ref = GazeRuntime.load(reference, threads=threads)
    qnt = GazeRuntime.load(quantized, threads=threads)
    sampling = replace(ref.default_sampling, max_new_tokens=max_new_tokens, do_sample=False)
    ref_texts: list[str] = []
    q_texts: list[str] = []
    identical = 0
    errors: list[np.ndarray] = []
    flips: list[np.ndarray] = []  # per gaze position: some layer / KV head selected other regions than fp32
    with_selection = ref.folder.has_gaze_queries and qnt.folder.has_gaze_queries
    disagreements: list[dict[str, str]] = []
    for start in range(0, len(images), batch):
        part = slice(start, start + batch)
        prompts = [Prompt(None, [image]) for image in images.images[part]]
        f = ref.generate(prompts, sampling)
        q = qnt.generate(prompts, sampling)
        f_len = sequence_lengths(f.tokens, _stop_ids(ref))
        q_len = sequence_lengths(q.tokens, _stop_ids(qnt))
        for name, a, b, ta, tb in zip(images.names[part], _trim(f.tokens, f_len), _trim(q.tokens, q_len), f.texts,
                                      q.texts, strict=True):
            identical += a == b
            if a != b and len(disagreements) < 10:
                disagreements.append({"image": name, "fp32": ta, "quantized": tb})
        ref_texts += f.texts
        q_texts += q.texts
        # Teacher forcing on the fp32 greedy tokens: both models predict the same positions.
        sf: list[np.ndarray] | None = [] if with_selection else None
        sq: list[np.ndarray] | None = [] if with_selection else None
        lf = forced_logits(ref, prompts, f.tokens, sf)
        lq = forced_logits(qnt, prompts, f.tokens, sq)
        for row in range(len(prompts)):
            n = int(f_len[row])
            fr, qr = lf[row, :n].astype(np.float64), lq[row, :n].astype(np.float64)
            errors.append(np.linalg.norm(qr - fr, axis=-1) / np.maximum(np.linalg.norm(fr, axis=-1), 1e-30))
            if sf is not None and sq is not None:  # position 0 is a dense query: nothing selected
                flips.append(np.array([False] + [bool((a[:, row] != b[:, row]).any())
                                                 for a, b in zip(sf[: n - 1], sq[: n - 1], strict=True)]))
        if progress is not None:
            progress(len(prompts))
    err = np.concatenate(errors) if errors else np.zeros(0)
    flip = np.concatenate(flips) if flips else None
    selection: dict[str, Any] | None = None
    if flip is not None and err.size:
        steady = err[~flip]
        selection = {"positions_with_a_flip": int(flip.sum()), "gaze_positions": int(err.size - len(errors)),
                     "logits_rel_err_max_without_flip": float(steady.max()) if steady.size else float("nan")}
    n = len(images)
    has_truth = images.has_truth
    return {
        "images": n,
        "folder": str(images.folder),
        "source": source,
        "greedy_agreement": identical / n,
        "identical_captions": int(identical),
        "accuracy_fp32": accuracy(ref_texts, images.names, images.truth) if has_truth else None,
        "accuracy_quantized": accuracy(q_texts, images.names, images.truth) if has_truth else None,
        "logits_rel_err_mean": float(err.mean()) if err.size else float("nan"),
        "logits_rel_err_max": float(err.max()) if err.size else float("nan"),
        "logits_rel_err_p50": float(np.median(err)) if err.size else float("nan"),
        "logits_rel_err_p99": float(np.percentile(err, 99)) if err.size else float("nan"),
        # Where the export outputs gaze queries: teacher-forced positions whose top-k region choice differs
        # from fp32's in some layer / KV head (the discrete step where the largest logit errors come from).
        "selection": selection,
        "logits_positions": int(err.size),
        "max_new_tokens": max_new_tokens,
        "disagreements": disagreements,
    }


# ----------------------------------------------------------------------------- the command


def _default_stage(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Steps:
    """Numbered progress lines `[i/n] what` on the stage callback (stderr by default)."""

    def __init__(self, stage: Stage, total: int) -> None:
        self.stage, self.total, self.done = stage, total, 0

    def __call__(self, message: str) -> None:
        self.done += 1
        self.stage(f"[{self.done}/{self.total}] {message}")


@contextlib.contextmanager
def _bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False, disable=None) as bar:
        yield bar.update


def _head(images: ImageSet, count: int) -> ImageSet:
    return ImageSet(images.folder, images.names[:count], images.images[:count], images.truth)


def _copy_files(folder: ExportFolder, tmp: Path) -> None:
    names = list(COPIED_FILES) + [folder.config["model"]["embedding"]["filename"]]
    if (folder.path / VALIDATION_FILE).is_file():
        names.append(VALIDATION_FILE)
    for name in names:
        shutil.copy2(folder.path / name, tmp / name)


def quantize_export(src: str | Path, dst: str | Path, options: QuantizeOptions,
                    stage: Stage = _default_stage) -> dict[str, Any]:
    """Quantize export folder `src` into a new export folder `dst` (atomically); returns the report."""
    src, dst = Path(src), Path(dst)
    check_options(options)
    check_destination(src, dst, options.force)
    folder = open_source(src)
    steps = _Steps(stage, 5 if options.mode == "int8-weight" else 6)
    steps("reading images")
    calib = None
    # Decoded one at a time, kept at the model's input size, within the pixel budget (calibrate/data.py).
    budget = {"processor": folder.processor, "max_total_pixels": options.max_total_pixels}
    if options.images is not None and (options.mode == "int8" or options.held_out is None):
        calib = load_image_set(options.images, limit=options.calib_count, **budget)
    if options.held_out is not None:
        check_set = load_image_set(options.held_out, limit=options.held_out_count, what="held-out", **budget)
        source = "held-out folder"
    else:
        assert calib is not None
        check_set = _head(calib, options.held_out_count)
        source = "calibration images (no --held-out given" + (
            ": the activation ranges were calibrated on these same images)" if options.mode == "int8" else ")")
    with partial_folder(dst, QuantizeError) as tmp:  # removed on any error or interrupt (gaze_edge/atomic.py)
        report = _quantize_into(tmp, folder, options, calib, check_set, source, steps)
        steps(f"moving into {dst}")
        move_folder_into_place(tmp, dst, QuantizeError, "the quantized export")
    report["output"] = str(dst)
    return report


def _quantize_into(tmp: Path, folder: ExportFolder, options: QuantizeOptions, calib: ImageSet | None,
                   check_set: ImageSet, source: str, steps: _Steps) -> dict[str, Any]:
    from gaze_edge.export import gaze_function

    scratch = tmp / ".work"
    paths = {"decoder": folder.decoder_path, "vision": folder.vision_path}
    models: dict[str, onnx.ModelProto] = {}
    external: dict[str, bool] = {}
    for name in GRAPHS:
        models[name], external[name] = load_graph(paths[name])
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in models["decoder"].functions):
        raise QuantizeError(f"{paths['decoder']} has no GazeAttention FunctionProto (a --trt-compat graph?): ONNX "
                            "Runtime cannot run it, so the quantized export could not be checked; quantize the "
                            "default export (`gaze export CKPT -o OUT`, without --trt-compat)")
    before = {name: initializer_bytes(m) for name, m in models.items()}
    signature = gaze_signature(models["decoder"])
    exclude = gaze_node_names(models["decoder"])
    convs = [f"{name} {n.name}" for name, m in models.items() for n in m.graph.node if n.op_type == "Conv"]

    folded = {name: fold_weight_transposes(m.graph) for name, m in models.items()}
    plans = {name: plan_graph(m.graph) for name, m in models.items()}
    stats = {name: WeightStats() for name in GRAPHS}
    calibration: dict[str, Any] | None = None
    if options.mode == "int8-weight":
        steps(f"weight-only INT8: {sum(len(p.weights) for p in plans.values())} matrices "
              "(per output channel, symmetric)")
        for name in GRAPHS:
            stats[name] = quantize_weights(models[name], plans[name])
    else:
        from .feeds import record_feeds

        assert calib is not None
        steps(f"recording calibration feeds: {len(calib)} images from {calib.folder}, prefill + "
              f"{options.decode_steps} decode steps per batch of {options.batch} (fp32 export, ONNX Runtime)")
        with _bar(len(calib), "calibration") as update:
            vision_feeds, decoder_feeds = record_feeds(folder, calib.images, scratch / "feeds",
                                                       decode_steps=options.decode_steps, batch=options.batch,
                                                       threads=options.threads, progress=update)
        calibration = {"images": len(calib), "folder": str(calib.folder), "decoder_feeds": len(decoder_feeds),
                       "vision_feeds": len(vision_feeds), "decode_steps_per_batch": options.decode_steps,
                       "method": "MinMax", "feed_bytes": decoder_feeds.nbytes + vision_feeds.nbytes}
        steps(f"W8A8 with onnxruntime quantize_static (QDQ, symmetric INT8, per-channel weights) on "
              f"{len(decoder_feeds)} decoder and {len(vision_feeds)} vision feeds")
        for name, feeds in (("decoder", decoder_feeds.files), ("vision", vision_feeds.files)):
            before_weights = _weight_tensors(models[name], plans[name])
            models[name] = quantize_w8a8(models[name], plans[name], feeds, exclude if name == "decoder" else [],
                                         scratch / name, external[name])
            stats[name] = _w8a8_stats(models[name], before_weights)
        shutil.rmtree(scratch, ignore_errors=True)

    steps("writing and checking the graphs "
          "(onnx.checker full_check, GazeAttention nodes and function unchanged)")
    if gaze_signature(models["decoder"]) != signature:
        raise QuantizeError("the quantized decoder's GazeAttention nodes or FunctionProto differ from the source's; "
                            "nothing was written (a bug: please report it)")
    qdq = {}
    for name in GRAPHS:
        qdq[name] = check_zero_points(models[name])
        _set_metadata(models[name], options.mode)
        save_graph(models[name], tmp / paths[name].name, external[name])
    gaze_function.register_schema()
    for name in GRAPHS:
        try:
            onnx.checker.check_model(str(tmp / paths[name].name), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise QuantizeError(f"the quantized {name}.onnx fails onnx.checker: {exc}") from exc
    after = {name: initializer_bytes(m) for name, m in models.items()}
    embedding_bytes = int((folder.path / folder.config["model"]["embedding"]["filename"]).stat().st_size)
    del models

    _copy_files(folder, tmp)
    block = _quantization_block(options.mode, folder, plans, stats, folded, before, after, embedding_bytes, qdq,
                                exclude, convs, calibration)
    config = dict(folder.config)
    config["quantization"] = block
    (tmp / "gaze_config.json").write_text(json.dumps(config, indent=2) + "\n")

    steps(f"checking against fp32 on {len(check_set)} images ({source.split(' (')[0]}): greedy "
          "captions, teacher-forced logits")
    with _bar(len(check_set), "check") as update:
        quality = quality_report(folder.path, tmp, check_set, source, batch=options.batch, threads=options.threads,
                                 progress=update)
    report = {"mode": options.mode, "source": str(folder.path), "scheme": block["scheme"], "check": quality,
              "weight_bytes": block["weight_bytes"], "excluded": block["excluded"]}
    if calibration is not None:
        report["calibration"] = calibration
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _weight_tensors(model: onnx.ModelProto, plan: GraphPlan) -> dict[str, int]:
    inits = {t.name: t for t in model.graph.initializer}
    return {w.weight: _tensor_bytes(inits[w.weight]) for w in plan.weights}


def _w8a8_stats(model: onnx.ModelProto, weights: dict[str, int]) -> WeightStats:
    """Bytes of the planned matrices after quantize_static (its `<w>_quantized`, `_scale`, `_zero_point`)."""
    inits = {t.name: t for t in model.graph.initializer}
    stats = WeightStats()
    for weight, nbytes in weights.items():
        parts = [inits.get(f"{weight}{suffix}") for suffix in ("_quantized", "_scale", "_zero_point")]
        if parts[0] is None or parts[0].data_type != TensorProto.INT8:
            raise QuantizeError(f"onnxruntime did not quantize weight {weight} to INT8; nothing was written")
        stats.matrices += 1
        stats.float_bytes += nbytes
        stats.int8_bytes += sum(_tensor_bytes(p) for p in parts if p is not None)
    return stats


def _set_metadata(model: onnx.ModelProto, mode: str) -> None:
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=mode)


def _quantization_block(mode: str, folder: ExportFolder, plans: dict[str, GraphPlan], stats: dict[str, WeightStats],
                        folded: dict[str, int], before: dict[str, int], after: dict[str, int], embedding_bytes: int,
                        qdq: dict[str, int], exclude: list[str], convs: list[str],
                        calibration: dict[str, Any] | None) -> dict[str, Any]:
    weights = {"dtype": "int8", "symmetric": True, "zero_point": 0, "range": [-QMAX, QMAX],
               "granularity": "per output channel", "format": "INT8 initializer -> DequantizeLinear(axis) -> MatMul"}
    if mode == "int8-weight":
        scheme = "weight-only INT8 (W8A32): symmetric per-output-channel weights, fp32 activations"
        activations: dict[str, Any] | None = None
    else:
        scheme = ("W8A8: symmetric per-output-channel INT8 weights, symmetric per-tensor INT8 activations "
                  "(QuantizeLinear -> DequantizeLinear on each MatMul input), MinMax calibration")
        activations = {"dtype": "int8", "symmetric": True, "zero_point": 0, "granularity": "per tensor",
                       "calibration": calibration}
    kept = {name: dict(plans[name].kept_float) for name in GRAPHS}
    excluded = [
        f"gaze::GazeAttention nodes ({', '.join(exclude)}) and the GazeAttention FunctionProto body: unchanged",
        "embed_tokens.npy: kept as is (a host-side gather of one row per token, not a matrix product)",
    ]
    excluded += [f"{conv}: fp32 (Conv, not a MatMul/Gemm; the patch embedding)" for conv in convs]
    for name in GRAPHS:
        for node, why in kept[name].items():
            excluded.append(f"{name} {node}: fp32 ({why})")
    return {
        "mode": mode,
        "scheme": scheme,
        "weights": weights,
        "activations": activations,
        "quantized_matmuls": {name: len(plans[name].nodes) for name in GRAPHS},
        "qdq_nodes": qdq,
        "folded_weight_transposes": folded,
        "excluded": excluded,
        "weight_bytes": {
            "before": {**before, "total": sum(before.values())},
            "after": {**after, "total": sum(after.values())},
            "quantized_matrices_before": sum(s.float_bytes for s in stats.values()),
            "quantized_matrices_after": sum(s.int8_bytes for s in stats.values()),
            "embedding": embedding_bytes,
        },
        "source": str(folder.path.resolve()),
        "note": "validation_report.json is the fp32 export's check against PyTorch; quantization_report.json "
                "compares this export with that fp32 one",
    }
