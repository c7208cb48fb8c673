/* One step of the RG-LRU recurrence for one channel, shared by the scan (rglru_scan.c) and the fused
 * decode step (step.c). */
#ifndef RGCHAT_RGLRU_H
#define RGCHAT_RGLRU_H

#include <math.h>

#include "fastmath.h"

/* The recurrence for one channel, given that token's inputs in float (see rglru_scan.c). */
static inline float rglru_channel(float x, float gx, float ga, float scale, float h, float keep) {
    /* With e = expm1(log a) = a - 1: 1 - a^2 = -e (2 + e), exact where a is near 1, which
       `1 - a * a` is not. Computed unconditionally, even at a reset, so the loop stays vectorised. */
    const float e = expm1_inline(scale * sigmoid(ga));
    float mult = sqrtf(-e * (2.0f + e));
    mult = keep * mult + (1.0f - keep);
    /* a h = h + e h: never rounding a itself to float keeps the carry exact where a is near 1 */
    return keep * (h + e * h) + mult * sigmoid(gx) * x;
}

#endif
