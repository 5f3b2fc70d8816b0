// Scheduler and CUDA runtime stand-ins of the CPU execution harness (see cuda_cpu.h).
//
// A launch runs its blocks one at a time on the calling OS thread. A block's threads are
// fibers (ucontext, one stack each) scheduled cooperatively: a thread runs until it reaches
// __syncthreads, a warp exchange (shuffle, __syncwarp) that not all its lanes have reached
// yet, or its end; then another ready thread runs. Which one is the scheduling seed's
// choice (0: FIFO), so different seeds run the code between two sync points in different
// thread orders, and the blocks of a grid in different orders.
//
// Rules enforced, each reported as a launch failure (cudaErrorLaunchFailure, with the
// kernel, block, threads and source lines in cudaGetErrorString):
//   - a barrier releases when every live (not exited) thread of the block waits at it, and
//     all of them must wait at the same __syncthreads call;
//   - a warp exchange completes when every lane named in the mask has arrived at the same
//     call (same operation, mask and width); several may be pending in a warp. A named
//     lane that has exited, does not exist or waits at a barrier is divergence, and so is
//     a lane reading from a lane outside the mask;
//   - a block whose live threads all wait (and none can be released) is a deadlock: e.g.
//     the two halves of a warp waiting at two different full-mask shuffles.
// A thread that touches unmapped memory (SIGSEGV/SIGBUS) ends the launch with
// cudaErrorIllegalAddress, as a GPU would, instead of killing the process; a stray write
// that lands in mapped memory is not detected (no bounds checks).
#include "gaze_harness.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// shared.ld defines these around the section that holds every __shared__ variable.
extern "C" char gaze_cpu_shared_begin[] __attribute__((weak, visibility("hidden")));
extern "C" char gaze_cpu_shared_end[] __attribute__((weak, visibility("hidden")));

namespace gaze_cpu {

ThreadCtx* g_thread = nullptr;

namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // kernels keep softmax state and vector loads on the stack

enum class State : uint8_t { kReady, kRunning, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes above one guard page
  ThreadCtx t;
  State state = State::kDone;
  const char* file = "";
  int line = 0;
};

// One warp-synchronous operation in progress. Several may be pending in a warp (legal since
// Volta: lanes 16..31 may wait at __syncwarp() while lanes 0..15 still shuffle among
// themselves); a lane joins the pending exchange of its own call, or starts one.
struct Exchange {
  uint32_t mask = 0;  // lanes named
  uint32_t arrived = 0;
  WarpOp op = kShflIdx;
  int width = 32;
  const char* file = "";
  int line = 0;
};

struct Warp {
  Exchange ex[32];  // pending exchanges (each has an arrived lane, so at most 32)
  int n = 0;
  uint64_t value[32], result[32];  // per lane: a lane waits in one exchange at a time
  int arg[32];

  // The pending exchange of this call that still expects lane `bit`.
  Exchange* find(uint32_t bit, uint32_t mask, WarpOp op, int width, const char* file, int line) {
    for (int i = 0; i < n; ++i) {
      const Exchange& e = ex[i];
      if ((e.mask & bit) && !(e.arrived & bit) && e.mask == mask && e.op == op && e.width == width &&
          e.line == line && std::strcmp(e.file, file) == 0)
        return &ex[i];
    }
    return nullptr;
  }
  // Any pending exchange that still expects lane `bit` (it cannot exit or wait at a barrier).
  const Exchange* expecting(uint32_t bit) const {
    for (int i = 0; i < n; ++i)
      if ((ex[i].mask & bit) && !(ex[i].arrived & bit)) return &ex[i];
    return nullptr;
  }
};

struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t n) { return static_cast<uint32_t>(next() % n); }
};

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

// ---- global state (one launch at a time: g_mutex) ----------------------------------------

