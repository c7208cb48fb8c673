/*
 * The element-wise work of one CPU decode step, fused: what lies between the matrix products.
 *
 * A decode step of n conversations has n rows of activations. Between its products, torch would run
 * a few hundred small operations per layer, each a dispatch of its own; here each stretch between two
 * products is one call. Every function works row by row (a row's result never depends on the other
 * rows, so a conversation decodes the same alone or in a batch), reads its activations as bfloat16 or
 * float32 (`bf16`), computes in float32 and rounds once, where it stores its output.
 *
 * Plain C with no dependency on Python or torch, called through ctypes with raw pointers, on the calling
 * thread (these calls are microseconds; the products around them own the cores). bf16 tensors arrive as
 * their uint16 bit patterns. Each function returns 0, or 1 for bad arguments, 3 when out of memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* only for the module stub at the end; the kernels themselves use no Python API */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "fastmath.h"
#include "rglru.h"

#define LANES 16 /* partial sums per reduction, so that the compiler vectorises it without reassociating */

static void load(const void *src, int bf16, float *restrict dst, int64_t n) {
    if (bf16) {
        const uint16_t *restrict s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, n * sizeof(float));
    }
}

static void store(const float *restrict src, void *dst, int bf16, int64_t n) {
    if (bf16) {
        uint16_t *restrict d = dst;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, n * sizeof(float));
    }
}

static void *element(const void *base, int bf16, int64_t index) {
    return (char *)base + index * (bf16 ? 2 : 4);
}

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float part[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) part[j] += a[i + j] * b[i + j];
    float sum = 0.0f;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < LANES; j++) sum += part[j];
    return sum;
}

/* gelu with the tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3) */
static inline float gelu(float x) {
    return x * sigmoid(1.5957691216f * (x + 0.044715f * x * x * x));
}

/* out = x / rms(x) * (1 + w), rows of `width`. */
int step_rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t width, float eps, int bf16) {
    if (rows < 0 || width <= 0) return 1;
    float *buf = malloc(2 * width * sizeof(float));
    if (!buf) return 3;
    float *restrict v = buf, *restrict scale = buf + width;
    load(w, bf16, scale, width);
    for (int64_t c = 0; c < width; c++) scale[c] += 1.0f;
    for (int64_t r = 0; r < rows; r++) {
        load(element(x, bf16, r * width), bf16, v, width);
        const float inv = 1.0f / sqrtf(dot(v, v, width) / (float)width + eps);
        for (int64_t c = 0; c < width; c++) v[c] = v[c] * inv * scale[c];
        store(v, element(out, bf16, r * width), bf16, width);
    }
    free(buf);
    return 0;
}

/* out = gelu(gate) * up, element-wise over n values (the MLP). */
int step_gelu_mul(const void *gate, const void *up, void *out, int64_t n, int bf16) {
    if (n < 0) return 1;
    enum { BLOCK = 1024 };
    float g[BLOCK], u[BLOCK];
    for (int64_t i = 0; i < n; i += BLOCK) {
        const int64_t m = n - i < BLOCK ? n - i : BLOCK;
        load(element(gate, bf16, i), bf16, g, m);
        load(element(up, bf16, i), bf16, u, m);
        for (int64_t j = 0; j < m; j++) g[j] = gelu(g[j]) * u[j];
        store(g, element(out, bf16, i), bf16, m);
    }
    return 0;
}

/* The causal depthwise conv for one token of each row: out = b + sum_k w[:, k] * window_k over the
 * window [state (width - 1 earlier inputs), u]; then the state moves on by u. u, out [rows, L];
 * state [rows, width - 1, L]; w [L, width]. */
