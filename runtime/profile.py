"""`gaze profile`: measured latency per stage (gaze vs dense), KV bytes read per decode step, memory by
kind, power where it can be read, and a roofline projection kept apart from the measurements.

**Measured** (this machine, this backend), with `gaze bench`'s machinery (runtime/bench.py
`interleave`, `summary`): `warmup` untimed then `repeats` timed generations per mode, the modes
alternating (gaze, dense, gaze, dense, ...). A generation is one batch of `batch` prompts of
generated pixels, `new_tokens` tokens each (eos ignored). "gaze" runs the decode steps as gaze
queries; "dense" runs the same export with every decode step a dense query (`stream(gaze=False)`:
causal attention over every cached token, what the model computes with top_k = R), or a dense
twin's export. Per stage the median and p90: vision, prefill, time to first token and the whole
request over the `repeats` runs; decode ms/token over every decode step of every timed run.
Tokens/s **per sequence** = 1000 / decode ms/token (each sequence gets one token per step);
**in total** = batch x that.

**Projection** (not measured): KV bytes read are computed from the cache layout and the per-layer
top_k (a gaze step reads the dense tokens, the k selected regions' tokens and the R descriptors;
dense reads every token); weights are read once per step. A step on a Jetson board takes
(weights + KV bytes) / datasheet bandwidth + a per-token launch overhead (`launch_overhead_us`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from gaze_edge.errors import InputError, interrupt_in_chain

from .bench import interleave, machine, summary
from .folder import ModelShape
from .generate import GazeRuntime, Prompt, Timings
from .sampling import SamplingConfig

#: Datasheet memory bandwidth (GB/s) of the Jetson targets (NVIDIA's Jetson module datasheets).
JETSON_BANDWIDTH_GBPS = {"Orin Nano 8GB": 68.0, "Orin Nano 8GB Super": 102.0, "Orin NX 16GB": 102.0,
                         "AGX Orin 64GB": 204.8, "AGX Thor": 273.0}

#: The per-token launch overhead of the projection (an assumption, not a measurement; docs/RUNTIME.md):
#: the TensorRT backend replays one CUDA graph per decode step (runtime/trt_backend.py GraphPolicy), so
#: the CPU no longer launches kernel by kernel, but the GPU still starts dependent kernels of a graph
#: about 1-2 us apart (we take 2 us for an Orin-class iGPU), and each step pays a fixed host part: the
#: graph launch, the host -> device copies of the step's embeddings, gaze flags and slot columns,
#: the logits copy back and the stream synchronize (30 us).
LAUNCH_US_PER_KERNEL = 2.0
HOST_US_PER_STEP = 30.0
#: Kernels per decoder layer after TensorRT's fusions: RMSNorm, QKV GEMM, rotary, GazeAttention,
#: output GEMM, residual add, RMSNorm, gate/up GEMM, SiLU x up, down GEMM (+ its residual add fused).
KERNELS_PER_LAYER = 10
#: Kernels per step outside the layers: embedding gather, final RMSNorm, LM head GEMM, argmax/sampling.
KERNELS_PER_STEP = 4

STAGES = ("vision_ms", "prefill_ms", "ttft_ms", "request_ms", "decode_ms_per_token")
STAGE_NAMES = {"vision_ms": "vision", "prefill_ms": "prefill", "ttft_ms": "time to first token",
               "request_ms": "whole request", "decode_ms_per_token": "decode / token"}


def launch_overhead_us(shape: ModelShape) -> float:
    """The projection's per-token (per decode step) launch overhead, microseconds: host part + kernels x gap."""
    return HOST_US_PER_STEP + (KERNELS_PER_LAYER * shape.num_layers + KERNELS_PER_STEP) * LAUNCH_US_PER_KERNEL