std::mutex g_mutex;
uint64_t g_seed = env_u64("GAZE_HARNESS_SEED", 0);
uint64_t g_launch_index = 0;  // launches since the seed was set
int32_t g_sms = static_cast<int32_t>(env_u64("GAZE_HARNESS_SMS", 132));
uint64_t g_counters[7] = {};
enum { kLaunches, kBlocks, kThreads, kBarriers, kExchanges, kSwitches, kFailures };

cudaError_t g_pending = cudaSuccess;  // returned (and cleared) by cudaGetLastError
std::string g_failure_text;           // detail of the last harness-detected failure

// The block being run.
Fiber g_fibers[kMaxThreads];
Warp g_warps[kMaxThreads / 32];
ucontext_t g_main;
int g_nthreads = 0, g_live = 0, g_at_barrier = 0;
const char* g_barrier_file = "";
int g_barrier_line = 0;
bool g_aborted = false;
volatile sig_atomic_t g_fault_signal = 0;  // set by on_fault inside a fiber
void* volatile g_fault_addr = nullptr;
int g_fault_thread = -1;
bool g_shuffle = false;  // seeded order (false: FIFO)
Rng g_rng{0};
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
const char* g_kernel = "";
const char* g_launch_site = "";  // __PRETTY_FUNCTION__ of the launching function

// "decode_kernel<T, kD> [with T = __half; kD = 128]": the kernel as launched, with what the
// launching function's template parameters were.
std::string kernel_label() {
  const char* with = std::strstr(g_launch_site, "[with ");
  return with ? std::string(g_kernel) + " " + with : std::string(g_kernel);
}
int g_ready[kMaxThreads];
int g_ready_head = 0, g_ready_count = 0;

// Watchdog: a kernel that loops forever would otherwise hang CI until its time limit.
std::atomic<int64_t> g_launch_started_ms{0};  // 0: no launch running
std::atomic<const char*> g_watch_kernel{""};

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void start_watchdog() {
  static std::once_flag once;
  std::call_once(once, [] {
    const int64_t limit_ms = static_cast<int64_t>(env_u64("GAZE_HARNESS_TIMEOUT_S", 600)) * 1000;
    std::thread([limit_ms] {
      for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        const int64_t t0 = g_launch_started_ms.load();
        if (t0 && now_ms() - t0 > limit_ms) {
          std::fprintf(stderr, "gaze CPU harness: kernel %s has run for more than %lld s (GAZE_HARNESS_TIMEOUT_S): "
                       "an endless loop? aborting the process\n", g_watch_kernel.load(),
                       static_cast<long long>(limit_ms / 1000));
          std::fflush(stderr);
          std::abort();
        }
      }
    }).detach();
  });
}

std::string where(const ThreadCtx& t) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %d lane %d] of block (%u,%u,%u)", t.thread_idx.x,
                t.thread_idx.y, t.thread_idx.z, t.index / 32, t.index % 32, t.block_idx.x, t.block_idx.y,
                t.block_idx.z);
  return buf;
}

std::string site(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kSyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string lanes(uint32_t mask) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
  return "{" + s + "}";
}

void push_ready(int i) {
  g_ready[(g_ready_head + g_ready_count++) % kMaxThreads] = i;
}

int pop_ready() {
  if (g_ready_count == 0) return -1;
  if (g_shuffle && g_ready_count > 1) {
    const int j = (g_ready_head + static_cast<int>(g_rng.below(static_cast<uint32_t>(g_ready_count)))) % kMaxThreads;
    std::swap(g_ready[j], g_ready[g_ready_head]);
  }
  const int i = g_ready[g_ready_head];
  g_ready_head = (g_ready_head + 1) % kMaxThreads;
  --g_ready_count;
  return i;
}

Fiber& current() { return g_fibers[g_thread->index]; }

