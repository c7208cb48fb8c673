/* Inlined float exp-family functions for the CPU kernels: loops that call them still vectorise, where
 * calls into libm would spill every vector register. */
#ifndef RGCHAT_FASTMATH_H
#define RGCHAT_FASTMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) - 1. x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2); expm1(r) = r + r^2 P(r) with
 * Cephes' minimax polynomial for expf (about 1 ulp); then 2^n expm1(r) + (2^n - 1), which keeps full
 * relative accuracy for small x, where exp(x) - 1 would cancel. */
static inline float expm1_inline(float x) {
    x = x < -87.0f ? -87.0f : x; /* 2^n stays a normal float */
    x = x > 88.0f ? 88.0f : x;
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

#endif
