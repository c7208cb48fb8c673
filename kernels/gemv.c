/*
 * Matrix products for decode on the CPU: out[b, n] = sum_k x[b, k] * W[n, k] for 1 to 8 activation rows b
 * against a weight matrix W [N, K], in the formats rgchat stores:
 *
 *   int8  W int8 with one bfloat16 scale per output row. Each activation row is quantized once per product
 *         to int8 with one float scale (xs = max|x| / 127, xq = round(x / xs)), the int8 pairs are summed
 *         exactly in int32, and out = (float(sum) * xs) * scale[n]: the same numbers as torch._int_mm on
 *         the same quantized row, on every path.
 *   int4  W two 4-bit values q in 0..15 per byte (low nibble first), w = (q - 8) * s + z with a bfloat16
 *         scale s and zero z per group of inputs. The activations are quantized as for int8; per group the
 *         integer sums D = sum (q - 8) xq and S = sum xq are exact, and out = xs * sum_g (s_g D_g + z_g S_g).
 *   bf16  W and x bfloat16, products summed in float32, out rounded to bfloat16.
 *
 * Decode is bound by reading W, so each path reads every weight once for all activation rows, one output
 * row after the other (one sequential stream a thread), with an accumulator per activation row; from four
 * activation rows on, the AVX-512 int8 and bf16 paths take output rows in pairs (see int8_block_avx512).
 * gemv_int8_packed reads int8 weights from a layout packed in blocks of 32 output rows instead, which lets
 * one activation load serve the whole block (the AVX-512 path runs int8 models from it; see PACK_ROWS).
 * A row's result never depends on how many rows come with it. Paths: portable C, AVX2 (+FMA), and AVX-512
 * (VNNI for the integer formats, BF16 for bfloat16; bfloat16 widened to float on AVX-512 CPUs without
 * BF16), chosen at run time from the CPU's flags, or forced by the caller (the tests force each).
 *
 * Threads: a persistent pool splits the output rows; the calling thread takes the first slice. Plain C
 * with no Python or torch dependency, called through ctypes; bfloat16 tensors arrive as uint16 bits.
 */
#ifndef GEMV_NO_PYTHON /* built alone (for another architecture, in the tests) without the module stub */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* only for the module stub at the end */
#endif

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))
#else
#define HAVE_X86 0
#endif

/* PATH_AVX512_FLOAT: bf16 alone, on AVX-512 without VDPBF16PS (or forced, to test it on any AVX-512 CPU) */
enum { PATH_AUTO = 0, PATH_PORTABLE = 1, PATH_AVX2 = 2, PATH_AVX512 = 3, PATH_AVX512_FLOAT = 4 };
enum { KIND_INT8 = 0, KIND_INT4 = 1, KIND_BF16 = 2 };
enum { OK = 0, ERR_ARGS = 1, ERR_PATH = 2, ERR_MEMORY = 3 };

#define MAX_ROWS 8
#define MAX_K 65536 /* keeps every int32 sum exact: 65536 * 255 * 128 < 2^31 */
#define MAX_THREADS 64
#define MAX_PACKED_ROWS 4096 /* rows of one packed int8 product: a prefill chunk */

/* ---- one product ------------------------------------------------------------------------------------- */

typedef struct {
    int B, out_bf16;
    int64_t N, K, group;
    int group_shift;               /* int4: log2(group / 32) */
    int64_t rows_per_head, x_stride; /* bf16: each run of rows_per_head rows reads its own K inputs of the
                                        activation rows (a block-diagonal matrix); x_stride apart */
    const void *w;                 /* int8 [N, K] | uint8 [N, K/2] | bf16 [N, K] */
    const uint16_t *scale, *zero;  /* int8: [N]; int4: [N, K/group] */
    const int8_t *xq;              /* [B, K] quantized rows (int4 SIMD: permuted within each block of 32) */
    const int32_t *xsum;           /* int8 AVX-512: [B] sum of xq over the vector part */
    const float *xgroup;           /* int4: [B, K/group] sum of xq per group, as float */
    const float *xscale;           /* int8, int4: [B] */
    const float *xf;               /* bf16 on every path but PATH_AVX512: [B, K] activations as float */
    const uint16_t *xb;            /* bf16 on PATH_AVX512: [B, K] activations as bfloat16 */
    void *out;                     /* [B, N], float32 or bfloat16 */
} job_t;

static inline void store(const job_t *j, int b, int64_t n, float v) {
    if (j->out_bf16)
        ((uint16_t *)j->out)[b * j->N + n] = f32_to_bf16(v);
    else
        ((float *)j->out)[b * j->N + n] = v;
}

static inline void store_int8(const job_t *j, int b, int64_t n, int32_t total) {
    store(j, b, n, ((float)total * j->xscale[b]) * bf16_to_f32(j->scale[n]));
}

static inline int32_t dot_int8_tail(const int8_t *w, const int8_t *x, int64_t k0, int64_t K) {
    int32_t s = 0;
    for (int64_t k = k0; k < K; k++) s += (int32_t)w[k] * x[k];
    return s;
}

/* int4 zero-point term of one output row: sum_g z_g S_g, in order (portable and the SIMD tails) */
static inline float zero_term_tail(const uint16_t *zero, const float *xgroup, int64_t g0, int64_t G) {
    float s = 0.0f;
    for (int64_t g = g0; g < G; g++) s += bf16_to_f32(zero[g]) * xgroup[g];
    return s;
}

/* ---- portable C -------------------------------------------------------------------------------------- */

static void int8_part_portable(const job_t *j, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int b = 0; b < j->B; b++)
            store_int8(j, b, n, dot_int8_tail((const int8_t *)j->w + n * j->K, j->xq + b * j->K, 0, j->K));
}

/* ---- int8 from the packed layout --------------------------------------------------------------------
 * gemv_int8_packed reads int8 weights in blocks of PACK_ROWS output rows, each block [K/4][PACK_ROWS][4]:
 * four consecutive inputs of every row of the block, then the next four. A 64-byte vector then holds four
 * inputs of 16 output rows, so one broadcast group of four activations feeds 16 outputs at once: the
 * activations are loaded once for PACK_ROWS rows instead of once per row or pair, each block is one sequential
 * stream, and every lane ends as one output's exact int32 sum (no horizontal sums). Activation rows are taken
 * PACKED_GROUP at a time, each group over the whole block while it is in cache, so any number of rows (a
 * prefill chunk) reads the weights from memory once. */