// Leaves the running fiber for the next ready one, or for the launch loop when none is ready.
// Returns when this fiber is scheduled again (never, for an exited or aborted one).
void run_next(Fiber& self) {
  const int next = pop_ready();
  if (next < 0) {
    swapcontext(&self.ctx, &g_main);
    return;
  }
  Fiber& n = g_fibers[next];
  n.state = State::kRunning;
  if (&n == &self) return;
  g_thread = &n.t;
  ++g_counters[kSwitches];
  swapcontext(&self.ctx, &n.ctx);
}

// A rule was broken inside the block: record it and return to the launch loop for good.
[[noreturn]] void fail_in_block(const std::string& what) {
  if (!g_aborted) {
    g_aborted = true;
    g_failure_text = "CPU harness: " + kernel_label() + ": " + what;
  }
  swapcontext(&current().ctx, &g_main);
  std::abort();  // an aborted fiber is never resumed
}

void release_barrier_if_complete() {
  if (g_at_barrier == 0 || g_at_barrier != g_live) return;
  for (int i = 0; i < g_nthreads; ++i) {
    if (g_fibers[i].state == State::kBarrier) {
      g_fibers[i].state = State::kReady;
      push_ready(i);
    }
  }
  g_at_barrier = 0;
  ++g_counters[kBarriers];
}

// Lanes of this fiber's warp that wait in an exchange naming it: it must not go elsewhere.
// (file == nullptr: the thread exits.)
void require_not_awaited(Fiber& f, const char* file, int line) {
  Warp& w = g_warps[f.t.index / 32];
  const uint32_t bit = 1u << (f.t.index % 32);
  if (const Exchange* e = w.expecting(bit))
    fail_in_block("divergence: " + where(f.t) + (file ? " reached __syncthreads " + site(file, line) : " exited") +
                  " while lanes " + lanes(e->arrived) + " of its warp wait for it at " + op_name(e->op) + " " +
                  site(e->file, e->line) + " (mask " + lanes(e->mask) + ")");
}

void fiber_entry(int index) {
  Fiber& f = g_fibers[index];
  g_body(g_body_ctx);
  require_not_awaited(f, nullptr, 0);
  f.state = State::kDone;
  --g_live;
  release_barrier_if_complete();
  run_next(f);
  std::abort();  // an exited fiber is never resumed
}

std::string describe_waits() {
  std::string s;
  for (int i = 0; i < g_nthreads; ++i) {
    const Fiber& f = g_fibers[i];
    if (f.state != State::kBarrier && f.state != State::kWarp) continue;
    const bool first_of_warp = i % 32 == 0 || g_fibers[i - 1].state != f.state || g_fibers[i - 1].line != f.line;
    if (!first_of_warp) continue;
    s += "; " + where(f.t) + (f.state == State::kBarrier ? " and following wait at __syncthreads "
                                                          : " and following wait at a warp exchange ") +
         site(f.file, f.line);
  }
  return s;
}

// ---- memory faults inside a kernel --------------------------------------------------------

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void*) {
  if (g_thread == nullptr) {  // not a kernel thread: the previous handler takes it when it faults again
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    return;
  }
  g_fault_signal = sig;
  g_fault_addr = info->si_addr;
  g_fault_thread = g_thread->index;
  g_aborted = true;
  setcontext(&g_main);  // back to the launch loop; this fiber is abandoned (setcontext restores its mask)
}

// Installed for the duration of a launch, on an alternate stack (a fiber's guard page faults too).
class FaultGuard {
 public:
  FaultGuard() {
    thread_local char* alt = nullptr;
    if (!alt) {
      alt = static_cast<char*>(std::malloc(1 << 16));
      stack_t ss{};
      ss.ss_sp = alt;
      ss.ss_size = 1 << 16;
      sigaltstack(&ss, nullptr);
    }
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  }
  ~FaultGuard() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
  }
};

