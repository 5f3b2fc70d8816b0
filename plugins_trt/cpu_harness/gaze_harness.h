/* Controls of the CPU execution harness (plugins_trt/cpu_harness), exported by the CPU build
 * of libgaze_kernels next to the unchanged gaze_* C ABI (capi/gaze_capi.h). Tests use them to
 * choose the scheduling seed and to check that a case exercised what it claims. */
#ifndef GAZE_HARNESS_H_
#define GAZE_HARNESS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Scheduling seed; 0 = natural order (blocks in grid order, threads FIFO), any other value
 * shuffles the order of blocks and of threads between sync points, and the byte that
 * poisons shared memory. Setting it also restarts the per-launch random streams, so a call
 * sequence is reproducible. The initial value is $GAZE_HARNESS_SEED (0 if unset). */
void gaze_harness_set_seed(uint64_t seed);
uint64_t gaze_harness_get_seed(void);

/* Streaming multiprocessors the harness reports (cudaDevAttrMultiProcessorCount); the host
 * code plans split-KV from it. $GAZE_HARNESS_SMS, default 132 (an H100 SXM). */
int32_t gaze_harness_sm_count(void);

/* Counters since load: [0] launches, [1] blocks, [2] threads, [3] barriers released,
 * [4] warp exchanges completed, [5] fiber switches, [6] launches failed (divergence, deadlock,
 * bad configuration). Fills min(n, 7) entries. */
void gaze_harness_counters(uint64_t* out, int32_t n);

#ifdef __cplusplus
}
#endif

#endif /* GAZE_HARNESS_H_ */