#define PACK_ROWS 32
#define PACKED_GROUP 8

static inline int8_t packed_weight(const job_t *j, int64_t n, int64_t k) {
    const int64_t block = n / PACK_ROWS * PACK_ROWS * j->K;
    return ((const int8_t *)j->w)[block + k / 4 * (4 * PACK_ROWS) + n % PACK_ROWS * 4 + k % 4];
}

static void int8_packed_part_portable(const job_t *j, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int b = 0; b < j->B; b++) {
            int32_t s = 0;
            for (int64_t k = 0; k < j->K; k++) s += (int32_t)packed_weight(j, n, k) * j->xq[b * j->K + k];
            store_int8(j, b, n, s);
        }
}

static void int4_part_portable(const job_t *j, int64_t n0, int64_t n1) {
    const int64_t K = j->K, G = K / j->group;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = (const uint8_t *)j->w + n * (K / 2);
        for (int b = 0; b < j->B; b++) {
            const int8_t *x = j->xq + b * K;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                int32_t d = 0;
                for (int64_t k = g * j->group; k < (g + 1) * j->group; k += 2) {
                    d += ((int32_t)(w[k / 2] & 15) - 8) * x[k];
                    d += ((int32_t)(w[k / 2] >> 4) - 8) * x[k + 1];
                }
                acc += bf16_to_f32(j->scale[n * G + g]) * (float)d;
            }
            acc += zero_term_tail(j->zero + n * G, j->xgroup + b * G, 0, G);
            store(j, b, n, j->xscale[b] * acc);
        }
    }
}

static void bf16_part_portable(const job_t *j, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *w = (const uint16_t *)j->w + n * j->K;
        for (int b = 0; b < j->B; b++) {
            const float *x = j->xf + b * j->x_stride + n / j->rows_per_head * j->K;
            float acc = 0.0f;
            for (int64_t k = 0; k < j->K; k++) acc += bf16_to_f32(w[k]) * x[k];
            store(j, b, n, acc);
        }
    }
}

/* One output row at a time for all B activation rows (B accumulators): consecutive rows are consecutive
 * in memory, so each thread reads one sequential stream, which reached more of the memory bandwidth than
 * passes over several rows at once (several streams a row apart). */
#define PART_LOOP(ROWS_FN, B_)                                                                               \
    for (int64_t n = n0; n < n1; n++) ROWS_FN(j, n, B_)

#ifndef PAIR_FROM /* a build flag only to time other thresholds against this one */
#define PAIR_FROM 4
#endif
/* From PAIR_FROM activation rows on, output rows in pairs through PAIR_FN (both in one head of a block-diagonal
 * bf16 matrix), the others one at a time through ROWS_FN; kernels without a pair function pass no_pair. */
static inline void no_pair(const job_t *j, int64_t n, int B) { (void)j, (void)n, (void)B; }

static inline int pair_in_one_head(const job_t *j, int64_t n) {
    return j->rows_per_head == 0 || n / j->rows_per_head == (n + 1) / j->rows_per_head;
}

#define PAIR_LOOP(ROWS_FN, PAIR_FN, B_)                                                                      \
    do {                                                                                                     \
        int64_t n = n0;                                                                                      \
        while (n < n1) {                                                                                     \
            if (n + 1 < n1 && pair_in_one_head(j, n)) {                                                      \
                PAIR_FN(j, n, B_);                                                                           \
                n += 2;                                                                                      \
            } else {                                                                                         \
                ROWS_FN(j, n, B_);                                                                           \
                n++;                                                                                         \
            }                                                                                                \
        }                                                                                                    \
    } while (0)

#define ROWS_LOOP(ROWS_FN, PAIR_FN, B_)                                                                      \
    do {                                                                                                     \
        if ((B_) >= PAIR_FROM && PAIR_FN != no_pair) PAIR_LOOP(ROWS_FN, PAIR_FN, B_);                        \
        else PART_LOOP(ROWS_FN, B_);                                                                         \
    } while (0)

#define DEFINE_PART(NAME, ROWS_FN, PAIR_FN, TARGET)                                                          \
    TARGET static void NAME(const job_t *j, int64_t n0, int64_t n1) {                                        \
        switch (j->B) {                                                                                      \
        case 1: ROWS_LOOP(ROWS_FN, PAIR_FN, 1); break;                                                       \
        case 2: ROWS_LOOP(ROWS_FN, PAIR_FN, 2); break;                                                       \
        case 3: ROWS_LOOP(ROWS_FN, PAIR_FN, 3); break;                                                       \
        case 4: ROWS_LOOP(ROWS_FN, PAIR_FN, 4); break;                                                       \
        case 5: ROWS_LOOP(ROWS_FN, PAIR_FN, 5); break;                                                       \
        case 6: ROWS_LOOP(ROWS_FN, PAIR_FN, 6); break;                                                       \
        case 7: ROWS_LOOP(ROWS_FN, PAIR_FN, 7); break;                                                       \
        default: ROWS_LOOP(ROWS_FN, PAIR_FN, 8); break;                                                      \
        }                                                                                                    \
    }

#if HAVE_X86
/* ---- AVX2 -------------------------------------------------------------------------------------------- */

/* Each pass prefetches the rows of the next pass at the same offset: one linear stream ahead of the reads,
 * where the hardware prefetchers lose time on every short row. */

AVX2 INLINE int32_t hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

AVX2 INLINE float hsum_ps_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 INLINE __m256 bf16x8_to_f32_avx2(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* int8: |w| times x with w's sign (maddubs multiplies unsigned by signed bytes; pairs stay below 2^15) */
AVX2 INLINE void int8_rows_avx2(const job_t *j, int64_t n, const int B) {
    const int64_t K = j->K, KV = K & ~(int64_t)31;
    const int8_t *w = (const int8_t *)j->w + n * K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MAX_ROWS];
    for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_si256();
    for (int64_t k = 0; k < KV; k += 32) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        if ((k & 63) == 0) _mm_prefetch((const char *)(w + K + k), _MM_HINT_T0); /* the next row */
        const __m256i aw = _mm256_abs_epi8(wv);
        for (int b = 0; b < B; b++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(j->xq + b * K + k));
            const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
            acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(p, ones));
        }
    }
    for (int b = 0; b < B; b++)
        store_int8(j, b, n, hsum_epi32_avx2(acc[b]) + dot_int8_tail(w, j->xq + b * K, KV, K));
}
DEFINE_PART(int8_part_avx2, int8_rows_avx2, no_pair, AVX2)