bool check_config(const char* name, dim3 grid, dim3 block, size_t shared_bytes) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  std::string why;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    why = "a grid or block dimension is 0";
  } else if (threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64) {
    why = "block of " + std::to_string(threads) + " threads exceeds the limits (1024; x, y <= 1024, z <= 64)";
  } else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    why = "grid exceeds the limits (x < 2^31, y and z <= 65535)";
  } else if (shared_bytes != 0) {
    why = "dynamic shared memory is not supported by the CPU harness";
  } else {
    return true;
  }
  g_failure_text = std::string("CPU harness: ") + name + ": invalid launch configuration: " + why;
  if (g_pending == cudaSuccess) g_pending = cudaErrorInvalidConfiguration;
  ++g_counters[kFailures];
  return false;
}

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    std::perror("gaze CPU harness: mmap of a fiber stack");
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting a neighbour
  return static_cast<char*>(p) + page;
}

// Runs one block; false when it broke a rule (g_failure_text says which).
bool run_block(dim3 grid, dim3 block, uint3 block_idx) {
  g_nthreads = static_cast<int>(block.x * block.y * block.z);
  g_live = g_nthreads;
  g_at_barrier = 0;
  g_aborted = false;
  g_ready_head = g_ready_count = 0;
  for (int w = 0; w < (g_nthreads + 31) / 32; ++w) g_warps[w].n = 0;
  // Shared memory starts as garbage on a GPU: a read before the block wrote it must not pass.
  if (+gaze_cpu_shared_begin && +gaze_cpu_shared_end > +gaze_cpu_shared_begin) {
    const int poison = g_shuffle ? static_cast<int>(g_rng.below(255) + 1) : 0xff;  // 0xff: NaN floats, -1 ints
    std::memset(gaze_cpu_shared_begin, poison, static_cast<size_t>(gaze_cpu_shared_end - gaze_cpu_shared_begin));
  }
  for (int i = 0; i < g_nthreads; ++i) {
    Fiber& f = g_fibers[i];
    if (!f.stack) f.stack = new_stack();
    f.t.thread_idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.t.block_idx = block_idx;
    f.t.block_dim = block;
    f.t.grid_dim = grid;
    f.t.index = i;
    f.state = State::kReady;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;  // fibers never return from fiber_entry
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_entry), 1, i);
    push_ready(i);
  }
  g_counters[kThreads] += static_cast<uint64_t>(g_nthreads);
  ++g_counters[kBlocks];
  const int first = pop_ready();
  g_fibers[first].state = State::kRunning;
  g_thread = &g_fibers[first].t;
  swapcontext(&g_main, &g_fibers[first].ctx);
  g_thread = nullptr;
  if (g_fault_signal) {
    const Fiber& f = g_fibers[g_fault_thread];
    char addr[32];
    std::snprintf(addr, sizeof addr, "%p", g_fault_addr);
    g_failure_text = "CPU harness: " + kernel_label() + ": illegal memory access (" +
                     (g_fault_signal == SIGBUS ? "SIGBUS" : "SIGSEGV") + " at " + addr + ") by " + where(f.t);
    return false;
  }
  if (g_aborted) return false;
  if (g_live > 0) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "deadlock in block (%u,%u,%u): %d live threads all wait", block_idx.x, block_idx.y,
                  block_idx.z, g_live);
    g_failure_text = "CPU harness: " + kernel_label() + ": " + buf + describe_waits();
    return false;
  }
  return true;
}

}  // namespace

