"""`gaze profile`: latency, KV bytes read per decode step (gaze vs dense), memory by kind, roofline projection.

KV bytes read are computed from the cache layout and the per-layer top_k: a gaze step
reads the dense tokens (text, context), the k selected regions' tokens and the R
descriptors; dense (top_k = R) reads every token. Weights are read once per step. The
roofline divides bytes per step by each Jetson board's datasheet memory bandwidth: a
projection, not a measurement.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import Any

import numpy as np

from .folder import ModelShape
from .generate import GazeRuntime, Prompt, Timings
from .sampling import SamplingConfig

#: Datasheet memory bandwidth (GB/s) of the Jetson targets (NVIDIA's Jetson module datasheets).
JETSON_BANDWIDTH_GBPS = {"Orin Nano 8GB": 68.0, "Orin Nano 8GB Super": 102.0, "Orin NX 16GB": 102.0,
                         "AGX Orin 64GB": 204.8, "AGX Thor": 273.0}


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
    """NVML used/total bytes of GPU 0 where pynvml and a GPU exist; None otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return {"used": int(info.used), "total": int(info.total)}
    except Exception:  # no pynvml, no driver, no GPU: the profile reports host memory only
        return None


def check_profile_args(rt: GazeRuntime, images: int = 1, frames: int = 0, batch: int = 1,
                       new_tokens: int = 32) -> None:
    """InputError for a profile request this export cannot run or this machine cannot hold, before any work."""
    from gaze_edge.errors import InputError

    count = frames or images
    for name, value in (("images" if not frames else "frames", count), ("batch", batch), ("new tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if count > rt.shape.max_images:
        raise InputError(f"{count} {'frames' if frames else 'images'} per prompt; this export takes at most "
                         f"{rt.shape.max_images} (gaze export --max-images)")
    least = count * rt.shape.tokens_per_image + new_tokens
    if least > rt.shape.max_seq_len:
        raise InputError(f"{count} images and {new_tokens} new tokens need more than {least} cache slots; this "
                         f"export holds {rt.shape.max_seq_len}: use fewer --new-tokens or images")
    rt.folder.check_fits(batch, least)


def profile(rt: GazeRuntime, images: int = 1, frames: int = 0, batch: int = 1, new_tokens: int = 32,
            seed: int = 0) -> dict[str, Any]:
    """Run one batch and report timings, bytes, memory and the roofline projection."""
    count = frames or images
    rng = np.random.default_rng(seed)
    size = rt.shape.image_size
    pictures = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    prompts = [Prompt(None, pictures, frames=bool(frames)) for _ in range(batch)]
    sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    timings = Timings()
    rss_before = current_rss_bytes()
    steps = list(rt.stream(prompts, sampling, timings=timings))
    spec = rt.backend.spec
    assert spec is not None
    prompt_len = spec.capacity - new_tokens
    context = prompt_len + len(steps) - 1
    kv = kv_bytes_per_step(rt.shape, batch, count, context, frames=bool(frames))
    memory = rt.backend.memory()
    peak = peak_rss_bytes()
    # Whatever the run added at its peak beyond the cache buffers: activations, ORT arenas, logits buffers.
    workspace = None if rss_before is None or peak < rss_before else max(
        0, peak - rss_before - spec.kv_bytes - spec.desc_bytes)
    decoder_weights = rt.folder.decoder_path.stat().st_size + sum(
        p.stat().st_size for p in rt.folder.path.glob("decoder.onnx.data"))
    weight_read = decoder_weights + batch * rt.shape.hidden_size * rt.shape.itemsize
    report: dict[str, Any] = {
        "backend": rt.backend.name,
        "batch": batch, "images": 0 if frames else images, "frames": frames,
        "prompt_tokens": prompt_len, "new_tokens": len(steps),
        **timings.as_dict(),
        "kv_bytes_per_step": kv,
        "kv_read_reduction": 1 - kv["gaze"] / kv["dense"],
        "memory_bytes": {**memory, "slot_metadata": spec.slot_bytes,
                         "kv_formula": spec.kv_bytes, "descriptors_formula": spec.desc_bytes,
                         "workspace_activations_estimate": workspace, "peak_rss": peak, "gpu": gpu_memory()},
        "roofline_projection": {
            "note": "projection: tokens/s = batch x bandwidth / (decoder weights + KV bytes per step); not measured",
            "weights_bytes_per_step": weight_read,
            "boards": {name: {"gaze_tokens_per_s": batch * bw * 1e9 / (weight_read + kv["gaze"]),
                              "dense_tokens_per_s": batch * bw * 1e9 / (weight_read + kv["dense"])}
                       for name, bw in JETSON_BANDWIDTH_GBPS.items()},
        },
    }
    return report


def format_table(report: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    rows = [
        ("vision", ms(report["vision_ms"])), ("prefill", ms(report["prefill_ms"])),
        ("time to first token", ms(report["ttft_ms"])),
        ("decode / token (median)", ms(report["decode_ms_per_token_median"])),
        ("decode / token (p90)", ms(report["decode_ms_per_token_p90"])),
        ("decode tokens/s", "-" if report["decode_tokens_per_s"] is None
         else f"{report['decode_tokens_per_s'] * report['batch']:.1f}"),
        ("KV bytes read / step gaze", f"{report['kv_bytes_per_step']['gaze']:,}"),
        ("KV bytes read / step dense", f"{report['kv_bytes_per_step']['dense']:,}"),
    ]
    rows += [(f"memory {k}", f"{v:,} B") for k, v in report["memory_bytes"].items() if isinstance(v, int)]
    for board, r in report["roofline_projection"]["boards"].items():
        rows.append((f"projection {board}", f"gaze {r['gaze_tokens_per_s']:.0f} / dense {r['dense_tokens_per_s']:.0f}"
                                            " tok/s"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plot(report: dict[str, Any], path: str) -> None:
    """Bar chart of the roofline projection, gaze vs dense, per board (matplotlib only when asked)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from gaze_edge.errors import InputError

        raise InputError("--plot needs matplotlib (pip install matplotlib)") from exc
    boards = report["roofline_projection"]["boards"]
    names = list(boards)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [boards[n]["gaze_tokens_per_s"] for n in names], 0.4, label="gaze")
    ax.bar(x + 0.2, [boards[n]["dense_tokens_per_s"] for n in names], 0.4, label="dense (top_k = R)")
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("decode tokens/s (projection)")
    ax.set_title(f"roofline projection, {report['images'] or report['frames']} "
                 f"{'frames' if report['frames'] else 'images'}, batch {report['batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