/* sum_g (z_g - 8 s_g) S_g of one output row (scale: its scales as float): the zero points and the -8 of
 * the stored 4-bit values, both multiplying the group sums S_g of the activation row. */
AVX2 INLINE float int4_zero_term_avx2(const job_t *j, int64_t n, int b, const float *scale) {
    const int64_t G = j->K / j->group, GV = G & ~(int64_t)7;
    const uint16_t *zero = j->zero + n * G;
    const float *xg = j->xgroup + b * G;
    const __m256 minus8 = _mm256_set1_ps(-8.0f);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < GV; g += 8) {
        const __m256 shifted = _mm256_fmadd_ps(minus8, _mm256_loadu_ps(scale + g), bf16x8_to_f32_avx2(zero + g));
        acc = _mm256_fmadd_ps(shifted, _mm256_loadu_ps(xg + g), acc);
    }
    float tail = 0.0f;
    for (int64_t g = GV; g < G; g++) tail += (bf16_to_f32(zero[g]) - 8.0f * scale[g]) * xg[g];
    return hsum_ps_avx2(acc) + tail;
}

/* int4, two blocks of 32 values (32 packed bytes) a step: the low nibbles hold the even values of both
 * blocks, the high nibbles the odd ones, and the activations are laid out to match ([even | even] then
 * [odd | odd], 64 bytes a pair; a last odd block is padded with zeros). Lanes 0-3 of the sums belong to the
 * first block, 4-7 to the second; each lane holds sum q xq over its bytes (exact), is scaled by its block's
 * s and accumulated in float; the -8 joins the zero points' term. DOT2(lo, xlo, hi, xhi) gives the lanes. */
#define INT4_PAIR(DOT2, p, g0, g1, full)                                                                     \
    do {                                                                                                     \
        const uint8_t *src = w + (p) * 32;                                                                   \
        _mm_prefetch((const char *)(src + row), _MM_HINT_T0); /* the next row */                            \
        const __m256i v = (full) ? _mm256_loadu_si256((const __m256i *)src)                                  \
                                 : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)src));            \
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4); \
        const __m256 s = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(&scale[g0])),          \
                                              _mm_broadcast_ss(&scale[g1]), 1);                              \
        for (int b = 0; b < B; b++) {                                                                        \
            const int8_t *x = j->xq + (b * pairs + (p)) * 64;                                                \
            const __m256i d = DOT2(lo, _mm256_loadu_si256((const __m256i *)x), hi,                           \
                                   _mm256_loadu_si256((const __m256i *)(x + 32)));                           \
            acc[b] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d), acc[b]);                                      \
        }                                                                                                    \
    } while (0)

#define DEFINE_INT4_ROWS(NAME, TARGET, DOT2)                                                                 \
    TARGET INLINE void NAME(const job_t *j, int64_t n, const int B) {                                        \
        const int64_t K = j->K, G = K / j->group, KB = K / 32, pairs = (KB + 1) / 2, row = K / 2;            \
        const int shift = j->group_shift;                                                                    \
        const uint8_t *w = (const uint8_t *)j->w + n * row;                                                  \
        const __m256i low4 = _mm256_set1_epi8(15);                                                           \
        float scale[MAX_K / 32];                                                                             \
        int64_t g = 0;                                                                                       \
        for (; g + 8 <= G; g += 8) _mm256_storeu_ps(&scale[g], bf16x8_to_f32_avx2(j->scale + n * G + g));   \
        for (; g < G; g++) scale[g] = bf16_to_f32(j->scale[n * G + g]);                                      \
        __m256 acc[MAX_ROWS];                                                                                \
        for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();                                            \
        for (int64_t p = 0; p < KB / 2; p++) INT4_PAIR(DOT2, p, (2 * p) >> shift, (2 * p + 1) >> shift, 1);  \
        if (KB & 1) INT4_PAIR(DOT2, KB / 2, (KB - 1) >> shift, (KB - 1) >> shift, 0);                        \
        for (int b = 0; b < B; b++)                                                                          \
            store(j, b, n, j->xscale[b] * (hsum_ps_avx2(acc[b]) + int4_zero_term_avx2(j, n, b, scale)));     \
    }

/* maddubs pairs stay far below 2^15 (15 * 127 * 2 twice), so the two halves are summed in int16 first */
#define DOT2_AVX2(lo, xlo, hi, xhi)                                                                          \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)),        \
                      _mm256_set1_epi16(1))
DEFINE_INT4_ROWS(int4_rows_avx2, AVX2, DOT2_AVX2)
DEFINE_PART(int4_part_avx2, int4_rows_avx2, no_pair, AVX2)

AVX2 INLINE void bf16_rows_avx2(const job_t *j, int64_t n, const int B) {
    const int64_t K = j->K, KV = K & ~(int64_t)7, xs = j->x_stride;
    const uint16_t *w = (const uint16_t *)j->w + n * K;
    const float *x = j->xf + n / j->rows_per_head * K;
    __m256 acc[MAX_ROWS];
    for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
    for (int64_t k = 0; k < KV; k += 8) {
        if ((k & 31) == 0) _mm_prefetch((const char *)(w + K + k), _MM_HINT_T0); /* the next row */
        const __m256 wv = bf16x8_to_f32_avx2(w + k);
        for (int b = 0; b < B; b++) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * xs + k), acc[b]);
    }
    for (int b = 0; b < B; b++) {
        float tail = 0.0f;
        for (int64_t k = KV; k < K; k++) tail += bf16_to_f32(w[k]) * x[b * xs + k];
        store(j, b, n, hsum_ps_avx2(acc[b]) + tail);
    }
}
DEFINE_PART(bf16_part_avx2, bf16_rows_avx2, no_pair, AVX2)

/* ---- AVX-512 ----------------------------------------------------------------------------------------- */

/* VPDPBUSD and VDPBF16PS through inline assembly: GCC 12's intrinsics for them do not keep an accumulator in
 * one register across a loop, and with many accumulators it copies each one twice per step (and spills). */
AVX512 INLINE __m512i dpbusd_avx512(__m512i acc, __m512i u8, __m512i s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
}