def kv_bytes_per_step(shape: ModelShape, batch: int, images: int, context_len: float,
                      top_k_per_layer: Sequence[float] | None = None, frames: bool = False) -> dict[str, int]:
    """KV (+ descriptor) bytes one decode step reads at a context of context_len tokens, gaze and dense.

    A gaze step reads the dense tokens, the k selected regions' tokens (per KV head, or per query
    head with `query_head` routing) and the R descriptors; a dense step reads every token.
    ``top_k_per_layer`` defaults to the export's (gaze calibrate asks about other budgets).
    """
    s = shape
    visual = images * s.tokens_per_image
    dense_tokens = context_len - visual
    per_token = 2 * s.head_dim * s.itemsize * s.kv_heads  # key + value of all KV heads, one layer
    rt = s.region_frames if frames else 1
    region_tokens = s.region_size[0] * s.region_size[1] * rt
    regions = -(-images // rt) * s.regions_per_image
    readers = s.num_heads // s.kv_heads if s.routing == "query_head" else 1
    gaze = dense = 0.0
    for k in s.top_k_per_layer if top_k_per_layer is None else top_k_per_layer:
        kept = min(min(k, regions) * region_tokens, visual)
        gaze += per_token * (dense_tokens + readers * kept) + s.kv_heads * regions * s.head_dim * 4
        dense += per_token * context_len
    return {"gaze": int(round(gaze * batch)), "dense": int(round(dense * batch))}


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def gpu_memory() -> dict[str, Any] | None:
    """NVML used/total bytes of GPU 0 where pynvml and a GPU exist; None otherwise (an interrupt is re-raised)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return {"used": int(info.used), "total": int(info.total)}
    except Exception as exc:  # no pynvml, no driver, no GPU: the profile reports host memory only
        interrupt = interrupt_in_chain(exc)  # Ctrl-C inside the import can arrive as an ImportError
        if interrupt is not None:
            raise interrupt from None
        return None


def check_profile_args(rt: GazeRuntime, images: int = 1, frames: int = 0, batch: int = 1,
                       new_tokens: int = 32, warmup: int = 0, repeats: int = 1) -> None:
    """InputError for a profile request this export cannot run or this machine cannot hold, before any work."""
    from gaze_edge.errors import InputError

    count = frames or images
    for name, value, least in (("images" if not frames else "frames", count, 1), ("batch", batch, 1),
                               ("new tokens", new_tokens, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    if count > rt.shape.max_images:
        raise InputError(f"{count} {'frames' if frames else 'images'} per prompt; this export takes at most "
                         f"{rt.shape.max_images} (gaze export --max-images)")
    least = count * rt.shape.tokens_per_image + new_tokens
    if least > rt.shape.max_seq_len:
        raise InputError(f"{count} images and {new_tokens} new tokens need more than {least} cache slots; this "
                         f"export holds {rt.shape.max_seq_len}: use fewer --max-new-tokens or images")
    rt.folder.check_fits(batch, least)


def _stage_stats(runs: list[Timings], request_s: list[float]) -> dict[str, Any]:
    steps = [s for t in runs for s in t.step_s]
    out: dict[str, Any] = {
        "vision_ms": summary([t.vision_s for t in runs]),
        "prefill_ms": summary([t.prefill_s for t in runs]),
        "ttft_ms": summary([t.ttft_s for t in runs]),
        "request_ms": summary(request_s),
        "decode_ms_per_token": summary(steps) if steps else None,
    }
    return out


def _throughput(stats: dict[str, Any], batch: int, new_tokens: int) -> dict[str, Any]:
    decode = stats["decode_ms_per_token"]
    per_seq = None if decode is None else 1e3 / decode["median_ms"]
    return {"decode_tokens_per_s_per_sequence": per_seq,
            "decode_tokens_per_s_total": None if per_seq is None else per_seq * batch,
            "request_tokens_per_s_total": batch * new_tokens * 1e3 / stats["request_ms"]["median_ms"]}


def profile(rt: GazeRuntime, images: int = 1, frames: int = 0, batch: int = 1, new_tokens: int = 32,
            seed: int = 0, *, warmup: int = 1, repeats: int = 5, dense: bool = True,
            dense_rt: GazeRuntime | None = None, launch_overhead_us: float | None = None, power: bool = True,
            project_layers: int | None = None,
            progress: Callable[[str], None] | None = None,
            detail: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time `warmup` + `repeats` generations per mode (gaze, and dense unless dense=False) and report.

    `progress` gets a line per phase, `detail` one per generation (the CLI's stderr, -v).

    Returns the report `format_table` prints and `plot` draws (keys: docs/RUNTIME.md "gaze profile").
    """
    from .telemetry import PowerSampler, nvml_info

    check_profile_args(rt, images, frames, batch, new_tokens, warmup, repeats)
    say = progress or (lambda _m: None)
    count = frames or images
    rng = np.random.default_rng(seed)
    size = rt.shape.image_size
    pictures = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    prompts = [Prompt(None, pictures, frames=bool(frames)) for _ in range(batch)]
    sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    modes: dict[str, tuple[GazeRuntime, bool]] = {"gaze": (rt, True)}
    if dense:
        modes["dense"] = (dense_rt or rt, False)  # dense decode steps (of a dense twin too, as gaze bench does)
    timed: dict[str, list[Timings]] = {name: [] for name in modes}
    produced: dict[str, int] = {}

    def run(name: str) -> None:
        runtime, gaze = modes[name]
        t = Timings()
        produced[name] = sum(1 for _ in runtime.stream(prompts, sampling, timings=t, gaze=gaze))
        timed[name].append(t)
        if detail is not None:
            steps = np.asarray(t.step_s) * 1e3
            decode = f"{np.median(steps):.2f}" if steps.size else "-"
            detail(f"gaze profile: {name} run {len(timed[name])}: vision {t.vision_s * 1e3:.2f} ms, prefill "
                   f"{t.prefill_s * 1e3:.2f} ms, TTFT {t.ttft_s * 1e3:.2f} ms, decode {decode} ms/token (median)")

    calls: dict[str, Callable[[], None]] = {name: partial(run, name) for name in modes}
    rss_before = current_rss_bytes()
    started = time.perf_counter()
    if warmup:
        say(f"gaze profile: {warmup} warm-up generation(s) per mode ({', '.join(modes)})")
        interleave(calls, warmup, 0)
    for name in modes:
        timed[name].clear()
    say(f"gaze profile: {repeats} timed generation(s) per mode, {batch} x {new_tokens} tokens each")
    sampler = PowerSampler() if power else None
    if sampler is not None:
        sampler.start()
    try:
        request_s = interleave(calls, 0, repeats)
    finally:
        if sampler is not None:
            sampler.stop()
    wall_s = time.perf_counter() - started

    spec = rt.backend.spec
    assert spec is not None
    prompt_len = spec.capacity - new_tokens
    context = prompt_len + produced["gaze"] - 1  # the context of the last decode step
    kv = kv_bytes_per_step(rt.shape, batch, count, context, frames=bool(frames))
    memory = rt.backend.memory()
    peak = peak_rss_bytes()
    # Whatever the runs added at their peak beyond the cache buffers: activations, ORT arenas, logits buffers.
    workspace = None if rss_before is None or peak < rss_before else max(
        0, peak - rss_before - spec.kv_bytes - spec.desc_bytes)
    measured: dict[str, Any] = {}
    for name in modes:
        stats = _stage_stats(timed[name], request_s[name])
        measured[name] = {**stats, **_throughput(stats, batch, produced[name])}
    if "dense" in measured and measured["dense"]["decode_ms_per_token"] and measured["gaze"]["decode_ms_per_token"]:
        speedup = measured["dense"]["decode_ms_per_token"]["median_ms"] / measured["gaze"]["decode_ms_per_token"][
            "median_ms"]
    else:
        speedup = None
    return {
        "profile_version": 2,
        "export": str(rt.folder.path),
        "dense": None if not dense else (str(dense_rt.folder.path) if dense_rt else "same export, gaze off"),
        "backend": rt.backend.name, "machine": machine(),
        "batch": batch, "images": 0 if frames else images, "frames": frames,
        "prompt_tokens": prompt_len, "new_tokens": produced["gaze"], "context_tokens": context,
        "warmup": warmup, "repeats": repeats, "wall_s": wall_s,
        "measured": measured,
        "decode_speedup_dense_over_gaze": speedup,
        "kv_bytes_per_step": kv,
        "kv_read_reduction": 1 - kv["gaze"] / kv["dense"],
        "memory_bytes": {**memory, "slot_metadata": spec.slot_bytes,
                         "kv_formula": spec.kv_bytes, "descriptors_formula": spec.desc_bytes,
                         "workspace_activations_estimate": workspace, "peak_rss": peak, "gpu": gpu_memory()},
        "gpu": nvml_info(),
        "power": sampler.summary() if sampler is not None else {"absent": "not sampled (power=False)"},
        "decoder_weight_bytes": layer_weight_bytes(rt),
        "roofline_projection": projection(rt, batch, kv, launch_overhead_us, project_layers),
    }


def layer_weight_bytes(rt: GazeRuntime) -> dict[str, int] | None:
    """The export's decoder weight bytes per layer and for the rest (gaze_config.json; None: an older export)."""
    weights = rt.folder.config["model"]["decoder"].get("weights")
    if not isinstance(weights, dict):
        return None
    values = (weights.get("per_layer_bytes"), weights.get("other_bytes"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise InputError(f"{rt.folder.path}/gaze_config.json: model.decoder.weights is not two byte counts; "
                         "re-run `gaze export`")
    return {"per_layer_bytes": int(values[0]), "other_bytes": int(values[1])}  # type: ignore[arg-type]


def projection(rt: GazeRuntime, batch: int, kv: dict[str, int], overhead_us: float | None = None,
               layers: int | None = None) -> dict[str, Any]:
    """Tokens/s per Jetson board: a step = (weights + KV bytes) / bandwidth + launch overhead. Not measured.

    ``layers``: project the same model with that many decoder layers (an export made with fewer layers than the
    real model, e.g. a real-size configuration in CI): weights = the rest + layers x one layer's bytes, KV bytes
    scaled by layers / the export's layers (the mean layer's top_k), launch overhead for that many layers.
    """
    own = rt.shape.num_layers
    if layers is None:
        decoder_weights = rt.folder.decoder_path.stat().st_size + sum(
            p.stat().st_size for p in rt.folder.path.glob("decoder.onnx.data"))
    else:
        split = layer_weight_bytes(rt)
        if split is None:
            raise InputError(f"{rt.folder.path} does not record its per-layer weight bytes (an older export): "
                             "re-run `gaze export` to use --project-layers")
        decoder_weights = split["other_bytes"] + layers * split["per_layer_bytes"]
        kv = {mode: int(round(v * layers / own)) for mode, v in kv.items()}
    weight_read = decoder_weights + batch * rt.shape.hidden_size * rt.shape.itemsize
    default = overhead_us is None
    shape = rt.shape if layers is None else replace(rt.shape, num_layers=layers)
    overhead = launch_overhead_us(shape) if overhead_us is None else float(overhead_us)
    boards: dict[str, Any] = {}
    for name, bw in JETSON_BANDWIDTH_GBPS.items():
        entry: dict[str, Any] = {"bandwidth_gbps": bw}
        for mode in ("gaze", "dense"):
            memory_s = (weight_read + kv[mode]) / (bw * 1e9)
            step_s = memory_s + overhead * 1e-6
            entry[mode] = {"step_ms": step_s * 1e3, "memory_ms": memory_s * 1e3,
                           "tokens_per_s_per_sequence": 1 / step_s, "tokens_per_s_total": batch / step_s,
                           "bandwidth_bound_tokens_per_s_total": batch / memory_s}
        boards[name] = entry
    why = (f"default: {HOST_US_PER_STEP:g} us host part per step + {KERNELS_PER_LAYER} x {shape.num_layers} "
           f"layers + {KERNELS_PER_STEP} kernels x {LAUNCH_US_PER_KERNEL:g} us (CUDA graph replay)"
           if default else "given with --launch-overhead-us")
    return {
        "note": "PROJECTION, not measured: step = (decoder weights + KV bytes per step) / datasheet bandwidth "
                "+ launch overhead per token; tokens/s in total = batch / step",
        "decoder_layers": shape.num_layers,
        "layers_projected_from_export": layers is not None,
        "weights_bytes_per_step": weight_read,
        "kv_bytes_per_step": kv,
        "launch_overhead_us_per_token": overhead,
        "launch_overhead_basis": why,
        "boards": boards,
    }


# ------------------------------------------------------------------------------------------ the table


def _ms(stat: dict[str, Any] | None) -> str:
    return "-" if stat is None else f"{stat['median_ms']:.2f} ({stat['p90_ms']:.2f}) ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: measured rows (median, p90 in brackets) gaze | dense, then bytes, memory, power,
    and the projection rows, labelled as such. Every number is the JSON's, rounded."""
    measured = report["measured"]
    modes = list(measured)
    m = report["machine"]
    count = f"{report['frames']} frames" if report["frames"] else f"{report['images']} image(s)"
    head = [f"gaze profile {report['export']}: {report['backend']}, batch {report['batch']}, {count}, "
            f"{report['prompt_tokens']} prompt + {report['new_tokens']} new tokens per sequence",
            f"measured on {m['machine']} ({m['processor'] or 'cpu'}), onnxruntime {m['onnxruntime']}, {m['date']}: "
            f"{report['warmup']} warm-up + {report['repeats']} timed generations per mode; median (p90)"]
    rows: list[tuple[str, ...]] = [("measured", *modes)]
    for key in STAGES:
        rows.append((STAGE_NAMES[key], *(_ms(measured[mode][key]) for mode in modes)))
    rows.append(("decode tok/s per sequence", *(_rate(measured[mode]["decode_tokens_per_s_per_sequence"])
                                                for mode in modes)))
    rows.append((f"decode tok/s in total (batch {report['batch']})",
                 *(_rate(measured[mode]["decode_tokens_per_s_total"]) for mode in modes)))
    rows.append(("request tok/s in total", *(_rate(measured[mode]["request_tokens_per_s_total"]) for mode in modes)))
    if report.get("decode_speedup_dense_over_gaze") is not None:
        rows.append(("decode speedup (dense / gaze ms)", f"{report['decode_speedup_dense_over_gaze']:.2f}x"))
    kv = report["kv_bytes_per_step"]
    rows.append(("KV bytes read / step", f"{kv['gaze']:,}", f"{kv['dense']:,}"))
    rows += [(f"memory {k}", f"{v:,} B") for k, v in report["memory_bytes"].items() if isinstance(v, int)]
    gpu = report["gpu"]
    rows.append(("gpu (NVML)", "absent: " + gpu["absent"] if "absent" in gpu else
                 f"{gpu['device']}: {gpu['memory_used']:,} of {gpu['memory_total']:,} B used"))
    power = report["power"]
    if "absent" in power:
        rows.append(("power", "absent: " + power["absent"].removeprefix("no power telemetry here; ")))
    else:
        for rail, r in power["rails"].items():
            rows.append((f"power {rail}", f"{r['mean_mw'] / 1e3:.2f} W mean, {r['max_mw'] / 1e3:.2f} W max"))
    proj = report["roofline_projection"]
    projected = f" ({proj['decoder_layers']} decoder layers)" if proj.get("layers_projected_from_export") else ""
    rows.append((f"PROJECTION{projected}, not measured", "gaze", "dense"))
    pkv = proj.get("kv_bytes_per_step", kv)
    rows.append(("projection bytes / step (weights + KV)", f"{proj['weights_bytes_per_step'] + pkv['gaze']:,}",
                 f"{proj['weights_bytes_per_step'] + pkv['dense']:,}"))
    rows.append(("projection launch overhead", f"{proj['launch_overhead_us_per_token']:.0f} us per token "
                                               f"({proj['launch_overhead_basis']})"))
    for board, r in proj["boards"].items():
        rows.append((f"projection {board}", f"{r['gaze']['tokens_per_s_total']:.0f} tok/s",
                     f"{r['dense']['tokens_per_s_total']:.0f} tok/s"))
    width = max(len(r[0]) for r in rows)
    # Columns are as wide as the gaze | dense cells; a row with one value (memory, power) just follows its label.
    widths = [max([len(r[i]) for r in rows if len(r) > 2] or [0]) for i in (1, 2)]
    lines = head + [f"{r[0]:<{width}}  " + "  ".join(c if len(r) == 2 else f"{c:<{widths[i]}}"
                                                      for i, c in enumerate(r[1:])) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------- the plot


def plot(report: dict[str, Any], path: str) -> None:
    """Measured stages gaze vs dense (median bars, p90 whiskers) and, in its own marked panel, the projection."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from gaze_edge.errors import InputError

        raise InputError("--plot needs matplotlib (pip install matplotlib)") from exc
    measured = report["measured"]
    modes = list(measured)
    colours = {"gaze": "tab:blue", "dense": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 1.3, 3]})

    def bars(ax: Any, keys: Sequence[str], labels: Sequence[str]) -> None:
        x = np.arange(len(keys))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            stats = [measured[mode][k] for k in keys]
            med = [0.0 if s is None else s["median_ms"] for s in stats]
            up = [0.0 if s is None else s["p90_ms"] - s["median_ms"] for s in stats]
            pos = x + (i - (len(modes) - 1) / 2) * width
            ax.bar(pos, med, width, yerr=[np.zeros(len(med)), up], capsize=3, color=colours.get(mode),
                   label=mode if mode == "gaze" else f"{mode} (gaze off)")
            for p, v, u in zip(pos, med, up, strict=True):  # the median, written above the p90 whisker
                ax.annotate(f"{v:.2f}", (p, v + u), ha="center", va="bottom", fontsize=7, xytext=(0, 3),
                            textcoords="offset points")
        ax.set_xticks(x, labels)
        ax.set_ylabel("ms (bar: median, whisker: p90)")

    m = report["machine"]
    bars(axes[0], ["vision_ms", "prefill_ms", "ttft_ms", "request_ms"], ["vision", "prefill", "TTFT", "request"])
    axes[0].set_title(f"MEASURED per request, {report['repeats']} runs per mode")
    axes[0].legend(fontsize=8)
    bars(axes[1], ["decode_ms_per_token"], ["decode / token"])
    rates = ", ".join(f"{mode} {_rate(measured[mode]['decode_tokens_per_s_total'])}" for mode in modes)
    axes[1].set_title("MEASURED decode", fontsize=10)
    axes[1].set_xlabel(f"tok/s in total: {rates}", fontsize=8)

    proj = report["roofline_projection"]
    ax = axes[2]
    ax.set_facecolor("#f3f0e6")
    names = list(proj["boards"])
    x = np.arange(len(names))
    for i, mode in enumerate(("gaze", "dense")):
        vals = [proj["boards"][n][mode]["tokens_per_s_total"] for n in names]
        bound = [proj["boards"][n][mode]["bandwidth_bound_tokens_per_s_total"] for n in names]
        pos = x + (i - 0.5) * 0.4
        ax.bar(pos, vals, 0.4, color=colours[mode], alpha=0.55, hatch="//", edgecolor="black", linewidth=0.5,
               label=f"{mode}: bandwidth + launch overhead")
        ax.scatter(pos, bound, marker="_", s=200, color="black", zorder=3,
                   label="bandwidth only (no overhead)" if i == 0 else None)
    ax.set_xticks(x, names, rotation=15, fontsize=8)
    ax.set_ylabel("decode tok/s in total (projected)")
    ax.set_title(f"PROJECTION, not measured: datasheet bandwidth\n+ {proj['launch_overhead_us_per_token']:.0f} us "
                 "launch overhead per token", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    count = f"{report['frames']} frames" if report["frames"] else f"{report['images']} image(s)"
    fig.suptitle(f"gaze profile: {report['backend']} on {m['machine']}, batch {report['batch']}, {count}, "
                 f"{report['prompt_tokens']} + {report['new_tokens']} tokens, {report['warmup']} warm-up + "
                 f"{report['repeats']} timed ({m['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
