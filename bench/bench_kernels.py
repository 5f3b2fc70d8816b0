"""Gaze decode attention (CUDA kernels via libgaze_kernels.so) vs dense decode attention.

GPU only for numbers. For each case (visual tokens 729 / 4096 / 16384, batch 1 / 8, head dim
64 / 128, fp16, 2x2 regions, 10% of regions kept) it times one decode step (T = 1, every query a
gaze query) over a static cache and prints:

  speedup            dense time / gaze time (dense: torch SDPA, only where torch has CUDA)
  ideal              dense bytes / gaze bytes (K/V read; gaze adds descriptors and slot metadata)
  gaze GB/s          gaze bytes / gaze time, and as % of a measured device-to-device copy
  select us          region scoring + top-k alone (select stage; slot index excluded)
  index us           KV write + per-call slot index (rebuilt every call: see docs/KERNELS.md)

Device memory and timing go through CuPy or cuda-python (plugins_trt/python/gaze_backends.py),
not torch: the README installs CPU torch. The dense SDPA column needs torch with CUDA and is
"-" without it.

    python bench/bench_kernels.py [--json bench/results/kernels.json] [--lib build/plugins_trt/libgaze_kernels.so]
    python bench/bench_kernels.py --cpu-smoke     # the CPU harness build, one tiny case: checks this script runs

Exits with a message and status 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):  # noqa: ANN202 - modules loaded by path, as tests/ does
    spec = importlib.util.spec_from_file_location(name, REPO / "plugins_trt" / "python" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


gk = _load("gaze_kernels")
gb = _load("gaze_backends")


def time_ms(backend, fn, iters: int = 50, warmup: int = 10) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    backend.synchronize()
    return statistics.median(backend.time_ms(fn) for _ in range(iters))


def copy_bandwidth(backend, nbytes: int = 1 << 30) -> float:  # noqa: ANN001
    """GB/s of a large device-to-device copy (read + write bytes)."""
    src, dst = backend.empty((nbytes,), np.uint8), backend.empty((nbytes,), np.uint8)
    ms = time_ms(backend, lambda: backend.copy(dst, src), iters=20, warmup=3)
    return 2 * nbytes / ms / 1e6


def build_case(backend, batch: int, visual: int, head_dim: int, keep: float = 0.1, seed: int = 0) -> dict:  # noqa: ANN001
    side = math.isqrt(visual)
    assert side * side == visual, "visual token counts are square grids"
    q_heads, kv_heads = (16, 2) if head_dim == 64 else (32, 8)
    regions_w = -(-side // 2)
    R = regions_w * regions_w
    prefix, suffix = 16, 32
    L = prefix + visual + suffix
    S = L + 1  # the decode token's slot
    rng = np.random.default_rng(seed)
    grid = np.arange(visual)
    region = (grid // side // 2) * regions_w + (grid % side) // 2
    slot_region = np.full((batch, S), -1, np.int64)
    slot_region[:, prefix:prefix + visual] = region
    slot_pos = np.broadcast_to(np.arange(S, dtype=np.int64), (batch, S)).copy()
    k = rng.standard_normal((batch, kv_heads, S, head_dim), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((batch, kv_heads, S, head_dim), dtype=np.float32).astype(np.float16)
    order = np.argsort(region, kind="stable")  # descriptor sums by segment (np.add.at is far slower)
    starts = np.flatnonzero(np.r_[True, np.diff(region[order]) != 0])
    desc = np.add.reduceat(k[:, :, prefix:prefix + visual][:, :, order].astype(np.float32), starts, axis=2)
    q = rng.standard_normal((batch, q_heads, 1, head_dim), dtype=np.float32).astype(np.float16)
    top_k = max(1, round(keep * R))
    up = backend.upload
    return dict(batch=batch, visual=visual, head_dim=head_dim, q_heads=q_heads, kv_heads=kv_heads, R=R, S=S, L=L,
                top_k=top_k, q=up(q), k=up(k), v=up(v), desc=up(desc), new_k=up(k[:, :, L:L + 1]),
                new_v=up(v[:, :, L:L + 1]), slot_pos=up(slot_pos), slot_region=up(slot_region),
                slot_valid=up(np.ones((batch, S), bool)), gaze=up(np.ones((batch, 1), bool)),
                write_offset=up(np.array([L], np.int64)), out=up(np.zeros(q.shape, np.float16)))


def dense_ms(c: dict) -> tuple[float | None, str]:
    """torch SDPA decode over a cache of the same shape (its own tensors), if torch has CUDA."""
    try:
        import torch
    except ImportError:
        return None, "- (torch not installed)"
    if not torch.cuda.is_available():
        return None, "- (torch has no CUDA)"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, Hq, Hkv, D, S = c["batch"], c["q_heads"], c["kv_heads"], c["head_dim"], c["S"]
    k = torch.randn((B, Hkv, S, D), dtype=torch.float16, device="cuda")
    v, q = torch.randn_like(k), torch.randn((B, Hq, 1, D), dtype=torch.float16, device="cuda")
    backend = "flash"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(q, k, v, enable_gqa=True)

        def dense() -> None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa(q, k, v, enable_gqa=True)
    except RuntimeError:
        backend = "default (flash refused these shapes)"

        def dense() -> None:
            sdpa(q, k, v, enable_gqa=True)

    for _ in range(10):
        dense()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dense()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), backend


def run_case(backend, c: dict, iters: int = 50) -> dict:  # noqa: ANN001
    lib = backend.lib
    B, Hq, Hkv, D, S, R = c["batch"], c["q_heads"], c["kv_heads"], c["head_dim"], c["S"], c["R"]
    problem = gk.Problem(batch=B, new_tokens=1, cache_len=S, num_regions=R, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                         dtype=gk.F16, top_k=c["top_k"], max_region_tokens=4)
    attrs = gk.Attrs(c["top_k"], 4, 1.0 / math.sqrt(D))
    ws_bytes = lib.workspace_size(problem)
    ws = backend.empty((ws_bytes,), np.uint8)
    t = gk.Tensors(c["q"].ptr, c["new_k"].ptr, c["new_v"].ptr, c["k"].ptr, c["v"].ptr, c["desc"].ptr,
                   c["slot_pos"].ptr, c["slot_region"].ptr, c["slot_valid"].ptr, c["gaze"].ptr,
                   c["write_offset"].ptr, c["out"].ptr, c["k"].ptr, c["v"].ptr, c["desc"].ptr)

    def stages(mask: int):  # noqa: ANN202
        return lambda: lib.forward_stages(problem, attrs, t, ws.ptr, ws_bytes, backend.stream, mask)

    # Descriptor sums grow by the re-written token each call; harmless for timing.
    warm = min(10, iters)
    gaze_ms = time_ms(backend, stages(7), iters, warm)
    index_ms = time_ms(backend, stages(1), iters, warm)
    select_ms = time_ms(backend, stages(3), iters, warm) - index_ms
    if lib.device_errors(problem, ws.ptr, backend.stream):
        raise RuntimeError("kernels reported a contract violation")
    dense, dense_backend = dense_ms(c) if isinstance(backend, gb.GpuBackend) else (None, "- (CPU smoke run)")

    elem = 2
    dense_bytes = 2 * B * Hkv * S * D * elem
    visual_kept = min(c["top_k"], R) * 4
    dense_tokens = S - c["visual"]
    gaze_kv = 2 * B * Hkv * (dense_tokens + visual_kept) * D * elem
    gaze_bytes = gaze_kv + B * Hkv * R * D * 4 + B * S * (8 + 8 + 1)  # + descriptors + slot metadata
    return dict(batch=B, visual_tokens=c["visual"], head_dim=D, q_heads=Hq, kv_heads=Hkv, regions=R,
                top_k=c["top_k"], gaze_ms=gaze_ms, dense_ms=dense, select_us=select_ms * 1e3,
                index_us=index_ms * 1e3, speedup=dense / gaze_ms if dense else None,
                ideal_byte_ratio=dense_bytes / gaze_bytes, gaze_bytes=gaze_bytes, dense_bytes=dense_bytes,
                gaze_gbps=gaze_bytes / gaze_ms / 1e6, dense_gbps=dense_bytes / dense / 1e6 if dense else None,
                dense_backend=dense_backend)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=REPO / "build" / "plugins_trt" / "libgaze_kernels.so")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="one tiny case on the CPU harness build (build/kernels-cpu): checks the script, no numbers")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        backend = gb.cpu_backend(gk.build_cpu(REPO / "build" / "kernels-cpu"))
        device, copy_gbps = "CPU harness (smoke run, timings meaningless)", None
        grid = [(1, 16, 64)]
    else:
        if not args.lib.is_file():
            sys.stderr.write(f"bench_kernels: {args.lib} not found; build it: cmake -S plugins_trt "
                             "-B build/plugins_trt && cmake --build build/plugins_trt -j\n")
            return 2
        try:
            backend = gb.gpu_backend(args.lib)
        except gb.GpuUnavailable as e:
            sys.stderr.write(f"bench_kernels: {e}; run it on a GPU machine\n")
            return 2
        device, copy_gbps = backend.rt.device_name(), copy_bandwidth(backend)
        grid = [(b, v, d) for v in (729, 4096, 16384) for b in (1, 8) for d in (64, 128)]
    rows = []
    print(f"{device}: device copy {_fmt(copy_gbps, '.0f')} GB/s")
    print(f"{'B':>2} {'visual':>6} {'D':>4} {'R':>5} {'k':>4} {'gaze ms':>8} {'dense ms':>8} {'speedup':>7} "
          f"{'ideal':>6} {'gaze GB/s':>9} {'%copy':>6} {'select us':>9} {'index us':>8}")
    for batch, visual, head_dim in grid:
        r = run_case(backend, build_case(backend, batch, visual, head_dim), iters=3 if args.cpu_smoke else 50)
        if isinstance(backend, gb.GpuBackend):
            backend.free_all()
        r["copy_gbps"] = copy_gbps
        rows.append(r)
        pct = 100 * r["gaze_gbps"] / copy_gbps if copy_gbps else None
        print(f"{batch:>2} {visual:>6} {head_dim:>4} {r['regions']:>5} {r['top_k']:>4} {r['gaze_ms']:>8.4f} "
              f"{_fmt(r['dense_ms'], '>8.4f'):>8} {_fmt(r['speedup'], '>7.2f'):>7} {r['ideal_byte_ratio']:>6.2f} "
              f"{r['gaze_gbps']:>9.0f} {_fmt(pct, '>5.0f'):>5}% {r['select_us']:>9.1f} {r['index_us']:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "copy_gbps": copy_gbps, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