AVX512BF16 INLINE __m512 dpbf16_avx512(__m512 acc, __m512i a, __m512i b) {
    __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* int8 with VPDPBUSD (unsigned times signed bytes, summed in int32 without saturation): the weights are
 * made unsigned by flipping their sign bit (w + 128), and 128 * sum(xq) is taken off at the end.
 * R (1 or 2) output rows at once: with many activation rows, two let each activation vector loaded serve
 * both rows, so that the loads (one per VPDPBUSD with one row) no longer set the pace. The sums are exact
 * integers, so a row's result is the same either way. */
AVX512 INLINE void int8_block_avx512(const job_t *j, int64_t n, const int R, const int B) {
    const int64_t K = j->K, KV = K & ~(int64_t)63;
    const int8_t *w = (const int8_t *)j->w + n * K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[2][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_si512();
    for (int64_t k = 0; k < KV; k += 64) {
        __m512i wu[2];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (R + r) * K + k), _MM_HINT_T0); /* the next rows */
            wu[r] = _mm512_xor_si512(_mm512_loadu_si512(w + r * K + k), flip);
        }
        for (int b = 0; b < B; b++) {
            __m512i xv = _mm512_loadu_si512(j->xq + b * K + k);
            if (R > 1) __asm__("" : "+v"(xv)); /* loaded once for both rows, not once for each */
            for (int r = 0; r < R; r++) acc[r][b] = dpbusd_avx512(acc[r][b], wu[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++)
            store_int8(j, b, n + r, _mm512_reduce_add_epi32(acc[r][b]) - 128 * j->xsum[b] +
                                        dot_int8_tail(w + r * K, j->xq + b * K, KV, K));
}
AVX512 INLINE void int8_rows_avx512(const job_t *j, int64_t n, const int B) { int8_block_avx512(j, n, 1, B); }
AVX512 INLINE void int8_pair_avx512(const job_t *j, int64_t n, const int B) { int8_block_avx512(j, n, 2, B); }
DEFINE_PART(int8_part_avx512, int8_rows_avx512, int8_pair_avx512, AVX512)

/* Activation rows b0 .. b0 + B - 1 against the PACK_ROWS rows of one packed block (two vectors of 16 rows),
 * weights made unsigned as above. */
AVX512 INLINE void int8_packed_block_avx512(const job_t *j, int64_t block, int64_t b0, const int B) {
    const int64_t K = j->K;
    const int8_t *w = (const int8_t *)j->w + block * PACK_ROWS * K, *xq = j->xq + b0 * K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[2][PACKED_GROUP];
    for (int b = 0; b < B; b++) acc[0][b] = acc[1][b] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t *p = w + k * PACK_ROWS;
        _mm_prefetch((const char *)(p + 16 * 4 * PACK_ROWS), _MM_HINT_T0); /* 16 steps ahead */
        _mm_prefetch((const char *)(p + 16 * 4 * PACK_ROWS + 64), _MM_HINT_T0);
        const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
        const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(p + 64), flip);
        for (int b = 0; b < B; b++) {
            int32_t four;
            memcpy(&four, xq + b * K + k, sizeof four);
            const __m512i xv = _mm512_set1_epi32(four);
            acc[0][b] = dpbusd_avx512(acc[0][b], w0, xv);
            acc[1][b] = dpbusd_avx512(acc[1][b], w1, xv);
        }
    }
    for (int b = 0; b < B; b++)
        for (int half = 0; half < 2; half++) {
            int32_t sums[16];
            _mm512_storeu_si512(sums, acc[half][b]);
            for (int i = 0; i < 16; i++)
                store_int8(j, (int)b0 + b, block * PACK_ROWS + half * 16 + i, sums[i] - 128 * j->xsum[b0 + b]);
        }
}

AVX512 static void int8_packed_part_avx512(const job_t *j, int64_t n0, int64_t n1) {
    for (int64_t block = n0 / PACK_ROWS; block < n1 / PACK_ROWS; block++)
        for (int64_t b0 = 0; b0 < j->B; b0 += PACKED_GROUP) {
            switch (j->B - b0 < PACKED_GROUP ? j->B - b0 : PACKED_GROUP) {
            case 1: int8_packed_block_avx512(j, block, b0, 1); break;
            case 2: int8_packed_block_avx512(j, block, b0, 2); break;
            case 3: int8_packed_block_avx512(j, block, b0, 3); break;
            case 4: int8_packed_block_avx512(j, block, b0, 4); break;
            case 5: int8_packed_block_avx512(j, block, b0, 5); break;
            case 6: int8_packed_block_avx512(j, block, b0, 6); break;
            case 7: int8_packed_block_avx512(j, block, b0, 7); break;
            default: int8_packed_block_avx512(j, block, b0, 8); break;
            }
        }
}

#define DOT2_VNNI(lo, xlo, hi, xhi) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xlo), hi, xhi)
DEFINE_INT4_ROWS(int4_rows_avx512, AVX512, DOT2_VNNI)
DEFINE_PART(int4_part_avx512, int4_rows_avx512, no_pair, AVX512)

/* bf16 with VDPBF16PS: pairs of bfloat16 products summed into float32 lanes; R (1 or 2) output rows at once,
 * as int8_block_avx512 does and for the same reason (both rows in one head). Each sum is formed in the same
 * order either way, so a row's result is too. */