void syncthreads(const char* file, int line) {
  Fiber& f = current();
  require_not_awaited(f, file, line);
  if (g_at_barrier == 0) {
    g_barrier_file = file;
    g_barrier_line = line;
  } else if (line != g_barrier_line || std::strcmp(file, g_barrier_file) != 0) {
    fail_in_block("divergence: " + where(f.t) + " waits at __syncthreads " + site(file, line) + " while " +
                  std::to_string(g_at_barrier) + " threads wait at __syncthreads " +
                  site(g_barrier_file, g_barrier_line));
  }
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  ++g_at_barrier;
  release_barrier_if_complete();
  run_next(f);
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Fiber& f = current();
  const int warp = f.t.index / 32, lane = f.t.index % 32;
  const uint32_t bit = 1u << lane;
  Warp& w = g_warps[warp];
  // Built only for a report: this path runs for every lane of every shuffle.
  auto call = [&] { return std::string(op_name(op)) + " " + site(file, line); };
  if (!(mask & bit)) fail_in_block(where(f.t) + " calls " + call() + " with a mask " + lanes(mask) + " without itself");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_in_block(call() + ": width " + std::to_string(width) + " is not a power of two <= 32");
  Exchange* e = w.find(bit, mask, op, width, file, line);
  if (!e) {  // first lane of a new exchange: every named lane must be able to come
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const int i = warp * 32 + l;
      if (i >= g_nthreads)
        fail_in_block("divergence: " + where(f.t) + " calls " + call() + " with mask " + lanes(mask) + " naming lane " +
                      std::to_string(l) + ", which does not exist (block of " + std::to_string(g_nthreads) +
                      " threads)");
      if (g_fibers[i].state == State::kDone)
        fail_in_block("divergence: " + where(f.t) + " calls " + call() + " with mask " + lanes(mask) + " but lane " +
                      std::to_string(l) + " has exited");
      if (g_fibers[i].state == State::kBarrier)
        fail_in_block("divergence: " + where(f.t) + " calls " + call() + " with mask " + lanes(mask) + " while lane " +
                      std::to_string(l) + " waits at __syncthreads " + site(g_fibers[i].file, g_fibers[i].line));
    }
    e = &w.ex[w.n++];
    *e = Exchange{mask, 0, op, width, file, line};
  }
  w.value[lane] = bits;
  w.arg[lane] = arg;
  e->arrived |= bit;
  if (e->arrived != e->mask) {
    f.state = State::kWarp;
    f.file = file;
    f.line = line;
    run_next(f);
    return w.result[lane];
  }
  // Every named lane is here: each reads its source lane (CUDA's rules for width < 32).
  for (int l = 0; l < 32; ++l) {
    if (!(e->mask >> l & 1u)) continue;
    const int seg = l & ~(e->width - 1);
    int src = l;
    switch (e->op) {
      case kShflIdx: src = seg + (w.arg[l] & (e->width - 1)); break;
      case kShflUp: src = l - w.arg[l] >= seg ? l - w.arg[l] : l; break;
      case kShflDown: src = l + w.arg[l] < seg + e->width ? l + w.arg[l] : l; break;
      case kShflXor: src = (l ^ w.arg[l]) < seg + e->width ? (l ^ w.arg[l]) : l; break;
      case kSyncWarp: break;
    }
    if (!(e->mask >> src & 1u))
      fail_in_block(call() + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                    ", which is not in the mask " + lanes(e->mask) + " (undefined on a GPU)");
    w.result[l] = w.value[src];
  }
  for (int l = 0; l < 32; ++l) {
    if ((e->mask >> l & 1u) && l != lane) {
      g_fibers[warp * 32 + l].state = State::kReady;
      push_ready(warp * 32 + l);
    }
  }
  *e = w.ex[--w.n];  // done: drop it (order of the pending list does not matter)
  ++g_counters[kExchanges];
  if (g_shuffle) {  // let another thread run first sometimes: the lanes leave an exchange in any order
    f.state = State::kReady;
    push_ready(f.t.index);
    run_next(f);
  }
  return w.result[lane];
}

