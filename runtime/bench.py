"""`gaze bench`: what a user runs to see what gaze attention buys (like trtexec / llm_bench).

- `gaze bench op`: one GazeAttention layer (the exported node and its function body, in ONNX
  Runtime) over a static cache, a gaze decode step against a dense decode step of the very
  same node (the same call with the query flagged dense: causal attention over every written
  slot). Shapes from flags: visual tokens, keep ratio, batch, heads, head dim, dtype.
- `gaze bench decode EXPORT`: end to end, the runtime's decode loop over an export, gaze decode
  steps against dense decode steps of the same export (or of `--dense EXPORT2`, a dense twin).

Both interleave A and B in one process (A, B, A, B, ...) after warm-up, with ONNX Runtime's
thread spinning off (a spinning session slows the other), and report medians, p90 and the
ratio, beside the ideal ratio of bytes read per step (the cost model of docs/GAZE_SEMANTICS.md).
Numbers measure this machine and this backend; they are not tests.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gaze_edge import cli_args as ca
from gaze_edge import console
from gaze_edge.errors import InputError

from .cache import SlotState

# ----------------------------------------------------------------------------------- statistics


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median and p90 in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "n": int(a.size)}


def interleave(runs: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time each callable `repeats` times, alternating between them (after `warmup` untimed rounds)."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    return {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ------------------------------------------------------------------------------------ bench op


@dataclass(frozen=True)
class OpCase:
    """One `bench op` configuration; the cache holds text, then the visual tokens region by region, then the query."""

    visual_tokens: int
    keep: float
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    region_tokens: int
    text_tokens: int
    dtype: str
    routing: str

    @property
    def regions(self) -> int:
        return -(-self.visual_tokens // self.region_tokens)

    @property
    def top_k(self) -> int:
        return max(1, round(self.keep * self.regions))

    @property
    def length(self) -> int:
        return self.text_tokens + self.visual_tokens + 1  # + the query token itself

    def ideal_bytes(self) -> dict[str, int]:
        """Cache bytes one decode step reads per layer: dense (every slot), gaze (dense, k regions, descriptors)."""
        item = 2 if self.dtype == "fp16" else 4
        per_token = 2 * self.head_dim * item  # key + value, one KV head
        kept = min(self.top_k * self.region_tokens, self.visual_tokens)
        heads_reading = self.group if self.routing == "query_head" else 1  # per-head selections read separately
        gaze = self.kv_heads * (per_token * (self.text_tokens + 1 + heads_reading * kept)
                                + self.regions * self.head_dim * 4)
        dense = self.kv_heads * per_token * self.length
        return {"gaze": self.batch * gaze, "dense": self.batch * dense}


def _ort_session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Two sessions (or two modes of one) alternate: a spinning thread pool would steal the other's time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_op_case(case: OpCase, threads: int, warmup: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Time one layer's gaze decode step against its dense decode step over the same cache (ONNX Runtime)."""
    try:
        from onnx import TensorProto

        from gaze_edge.export.gaze_function import single_node_model
    except ImportError as exc:  # the runtime extra has no onnx; the op bench builds a one-node model with it
        raise InputError("`gaze bench op` builds its one-node model with the onnx package: "
                         "pip install onnx (or the torch extra)") from exc
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    b, hkv, g, d, length = case.batch, case.kv_heads, case.group, case.head_dim, case.length
    dtype = np.float16 if case.dtype == "fp16" else np.float32
    model = single_node_model(top_k=case.top_k, max_region_tokens=case.region_tokens, scale=d**-0.5,
                              routing=case.routing, context_attention="causal",
                              dtype=TensorProto.FLOAT16 if case.dtype == "fp16" else TensorProto.FLOAT)
    sess = _ort_session(model.SerializeToString(), threads)

    # The layout: text, visual tokens stored region-major (region r in M contiguous slots), the query last.
    slots = SlotState(b, length, case.regions, case.region_tokens)
    region = np.full(length - 1, -1, dtype=np.int64)
    region[case.text_tokens:] = np.arange(case.visual_tokens) // case.region_tokens
    pos = np.arange(length - 1)
    slots.write(np.tile(pos, (b, 1)), np.tile(region, (b, 1)), np.ones((b, length - 1), dtype=bool))
    offset = slots.write(np.full((b, 1), length - 1), np.full((b, 1), -1), np.ones((b, 1), dtype=bool))
    k = rng.standard_normal((b, hkv, length, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, length, d)).astype(dtype)
    desc = np.zeros((b, hkv, case.regions, d), dtype=np.float32)
    for r in range(case.regions):  # descriptor sums of the cached visual tokens, as the node keeps them
        desc[:, :, r] = k[:, :, :-1][:, :, region == r].astype(np.float32).sum(2)
    feeds = {"query": rng.standard_normal((b, hkv * g, 1, d)).astype(dtype), "key": k[:, :, -1:].copy(),
             "value": v[:, :, -1:].copy(), "write_offset": np.array([offset], dtype=np.int64), **slots.tables()}
    # past and present bound to one buffer each (as the runtime does): the call writes the query's slot only.
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in (("k", k), ("v", v), ("desc", desc))}
    bindings = {}
    for mode in ("gaze", "dense"):
        io = sess.io_binding()
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        io.bind_cpu_input("gaze", np.full((b, 1), mode == "gaze"))
        io.bind_ortvalue_input("past_key", values["k"])
        io.bind_ortvalue_input("past_value", values["v"])
        io.bind_ortvalue_input("past_desc", values["desc"])
        io.bind_ortvalue_output("present_key", values["k"])
        io.bind_ortvalue_output("present_value", values["v"])
        io.bind_ortvalue_output("present_desc", values["desc"])
        io.bind_output("output")
        bindings[mode] = io
    runs: dict[str, Callable[[], None]] = {mode: partial(sess.run_with_iobinding, io) for mode, io in bindings.items()}
    times = interleave(runs, warmup, repeats)
    gaze, dense = summary(times["gaze"]), summary(times["dense"])
    ideal = case.ideal_bytes()
    speedup = dense["median_ms"] / gaze["median_ms"]
    ideal_ratio = ideal["dense"] / ideal["gaze"]
    return {"case": case.__dict__ | {"regions": case.regions, "top_k": case.top_k, "cache_tokens": length},
            "gaze": gaze, "dense": dense, "speedup": speedup, "bytes_per_step": ideal,
            "ideal_ratio": ideal_ratio, "speedup_of_ideal": speedup / ideal_ratio}


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from exc
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _ints(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return value[0]


def _op_defaults(args: argparse.Namespace) -> None:
    """Flags left unset take the backend's defaults: the CUDA grid is docs/KERNELS.md's (issue #12)."""
    cuda = args.backend == "cuda"
    if args.visual_tokens is None:
        args.visual_tokens = [729, 4096, 16384] if cuda else [4096, 16384]
    if args.batch is None:
        args.batch = [1, 8] if cuda else [1, 4]
    if args.head_dim is None:
        args.head_dim = [64, 128] if cuda else [64]
    if args.dtype is None:
        args.dtype = "fp16" if cuda else "fp32"


def run_op(args: argparse.Namespace) -> int:
    _op_defaults(args)
    if args.backend == "cuda":
        return run_op_cuda(args)
    cases = [OpCase(visual, args.keep, batch, args.kv_heads, args.group, dim, args.region_tokens,
                    args.text_tokens, args.dtype, args.routing)
             for visual in args.visual_tokens for batch in args.batch for dim in args.head_dim]
    cache_bytes = max(2 * c.batch * c.kv_heads * c.length * c.head_dim * (2 if c.dtype == "fp16" else 4)
                      for c in cases)
    if cache_bytes > 8 << 30:
        raise InputError(f"the largest case needs a {cache_bytes / 2**30:.1f} GiB cache; use fewer --visual-tokens "
                         "or a smaller --batch")
    rows = []
    out = _table_stream(args)
    print(f"{'visual':>7} {'batch':>5} {'R':>5} {'k':>4} {'gaze ms':>9} {'dense ms':>9} {'speedup':>8} "
          f"{'ideal':>7} {'of ideal':>8}", file=out, flush=True)
    for case in cases:
        r = run_op_case(case, args.threads, args.warmup, args.repeats)
        rows.append(r)
        print(f"{case.visual_tokens:>7} {case.batch:>5} {case.regions:>5} {case.top_k:>4} "
              f"{r['gaze']['median_ms']:>9.3f} {r['dense']['median_ms']:>9.3f} {r['speedup']:>7.2f}x "
              f"{r['ideal_ratio']:>6.2f}x {r['speedup_of_ideal']:>8.2f}", file=out, flush=True)
    console.write_json({"bench": "op", "backend": "onnxruntime-cpu", "threads": args.threads, "warmup": args.warmup,
                        "repeats": args.repeats, "machine": machine(), "results": rows}, args.json)
    return 0


REPO = Path(__file__).resolve().parents[1]
CUDA_LIB_ENV = "GAZE_KERNELS_LIB"  # libgaze_kernels.so for --backend cuda (default: the CMake build's)


def _bench_kernels() -> Any:
    """bench/bench_kernels.py of the checkout (the CUDA op bench lives beside the kernels it drives)."""
    import importlib.util

    path = REPO / "bench" / "bench_kernels.py"
    if not path.is_file():
        raise InputError(f"`gaze bench op --backend cuda` runs from a repository checkout ({path} is missing); "
                         "run it from the gaze-edge repository")
    spec = importlib.util.spec_from_file_location("gaze_bench_kernels", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gaze_bench_kernels", module)
    spec.loader.exec_module(module)
    return module


def run_op_cuda(args: argparse.Namespace) -> int:
    """`gaze bench op --backend cuda`: the CUDA kernels (gaze_forward_v2) against torch SDPA flash, one decode step.

    Refuses in one line without a CUDA GPU (checked first) or without libgaze_kernels.so."""
    import os

    kb = _bench_kernels()
    lib = Path(os.environ.get(CUDA_LIB_ENV) or kb.DEFAULT_LIB)
    try:
        backend = kb.gpu_backend(lib)
    except kb.Refused as exc:
        raise InputError(f"`gaze bench op --backend cuda` {exc} (or use --backend onnxruntime)") from None
    dtype = {"fp16": "float16", "fp32": "float32"}[args.dtype]
    copy_gbps = kb.copy_bandwidth(backend)
    out = _table_stream(args)
    print(f"{backend.rt.device_name()}: device copy {copy_gbps:.0f} GB/s", file=out, flush=True)
    print(f"{'visual':>7} {'batch':>5} {'D':>4} {'R':>5} {'k':>4} {'gaze ms':>9} {'dense ms':>9} {'speedup':>8} "
          f"{'ideal':>7} {'of ideal':>8} {'GB/s':>6} {'%copy':>6} {'select us':>9}", file=out, flush=True)
    rows = []
    for visual in args.visual_tokens:
        for batch in args.batch:
            for dim in args.head_dim:
                r = kb.op_case(backend, batch=batch, visual=visual, head_dim=dim, kv_heads=args.kv_heads,
                               group=args.group, region_tokens=args.region_tokens, text=args.text_tokens,
                               keep=args.keep, dtype=dtype, routing=args.routing, iters=args.repeats,
                               seed=0)
                backend.free_all()
                r["copy_gbps"] = copy_gbps
                r["bandwidth_of_copy"] = r["gaze_gbps"] / copy_gbps
                r["speedup_of_ideal"] = r["speedup"] / r["ideal_byte_ratio"] if r["speedup"] else None
                rows.append(r)
                print(f"{visual:>7} {batch:>5} {dim:>4} {r['regions']:>5} {r['top_k']:>4} {r['gaze_ms']:>9.4f} "
                      f"{kb._fmt(r['dense_ms'], '>9.4f'):>9} {kb._fmt(r['speedup'], '>7.2f'):>7}x "
                      f"{r['ideal_byte_ratio']:>6.2f}x {kb._fmt(r['speedup_of_ideal'], '>8.2f'):>8} "
                      f"{r['gaze_gbps']:>6.0f} {100 * r['bandwidth_of_copy']:>5.0f}% {r['select_us']:>9.1f}",
                      file=out, flush=True)
    console.write_json({"bench": "op", "backend": "cuda", "device": backend.rt.device_name(),
                        "repeats": args.repeats, "copy_gbps": copy_gbps,
                        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                        "results": rows}, args.json)
    return 0


# -------------------------------------------------------------------------------- bench decode


def run_decode(args: argparse.Namespace) -> int:
    from .generate import GazeRuntime, Prompt, Timings
    from .profile import kv_bytes_per_step
    from .sampling import SamplingConfig

    def load(path: Path) -> GazeRuntime:
        # Two runtimes alternate: no spinning thread pools (a spinning one slows the other).
        return GazeRuntime.load(path, threads=args.threads, spinning=False)

    # Two runtimes (each owns its cache): gaze steps on one, dense steps (gaze off: causal attention over every
    # slot, what a dense model does) on the other, the export itself or a dense twin's.
    gaze_rt = load(args.export)
    dense_rt = load(args.dense or args.export)
    count = args.frames or args.images
    for rt in (gaze_rt, dense_rt):
        if count > rt.shape.max_images:
            raise InputError(f"{count} images/frames per prompt; {rt.folder.path} takes at most {rt.shape.max_images}")
    rng = np.random.default_rng(0)
    size = gaze_rt.shape.image_size
    pictures = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    prompts = [Prompt(None, pictures, frames=bool(args.frames)) for _ in range(args.batch)]
    sampling = SamplingConfig(max_new_tokens=args.warmup + args.repeats + 1, ignore_eos=True)
    timings = {"gaze": Timings(), "dense": Timings()}
    chunk = args.prefill_chunk
    streams = {"gaze": gaze_rt.stream(prompts, sampling, timings=timings["gaze"], prefill_chunk=chunk),
               "dense": dense_rt.stream(prompts, sampling, timings=timings["dense"], gaze=False, prefill_chunk=chunk)}
    live = dict(streams)
    while live:  # one token of A, one of B, ...
        for name in list(live):
            if next(live[name], None) is None:
                del live[name]
    results: dict[str, Any] = {}
    for name, t in timings.items():
        measured = t.step_s[args.warmup :]
        results[name] = {**summary(measured), "tokens_per_s": args.batch / float(np.median(measured)),
                         "prefill_ms": t.prefill_s * 1e3, "ttft_ms": (t.ttft_s or 0.0) * 1e3}
    spec = gaze_rt.backend.spec
    assert spec is not None
    context = spec.capacity - 1
    kv = kv_bytes_per_step(gaze_rt.shape, args.batch, count, context, frames=bool(args.frames))
    weights = sum(p.stat().st_size for p in gaze_rt.folder.path.glob("decoder.onnx*"))
    ideal = (weights + kv["dense"]) / (weights + kv["gaze"])
    speedup = results["dense"]["median_ms"] / results["gaze"]["median_ms"]
    report = {"bench": "decode", "export": str(args.export), "dense": str(args.dense or "same export, gaze off"),
              "images": 0 if args.frames else args.images, "frames": args.frames, "batch": args.batch,
              "context_tokens": context, "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
              "machine": machine(), "results": results, "speedup": speedup,
              "bytes_per_step": {"weights": weights, **kv}, "ideal_ratio": ideal, "speedup_of_ideal": speedup / ideal}
    out = _table_stream(args)
    for name in ("gaze", "dense"):
        r = results[name]
        print(f"{name:>5}: decode {r['median_ms']:.2f} ms/token median (p90 {r['p90_ms']:.2f}), "
              f"{r['tokens_per_s']:.1f} tokens/s in total; prefill {r['prefill_ms']:.0f} ms", file=out)
    print(f"dense / gaze: {speedup:.2f}x; ideal by bytes read per step {ideal:.2f}x ({speedup / ideal:.2f} of ideal); "
          f"context {context} tokens, batch {args.batch}", file=out, flush=True)
    console.write_json(report, args.json)
    return 0


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `gaze bench op` and `gaze bench decode` to a `gaze` argparse subparsers object."""
    p = subparsers.add_parser("bench", help="benchmarks: one GazeAttention layer (op) or the decode loop (decode)")
    sub = p.add_subparsers(dest="bench_command", required=True)
    op = sub.add_parser("op", help="one GazeAttention layer, gaze vs dense decode step over the same cache",
                        formatter_class=console.HelpFormatter)
    op.add_argument("--visual-tokens", type=_ints, default=None,
                    help="comma-separated list (default 4096,16384; cuda: 729,4096,16384)")
    op.add_argument("--keep", type=_fraction, default=0.1, help="fraction of regions each gaze query keeps")
    op.add_argument("--batch", type=_ints, default=None,
                    help="sequences per batch: a comma-separated list (default 1,4; cuda: 1,8)")
    op.add_argument("--kv-heads", type=_positive, default=2)
    op.add_argument("--group", type=_positive, default=7, help="query heads per KV head")
    op.add_argument("--head-dim", type=_ints, default=None, help="comma-separated list (default 64; cuda: 64,128)")
    op.add_argument("--region-tokens", type=_positive, default=36, help="tokens per region (6 x 6)")
    op.add_argument("--text-tokens", type=_positive, default=64, help="dense tokens in the cache")
    op.add_argument("--dtype", choices=("fp32", "fp16"), default=None, help="default fp32; cuda: fp16")
    op.add_argument("--routing", choices=("kv_head", "query_head"), default="kv_head")
    op.add_argument("--backend", choices=("onnxruntime", "cuda"), default="onnxruntime",
                    help="onnxruntime (CPU, the exported node) or cuda (the CUDA kernels vs torch SDPA flash; "
                         "needs a GPU, CuPy or cuda-python, libgaze_kernels.so or $GAZE_KERNELS_LIB)")
    _timing_flags(op)
    op.set_defaults(func=run_op)
    dec = sub.add_parser("decode", help="decode loop of an export, gaze vs dense steps",
                         formatter_class=console.HelpFormatter)
    dec.add_argument("export", type=Path, help="export folder written by `gaze export`")
    dec.add_argument("--dense", type=Path, default=None, metavar="EXPORT",
                     help="a dense twin's export for the dense steps (default: this export with gaze turned off)")
    group = dec.add_mutually_exclusive_group()
    group.add_argument("--images", type=ca.int_in(1, 1024), default=1, help="images per prompt (generated pixels)")
    group.add_argument("--frames", type=ca.int_in(1, 1024), default=0,
                       help="video frames per prompt, instead of images (generated pixels; 0: images)")
    dec.add_argument("--batch", type=ca.int_in(1, 4096), default=1, help="sequences per batch")
    dec.add_argument("--prefill-chunk", type=_positive, default=256,
                     help="tokens per prefill call (never inside an image); bounds prefill memory")
    _timing_flags(dec)
    dec.set_defaults(func=run_decode)
    return p


def _timing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=ca.threads, default=1, help="intra-op threads of the backend, 1 .. 1024")
    p.add_argument("--warmup", type=ca.non_negative_int, default=3, help="untimed rounds first")
    p.add_argument("--repeats", type=ca.int_in(1, 1_000_000), default=20, help="timed rounds")
    console.add_json_flag(p, "the report", ca.output_file(".json", stdout=True))


def _table_stream(args: argparse.Namespace) -> TextIO:
    """The table goes to stdout, or to stderr when the JSON report takes stdout (`--json -`)."""
    return sys.stderr if console.json_to_stdout(args.json) else sys.stdout