AVX512BF16 INLINE void bf16_block_avx512(const job_t *j, int64_t n, const int R, const int B) {
    const int64_t K = j->K, KV = K & ~(int64_t)31, xs = j->x_stride;
    const uint16_t *w = (const uint16_t *)j->w + n * K;
    const uint16_t *x = j->xb + n / j->rows_per_head * K;
    __m512 acc[2][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < KV; k += 32) {
        __m512i wv[2];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (R + r) * K + k), _MM_HINT_T0); /* the next rows */
            wv[r] = _mm512_loadu_si512(w + r * K + k);
        }
        for (int b = 0; b < B; b++) {
            __m512i xv = _mm512_loadu_si512(x + b * xs + k);
            if (R > 1) __asm__("" : "+v"(xv)); /* loaded once for both rows, not once for each */
            for (int r = 0; r < R; r++) acc[r][b] = dpbf16_avx512(acc[r][b], wv[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float tail = 0.0f;
            for (int64_t k = KV; k < K; k++) tail += bf16_to_f32(w[r * K + k]) * bf16_to_f32(x[b * xs + k]);
            store(j, b, n + r, _mm512_reduce_add_ps(acc[r][b]) + tail);
        }
}
AVX512BF16 INLINE void bf16_rows_avx512(const job_t *j, int64_t n, const int B) { bf16_block_avx512(j, n, 1, B); }
AVX512BF16 INLINE void bf16_pair_avx512(const job_t *j, int64_t n, const int B) { bf16_block_avx512(j, n, 2, B); }
DEFINE_PART(bf16_part_avx512, bf16_rows_avx512, bf16_pair_avx512, AVX512BF16)

/* a bfloat16 is the top half of a float */
AVX512 INLINE __m512 bf16x16_to_f32_avx512(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* bf16 on AVX-512 CPUs without VDPBF16PS: each weight vector widened to float in registers and multiplied
 * by float activations, 16 lanes at a time, in pairs of output rows from PAIR_FROM activation rows on. */
AVX512 INLINE void bf16_float_block_avx512(const job_t *j, int64_t n, const int R, const int B) {
    const int64_t K = j->K, KV = K & ~(int64_t)15, xs = j->x_stride;
    const uint16_t *w = (const uint16_t *)j->w + n * K;
    const float *x = j->xf + n / j->rows_per_head * K;
    __m512 acc[2][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < KV; k += 16) {
        __m512 wv[2];
        for (int r = 0; r < R; r++) {
            if ((k & 31) == 0) _mm_prefetch((const char *)(w + (R + r) * K + k), _MM_HINT_T0); /* the next rows */
            wv[r] = bf16x16_to_f32_avx512(w + r * K + k);
        }
        for (int b = 0; b < B; b++) {
            __m512 xv = _mm512_loadu_ps(x + b * xs + k);
            if (R > 1) __asm__("" : "+v"(xv)); /* loaded once for both rows, not once for each */
            for (int r = 0; r < R; r++) acc[r][b] = _mm512_fmadd_ps(wv[r], xv, acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float tail = 0.0f;
            for (int64_t k = KV; k < K; k++) tail += bf16_to_f32(w[r * K + k]) * x[b * xs + k];
            store(j, b, n + r, _mm512_reduce_add_ps(acc[r][b]) + tail);
        }
}
AVX512 INLINE void bf16_float_rows_avx512(const job_t *j, int64_t n, const int B) { bf16_float_block_avx512(j, n, 1, B); }
AVX512 INLINE void bf16_float_pair_avx512(const job_t *j, int64_t n, const int B) { bf16_float_block_avx512(j, n, 2, B); }
DEFINE_PART(bf16_float_part_avx512, bf16_float_rows_avx512, bf16_float_pair_avx512, AVX512)
#endif /* HAVE_X86 */

/* ---- dispatch ---------------------------------------------------------------------------------------- */

typedef void (*part_fn)(const job_t *job, int64_t n0, int64_t n1);

static int cpu_runs(int path, int kind) {
    if (path == PATH_PORTABLE) return 1;
#if HAVE_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    if (path == PATH_AVX2) return avx2;
    if (path == PATH_AVX512)
        return avx512 && (kind == KIND_BF16 ? __builtin_cpu_supports("avx512bf16") : __builtin_cpu_supports("avx512vnni"));
    if (path == PATH_AVX512_FLOAT) return avx512 && kind == KIND_BF16;
#endif
    (void)kind;
    return 0;
}

/* The fastest path this CPU runs for a kind of product (what PATH_AUTO means). */
int gemv_best_path(int kind) {
    static const int fastest_first[] = {PATH_AVX512, PATH_AVX512_FLOAT, PATH_AVX2};
    for (size_t i = 0; i < sizeof fastest_first / sizeof fastest_first[0]; i++)
        if (cpu_runs(fastest_first[i], kind)) return fastest_first[i];
    return PATH_PORTABLE;
}

int gemv_supported(int path, int kind) { return kind >= 0 && kind <= KIND_BF16 && cpu_runs(path, kind); }

/* Whether gemv_int8_packed runs on a path: the portable one, and AVX-512 with VNNI, where the packed layout
 * pays (the AVX2 path keeps the stored layout). */
int gemv_packs_int8(int path) {
    return (path == PATH_PORTABLE || path == PATH_AVX512) && cpu_runs(path, KIND_INT8);
}

static part_fn part_for(int kind, int path) {
    static const part_fn portable[] = {int8_part_portable, int4_part_portable, bf16_part_portable};
#if HAVE_X86
    static const part_fn avx2[] = {int8_part_avx2, int4_part_avx2, bf16_part_avx2};
    static const part_fn avx512[] = {int8_part_avx512, int4_part_avx512, bf16_part_avx512};
    if (path == PATH_AVX512_FLOAT) return bf16_float_part_avx512;
    if (path == PATH_AVX2) return avx2[kind];
    if (path == PATH_AVX512) return avx512[kind];
#endif
    return portable[kind];
}

/* ---- the thread pool --------------------------------------------------------------------------------- */

/* Workers spin this many pauses for the next product before they sleep: the products of one decode step
 * follow each other closely, and waking a sleeping thread costs more than a product's share of work. */
#define SPIN_PAUSES 20000

static inline void cpu_relax(void) {
#if HAVE_X86
    _mm_pause();
#endif
}

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int workers;               /* started so far: ids 1..workers */
    atomic_uint generation;    /* bumped once per product */
    atomic_int pending;        /* workers yet to finish the current product */
    unsigned start_generation[MAX_THREADS];
    part_fn fn;
    const job_t *job;
    int parts;                 /* threads taking part in the current product */
    int64_t n, chunk;
    _Atomic int64_t next;      /* the first row no thread has taken yet */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one product at a time, whoever calls */

/* torch's own OpenMP runtime, when the caller hands it over (gemv_use_openmp): the products then run on
 * torch's threads, which spin for a while after each of torch's operations and would otherwise take
 * the cores from a second pool of threads. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static struct {
    gomp_parallel_fn parallel; /* GOMP_parallel: runs fn on a team, the caller included, and waits */
    omp_int_fn thread_num, num_threads;
} openmp;

int gemv_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    pthread_mutex_lock(&call_lock);
    openmp.parallel = (gomp_parallel_fn)parallel;
    openmp.thread_num = (omp_int_fn)thread_num;
    openmp.num_threads = (omp_int_fn)num_threads;
    pthread_mutex_unlock(&call_lock);
    return OK;
}

/* Threads take chunks of rows in turn until none are left, so that one thread slowed down (by an
 * interrupt, or a neighbour on a shared machine) does not hold up the product. */
#define CHUNKS_PER_THREAD 8
#define MAX_CHUNK_BLOCKS 64

static void run_chunks(int id) {
    if (id >= pool.parts) return;
    for (;;) {
        const int64_t begin = atomic_fetch_add_explicit(&pool.next, pool.chunk, memory_order_relaxed);
        if (begin >= pool.n) return;
        pool.fn(pool.job, begin, begin + pool.chunk < pool.n ? begin + pool.chunk : pool.n);
    }
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned seen = pool.start_generation[id];
    for (;;) {
        unsigned now = seen;
        for (int i = 0; i < SPIN_PAUSES && now == seen; i++) {
            cpu_relax();
            now = atomic_load_explicit(&pool.generation, memory_order_acquire);
        }
        if (now == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((now = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = now;
        run_chunks(id);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void openmp_chunks(void *unused) { /* a team smaller than asked for still takes every chunk */
    (void)unused;
    run_chunks(openmp.thread_num() % pool.parts);
}

/* fn over rows [0, n) on up to `threads` threads in chunks of a multiple of `align` rows, on torch's OpenMP
 * team or the pool. Every started pool worker acknowledges every product, so none can fall a product behind.
 * Call with call_lock held. */
static void run_parallel(part_fn fn, const job_t *job, int64_t n, int64_t align, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (!openmp.parallel && pool.workers < threads - 1) {
        pthread_t thread;
        int id = pool.workers + 1;
        pool.start_generation[id] = atomic_load(&pool.generation);
        if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)id) != 0) break;
        pthread_detach(thread);
        pool.workers = id;
    }
    if (!openmp.parallel && threads > pool.workers + 1) threads = pool.workers + 1;
    int64_t blocks = (n + align - 1) / align;
    int parts = threads < 1 ? 1 : threads < blocks ? threads : (int)blocks;
    if (parts <= 1) {
        fn(job, 0, n);
        return;
    }
    pool.fn = fn;
    pool.job = job;
    pool.n = n;
    int64_t chunk_blocks = blocks / ((int64_t)parts * CHUNKS_PER_THREAD);
    pool.chunk = (chunk_blocks < 1 ? 1 : chunk_blocks > MAX_CHUNK_BLOCKS ? MAX_CHUNK_BLOCKS : chunk_blocks) * align;
    pool.parts = parts;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    if (openmp.parallel) {
        openmp.parallel(openmp_chunks, NULL, (unsigned)parts, 0);
        return;
    }
    atomic_store_explicit(&pool.pending, pool.workers, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_chunks(0);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) cpu_relax();
}

/* ---- activations ------------------------------------------------------------------------------------- */

static struct {
    void *memory;
    size_t size;
} scratch; /* reused between products; guarded by call_lock */

static void *scratch_of(size_t size) {
    if (size > scratch.size) {
        void *grown = realloc(scratch.memory, size);
        if (!grown) return NULL;
        scratch.memory = grown;
        scratch.size = size;
    }
    return scratch.memory;
}

/* Row `row` of x to int8 with one scale, exactly as torch computes it: max|x| clamped to 1e-12, divided by
 * 127; each value divided by that scale and rounded half to even (adding and taking away 1.5 * 2^23 rounds
 * in the default rounding mode without a call into libm). `f` receives the row as float. The SIMD loops
 * give the same bits as the plain ones: the same IEEE divisions and additions, and a maximum that skips
 * NaN as `a > amax ? a : amax` does. */
static float row_amax_portable(const float *f, int64_t k, int64_t K, float amax) {
    for (; k < K; k++) {
        const float a = fabsf(f[k]);
        amax = a > amax ? a : amax;
    }
    return amax;
}

static void row_to_int8_portable(const float *f, int64_t k, int64_t K, float scale, int8_t *xq) {
    const float magic = 12582912.0f;
    for (; k < K; k++) {
        float q = (f[k] / scale + magic) - magic;
        q = q > 127.0f ? 127.0f : q; /* only NaN or infinity reach these clamps */
        xq[k] = (int8_t)(q >= -127.0f ? q : -127.0f);
    }
}

#if HAVE_X86
AVX2 static float row_amax_avx2(const float *f, int64_t K) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(f + k), magnitude), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1)); /* no lane holds NaN */
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return row_amax_portable(f, k, K, _mm_cvtss_f32(h));
}