int step_conv(const void *u, void *state, const void *w, const void *b, void *out, int64_t rows, int64_t L,
              int64_t width, int bf16) {
    if (rows < 0 || L <= 0 || width < 1) return 1;
    float *buf = malloc((2 * width + 2) * L * sizeof(float));
    if (!buf) return 3;
    float *weights = buf, *window = buf + width * L, *bias = window + width * L, *acc = bias + L;
    float *wk = malloc(width * L * sizeof(float)); /* the weights as [width, L]: unit-stride rows per tap */
    if (!wk) {
        free(buf);
        return 3;
    }
    load(w, bf16, weights, width * L);
    for (int64_t c = 0; c < L; c++)
        for (int64_t k = 0; k < width; k++) wk[k * L + c] = weights[c * width + k];
    load(b, bf16, bias, L);
    for (int64_t r = 0; r < rows; r++) {
        void *s = element(state, bf16, r * (width - 1) * L);
        load(s, bf16, window, (width - 1) * L);
        load(element(u, bf16, r * L), bf16, window + (width - 1) * L, L);
        for (int64_t c = 0; c < L; c++) acc[c] = 0.0f;
        for (int64_t k = 0; k < width; k++) {
            const float *restrict tap = wk + k * L, *restrict in = window + k * L;
            for (int64_t c = 0; c < L; c++) acc[c] += in[c] * tap[c];
        }
        for (int64_t c = 0; c < L; c++) acc[c] += bias[c];
        store(acc, element(out, bf16, r * L), bf16, L);
        if (width > 1) store(window + L, s, bf16, (width - 1) * L);
    }
    free(wk);
    free(buf);
    return 0;
}

/* One RG-LRU step of each row, times gelu(y): out = h' * gelu(y), with the carries h [rows, L] (float32)
 * updated in place. x, gate_x, gate_a (before their sigmoid), y, out [rows, L]; a_scale [L] float32,
 * -8 softplus(a_param). */
int step_rglru_gelu(const void *x, const void *gate_x, const void *gate_a, const float *a_scale, float *h,
                    const void *y, void *out, int64_t rows, int64_t L, int bf16) {
    if (rows < 0 || L <= 0) return 1;
    float *buf = malloc(4 * L * sizeof(float));
    if (!buf) return 3;
    float *restrict xs = buf, *restrict gx = buf + L, *restrict ga = buf + 2 * L, *restrict ys = buf + 3 * L;
    for (int64_t r = 0; r < rows; r++) {
        load(element(x, bf16, r * L), bf16, xs, L);
        load(element(gate_x, bf16, r * L), bf16, gx, L);
        load(element(gate_a, bf16, r * L), bf16, ga, L);
        load(element(y, bf16, r * L), bf16, ys, L);
        float *restrict carry = h + r * L;
        for (int64_t c = 0; c < L; c++) {
            carry[c] = rglru_channel(xs[c], gx[c], ga[c], a_scale[c], carry[c], 1.0f);
            xs[c] = carry[c] * gelu(ys[c]);
        }
        store(xs, element(out, bf16, r * L), bf16, L);
    }
    free(buf);
    return 0;
}

