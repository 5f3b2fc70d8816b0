"""Mutation check of the kernel suite: break the kernels one way at a time, run the CPU suite.

Each mutant is a copy of plugins_trt/ (the working tree is never touched) with one edit,
built with the CPU harness, and tests/test_kernels.py run against it (CPU backend, the
given seeds) through $GAZE_CPU_KERNELS_LIB. Prints a markdown table (caught by how many
tests, per seed) and writes JSON; docs/KERNELS.md records a run.

    .venv/bin/python plugins_trt/cpu_harness/mutations.py [--only NAME ...] [--seeds 0,1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
K = "kernels/"


def barrier(file: str, nth: int, what: str) -> tuple:
    return (f"no barrier: {what}", file, "__syncthreads();", "/* mutant: barrier removed */;", nth)


# The strict-aliasing fix of issue #10, and the code it replaced (copied to a local uint4, then
# read through another type: with TBAA g++ -O2 may drop the copy).
ALIAS_FIXED = """__device__ __forceinline__ void load16(const __half* p, float (&o)[8]) {
  convert_halves(*reinterpret_cast<const uint4*>(p), o);
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float (&o)[8]) {
  convert_bfloat16s(*reinterpret_cast<const uint4*>(p), o);
}"""
ALIAS_OLD = """__device__ __forceinline__ void load16(const __half* p, float (&o)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x; o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float (&o)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x; o[2 * i + 1] = f.y;
  }
}"""

# (name, file under plugins_trt/, old text, new text, which occurrence (0-based) or None for all)
MUTANTS = [
    barrier(K + "gaze_index.cu", 0, "descriptor sums, before a region tile is overwritten"),
    barrier(K + "gaze_index.cu", 1, "descriptor sums, after a region tile is loaded"),
    barrier(K + "gaze_index.cu", 2, "slot index, after the warp totals"),
    barrier(K + "gaze_index.cu", 3, "slot index, after the warp-0 scan"),
    barrier(K + "gaze_index.cu", 4, "slot index, end of a 256-slot chunk"),
    barrier(K + "gaze_select.cu", 0, "select, after query rows + key init"),
    barrier(K + "gaze_select.cu", 1, "select, after scoring (before the sort)"),
    barrier(K + "gaze_select.cu", 2, "select, between bitonic steps"),
    barrier(K + "gaze_attention.cu", 0, "decode, after the region-count scan (warp sums)"),
    barrier(K + "gaze_attention.cu", 1, "decode, before a slot tile is overwritten"),
    barrier(K + "gaze_attention.cu", 2, "decode, after a slot tile is resolved"),
    barrier(K + "gaze_attention.cu", 3, "decode, before red_acc overwrites sel_start (union)"),
    barrier(K + "gaze_attention.cu", 4, "decode, before the cross-warp merge"),
    barrier(K + "gaze_attention.cu", 5, "prefill, before a tile is overwritten"),
    barrier(K + "gaze_attention.cu", 6, "prefill, after a tile is loaded"),
    ("key list: dense part one too long (i > n_dense)", K + "gaze_attention.cu",
     "if (q.is_gaze && i >= n_dense) {", "if (q.is_gaze && i > n_dense) {", 0),
    ("key list: one entry short (length - 1)", K + "gaze_attention.cu",
     "length = n_dense + total;", "length = n_dense + total - 1;", 0),
    ("key list: ragged region reads one past its count", K + "gaze_attention.cu",
     "const int c = min(a.idx.count(size_t(b) * d.R + sel[i]), d.mrt);",
     "const int c = min(a.idx.count(size_t(b) * d.R + sel[i]) + 1, d.mrt);", 0),
    ("key list: region search off by one (sel_start[mid] < j)", K + "gaze_attention.cu",
     "if (sh.sel_start[mid] <= j) lo = mid;", "if (sh.sel_start[mid] < j) lo = mid;", 0),
    ("key list: region offsets not scanned (sel_start[i] = 0)", K + "gaze_attention.cu",
     "      sh.sel_start[i] = run;\n", "      sh.sel_start[i] = 0;\n", 0),
    ("v2 workspace: no room for the split partials' max/sum", K + "gaze_forward.cu",
     "w.part_ml = take(v1.total - v1.part_ml);", "w.part_ml = take(0);", 0),
    ("merge: only the first split counts", K + "gaze_attention.cu",
     "for (int s = 0; s < a.splits; ++s) {", "for (int s = 0; s < 1; ++s) {", 0),  # the sum loop, not the max
    ("own_image: context queries attend causally (prefill)", K + "gaze_attention.cu",
     "pos_s[j] <= q.pos && (!q.own || img_s[j] == q.image)", "pos_s[j] <= q.pos", 0),
    ("query_head routing: the selection of query head 0 of each group serves the group", K + "gaze_select.cu",
     "const int g0 = d.per_head ? hs % d.G : 0", "const int g0 = 0", 0),
    ("tie order: ties go to the higher region", K + "gaze_select.cu",
     "keys[rl] = (uint64_t(~ordered_bits(score)) << 32) | uint32_t(r);",
     "keys[rl] = (uint64_t(~ordered_bits(score)) << 32) | uint32_t(d.R - 1 - r);", 0),
    ("select parts: the merge gives exact ties to the higher part", K + "gaze_select.cu",
     "if (o != j) rank += count_below(cand + size_t(o) * cap, cnt[o], key);",
     "if (o != j) rank += count_below(cand + size_t(o) * cap, cnt[o], "
     "o < j ? key & ~uint64_t(0xffffffffu) : key | 0xffffffffu);", 0),
    ("select parts: a full part hands over one candidate too few", K + "gaze_select.cu",
     "if (tid == 0) a.cand_n[bhq * parts + part] = n;",
     "if (tid == 0) a.cand_n[bhq * parts + part] = n - (n == a.cap);", 0),
    ("split bound: each split drops its last key", K + "gaze_attention.cu",
     "end = min(length, begin + chunk);", "end = min(length, begin + chunk - 1);", 0),
    ("split bound: chunk rounded down (tail dropped)", K + "gaze_attention.cu",
     "const int chunk = (length + used - 1) / used;", "const int chunk = length / used;", 0),
    ("descriptor count: mean over count + 1", K + "gaze_select.cu",
     "const float score = best / float(count[u]) + 0.0f;", "const float score = best / float(count[u] + 1) + 0.0f;",
     0),
    ("descriptor sum: also adds invalid new tokens", K + "gaze_index.cu",
     "return m.slot_valid[at] && r >= 0 && r < d.R ? int32_t(r) : -1;",
     "return r >= 0 && r < d.R ? int32_t(r) : -1;", 0),
    ("eligibility: a region whose last token is at p counts", K + "gaze_select.cu",
     "a.idx.last(br) < p", "a.idx.last(br) <= p", 0),
    ("aliasing: the old 16-bit loads (a uint4 copy read through __half2* / __nv_bfloat162*)",
     K + "gaze_common.cuh", ALIAS_FIXED, ALIAS_OLD, 0),
]


def _the_tie_mutant_decodes(text: str) -> str:
    """The tie mutant stores d.R - 1 - r; decode it back (single block and parts merge) so only the order
    changes."""
    return text.replace("a.sel[bhq * d.kmax + i] = i < n ? int32_t(keys[i] & 0xffffffffu) : -1;",
                        "a.sel[bhq * d.kmax + i] = i < n ? int32_t(d.R - 1 - (keys[i] & 0xffffffffu)) : -1;").replace(
        "if (rank < n) sel[rank] = int32_t(key & 0xffffffffu);",
        "if (rank < n) sel[rank] = int32_t(d.R - 1 - (key & 0xffffffffu));")


def apply(root: Path, name: str, file: str, old: str, new: str, nth: int | None) -> None:
    path = root / file
    text = path.read_text()
    spots = [m.start() for m in re.finditer(re.escape(old), text)]
    if not spots or (nth is not None and nth >= len(spots)):
        raise SystemExit(f"mutant {name!r}: {old!r} (occurrence {nth}) not found in {file}")
    at = spots[nth or 0]
    text = text[:at] + new + text[at + len(old):]
    if name.startswith("tie order"):
        text = _the_tie_mutant_decodes(text)
    path.write_text(text)


def run_suite(lib: Path, seeds: str, log: Path) -> dict:
    env = {**os.environ, "GAZE_CPU_KERNELS_LIB": str(lib), "GAZE_KERNEL_BACKENDS": "cpu", "GAZE_HARNESS_SEEDS": seeds,
           "GAZE_HARNESS_TIMEOUT_S": "120"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                           "tests/test_kernels.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    log.write_text(proc.stdout + proc.stderr)
    failed = re.findall(r"^FAILED tests/test_kernels.py::(\S+)", proc.stdout, re.M)
    per_seed: dict[str, int] = {}
    for f in failed:
        seed = re.search(r"cpu-seed(\d+)", f)
        per_seed[seed.group(1) if seed else "?"] = per_seed.get(seed.group(1) if seed else "?", 0) + 1
    summary = re.findall(r"^=+ (.*) in [\d.]+s", proc.stdout, re.M) or [proc.stdout.strip().splitlines()[-1:]]
    crashed = proc.returncode not in (0, 1)  # 1: tests failed; anything else: the run itself broke
    return {"failed": len(failed), "per_seed": per_seed, "tests": sorted({re.sub(r"\[.*", "", f) for f in failed}),
            "summary": summary[-1] if summary else "", "returncode": proc.returncode, "crashed": crashed,
            "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names containing any of these strings")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "plugins_trt" / "python"))
    chosen = [m for m in MUTANTS if not args.only or any(o in m[0] for o in args.only)]
    work = args.work or Path(tempfile.mkdtemp(prefix="gaze-mutants-"))
    rows = []
    previous: str | None = None
    for i, (name, file, old, new, nth) in enumerate(chosen):
        tree = work / "plugins_trt"
        if tree.exists():
            shutil.rmtree(tree)
        shutil.copytree(REPO / "plugins_trt", tree, ignore=shutil.ignore_patterns("__pycache__"))
        if previous:  # copies keep their times: make the build recompile the file the last mutant changed
            os.utime(tree / previous)
        apply(tree, name, file, old, new, nth)
        previous = file
        build = work / "build"  # one build folder: only the mutated file recompiles
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"gk_mutant{i}", tree / "python" / "gaze_kernels.py")
        assert spec and spec.loader
        gk = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = gk  # dataclasses look their module up
        spec.loader.exec_module(gk)
        t0 = time.time()
        try:
            lib = gk.build_cpu(build)
        except RuntimeError as e:
            rows.append({"mutant": name, "file": file, "build_error": str(e)[-2000:]})
            print(f"{name}: does not build", flush=True)
            continue
        result = run_suite(lib, args.seeds, work / f"mutant{i}.log")
        result.update(mutant=name, file=file, build_seconds=round(time.time() - t0 - result["seconds"], 1))
        rows.append(result)
        print(f"{name}: {result['failed']} failed {result['per_seed']} ({result['summary']})", flush=True)
    print("\n| mutant | caught | failing tests (per seed " + args.seeds + ") |\n|---|---|---|")
    for r in rows:
        if "build_error" in r:
            print(f"| {r['mutant']} | does not build | |")
            continue
        caught = "yes" if r["failed"] or r["crashed"] else "**no**"
        seeds = ", ".join(f"{s}: {n}" for s, n in sorted(r["per_seed"].items()))
        print(f"| {r['mutant']} | {caught} | {r['failed']} ({seeds}){' crash' if r['crashed'] else ''} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