AVX2 static void row_to_int8_avx2(const float *f, int64_t K, float scale, int8_t *xq) {
    const __m256 s = _mm256_set1_ps(scale), magic = _mm256_set1_ps(12582912.0f);
    const __m256 top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 q = _mm256_sub_ps(_mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(f + k), s), magic), magic);
        q = _mm256_blendv_ps(q, top, _mm256_cmp_ps(q, top, _CMP_GT_OQ));
        q = _mm256_blendv_ps(bottom, q, _mm256_cmp_ps(q, bottom, _CMP_GE_OQ));
        const __m256i i = _mm256_cvtps_epi32(q);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i *)(xq + k), _mm_packs_epi16(i16, i16));
    }
    row_to_int8_portable(f, k, K, scale, xq);
}

AVX512 static float row_amax_avx512(const float *f, int64_t K) {
    __m512 m = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(f + k)), m);
    return row_amax_portable(f, k, K, _mm512_reduce_max_ps(m)); /* no lane holds NaN */
}

AVX512 static void row_to_int8_avx512(const float *f, int64_t K, float scale, int8_t *xq) {
    const __m512 s = _mm512_set1_ps(scale), magic = _mm512_set1_ps(12582912.0f);
    const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 q = _mm512_sub_ps(_mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(f + k), s), magic), magic);
        q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(q, top, _CMP_GT_OQ), q, top);
        q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(q, bottom, _CMP_GE_OQ), bottom, q);
        _mm_storeu_si128((__m128i *)(xq + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
    }
    row_to_int8_portable(f, k, K, scale, xq);
}

/* sum of n int8 values, n a multiple of 64 */
AVX512 static int32_t int8_sum_avx512(const int8_t *x, int64_t n) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < n; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(x + k));
    return _mm512_reduce_add_epi32(acc);
}
#endif