void run_grid(const char* name, const char* launch_site, dim3 grid, dim3 block, size_t shared_bytes,
              cudaStream_t /*stream*/, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_mutex);
  ++g_counters[kLaunches];
  // A failed launch leaves the context unusable on a GPU; here the following launches are
  // skipped until cudaGetLastError reports the failure.
  if (g_pending != cudaSuccess) return;
  if (!check_config(name, grid, block, shared_bytes)) return;
  start_watchdog();
  FaultGuard guard;
  g_fault_signal = 0;
  g_watch_kernel = name;
  g_launch_started_ms = now_ms();
  g_kernel = name;
  g_launch_site = launch_site;
  g_body = body;
  g_body_ctx = ctx;
  g_rng = Rng{g_seed * 0x2545f4914f6cdd1dull + g_launch_index++};
  g_shuffle = g_seed != 0;
  const size_t nblocks = size_t(grid.x) * grid.y * grid.z;
  std::vector<size_t> order(nblocks);
  for (size_t i = 0; i < nblocks; ++i) order[i] = i;
  if (g_shuffle)
    for (size_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[g_rng.next() % i]);
  for (size_t k = 0; k < nblocks; ++k) {
    const size_t i = order[k];
    const uint3 b{static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                  static_cast<unsigned>(i / (size_t(grid.x) * grid.y))};
    if (!run_block(grid, block, b)) {
      g_pending = g_fault_signal ? cudaErrorIllegalAddress : cudaErrorLaunchFailure;
      ++g_counters[kFailures];
      break;
    }
  }
  g_launch_started_ms = 0;
}

}  // namespace gaze_cpu

// ---- harness controls (gaze_harness.h) --------------------------------------------------------

extern "C" {

void gaze_harness_set_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(gaze_cpu::g_mutex);
  gaze_cpu::g_seed = seed;
  gaze_cpu::g_launch_index = 0;
}

uint64_t gaze_harness_get_seed(void) { return gaze_cpu::g_seed; }

int32_t gaze_harness_sm_count(void) { return gaze_cpu::g_sms; }

void gaze_harness_counters(uint64_t* out, int32_t n) {
  std::lock_guard<std::mutex> lock(gaze_cpu::g_mutex);
  for (int32_t i = 0; i < n && i < 7; ++i) out[i] = gaze_cpu::g_counters[i];
}

// ---- the CUDA runtime calls of the kernels' host code, on host memory --------------------------
// Streams are ignored: every launch and copy has completed when its call returns.

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(gaze_cpu::g_mutex);
  const cudaError_t e = gaze_cpu::g_pending;
  gaze_cpu::g_pending = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return gaze_cpu::g_pending; }

cudaError_t cudaStreamSynchronize(cudaStream_t) { return gaze_cpu::g_pending; }

cudaError_t cudaDeviceSynchronize(void) { return gaze_cpu::g_pending; }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind) {
  if (count && (!dst || !src)) return cudaErrorInvalidValue;
  if (count) std::memmove(dst, src, count);
  return gaze_cpu::g_pending;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, count, kind);
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              enum cudaMemcpyKind, cudaStream_t) {
  if (width > dpitch || width > spitch) return cudaErrorInvalidPitchValue;
  if (width && height && (!dst || !src)) return cudaErrorInvalidValue;
  for (size_t r = 0; r < height && width; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  if (count && !dst) return cudaErrorInvalidValue;
  if (count) std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return cudaErrorInvalidValue;
  *count = 1;  // the CPU
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (!device) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (!value || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = gaze_cpu::g_sms; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    default: return cudaErrorInvalidValue;  // not simulated: better an error than a made-up number
  }
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidPitchValue: return "cudaErrorInvalidPitchValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string text;
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidPitchValue: return "invalid pitch argument";
    case cudaErrorInvalidConfiguration:
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure: {
      std::lock_guard<std::mutex> lock(gaze_cpu::g_mutex);
      text = (e == cudaErrorLaunchFailure  ? "unspecified launch failure: "
              : e == cudaErrorIllegalAddress ? "an illegal memory access was encountered: "
                                             : "invalid configuration argument: ") +
             gaze_cpu::g_failure_text;
      return text.c_str();
    }
    default: return "unknown error";
  }
}

}  // extern "C"
