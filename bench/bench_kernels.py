"""Gaze decode attention (CUDA kernels via libgaze_kernels.so) vs dense decode attention (torch SDPA).

GPU only. For each case (visual tokens 729 / 4096 / 16384, batch 1 / 8, head dim 64 / 128,
fp16, 2x2 regions, 10% of regions kept) it times one decode step (T = 1, every query a gaze
query) over a static cache, and torch SDPA (flash backend when it serves the shapes) dense
decode over the same cache, and prints:

  speedup            dense time / gaze time
  ideal              dense bytes / gaze bytes (K/V read; gaze adds descriptors and slot metadata)
  gaze GB/s          gaze bytes / gaze time, and as % of a measured device-to-device copy
  select us          region scoring + top-k alone (select stage; slot index excluded)
  index us           KV write + per-call slot index (rebuilt every call: see docs/KERNELS.md)

    python bench/bench_kernels.py [--json bench/results/kernels.json] [--lib build/plugins_trt/libgaze_kernels.so]

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

REPO = Path(__file__).resolve().parent.parent


def _binding():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gaze_kernels", REPO / "plugins_trt" / "python" / "gaze_kernels.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gaze_kernels", module)
    spec.loader.exec_module(module)
    return module


gk = _binding()


def need_gpu():  # noqa: ANN201
    try:
        import torch
    except ImportError:
        sys.exit("bench_kernels: needs PyTorch with CUDA and a CUDA GPU (torch is not installed)")
    if not torch.cuda.is_available():
        sys.stderr.write("bench_kernels: no CUDA GPU (torch.cuda.is_available() is False); run it on a GPU machine\n")
        sys.exit(2)
    return torch


def time_ms(torch, fn, iters: int = 50, warmup: int = 10) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(torch) -> float:  # noqa: ANN001
    """GB/s of a large device-to-device copy (read + write bytes)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(torch, lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * src.numel() / ms / 1e6


def build_case(torch, batch: int, visual: int, head_dim: int, keep: float = 0.1) -> dict:  # noqa: ANN001
    side = math.isqrt(visual)
    assert side * side == visual, "visual token counts are square grids"
    q_heads, kv_heads = (16, 2) if head_dim == 64 else (32, 8)
    regions_w = -(-side // 2)
    R = regions_w * regions_w
    prefix, suffix = 16, 32
    L = prefix + visual + suffix
    S = L + 1  # the decode token's slot
    dev = torch.device("cuda")
    grid = torch.arange(visual, device=dev)
    region = (grid // side // 2) * regions_w + (grid % side) // 2
    slot_region = torch.full((batch, S), -1, dtype=torch.int64, device=dev)
    slot_region[:, prefix:prefix + visual] = region
    slot_pos = torch.arange(S, dtype=torch.int64, device=dev).expand(batch, S).contiguous()
    slot_valid = torch.ones((batch, S), dtype=torch.bool, device=dev)
    k = torch.randn((batch, kv_heads, S, head_dim), dtype=torch.float16, device=dev)
    v = torch.randn_like(k)
    desc = torch.zeros((batch, kv_heads, R, head_dim), dtype=torch.float32, device=dev)
    desc.index_add_(2, region, k[:, :, prefix:prefix + visual].float())
    q = torch.randn((batch, q_heads, 1, head_dim), dtype=torch.float16, device=dev)
    top_k = max(1, round(keep * R))
    return dict(batch=batch, visual=visual, head_dim=head_dim, q_heads=q_heads, kv_heads=kv_heads, R=R, S=S,
                L=L, top_k=top_k, q=q, k=k, v=v, desc=desc, new_k=k[:, :, L:L + 1].contiguous(),
                new_v=v[:, :, L:L + 1].contiguous(), slot_pos=slot_pos, slot_region=slot_region,
                slot_valid=slot_valid, gaze=torch.ones((batch, 1), dtype=torch.bool, device=dev),
                write_offset=torch.tensor([L], dtype=torch.int64, device=dev))


def run_case(torch, lib, c: dict) -> dict:  # noqa: ANN001
    B, Hq, Hkv, D, S, R = c["batch"], c["q_heads"], c["kv_heads"], c["head_dim"], c["S"], c["R"]
    problem = gk.Problem(batch=B, new_tokens=1, cache_len=S, num_regions=R, q_heads=Hq, kv_heads=Hkv, head_dim=D,
                         dtype=gk.F16, top_k=c["top_k"], max_region_tokens=4)
    attrs = gk.Attrs(c["top_k"], 4, 1.0 / math.sqrt(D))
    ws_bytes = lib.workspace_size(problem)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(c["q"])
    t = gk.Tensors(c["q"].data_ptr(), c["new_k"].data_ptr(), c["new_v"].data_ptr(), c["k"].data_ptr(),
                   c["v"].data_ptr(), c["desc"].data_ptr(), c["slot_pos"].data_ptr(), c["slot_region"].data_ptr(),
                   c["slot_valid"].data_ptr(), c["gaze"].data_ptr(), c["write_offset"].data_ptr(), out.data_ptr(),
                   c["k"].data_ptr(), c["v"].data_ptr(), c["desc"].data_ptr())
    stream = torch.cuda.current_stream().cuda_stream

    def stages(mask: int):  # noqa: ANN202
        return lambda: lib.forward_stages(problem, attrs, t, ws.data_ptr(), ws_bytes, stream, mask)

    # Descriptor sums grow by the re-written token each call; harmless for timing.
    gaze_ms = time_ms(torch, stages(7))
    index_ms = time_ms(torch, stages(1))
    select_ms = time_ms(torch, stages(3)) - index_ms
    if lib.device_errors(problem, ws.data_ptr(), stream):
        raise RuntimeError("kernels reported a contract violation")

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    k, v, q = c["k"], c["v"], c["q"]
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
    dense_ms = time_ms(torch, dense)

    elem = 2
    dense_bytes = 2 * B * Hkv * S * D * elem
    visual_kept = min(c["top_k"], R) * 4
    dense_tokens = S - c["visual"]
    gaze_kv = 2 * B * Hkv * (dense_tokens + visual_kept) * D * elem
    gaze_bytes = gaze_kv + B * Hkv * R * D * 4 + B * S * (8 + 8 + 1)  # + descriptors + slot metadata
    return dict(batch=B, visual_tokens=c["visual"], head_dim=D, q_heads=Hq, kv_heads=Hkv, regions=R,
                top_k=c["top_k"], gaze_ms=gaze_ms, dense_ms=dense_ms, select_us=select_ms * 1e3,
                index_us=index_ms * 1e3, speedup=dense_ms / gaze_ms, ideal_byte_ratio=dense_bytes / gaze_bytes,
                gaze_bytes=gaze_bytes, dense_bytes=dense_bytes, gaze_gbps=gaze_bytes / gaze_ms / 1e6,
                dense_gbps=dense_bytes / dense_ms / 1e6, dense_backend=backend)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=REPO / "build" / "plugins_trt" / "libgaze_kernels.so")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch = need_gpu()
    if not args.lib.is_file():
        sys.stderr.write(f"bench_kernels: {args.lib} not found; build it: cmake -S plugins_trt -B build/plugins_trt "
                         "&& cmake --build build/plugins_trt -j\n")
        return 2
    lib = gk.GazeKernels(args.lib)
    copy_gbps = copy_bandwidth(torch)
    rows = []
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbps:.0f} GB/s")
    print(f"{'B':>2} {'visual':>6} {'D':>4} {'R':>5} {'k':>4} {'gaze ms':>8} {'dense ms':>8} {'speedup':>7} "
          f"{'ideal':>6} {'gaze GB/s':>9} {'%copy':>6} {'select us':>9} {'index us':>8}")
    for visual in (729, 4096, 16384):
        for batch in (1, 8):
            for head_dim in (64, 128):
                r = run_case(torch, lib, build_case(torch, batch, visual, head_dim))
                r["copy_gbps"] = copy_gbps
                rows.append(r)
                print(f"{batch:>2} {visual:>6} {head_dim:>4} {r['regions']:>5} {r['top_k']:>4} {r['gaze_ms']:>8.4f} "
                      f"{r['dense_ms']:>8.4f} {r['speedup']:>7.2f} {r['ideal_byte_ratio']:>6.2f} "
                      f"{r['gaze_gbps']:>9.0f} {100 * r['gaze_gbps'] / copy_gbps:>5.0f}% {r['select_us']:>9.1f} "
                      f"{r['index_us']:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps,
                                         "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
