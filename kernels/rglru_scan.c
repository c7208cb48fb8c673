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

/* exp(x) - 1, inlined so that the channel loop vectorises without calls into libm (which would spill
 * every vector register). x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2); expm1(r) =
 * r + r^2 P(r) with Cephes' minimax polynomial for expf (about 1 ulp); then 2^n expm1(r) + (2^n - 1),
 * which keeps full relative accuracy for small x, where exp(x) - 1 would cancel. */
static inline float expm1_inline(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float n = rintf(x * 1.44269504f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float p = r + r * r * (5.0000001201e-1f + r * (1.6666665459e-1f + r * (4.1665795894e-2f +
                    r * (8.3334519073e-3f + r * (1.3981999507e-3f + r * 1.9875691500e-4f)))));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return two_n * p + (two_n - 1.0f);
}

static inline float sigmoid(float v) { return 1.0f / (2.0f + expm1_inline(-v)); }

/* The recurrence for one channel, given that token's inputs in float (see the top of this file). */
static inline float rglru_channel(float x, float gx, float ga, float scale, float h, float keep) {
    /* With e = expm1(log a) = a - 1: 1 - a^2 = -e (2 + e), exact where a is near 1, which
       `1 - a * a` is not. Computed unconditionally, even at a reset, so the loop stays vectorised. */
    const float e = expm1_inline(scale * sigmoid(ga));
    float mult = sqrtf(-e * (2.0f + e));
    mult = keep * mult + (1.0f - keep);
    /* a h = h + e h: never rounding a itself to float keeps the carry exact where a is near 1 */
    return keep * (h + e * h) + mult * sigmoid(gx) * x;
}

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