static void quantize_row(int path, const void *x, int x_bf16, int64_t row, int64_t K, float *f, int8_t *xq,
                         float *xscale) {
    if (x_bf16)
        for (int64_t k = 0; k < K; k++) f[k] = bf16_to_f32(((const uint16_t *)x)[row * K + k]);
    else
        memcpy(f, (const float *)x + row * K, K * sizeof(float));
    float amax;
#if HAVE_X86
    if (path == PATH_AVX512) amax = row_amax_avx512(f, K);
    else if (path == PATH_AVX2) amax = row_amax_avx2(f, K);
    else
#endif
        amax = row_amax_portable(f, 0, K, 0.0f);
    const float scale = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
#if HAVE_X86
    if (path == PATH_AVX512) row_to_int8_avx512(f, K, scale, xq);
    else if (path == PATH_AVX2) row_to_int8_avx2(f, K, scale, xq);
    else
#endif
        row_to_int8_portable(f, 0, K, scale, xq);
    *xscale = scale;
}

static int check(int64_t N, int64_t K, int64_t B, int path, int kind) {
    if (N < 1 || K < 1 || K > MAX_K || B < 1 || B > MAX_ROWS) return ERR_ARGS;
    if (!gemv_supported(path, kind)) return ERR_PATH;
    return OK;
}

/* Both int8 products: quantize the B activation rows, then run `part` over the N output rows in chunks of
 * `align`. On the AVX-512 path xsum[b] (the correction term) sums xq over inputs 0 .. summed - 1: the inputs
 * the kernel takes with the sign trick. */
static int int8_product(part_fn part, int64_t align, int64_t summed, const int8_t *w, const uint16_t *scale,
                        int64_t N, int64_t K, const void *x, int x_bf16, int64_t B, void *out, int threads, int path) {
    pthread_mutex_lock(&call_lock);
    char *mem = scratch_of(K * sizeof(float) + B * K + B * (sizeof(int32_t) + sizeof(float)));
    if (!mem) {
        pthread_mutex_unlock(&call_lock);
        return ERR_MEMORY;
    }
    float *f = (float *)mem, *xscale = f + K;
    int32_t *xsum = (int32_t *)(xscale + B);
    int8_t *xq = (int8_t *)(xsum + B);
    const int64_t KV = summed & ~(int64_t)63;
    for (int64_t b = 0; b < B; b++) {
        quantize_row(path, x, x_bf16, b, K, f, xq + b * K, xscale + b);
        xsum[b] = 0;
#if HAVE_X86
        if (path == PATH_AVX512) {
            xsum[b] = int8_sum_avx512(xq + b * K, KV);
            for (int64_t k = KV; k < summed; k++) xsum[b] += xq[b * K + k];
        }
#endif
    }
    job_t job = {.B = (int)B, .out_bf16 = x_bf16, .N = N, .K = K, .w = w,
                 .scale = scale, .xq = xq, .xsum = xsum, .xscale = xscale, .out = out};
    run_parallel(part, &job, N, align, threads);
    pthread_mutex_unlock(&call_lock);
    return OK;
}

/* Returns 0, or ERR_ARGS / ERR_PATH / ERR_MEMORY. x and out are [B, K] and [B, N], float32 (x_bf16 = 0) or
 * bfloat16 (x_bf16 = 1), the same for both. */
int gemv_int8(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, const void *x, int x_bf16, int64_t B,
              void *out, int threads, int path) {
    if (path == PATH_AUTO) path = gemv_best_path(KIND_INT8);
    int status = check(N, K, B, path, KIND_INT8);
    if (status != OK) return status;
    return int8_product(part_for(KIND_INT8, path), 8, K & ~(int64_t)63, w, scale, N, K, x, x_bf16, B, out, threads,
                        path);
}

/* int8 weights in the packed layout (see int8_packed_part_portable): N a multiple of PACK_ROWS, K of 4, and any
 * number of activation rows B up to MAX_PACKED_ROWS. The portable and AVX-512 paths; the same numbers as
 * gemv_int8 on the same weights. */
int gemv_int8_packed(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, const void *x, int x_bf16,
                     int64_t B, void *out, int threads, int path) {
    if (path == PATH_AUTO) path = gemv_best_path(KIND_INT8);
    if (N < PACK_ROWS || N % PACK_ROWS || K < 4 || K % 4 || K > MAX_K || B < 1 || B > MAX_PACKED_ROWS)
        return ERR_ARGS;
    if (!gemv_packs_int8(path)) return ERR_PATH;
#if HAVE_X86
    part_fn part = path == PATH_AVX512 ? int8_packed_part_avx512 : int8_packed_part_portable;
#else
    part_fn part = int8_packed_part_portable;
#endif
    return int8_product(part, PACK_ROWS, K, w, scale, N, K, x, x_bf16, B, out, threads, path);
}

/* The packed layout from int8 [N, K] (N a multiple of PACK_ROWS, K of 4): out [N / PACK_ROWS][K / 4][PACK_ROWS][4],
 * a transpose of 4-byte words within each block, the blocks split across the threads. */
static void pack_part(const job_t *j, int64_t n0, int64_t n1) {
    const int64_t K = j->K;
    for (int64_t block = n0 / PACK_ROWS; block < n1 / PACK_ROWS; block++) {
        const int8_t *from = (const int8_t *)j->w + block * PACK_ROWS * K;
        int8_t *to = (int8_t *)j->out + block * PACK_ROWS * K;
        for (int64_t k = 0; k < K; k += 4)
            for (int r = 0; r < PACK_ROWS; r++) memcpy(to + k * PACK_ROWS + r * 4, from + r * K + k, 4);
    }
}

int gemv_pack_int8(const int8_t *w, int64_t N, int64_t K, int8_t *out, int threads) {
    if (N < PACK_ROWS || N % PACK_ROWS || K < 4 || K % 4 || K > MAX_K) return ERR_ARGS;
    pthread_mutex_lock(&call_lock);
    job_t job = {.N = N, .K = K, .w = w, .out = out};
    run_parallel(pack_part, &job, N, PACK_ROWS, threads);
    pthread_mutex_unlock(&call_lock);
    return OK;
}

