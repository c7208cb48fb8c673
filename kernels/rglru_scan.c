/*
 * Fused RG-LRU for one chunk of T tokens and L channels, on the CPU.
 *
 * Inputs are row-major [T, L] (one row per token); the carry h [L] is float32 and updated in place.
 * For every token t and channel c (a_scale = -8 * softplus(a_param), precomputed, <= 0):
 *
 *     log_a = a_scale[c] * sigmoid(gate_a[t,c])
 *     a     = exp(log_a)
 *     mult  = reset[t] ? 1 : sqrt(1 - a^2), computed through expm1(log_a) for accuracy near a = 1
 *     h[c]  = (reset[t] ? 0 : a * h[c]) + mult * sigmoid(gate_x[t,c]) * x[t,c]
 *     y[t,c] = h[c]
 *
 * Time is sequential; channels are independent, so the inner loop runs over channels (vectorised by
 * the compiler) and threads split the channels. Plain C with no dependency on Python or torch: it is
 * called through ctypes with raw pointers. bf16 tensors are passed as their uint16 bit patterns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* only for the module stub at the end; the kernel itself uses no Python API */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "fastmath.h"
#include "rglru.h"

#define MAX_THREADS 64

typedef struct {
    const void *x, *gate_x, *gate_a;
    const float *a_scale;
    const uint8_t *reset; /* may be NULL: no document starts in this chunk */
    float *h;
    void *y;
    int64_t T, L, c0, c1;
    int bf16;
} job_t;

/* One token's row for channels [0, n): plain restrict pointers so the compiler vectorises the loop.
   keep is 0 where a document starts (forget h, do not normalise x), else 1. */
static void row_f32(const float *restrict x, const float *restrict gx, const float *restrict ga,
                    const float *restrict scale, float *restrict h, float *restrict y, int64_t n, float keep) {
    for (int64_t c = 0; c < n; c++) {
        h[c] = rglru_channel(x[c], gx[c], ga[c], scale[c], h[c], keep);
        y[c] = h[c];
    }
}

static void row_bf16(const uint16_t *restrict x, const uint16_t *restrict gx, const uint16_t *restrict ga,
                     const float *restrict scale, float *restrict h, uint16_t *restrict y, int64_t n, float keep) {
    for (int64_t c = 0; c < n; c++) {
        h[c] = rglru_channel(bf16_to_f32(x[c]), bf16_to_f32(gx[c]), bf16_to_f32(ga[c]), scale[c], h[c], keep);
        y[c] = f32_to_bf16(h[c]);
    }
}

static void run_job_rows(const job_t *j) {
    const int64_t n = j->c1 - j->c0;
    for (int64_t t = 0; t < j->T; t++) {
        const int64_t at = t * j->L + j->c0;
        const float keep = j->reset && j->reset[t] ? 0.0f : 1.0f;
        if (j->bf16)
            row_bf16((const uint16_t *)j->x + at, (const uint16_t *)j->gate_x + at,
                     (const uint16_t *)j->gate_a + at, j->a_scale + j->c0, j->h + j->c0, (uint16_t *)j->y + at,
                     n, keep);
        else
            row_f32((const float *)j->x + at, (const float *)j->gate_x + at, (const float *)j->gate_a + at,
                    j->a_scale + j->c0, j->h + j->c0, (float *)j->y + at, n, keep);
    }
}

static void *run_job(void *arg) {
    run_job_rows(arg);
    return NULL;
}

/* Returns 0 on success. Threads split the channels in multiples of 16; small chunks stay on one thread. */
static int rglru(const void *x, const void *gate_x, const void *gate_a, const float *a_scale,
                 const uint8_t *reset, float *h, void *y, int64_t T, int64_t L, int n_threads, int bf16) {
    if (T < 0 || L < 0) return 1;
    if (n_threads < 1 || T * L < (1 << 15)) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    int64_t per = ((L + n_threads - 1) / n_threads + 15) / 16 * 16;
    job_t jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started = 0;
    for (int i = 0; i < n_threads; i++) {
        int64_t c0 = i * per, c1 = c0 + per < L ? c0 + per : L;
        if (c0 >= c1) break;
        jobs[i] = (job_t){x, gate_x, gate_a, a_scale, reset, h, y, T, L, c0, c1, bf16};
        started++;
    }
    int spawned = 0; /* job 0 runs on the calling thread */
    for (int i = 1; i < started; i++, spawned++)
        if (pthread_create(&threads[i], NULL, run_job, &jobs[i]) != 0) break;
    if (started > 0) run_job(&jobs[0]);
    for (int i = spawned + 1; i < started; i++) run_job(&jobs[i]); /* any thread that failed to start */
    for (int i = 1; i <= spawned; i++) pthread_join(threads[i], NULL);
    return 0;
}

int rglru_f32(const float *x, const float *gate_x, const float *gate_a, const float *a_scale,
              const uint8_t *reset, float *h, float *y, int64_t T, int64_t L, int n_threads) {
    return rglru(x, gate_x, gate_a, a_scale, reset, h, y, T, L, n_threads, 0);
}

int rglru_bf16(const uint16_t *x, const uint16_t *gate_x, const uint16_t *gate_a, const float *a_scale,
               const uint8_t *reset, float *h, uint16_t *y, int64_t T, int64_t L, int n_threads) {
    return rglru(x, gate_x, gate_a, a_scale, reset, h, y, T, L, n_threads, 1);
}

/* Lets the shared library double as an importable (empty) CPython extension, as build tools expect. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rglru", "RG-LRU scan (loaded through ctypes)", -1};
PyMODINIT_FUNC PyInit__rglru(void) { return PyModule_Create(&module); }
