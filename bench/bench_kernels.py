"""Gaze decode attention (CUDA kernels, node v2 entry point `gaze_forward_v2`) vs dense attention.

GPU only for numbers. For each case (visual tokens 729 / 4096 / 16384, batch 1 / 8, head dim
64 / 128, fp16, 2x2 regions, 10% of regions kept) it times one decode step (T = 1, the query a
gaze query) over a static cache laid out by the runtime's own tables (runtime.cache.SlotState:
text, then the visual tokens region by region, then the query) and reports:

  speedup            dense time / gaze time (dense: torch SDPA flash over the same cache contents,
                     copied into torch tensors; only where torch has CUDA)
  ideal              dense bytes / gaze bytes (the cost model of `gaze bench op`: K/V read, plus the
                     fp32 descriptors for gaze)
  gaze GB/s          gaze bytes / gaze time, and as % of a measured device-to-device copy
  select us          region scoring + top-k alone (stage 2: stages 1+2 minus stage 1)
  write us           KV write + descriptor sums (stage 1)

`gaze bench op --backend cuda` (runtime/bench.py) runs the same cases through `op_case` below.
Device memory and timing go through CuPy or cuda-python (plugins_trt/python/gaze_backends.py),
not torch: the README installs CPU torch.

    python bench/bench_kernels.py [--json bench/results/kernels.json] [--lib build/plugins_trt/libgaze_kernels.so]
    python bench/bench_kernels.py --cpu-smoke     # the CPU harness build, one tiny case: checks this script runs

Without a CUDA GPU it refuses in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIB = REPO / "build" / "plugins_trt" / "libgaze_kernels.so"


def _load(name: str) -> Any:
    """plugins_trt/python modules, loaded by path as tests/ does (one module object per name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "plugins_trt" / "python" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gk = _load("gaze_kernels")
gb = _load("gaze_backends")


class Refused(RuntimeError):
    """The benchmark cannot run here; the message is one line saying why and what to do."""


def gpu_backend(lib: Path = DEFAULT_LIB) -> Any:
    """A GPU backend on `lib`, or Refused (one line): no GPU first, then a missing library."""
    try:
        gb.gpu_runtime()
    except gb.GpuUnavailable as e:
        raise Refused(f"needs an NVIDIA GPU with CUDA: {e}; run it on a GPU machine") from None
    if not lib.is_file():
        raise Refused(f"{lib} not found; build it: cmake -S plugins_trt -B build/plugins_trt && "
                      "cmake --build build/plugins_trt -j")
    try:
        return gb.gpu_backend(lib)
    except gb.GpuUnavailable as e:
        raise Refused(f"{e}; run it on a GPU machine") from None


def time_ms(backend: Any, fn: Any, iters: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    backend.synchronize()
    return statistics.median(backend.time_ms(fn) for _ in range(iters))


def copy_bandwidth(backend: Any, nbytes: int = 1 << 30) -> float:
    """GB/s of a large device-to-device copy (read + write bytes)."""
    src, dst = backend.empty((nbytes,), np.uint8), backend.empty((nbytes,), np.uint8)
    ms = time_ms(backend, lambda: backend.copy(dst, src), iters=20, warmup=3)
    return 2 * nbytes / ms / 1e6


def ideal_bytes(batch: int, kv_heads: int, group: int, head_dim: int, item: int, text: int, visual: int,
                regions: int, top_k: int, region_tokens: int, routing: str) -> dict[str, int]:
    """Cache bytes one decode step reads (runtime/bench.py OpCase.ideal_bytes, the same model)."""
    per_token = 2 * head_dim * item
    kept = min(top_k * region_tokens, visual)
    heads_reading = group if routing == "query_head" else 1
    gaze = kv_heads * (per_token * (text + 1 + heads_reading * kept) + regions * head_dim * 4)
    dense = kv_heads * per_token * (text + visual + 1)
    return {"gaze": batch * gaze, "dense": batch * dense}


def op_case(backend: Any, *, batch: int, visual: int, head_dim: int, kv_heads: int, group: int,
            region_tokens: int, text: int, keep: float, dtype: str = "float16", routing: str = "kv_head",
            iters: int = 50, seed: int = 0, dense: bool = True, return_arrays: bool = False) -> dict[str, Any]:
    """One decode step of one layer through gaze_forward_v2, timed per stage, against dense SDPA.

    return_arrays: also return the host inputs and the output under "arrays" (tests compare them
    with the reference; not JSON)."""
    from gaze_edge.runtime.cache import SlotState

    B, Hkv, D, M = batch, kv_heads, head_dim, region_tokens
    Hq = Hkv * group
    R = -(-visual // M)
    top_k = max(1, round(keep * R))
    L = text + visual  # cached tokens before the query
    S = L + 1          # + the query's slot
    region = np.full(L, -1, np.int64)
    region[text:] = np.arange(visual) // M  # region-major storage, as the runtime lays images out
    slots = SlotState(B, S, R, M)
    slots.write(np.tile(np.arange(L, dtype=np.int64), (B, 1)), np.tile(region, (B, 1)), np.ones((B, L), bool))
    offset = slots.write(np.full((B, 1), L, np.int64), np.full((B, 1), -1, np.int64), np.ones((B, 1), bool))
    tabs = slots.tables()
    dt = gb.np_dtype(dtype)
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, Hkv, S, D), dtype=np.float32).astype(dt)
    v = rng.standard_normal((B, Hkv, S, D), dtype=np.float32).astype(dt)
    desc = np.zeros((B, Hkv, R, D), np.float32)
    desc[:] = np.add.reduceat(k[:, :, text:L].astype(np.float32), np.arange(0, visual, M), axis=2)
    q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32).astype(dt)
    up = backend.upload
    buf = {name: up(np.ascontiguousarray(a)) for name, a in tabs.items()}
    kc, vc, dc = up(k), up(v), up(desc)
    qd, new_k, new_v = up(q), up(np.ascontiguousarray(k[:, :, L:])), up(np.ascontiguousarray(v[:, :, L:]))
    gz, off = up(np.ones((B, 1), bool)), up(np.array([offset], np.int64))
    out = backend.empty((B, Hq, 1, D), dt)
    lib = backend.lib
    problem = gk.Problem(batch=B, new_tokens=1, cache_len=S, num_regions=R, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                         dtype=gk.DTYPE_CODES[dtype], top_k=top_k, max_region_tokens=M)
    attrs = gk.Attrs(top_k, M, 1.0 / math.sqrt(D), gk.ROUTING[routing], 0)
    ws_bytes = lib.workspace_size_v2(problem)
    ws = backend.empty((ws_bytes,), np.uint8)
    base = gk.Tensors(qd.ptr, new_k.ptr, new_v.ptr, kc.ptr, vc.ptr, dc.ptr, buf["slot_pos"].ptr,
                      buf["slot_region"].ptr, buf["slot_valid"].ptr, gz.ptr, off.ptr, out.ptr, kc.ptr, vc.ptr, dc.ptr)
    t = gk.TensorsV2(base, buf["slot_image"].ptr, buf["dense_slots"].ptr, buf["region_slots"].ptr,
                     buf["region_count"].ptr, buf["region_last"].ptr, tabs["dense_slots"].shape[1])

    def stages(mask: int) -> Any:
        return lambda: lib.forward_v2(problem, attrs, t, ws.ptr, ws_bytes, backend.stream, 0, 0, mask)

    warm = min(10, iters)  # the query token is text: repeated calls leave the descriptors unchanged
    gaze_ms = time_ms(backend, stages(7), iters, warm)
    write_ms = time_ms(backend, stages(1), iters, warm)
    select_ms = time_ms(backend, stages(3), iters, warm) - write_ms
    if lib.device_errors(problem, ws.ptr, backend.stream):
        raise RuntimeError("kernels reported a contract violation")
    dense_ms, dense_backend = (dense_sdpa_ms(q, k, v, iters) if dense and isinstance(backend, gb.GpuBackend)
                               else (None, "- (not on a GPU)"))
    ideal = ideal_bytes(B, Hkv, group, D, dt.itemsize, text, visual, R, top_k, M, routing)
    row: dict[str, Any] = dict(
                batch=B, visual_tokens=visual, head_dim=D, q_heads=Hq, kv_heads=Hkv, regions=R, top_k=top_k,
                region_tokens=M, text_tokens=text, dtype=dtype, routing=routing, cache_tokens=S,
                splits_planned=lib.plan_splits(problem, backend.num_sms), gaze_ms=gaze_ms, dense_ms=dense_ms,
                select_us=select_ms * 1e3, write_us=write_ms * 1e3,
                speedup=dense_ms / gaze_ms if dense_ms else None, bytes_per_step=ideal,
                ideal_byte_ratio=ideal["dense"] / ideal["gaze"], gaze_gbps=ideal["gaze"] / gaze_ms / 1e6,
                dense_gbps=ideal["dense"] / dense_ms / 1e6 if dense_ms else None, dense_backend=dense_backend)
    if return_arrays:
        row["arrays"] = dict(q=q, k=k, v=v, slot_region=tabs["slot_region"], out=backend.download(out))
    return row