/* w: uint8 [N, K/2]; scale, zero: bfloat16 [N, K/group]; group 32 times a power of two, dividing K. */
int gemv_int4(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, int64_t N, int64_t K, int64_t group,
              const void *x, int x_bf16, int64_t B, void *out, int threads, int path) {
    if (path == PATH_AUTO) path = gemv_best_path(KIND_INT4);
    int status = check(N, K, B, path, KIND_INT4);
    if (status != OK) return status;
    if (group < 32 || group > K) return ERR_ARGS;
    int shift = 0;
    while ((32 << shift) < group) shift++;
    if ((32 << shift) != group || K % group) return ERR_ARGS;
    const int64_t G = K / group, KB = K / 32, pairs = (KB + 1) / 2;
    pthread_mutex_lock(&call_lock);
    char *mem = scratch_of(K * sizeof(float) + B * ((1 + G) * sizeof(float) + pairs * 64 + K));
    if (!mem) {
        pthread_mutex_unlock(&call_lock);
        return ERR_MEMORY;
    }
    float *f = (float *)mem, *xscale = f + K, *xgroup = xscale + B;
    int8_t *xq = (int8_t *)(xgroup + B * G), *plain = xq + B * pairs * 64;
    for (int64_t b = 0; b < B; b++) {
        int8_t *row = path == PATH_PORTABLE ? xq + b * K : plain + b * K;
        quantize_row(path, x, x_bf16, b, K, f, row, xscale + b);
        for (int64_t g = 0; g < G; g++) {
            int32_t s = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += row[k];
            xgroup[b * G + g] = (float)s;
        }
        if (path == PATH_PORTABLE) continue;
        for (int64_t p = 0; p < pairs; p++) { /* the SIMD paths' layout: see DEFINE_INT4_ROWS */
            int8_t *dst = xq + (b * pairs + p) * 64;
            memset(dst, 0, 64);
            for (int half = 0; half < 2 && 2 * p + half < KB; half++) {
                const int8_t *src = row + (2 * p + half) * 32;
                for (int i = 0; i < 16; i++) {
                    dst[16 * half + i] = src[2 * i];
                    dst[32 + 16 * half + i] = src[2 * i + 1];
                }
            }
        }
    }
    job_t job = {.B = (int)B, .out_bf16 = x_bf16, .N = N, .K = K, .group = group,
                 .group_shift = shift, .w = w, .scale = scale, .zero = zero, .xq = xq, .xgroup = xgroup, .xscale = xscale,
                 .out = out};
    run_parallel(part_for(KIND_INT4, path), &job, N, 8, threads);
    pthread_mutex_unlock(&call_lock);
    return OK;
}

/* w, x, out bfloat16: w [N, K], x [B, heads * K], out [B, N]. With heads > 1 the matrix is block-diagonal:
 * the N / heads rows of head h multiply inputs h * K .. (h + 1) * K of each activation row. */
int gemv_bf16(const uint16_t *w, int64_t N, int64_t K, int64_t heads, const uint16_t *x, int64_t B, uint16_t *out,
              int threads, int path) {
    if (path == PATH_AUTO) path = gemv_best_path(KIND_BF16);
    int status = check(N, K, B, path, KIND_BF16);
    if (status != OK) return status;
    if (heads < 1 || N % heads) return ERR_ARGS;
    pthread_mutex_lock(&call_lock);
    const int64_t width = heads * K;
    float *xf = path == PATH_AVX512 ? NULL : scratch_of(B * width * sizeof(float)); /* the rest read floats */
    if (path != PATH_AVX512 && !xf) {
        pthread_mutex_unlock(&call_lock);
        return ERR_MEMORY;
    }
    for (int64_t i = 0; xf && i < B * width; i++) xf[i] = bf16_to_f32(x[i]);
    job_t job = {.B = (int)B, .out_bf16 = 1, .N = N, .K = K, .w = w, .xf = xf,
                 .xb = x, .out = out, .rows_per_head = N / heads, .x_stride = width};
    run_parallel(part_for(KIND_BF16, path), &job, N, 8, threads);
    pthread_mutex_unlock(&call_lock);
    return OK;
}

/* ---- a plain read, for the benchmark's yardstick ----------------------------------------------------- */

static void read_part(const job_t *j, int64_t begin, int64_t end) { /* rows of 64 bytes, summed as words */
    const uint64_t *p = (const uint64_t *)j->w;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = begin * 8; i < end * 8; i += 8) {
        s0 += p[i] ^ p[i + 4];
        s1 += p[i + 1] ^ p[i + 5];
        s2 += p[i + 2] ^ p[i + 6];
        s3 += p[i + 3] ^ p[i + 7];
    }
    atomic_fetch_add((_Atomic uint64_t *)j->out, s0 + s1 + s2 + s3); /* keeps the loop from being dropped */
}

#if HAVE_X86
AVX2 static void read_part_avx2(const job_t *j, int64_t begin, int64_t end) {
    const __m256i *p = (const __m256i *)j->w;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int64_t i = begin * 2; i < end * 2; i += 2) {
        s0 = _mm256_xor_si256(s0, _mm256_loadu_si256(p + i));
        s1 = _mm256_xor_si256(s1, _mm256_loadu_si256(p + i + 1));
    }
    uint64_t words[4];
    _mm256_storeu_si256((__m256i *)words, _mm256_xor_si256(s0, s1));
    atomic_fetch_add((_Atomic uint64_t *)j->out, words[0] ^ words[1] ^ words[2] ^ words[3]);
}

AVX512 static void read_part_avx512(const job_t *j, int64_t begin, int64_t end) {
    const __m512i *p = (const __m512i *)j->w;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    int64_t i = begin;
    for (; i + 1 < end; i += 2) {
        s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p + i));
        s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(p + i + 1));
    }
    if (i < end) s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p + i));
    uint64_t words[8];
    _mm512_storeu_si512(words, _mm512_xor_si512(s0, s1));
    atomic_fetch_add((_Atomic uint64_t *)j->out, words[0] ^ words[1] ^ words[2] ^ words[3] ^ words[4] ^ words[5] ^
                                                     words[6] ^ words[7]);
}
#endif

/* Reads n64 * 64 bytes with the same threads and the widest vectors the products use; *out gets a
 * checksum (a sum of slices' words, or of their xors with vectors). */
int gemv_read(const void *p, int64_t n64, uint64_t *out, int threads) {
    if (n64 < 1) return ERR_ARGS;
    pthread_mutex_lock(&call_lock);
    job_t job = {.w = p, .out = out};
    part_fn fn = read_part;
#if HAVE_X86
    int path = gemv_best_path(KIND_INT8);
    fn = path == PATH_AVX512 ? read_part_avx512 : path == PATH_AVX2 ? read_part_avx2 : read_part;
#endif
    run_parallel(fn, &job, n64, 1024, threads);
    pthread_mutex_unlock(&call_lock);
    return OK;
}

#ifndef GEMV_NO_PYTHON
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gemv", "CPU matrix products (loaded through ctypes)", -1};
PyMODINIT_FUNC PyInit__gemv(void) { return PyModule_Create(&module); }
#endif