/* RoPE on the first half of each head (rotate-half, as two quarters), in place; v [heads, head_dim]. */
static void rope(float *v, int64_t heads, int64_t head_dim, const float *cos, const float *sin) {
    const int64_t quarter = head_dim / 4;
    for (int64_t h = 0; h < heads; h++) {
        float *restrict x1 = v + h * head_dim, *restrict x2 = x1 + quarter;
        for (int64_t i = 0; i < quarter; i++) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

/* Local attention for one token of each row, against its ring buffer, then the new key and value stored.
 *
 * q [n, heads * hd], k and v [n, kv * hd]: this token's projections (RoPE not yet applied); cos and sin
 * [n, hd / 4] its RoPE tables. The ring buffers ring_k, ring_v [pool rows, window, kv, hd] hold keys with
 * RoPE applied; row i of the step is pool row rows[i], whose slots [0, filled[i]) hold its earlier keys
 * (all of them once the window is full). Each query head attends to those and to its own new key; query
 * heads share key heads in consecutive groups. out [n, heads * hd]. q and k are rounded to the activation
 * dtype after RoPE, as the key is when stored; scores, softmax and the value sum are float32. */
int step_attention(const void *q, const void *k, const void *v, void *ring_k, void *ring_v, const void *cos,
                   const void *sin, const int64_t *rows, const int64_t *filled, const int64_t *slot, void *out,
                   int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t window, int bf16) {
    if (n < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || head_dim % 4 ||
        window <= 0)
        return 1;
    for (int64_t i = 0; i < n; i++)
        if (filled[i] < 0 || filled[i] > window || slot[i] < 0 || slot[i] >= window || rows[i] < 0) return 1;
    const int64_t width = heads * head_dim, kv_width = kv_heads * head_dim, group = heads / kv_heads;
    const int64_t quarter = head_dim / 4;
    float *buf = malloc((2 * width + 3 * kv_width + 2 * quarter + heads * (window + 1)) * sizeof(float));
    if (!buf) return 3;
    float *qs = buf, *acc = qs + width, *key = acc + width, *own_key = key + kv_width;
    float *val = own_key + kv_width, *cs = val + kv_width;
    float *sn = cs + quarter, *scores = sn + quarter;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int64_t i = 0; i < n; i++) {
        load(element(cos, bf16, i * quarter), bf16, cs, quarter);
        load(element(sin, bf16, i * quarter), bf16, sn, quarter);
        load(element(q, bf16, i * width), bf16, qs, width);
        load(element(k, bf16, i * kv_width), bf16, key, kv_width);
        rope(qs, heads, head_dim, cs, sn);
        rope(key, kv_heads, head_dim, cs, sn);
        const int64_t base = rows[i] * window * kv_width, keys = filled[i] + 1;
        /* the new key as it will be stored, rounded: scored after the ring, written once the ring is read */
        for (int64_t c = 0; c < kv_width; c++) own_key[c] = bf16 ? bf16_to_f32(f32_to_bf16(key[c])) : key[c];
        if (bf16)
            for (int64_t c = 0; c < width; c++) qs[c] = bf16_to_f32(f32_to_bf16(qs[c]));
        for (int64_t s = 0; s < keys; s++) {
            const float *kk = own_key;
            if (s < filled[i]) {
                load(element(ring_k, bf16, base + s * kv_width), bf16, key, kv_width);
                kk = key;
            }
            for (int64_t h = 0; h < heads; h++)
                scores[h * keys + s] = dot(qs + h * head_dim, kk + h / group * head_dim, head_dim) * scale;
        }
        /* the new key into the ring, now that the ring has been read */
        store(own_key, element(ring_k, bf16, base + slot[i] * kv_width), bf16, kv_width);
        for (int64_t h = 0; h < heads; h++) { /* softmax, float32 */
            float *p = scores + h * keys, top = p[0], total = 0.0f;
            for (int64_t s = 1; s < keys; s++) top = p[s] > top ? p[s] : top;
            for (int64_t s = 0; s < keys; s++) total += p[s] = expm1_inline(p[s] - top) + 1.0f;
            for (int64_t s = 0; s < keys; s++) p[s] /= total;
        }
        for (int64_t c = 0; c < width; c++) acc[c] = 0.0f;
        for (int64_t s = 0; s < keys; s++) {
            const void *src = s < filled[i] ? element(ring_v, bf16, base + s * kv_width)
                                            : element(v, bf16, i * kv_width);
            load(src, bf16, val, kv_width);
            for (int64_t h = 0; h < heads; h++) {
                const float p = scores[h * keys + s];
                float *restrict o = acc + h * head_dim;
                const float *restrict vv = val + h / group * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] += p * vv[d];
            }
        }
        memcpy(element(ring_v, bf16, base + slot[i] * kv_width), element(v, bf16, i * kv_width),
               kv_width * (bf16 ? 2 : 4));
        store(acc, element(out, bf16, i * width), bf16, width);
    }
    free(buf);
    return 0;
}

/* cap * tanh(x / cap) in place over n float32 logits, as cap (2 sigmoid(2 x / cap) - 1). */
int step_soft_cap(float *x, int64_t n, float cap) {
    if (n < 0 || !(cap > 0.0f)) return 1;
    for (int64_t i = 0; i < n; i++) x[i] = cap * (2.0f * sigmoid(2.0f * x[i] / cap) - 1.0f);
    return 0;
}

/* Lets the shared library double as an importable (empty) CPython extension, as build tools expect. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_step", "fused decode-step operations (loaded through ctypes)", -1};
PyMODINIT_FUNC PyInit__step(void) { return PyModule_Create(&module); }
