/* The portable path of kernels/gemv.c checked on its own, for architectures whose Python is not at hand:
 * tests/test_gemv.py cross-compiles this file with the kernels for aarch64 and runs it under qemu. Prints
 * "ok" when every product equals its reference (int8 exactly; int4 and bf16 within float rounding). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int gemv_int8(const int8_t *, const uint16_t *, int64_t, int64_t, const void *, int, int64_t, void *, int, int);
int gemv_int4(const uint8_t *, const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t, const void *, int,
              int64_t, void *, int, int);
int gemv_bf16(const uint16_t *, int64_t, int64_t, int64_t, const uint16_t *, int64_t, uint16_t *, int, int);
int gemv_best_path(int);

static uint32_t seed = 12345;
static uint32_t next(void) { return seed = seed * 1664525u + 1013904223u; }
static float uniform(void) { return (float)(next() >> 8) / 16777216.0f * 2.0f - 1.0f; }
static uint16_t to_bf16(float f) { uint32_t b; memcpy(&b, &f, 4); return (uint16_t)(b >> 16); } /* truncated: any bf16 will do */
static float from_bf16(uint16_t v) { uint32_t b = (uint32_t)v << 16; float f; memcpy(&f, &b, 4); return f; }

static void quantize(const float *x, int64_t K, int8_t *q, float *s) { /* as the kernel and torch do */
    float amax = 0;
    for (int64_t k = 0; k < K; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    *s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    for (int64_t k = 0; k < K; k++) q[k] = (int8_t)nearbyintf(x[k] / *s);
}

int main(void) {
    const int64_t shapes[][2] = {{1, 32}, {7, 96}, {33, 160}, {17, 2560}, {64, 3008}};
    int failures = 0;
    if (gemv_best_path(0) != 1) printf("note: a SIMD path is the best here, the portable one is checked\n");
    for (int s = 0; s < 5; s++) {
        const int64_t N = shapes[s][0], K = shapes[s][1], G = K / 32;
        for (int64_t B = 1; B <= 8; B += 3) {
            int8_t *w8 = malloc(N * K), *xq = malloc(K);
            uint8_t *w4 = malloc(N * K / 2);
            uint16_t *scale = malloc(N * G * 2), *zero = malloc(N * G * 2), *wb = malloc(N * K * 2), *xb = malloc(B * K * 2);
            uint16_t *ob = malloc(B * N * 2);
            float *x = malloc(B * K * 4), *out = malloc(B * N * 4);
            for (int64_t i = 0; i < N * K; i++) { w8[i] = (int8_t)(next() >> 24); wb[i] = to_bf16(uniform()); }
            for (int64_t i = 0; i < N * K / 2; i++) w4[i] = (uint8_t)(next() >> 24);
            for (int64_t i = 0; i < N * G; i++) { scale[i] = to_bf16(0.5f + uniform() * 0.25f); zero[i] = to_bf16(uniform()); }
            for (int64_t i = 0; i < B * K; i++) { x[i] = uniform() * 3; xb[i] = to_bf16(x[i]); }
            for (int threads = 1; threads <= 3; threads += 2) {
                if (gemv_int8(w8, scale, N, K, x, 0, B, out, threads, 1)) failures++;
                for (int64_t b = 0; b < B; b++) {
                    float xs;
                    quantize(x + b * K, K, xq, &xs);
                    for (int64_t n = 0; n < N; n++) {
                        int32_t sum = 0;
                        for (int64_t k = 0; k < K; k++) sum += (int32_t)w8[n * K + k] * xq[k];
                        if (out[b * N + n] != ((float)sum * xs) * from_bf16(scale[n])) failures++;
                    }
                }
                if (gemv_int4(w4, scale, zero, N, K, 32, x, 0, B, out, threads, 1)) failures++;
                for (int64_t b = 0; b < B; b++) {
                    float xs;
                    quantize(x + b * K, K, xq, &xs);
                    for (int64_t n = 0; n < N; n++) {
                        double sum = 0, size = 0;
                        for (int64_t k = 0; k < K; k++) {
                            int q = k % 2 ? w4[(n * K + k) / 2] >> 4 : w4[(n * K + k) / 2] & 15;
                            double w = (q - 8) * (double)from_bf16(scale[n * G + k / 32]) + from_bf16(zero[n * G + k / 32]);
                            sum += w * xq[k] * xs;
                            size += fabs(w * xq[k] * xs);
                        }
                        if (fabs(out[b * N + n] - sum) > 1e-5 * size + 1e-30) failures++;
                    }
                }
                if (gemv_bf16(wb, N, K, 1, xb, B, ob, threads, 1)) failures++;
                for (int64_t b = 0; b < B; b++)
                    for (int64_t n = 0; n < N; n++) {
                        double sum = 0, size = 0;
                        for (int64_t k = 0; k < K; k++) {
                            double p = (double)from_bf16(wb[n * K + k]) * from_bf16(xb[b * K + k]);
                            sum += p;
                            size += fabs(p);
                        }
                        if (fabs(from_bf16(ob[b * N + n]) - sum) > 0.0079 * fabs(sum) + 1e-5 * size) failures++;
                    }
            }
            free(w8); free(xq); free(w4); free(scale); free(zero); free(wb); free(xb); free(ob); free(x); free(out);
        }
    }
    printf(failures ? "%d failures\n" : "ok\n", failures);
    return failures != 0;
}
