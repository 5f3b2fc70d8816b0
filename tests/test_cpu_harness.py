"""The CPU execution harness itself (plugins_trt/cpu_harness): the rules tests/test_kernels.py relies on.

Small CUDA kernels (cpu_harness/selftest.cu) built into libgaze_harness_selftest.so with the
same harness: shared memory per block and barriers, every shuffle variant against numpy,
divergence of each kind reported (not hung, not crashed), real atomics, launch limits, the
scheduling seed really reordering blocks and threads, shared memory poisoned per block, the
watchdog, and that the poisoned section holds nothing but the kernels' __shared__ statics.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_kernels import cpu_library
from tests.test_plugin_build import REPO, gk

LAUNCH_FAILURE, ILLEGAL_ADDRESS, INVALID_CONFIGURATION = 719, 700, 9


class Selftest:
    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.gaze_harness_set_seed.argtypes = [ctypes.c_uint64]
        self.lib.gaze_harness_counters.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int32]

    def seed(self, seed: int) -> None:
        self.lib.gaze_harness_set_seed(seed)

    def counters(self) -> list[int]:
        out = (ctypes.c_uint64 * 7)()
        self.lib.gaze_harness_counters(out, 7)
        return list(out)

    def call(self, name: str, *args: object) -> tuple[int, str]:
        err = ctypes.create_string_buffer(1024)
        fn = getattr(self.lib, f"gaze_selftest_{name}")
        fn.restype = ctypes.c_int32
        # Without argtypes ctypes passes ints as C int: pointers must go as c_void_p.
        status = fn(*[ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else ctypes.c_int32(a)
                      for a in args], err, len(err))
        return int(status), err.value.decode()


@pytest.fixture(scope="module")
def st() -> Selftest:
    return Selftest(cpu_library().parent / gk.CPU_SELFTEST_LIBRARY)


SEEDS = [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", SEEDS)
def test_shared_memory_and_barrier(st: Selftest, seed: int) -> None:
    st.seed(seed)
    x = np.arange(5 * 128, dtype=np.int32)
    out = np.zeros_like(x)
    assert st.call("reverse", x, out, 5, 1) == (0, "")
    assert (out == x.reshape(5, 128)[:, ::-1].reshape(-1)).all()


def test_a_missing_barrier_is_a_wrong_result(st: Selftest) -> None:
    """Without the barrier a thread reads a slot its partner has not written yet: the poison, or
    (seeded order) sometimes the right value. Natural order and every seed must be caught."""
    x = np.arange(4 * 128, dtype=np.int32)
    for seed in SEEDS:
        st.seed(seed)
        out = np.zeros_like(x)
        assert st.call("reverse", x, out, 4, 0)[0] == 0
        assert (out != x.reshape(4, 128)[:, ::-1].reshape(-1)).any(), seed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffles(st: Selftest, seed: int) -> None:
    st.seed(seed)
    warps = 3
    v = np.random.default_rng(seed).integers(-50, 50, warps * 32).astype(np.float32)
    out = np.full(warps * 6 * 32, np.nan, np.float32)
    assert st.call("shuffle", v, out, warps) == (0, "")
    lane = np.arange(32)
    for w in range(warps):
        x = v[w * 32:(w + 1) * 32]
        o = out[w * 6 * 32:(w + 1) * 6 * 32].reshape(6, 32)
        assert (o[0] == x.sum()).all()
        assert (o[1] == np.cumsum(x)).all()
        assert (o[2] == np.where(lane + 3 < 32, x[np.minimum(lane + 3, 31)], x)).all()
        assert (o[3] == x[5]).all()
        assert (o[4] == x[lane ^ 1]).all()
        seg = lane & ~7
        assert (o[5] == np.where(lane - 2 >= seg, x[np.maximum(lane - 2, 0)], x)).all()


def test_partial_mask_shuffle_is_legal(st: Selftest) -> None:
    v = np.arange(32, dtype=np.float32)
    out = np.zeros(32, np.float32)
    assert st.call("half_warp", v, out) == (0, "")
    assert (out[:16] == v[:16].sum()).all() and (out[16:] == -v[16:]).all()


BROKEN = {
    1: "divergence: .* (exited|has exited)",
    2: "divergence: .* (exited|has exited)",
    3: "divergence: .* waits at __syncthreads selftest.cu:\\d+ while \\d+ threads wait at __syncthreads "
       "selftest.cu:\\d+",
    4: "divergence: .*__syncthreads",
    5: "naming lane \\d+, which does not exist \\(block of 40 threads\\)",
    6: "reads lane 20, which is not in the mask",
    7: "deadlock in block \\(0,0,0\\): 128 live threads all wait; .* at a warp exchange selftest.cu:\\d+",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", sorted(BROKEN))
def test_divergence_is_reported(st: Selftest, mode: int, seed: int) -> None:
    st.seed(seed)
    failures = st.counters()[6]
    status, text = st.call("broken", np.zeros(128, np.float32), mode)
    assert status == LAUNCH_FAILURE, text
    assert text.startswith("unspecified launch failure: CPU harness: broken_kernel")
    assert re.search(BROKEN[mode], text), text
    assert st.counters()[6] == failures + 1
    # The failure was reported once; the next launch runs normally.
    out = np.zeros(128, np.int32)
    assert st.call("reverse", np.arange(128, dtype=np.int32), out, 1, 1) == (0, "")


def test_atomics(st: Selftest) -> None:
    st.seed(3)
    count, total = np.zeros(1, np.int32), np.zeros(1, np.float32)
    bits, maxv = np.zeros(1, np.uint32), np.full(1, -1, np.int64)
    assert st.call("atomics", count, total, bits, maxv, 7, 96) == (0, "")
    n = 7 * 96
    assert count[0] == n and total[0] == 0.5 * n and bits[0] == 0xFFFFFFFF and maxv[0] == 3 * (n - 1)


@pytest.mark.parametrize(("threads", "blocks"), [(1025, 1), (0, 1), (32, 0)])
def test_bad_launch_configuration_is_refused(st: Selftest, threads: int, blocks: int) -> None:
    seq = np.zeros(4, np.int32)
    status, text = st.call("bad_config", threads, blocks, seq)
    assert status == INVALID_CONFIGURATION and "invalid launch configuration" in text
    assert (seq == 0).all()


def _order(st: Selftest, seed: int, blocks: int = 16, threads: int = 64) -> tuple[np.ndarray, np.ndarray]:
    st.seed(seed)
    seq = np.zeros(2, np.int32)
    block_order, thread_order = np.full(blocks, -1, np.int32), np.full(blocks * threads, -1, np.int32)
    assert st.call("order", seq, block_order, thread_order, blocks, threads) == (0, "")
    return block_order, thread_order


def test_seed_zero_is_the_natural_order(st: Selftest) -> None:
    blocks, threads = _order(st, 0)
    assert (blocks == np.arange(16)).all() and (threads == np.arange(16 * 64)).all()


def test_seeds_reorder_blocks_and_threads_reproducibly(st: Selftest) -> None:
    b1, t1 = _order(st, 1)
    b2, t2 = _order(st, 2)
    for b, t in ((b1, t1), (b2, t2)):
        assert sorted(b) == list(range(16)) and sorted(t) == list(range(16 * 64))
        assert (b != np.arange(16)).any()
        within = t.reshape(16, 64) - t.reshape(16, 64).min(axis=1, keepdims=True)
        assert (within != np.arange(64)).any(axis=1).all(), "threads of every block run in a shuffled order"
    assert (b1 != b2).any() and (t1 != t2).any()
    again = _order(st, 1)
    assert (again[0] == b1).all() and (again[1] == t1).all(), "a seed is reproducible"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_memory_is_poisoned_for_every_block(st: Selftest, seed: int) -> None:
    st.seed(seed)
    out = np.zeros(6 * 32, np.uint32)
    assert st.call("poison", out, 6) == (0, "")
    per_block = out.reshape(6, 32)
    assert (per_block != 0x12345678).all(), "a block saw the previous block's shared memory"
    for row in per_block:
        byte = int(row[0]) & 0xFF
        assert byte != 0 and (row == byte * 0x01010101).all()
    if seed == 0:
        assert (per_block == 0xFFFFFFFF).all()


def test_a_memory_fault_is_an_illegal_address_not_a_crash(st: Selftest) -> None:
    out = np.zeros(64, np.int32)
    status, text = st.call("fault", out)
    assert status == ILLEGAL_ADDRESS, text
    assert re.search(r"illegal memory access \(SIGSEGV at .*\) by thread \(37,0,0\)", text), text
    st.seed(0)
    assert st.call("reverse", np.arange(128, dtype=np.int32), np.zeros(128, np.int32), 1, 1) == (0, "")


def test_the_watchdog_ends_an_endless_kernel(st: Selftest) -> None:
    """A kernel that never ends would hang CI until its time limit; the watchdog aborts the process."""
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); flag = (ctypes.c_int * 1)(0); "
            "err = ctypes.create_string_buffer(64); lib.gaze_selftest_spin(flag, err, 64)")
    env = {**os.environ, "GAZE_HARNESS_TIMEOUT_S": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(cpu_library().parent / gk.CPU_SELFTEST_LIBRARY)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "kernel spin_kernel has run for more than 1 s" in proc.stderr


def _shared_section_symbols(lib: Path) -> list[str]:
    """Demangled symbols inside [gaze_cpu_shared_begin, gaze_cpu_shared_end)."""
    lines = subprocess.run(["nm", "-C", "--defined-only", str(lib)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    addr = {}
    syms = []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3:
            continue
        a, name = int(parts[0], 16), parts[2]
        if name in ("gaze_cpu_shared_begin", "gaze_cpu_shared_end"):
            addr[name] = a
        syms.append((a, name))
    assert set(addr) == {"gaze_cpu_shared_begin", "gaze_cpu_shared_end"}, "no poisoned section"
    start, stop = addr["gaze_cpu_shared_begin"], addr["gaze_cpu_shared_end"]
    return [n for a, n in syms if start <= a < stop and not n.startswith("gaze_cpu_shared_")]


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_the_poisoned_section_holds_only_shared_variables() -> None:
    """shared.ld takes the .bss of every .cu object: it must hold nothing but __shared__ statics
    (function-local statics of kernels, and guard variables of those with constructors)."""
    names = _shared_section_symbols(cpu_library())
    assert names, "the kernels' shared memory is not in the poisoned section"
    local_static = re.compile(r"^(guard variable for )?gaze::launch::\(anonymous namespace\)::\w+_kernel\b.*\)::\w+$")
    strays = [n for n in names if not local_static.match(n)]
    assert not strays, f"not __shared__ statics of a kernel, yet poisoned before every block: {strays}"
    for shared in ("::keys", "::sh", "::slot_s", "::region_s"):  # select, decode (a union and a tile), descriptors
        assert any(n.endswith(shared) for n in names), shared


def test_kernels_build_at_o2_with_strict_aliasing() -> None:
    """The issue's miscompile: the kernels are valid C++ (no uint4 read through __half2*), so the
    build keeps strict aliasing at -O2."""
    cmake_flags = (REPO / "plugins_trt" / "cpu_harness" / "CMakeLists.txt").read_text()
    binding = (REPO / "plugins_trt" / "python" / "gaze_kernels.py").read_text()
    for text in (cmake_flags, binding):
        assert "-O2" in text and "-fno-strict-aliasing" not in text.replace("no -fno-strict-aliasing", "")
    common = (REPO / "plugins_trt" / "kernels" / "gaze_common.cuh").read_text()
    assert not re.search(r"reinterpret_cast<const (__half2|__nv_bfloat162)\*>", common)
