// The RG-LRU on Apple GPUs: one thread per channel walks the chunk's T tokens with a float32 carry.
// Same math as kernels/rglru_scan.c; inputs are float32 [T, L] row-major (bf16 is widened by the caller).
#include <metal_stdlib>
using namespace metal;

// exp(z) - 1 without cancellation near z = 0 (Kahan's trick; Metal has no expm1).
static float exp_minus_one(float z) {
    const float u = precise::exp(z);
    if (u == 1.0f) return z;
    if (u < 0.5f) return u - 1.0f;
    return (u - 1.0f) * z / precise::log(u);
}

kernel void rglru_float(device const float* x [[buffer(0)]],
                        device const float* gate_x [[buffer(1)]],
                        device const float* gate_a [[buffer(2)]],
                        device const float* a_scale [[buffer(3)]],
                        device const uchar* reset [[buffer(4)]],
                        device float* h [[buffer(5)]],
                        device float* y [[buffer(6)]],
                        constant long& steps [[buffer(7)]],
                        constant long& width [[buffer(8)]],
                        constant long& has_reset [[buffer(9)]],
                        uint c [[thread_position_in_grid]]) {
    if (long(c) >= width) return;
    float carry = h[c];
    const float scale = a_scale[c];
    for (long t = 0; t < steps; t++) {
        const long i = t * width + c;
        const float e = exp_minus_one(scale / (1.0f + precise::exp(-gate_a[i])));  // a - 1
        const bool start = has_reset != 0 && reset[t] != 0;
        const float mult = start ? 1.0f : sqrt(-e * (2.0f + e));  // sqrt(1 - a^2)
        carry = (start ? 0.0f : carry + e * carry) + mult * x[i] / (1.0f + precise::exp(-gate_x[i]));
        y[i] = carry;
    }
    h[c] = carry;
}