def dense_sdpa_ms(q: np.ndarray, k: np.ndarray, v: np.ndarray, iters: int = 50) -> tuple[float | None, str]:
    """torch SDPA (flash where it accepts the shapes) decode over the same cache contents, if torch has CUDA."""
    try:
        import torch
    except ImportError:
        return None, "- (torch not installed)"
    if not torch.cuda.is_available():
        return None, "- (torch has no CUDA)"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in (q, k, v))
    backend = "flash"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(tq, tk, tv, enable_gqa=True)

        def dense() -> None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa(tq, tk, tv, enable_gqa=True)
    except RuntimeError:
        backend = "default (flash refused these shapes)"

        def dense() -> None:
            sdpa(tq, tk, tv, enable_gqa=True)

    for _ in range(10):
        dense()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dense()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), backend


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=DEFAULT_LIB)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="one tiny case on the CPU harness build (build/kernels-cpu): checks the script, no numbers")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        backend = gb.cpu_backend(gk.build_cpu(REPO / "build" / "kernels-cpu"))
        device, copy_gbps = "CPU harness (smoke run, timings meaningless)", None
        grid = [(1, 16, 64)]
    else:
        try:
            backend = gpu_backend(args.lib)
        except Refused as e:
            sys.stderr.write(f"bench_kernels: {e}\n")
            return 2
        device, copy_gbps = backend.rt.device_name(), copy_bandwidth(backend)
        grid = [(b, v, d) for v in (729, 4096, 16384) for b in (1, 8) for d in (64, 128)]
    rows = []
    print(f"{device}: device copy {_fmt(copy_gbps, '.0f')} GB/s")
    print(f"{'B':>2} {'visual':>6} {'D':>4} {'R':>5} {'k':>4} {'gaze ms':>8} {'dense ms':>8} {'speedup':>7} "
          f"{'ideal':>6} {'gaze GB/s':>9} {'%copy':>6} {'select us':>9} {'write us':>8}")
    for batch, visual, head_dim in grid:
        kv_heads, group = (2, 8) if head_dim == 64 else (8, 4)
        r = op_case(backend, batch=batch, visual=visual, head_dim=head_dim, kv_heads=kv_heads, group=group,
                    region_tokens=4, text=48, keep=0.1, iters=3 if args.cpu_smoke else 50)
        if isinstance(backend, gb.GpuBackend):
            backend.free_all()
        r["copy_gbps"] = copy_gbps
        rows.append(r)
        pct = 100 * r["gaze_gbps"] / copy_gbps if copy_gbps else None
        print(f"{batch:>2} {visual:>6} {head_dim:>4} {r['regions']:>5} {r['top_k']:>4} {r['gaze_ms']:>8.4f} "
              f"{_fmt(r['dense_ms'], '>8.4f'):>8} {_fmt(r['speedup'], '>7.2f'):>7} {r['ideal_byte_ratio']:>6.2f} "
              f"{r['gaze_gbps']:>9.0f} {_fmt(pct, '>5.0f'):>5}% {r['select_us']:>9.1f} {r['write_us']:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "copy_gbps": copy_gbps, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
