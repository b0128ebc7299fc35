/* gptmini's CPU kernels for few-row products, y[m, n] = Σ_k x[m, k]·W[n, k] + bias[n], and a whole decode step.
 *
 * Decoding one token multiplies one activation row by every weight matrix, so its speed is the rate at which the
 * weights stream from memory. These loops read each weight row once per call (prefetched AHEAD bytes in advance
 * where the CPU's own prefetchers fall behind: Sapphire Rapids') against up to XROWS activation rows at once. The
 * output rows are split between the threads (a thread done with its share takes pieces of the others'), and each
 * thread reads its rows as STREAMS sequential streams side by side (two with several activation rows, one for the
 * integer formats past two rows; see run_product). Every (m, n) dot product is summed in the same order whatever
 * the number of rows or threads, so a row computed alone gets the bits it gets inside a batch (a cached decode
 * equals its recompute).
 *
 * Weight formats (`wtype`):
 *   0 fp32, 1 bf16: widened to fp32 in registers, fp32 sums against fp32 activations;
 *   2 int8 with an fp32 scale per output row: each activation row is first rounded to 16-bit integers against
 *     its own largest value (a step of 1/16383 of it), and the dot products are exact int32 sums of int8 × int16
 *     products, scaled once (with VNNI as two u8 × s8 vpdpbusd over the activations' high and low bytes, 64
 *     products each; without, widened to int16);
 *   3 int4: codes q ∈ 0…15 with a bf16 scale s and zero z per group of G = 32, 64 or 128 inputs,
 *     w = (q − 8)·s + z, against activations rounded to int8 per 32 inputs (llama.cpp's Q4 × Q8_0: u8 × s8
 *     products, 64 per vpdpbusd), Σ_k x·w = Σ_b [s_g·sx_b·Σ_{k∈b} xq·q + (z_g − 8·s_g)·Σ_{k∈b} x] over the runs b
 *     of 32 inputs, g the group holding b. Rows are padded to a multiple of 256
 *     inputs (zero codes, scales and activations). In the block order, each block of 256 inputs (8 runs of 32) is
 *     32 pieces of 4 inputs, transposed: piece w of run r at position 8·w + r, so that 32-bit lane l of each of
 *     the block's four 64-byte vectors holds 4 inputs of run l mod 8. Codes and activations are stored in
 *     that order; byte j of the block's codes holds code j (low nibble) and code j + 64 (high nibble) of its
 *     first 128, byte 64 + j codes 128 + j and 192 + j.
 *
 * Built by gptmini/native.py with the machine's C compiler (-O3 -march=native -fopenmp); plain C loops where
 * AVX-512 is missing (same sums for the integer formats, fp32 sums in another order for the float ones).
 */
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define XROWS 4  /* activation rows per pass over a weight row */
#ifndef STREAMS
#define STREAMS 4 /* weight rows per pass with one activation row (native.py sets 2 on AMD: see run_product) */
#endif
#define BATCH_STREAMS (STREAMS > 1 ? 2 : 1) /* weight rows per pass with several activation rows */
#ifdef __AVX512VNNI__
#define INT8_STREAMS BATCH_STREAMS /* int8 past two rows: 4 × 2 sums fit the registers with one set of them */
#else
#define INT8_STREAMS 1
#endif
#ifndef INT4_STREAMS
#define INT4_STREAMS 1 /* int4 past two rows: 4 × 2 sums spill registers */
#endif
#define LANES (XROWS * BATCH_STREAMS > STREAMS ? XROWS * BATCH_STREAMS : STREAMS) /* sums per dot-product call */
#define INT8 2
#define INT4 3
#define UNROLL 2 /* independent sums per float dot product: 2 fastest here (Zen 4), 4 and 8 slower */
#define GROUP 32 /* int4 inputs per activation step; a weight group is 1, 2 or 4 of them */
#ifndef AHEAD
/* bytes a stream prefetches ahead, 0 for none: 4096 reads 1.3× faster than none on Sapphire Rapids, 8192 2–5 %
 * slower with 4 streams; native.py sets 0 on AMD, where Zen 4's own prefetchers do better alone (a step 4–11 %
 * faster for fp32, bf16 and int8 without, int4 the same) */
#define AHEAD 4096
#endif
#ifndef BATCH_AHEAD
/* the same with several activation rows, on every CPU: their arithmetic per weight byte leaves the prefetchers
 * behind (Zen 5, GPT-2 small's head at 8 rows: 4096 ahead 1.46x faster than none, 8192 the same as 4096) */
#define BATCH_AHEAD 4096
#endif
/* inside a dot product, where XR (activation rows) is a constant */
#define PREFETCH(p)                                                                                                \
    do {                                                                                                           \
        if (XR > 1 ? BATCH_AHEAD : AHEAD) _mm_prefetch((const char *)(p) + (XR > 1 ? BATCH_AHEAD : AHEAD), _MM_HINT_T0); \
    } while (0)
#define MANY_ROWS 8 /* past this many activation rows, the weights of a piece meet them XROWS at a time */
#define CLAIM_BYTES 16384 /* weight bytes a stream reads per claimed piece of a thread's rows (see run_product) */
#define XQ_MAX 16383.0f /* int16 activations: room for K up to 2^31 / (2·127·16383)·32 ≈ 16,500 inputs */
#define INLINE static inline __attribute__((always_inline))

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifdef __AVX512F__
/* e^x in 16 lanes: Cephes' expf (x = n·ln 2 + r, a degree-5 polynomial in r, then ·2^n), within 2 ulp of the
 * exact value; e^x over- and underflows where expf does. glibc's scalar expf took 2–4 % of a decode step. */
INLINE __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.73f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x)); /* a NaN stays NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* y[i] = act(y[i]) for i < n: 0 none, 1 GELU (tanh form, as the model's), 2 ReLU². GELU as 0.5·a·(1 + tanh u) =
 * a / (1 + e^(−2u)): one exponential, no tanh, no cancellation. The same loop for every row count. */
static void activate(float *y, int64_t n, int act) {
    const float k = -1.5957691216057308f, c = 0.044715f;
    int64_t i = 0;
    if (act == 0) return;
#ifdef __AVX512F__
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, y + i), b;
        if (act == 1) {
            __m512 u = _mm512_mul_ps(_mm512_set1_ps(k), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(c), a), _mm512_mul_ps(a, a), a));
            b = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(u)));
        } else {
            __m512 r = _mm512_max_ps(a, _mm512_setzero_ps());
            b = _mm512_mul_ps(r, r);
        }
        _mm512_mask_storeu_ps(y + i, m, b);
    }
#endif
    for (; i < n; i++) {
        float a = y[i];
        y[i] = act == 1 ? a / (1.0f + expf(k * (a + c * a * a * a))) : a > 0.0f ? a * a : 0.0f;
    }
}

/* ---- sums of a vector's lanes ---------------------------------------------------------------------------- */

#ifdef __AVX512F__
/* The lane sums of n ≤ 8 vectors (n a constant after inlining), each by the tree of GCC's _mm512_reduce_add_ps
 * (lanes i and i + 8, then i and i + 4, then 0 + 2 and 1 + 3, then those two): the same bits as that intrinsic
 * whatever n, so a sum does not depend on how many others were taken with it. The shuffles are shared between
 * the vectors (a dot product of 768 inputs is 48 FMAs; reducing its 16 lanes alone took ~10 more instructions). */
INLINE void sum_lanes(const __m512 *v, int n, float *out) {
    if (n == 1) {
        __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v[0]),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[0]), 1)));
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        __m128 t = _mm_add_ps(q, _mm_shuffle_ps(q, q, 0x4E));
        out[0] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0xB1)));
        return;
    }
    const int m = n <= 2 ? 2 : n <= 4 ? 4 : 8; /* padded with zero vectors, whose sums are dropped */
    __m512 p[8], w[4], x[2];
    for (int i = 0; i < m; i++) p[i] = i < n ? v[i] : _mm512_setzero_ps();
    for (int k = 0; k < m / 2; k++) /* lanes i + 8: vector 2k in lanes 0-7, 2k + 1 in 8-15 */
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0xEE));
    for (int k = 0; k < (m + 3) / 4; k++) { /* lanes i + 4: vector 4k + b in 128-bit block b */
        __m512 a = w[2 * k], b = m == 2 ? w[0] : w[2 * k + 1];
        x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    }
    float lanes[16];
    if (m < 8) { /* 0 + 2, 1 + 3, then both: vector b's sum in lane 4b */
        __m512 t = _mm512_add_ps(x[0], _mm512_permute_ps(x[0], 0x4E));
        _mm512_storeu_ps(lanes, _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1)));
        for (int b = 0; b < n; b++) out[b] = lanes[4 * b];
    } else { /* the same for two at once: vector b's sum in lane 4b, vector 4 + b's in lane 4b + 2 */
        __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x44), _mm512_shuffle_ps(x[0], x[1], 0xEE));
        _mm512_storeu_ps(lanes, _mm512_add_ps(y, _mm512_permute_ps(y, 0xB1)));
        for (int b = 0; b < n; b++) out[b] = lanes[b < 4 ? 4 * b : 4 * (b - 4) + 2];
    }
}

/* The same for int32 lanes (exact in any order) */
INLINE void sum_lanes_i32(const __m512i *v, int n, int32_t *out) {
    if (n == 1) {
        out[0] = _mm512_reduce_add_epi32(v[0]);
        return;
    }
    const int m = n <= 2 ? 2 : n <= 4 ? 4 : 8;
    __m512i p[8], w[4], x[2];
    for (int i = 0; i < m; i++) p[i] = i < n ? v[i] : _mm512_setzero_si512();
    for (int k = 0; k < m / 2; k++)
        w[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(p[2 * k], p[2 * k + 1], 0x44),
                                _mm512_shuffle_i32x4(p[2 * k], p[2 * k + 1], 0xEE));
    for (int k = 0; k < (m + 3) / 4; k++) {
        __m512i a = w[2 * k], b = m == 2 ? w[0] : w[2 * k + 1];
        x[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
    }
    int32_t lanes[16];
    if (m < 8) {
        __m512i t = _mm512_add_epi32(x[0], _mm512_shuffle_epi32(x[0], (_MM_PERM_ENUM)0x4E));
        _mm512_storeu_si512((void *)lanes, _mm512_add_epi32(t, _mm512_shuffle_epi32(t, (_MM_PERM_ENUM)0xB1)));
        for (int b = 0; b < n; b++) out[b] = lanes[4 * b];
    } else {
        __m512i y = _mm512_add_epi32(
            _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(x[0]), _mm512_castsi512_ps(x[1]), 0x44)),
            _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(x[0]), _mm512_castsi512_ps(x[1]), 0xEE)));
        _mm512_storeu_si512((void *)lanes, _mm512_add_epi32(y, _mm512_shuffle_epi32(y, (_MM_PERM_ENUM)0xB1)));
        for (int b = 0; b < n; b++) out[b] = lanes[b < 4 ? 4 * b : 4 * (b - 4) + 2];
    }
}
#endif

/* ---- fp32 / bf16 weights ------------------------------------------------------------------------------------ */

/* The dot products below compute acc[m·NR + j] = Σ_k x[m, k]·row_j[k] for m < XR activation rows and j < NR weight
 * rows (XR·NR ≤ LANES, both constants after inlining: each shape gets its own loop). Activation rows
 * past mr repeat row 0, unused. Every (m, j) sum runs in the same order whatever XR and NR. */

#ifdef __AVX512F__
/* 16 weights of a row from k on, as fp32 (masked at the row's end) */
INLINE __m512 load16(const void *row, int wtype, int64_t k, __mmask16 mask) {
    if (wtype == 0) return _mm512_maskz_loadu_ps(mask, (const float *)row + k);
    __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)row + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INLINE void dot_float(const float *x, int XR, int64_t mr, int NR, int64_t K, const void *const *rows, int wtype,
                      float acc[LANES]) {
    const int64_t wsize = wtype == 0 ? 4 : 2;
    __m512 a[UNROLL][LANES];
    for (int u = 0; u < UNROLL; u++)
        for (int c = 0; c < XR * NR; c++) a[u][c] = _mm512_setzero_ps();
    const float *xs[XROWS];
    for (int m = 0; m < XR; m++) xs[m] = x + (m < mr ? m : 0) * K;
    int64_t k = 0;
    for (; k + 16 * UNROLL <= K; k += 16 * UNROLL)
        for (int u = 0; u < UNROLL; u++) {
            const int64_t i = k + 16 * u;
            __m512 xv[XROWS];
            for (int m = 0; m < XR; m++) xv[m] = _mm512_loadu_ps(xs[m] + i);
            for (int j = 0; j < NR; j++) {
                PREFETCH((const char *)rows[j] + i * wsize);
                __m512 w = load16(rows[j], wtype, i, (__mmask16)0xFFFF);
                for (int m = 0; m < XR; m++) a[u][m * NR + j] = _mm512_fmadd_ps(w, xv[m], a[u][m * NR + j]);
            }
        }
    for (; k < K; k += 16) {
        __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv[XROWS];
        for (int m = 0; m < XR; m++) xv[m] = _mm512_maskz_loadu_ps(mask, xs[m] + k);
        for (int j = 0; j < NR; j++) {
            __m512 w = load16(rows[j], wtype, k, mask);
            for (int m = 0; m < XR; m++) a[0][m * NR + j] = _mm512_fmadd_ps(w, xv[m], a[0][m * NR + j]);
        }
    }
    __m512 s[LANES];
    for (int c = 0; c < XR * NR; c++) {
        s[c] = a[0][c];
        for (int u = 1; u < UNROLL; u++) s[c] = _mm512_add_ps(s[c], a[u][c]);
    }
    sum_lanes(s, XR * NR, acc);
}
#else
INLINE void dot_float(const float *x, int XR, int64_t mr, int NR, int64_t K, const void *const *rows, int wtype,
                      float acc[LANES]) {
    for (int m = 0; m < XR; m++)
        for (int j = 0; j < NR; j++) {
            const float *xm = x + (m < mr ? m : 0) * K;
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++)
                s += xm[k] * (wtype == 0 ? ((const float *)rows[j])[k] : bf16_to_f32(((const uint16_t *)rows[j])[k]));
            acc[m * NR + j] = s;
        }
}
#endif

/* ---- int8 / int4 weights against 16-bit activations ----------------------------------------------------------- */

/* max_k |x[k]| (exact in any order: no NaN reaches a decode step's activations) */
static float abs_max(const float *x, int64_t n) {
    float top = 0.0f;
    int64_t k = 0;
#ifdef __AVX512F__
    __m512 t = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) t = _mm512_max_ps(t, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    top = _mm512_reduce_max_ps(t);
#endif
    for (; k < n; k++) top = fmaxf(top, fabsf(x[k]));
    return top;
}

/* Row m of x as int16 (xq) with its step sx[m]: x ≈ sx·xq, xq = round-to-nearest-even(x / sx) (lrintf's rounding,
 * as the vector conversion's under the default MXCSR). These run on one thread between products: vectorised, as
 * scalar lrintf / fmaxf calls here took 5 % of an int8 step. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *xq, float *sx) {
    for (int64_t m = 0; m < M; m++) {
        const float *v = x + m * K;
        int16_t *q = xq + m * K;
        float top = abs_max(v, K);
        sx[m] = top > 0.0f ? top / XQ_MAX : 1.0f;
        float inv = 1.0f / sx[m];
        int64_t k = 0;
#ifdef __AVX512F__
        for (; k + 16 <= K; k += 16)
            _mm256_storeu_si256((__m256i *)(q + k),
                                _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + k), _mm512_set1_ps(inv)))));
#endif
        for (; k < K; k++) q[k] = (int16_t)lrintf(v[k] * inv);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT_KERNELS 1
INLINE __m512i madd16(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

/* acc + Σ of each 4 adjacent u8 × s8 products, per int32 lane */
INLINE __m512i dot4(__m512i acc, __m512i u, __m512i v) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, v);
#else /* no saturation: |15·127·2| < 32767 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), _mm512_set1_epi16(1)));
#endif
}
#endif

/* int8 activations as the kernels read them: xq [M, K] (with VNNI split into bytes, xq = 256·hi + lo, and each
 * row's H = Σ hi) and each row's step sx. */
typedef struct {
    int16_t *xq;
    float *sx;
    uint8_t *lo;
    int8_t *hi;
    int32_t *hsum;
} Int8Rows;

#ifdef __AVX512VNNI__
/* int8 with VNNI: each 16-bit activation split as xq = 256·hi + lo (hi signed, lo unsigned bytes), so a 64-byte
 * load of weights feeds two u8 × s8 vpdpbusd (64 products each) instead of two widenings and two vpdpwssd:
 *   Σ w·lo directly, and Σ (w + 128)·hi = Σ w·hi + 128·H with H = Σ hi, the row's constant `hsum`.
 * The int32 result equals Σ xq·w modulo 2^32, bit for bit, as the plain loop's. */
INLINE void dot_i8(const Int8Rows *xr, int64_t m0, int XR, int64_t mr, int NR, int64_t K, const int8_t *const *rows,
                   int32_t acc[LANES]) {
    const uint8_t *ls[XROWS];
    const int8_t *hs[XROWS];
    for (int m = 0; m < XR; m++) {
        int64_t r = m0 + (m < mr ? m : 0);
        ls[m] = xr->lo + r * K, hs[m] = xr->hi + r * K;
    }
    /* integer sums are exact in any order: one set of sums where 4 × 2 of them would need two sets' registers */
    const int U = XR * NR > 4 ? 1 : UNROLL;
    __m512i lo[UNROLL][LANES], hi[UNROLL][LANES];
    for (int u = 0; u < U; u++)
        for (int c = 0; c < XR * NR; c++) lo[u][c] = hi[u][c] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t k = 0;
    for (; k + 64 * U <= K; k += 64 * U)
        for (int u = 0; u < U; u++) {
            const int64_t i = k + 64 * u;
            __m512i xl[XROWS], xh[XROWS];
            for (int m = 0; m < XR; m++)
                xl[m] = _mm512_loadu_si512((const void *)(ls[m] + i)), xh[m] = _mm512_loadu_si512((const void *)(hs[m] + i));
            for (int j = 0; j < NR; j++) {
                PREFETCH(rows[j] + i);
                __m512i w = _mm512_loadu_si512((const void *)(rows[j] + i));
                __m512i wu = _mm512_xor_si512(w, flip); /* w + 128 as unsigned bytes */
                for (int m = 0; m < XR; m++) {
                    lo[u][m * NR + j] = _mm512_dpbusd_epi32(lo[u][m * NR + j], xl[m], w);
                    hi[u][m * NR + j] = _mm512_dpbusd_epi32(hi[u][m * NR + j], wu, xh[m]);
                }
            }
        }
    for (; k < K; k += 64) { /* masked-off lanes: w = 0, w + 128 = 128 against hi = 0 */
        __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __m512i xl[XROWS], xh[XROWS];
        for (int m = 0; m < XR; m++)
            xl[m] = _mm512_maskz_loadu_epi8(mask, ls[m] + k), xh[m] = _mm512_maskz_loadu_epi8(mask, hs[m] + k);
        for (int j = 0; j < NR; j++) {
            __m512i w = _mm512_maskz_loadu_epi8(mask, rows[j] + k);
            __m512i wu = _mm512_xor_si512(w, flip);
            for (int m = 0; m < XR; m++) {
                lo[0][m * NR + j] = _mm512_dpbusd_epi32(lo[0][m * NR + j], xl[m], w);
                hi[0][m * NR + j] = _mm512_dpbusd_epi32(hi[0][m * NR + j], wu, xh[m]);
            }
        }
    }
    for (int u = 1; u < U; u++)
        for (int c = 0; c < XR * NR; c++)
            lo[0][c] = _mm512_add_epi32(lo[0][c], lo[u][c]), hi[0][c] = _mm512_add_epi32(hi[0][c], hi[u][c]);
    /* Σ lo + 256·(Σ hi − 128·H) = Σ (lo + 256·hi) − 32768·H, modulo 2^32 */
    __m512i v[LANES];
    for (int c = 0; c < XR * NR; c++) v[c] = _mm512_add_epi32(lo[0][c], _mm512_slli_epi32(hi[0][c], 8));
    sum_lanes_i32(v, XR * NR, acc);
    for (int m = 0; m < XR; m++)
        for (int j = 0; j < NR; j++)
            acc[m * NR + j] = (int32_t)((uint32_t)acc[m * NR + j] - 32768u * (uint32_t)xr->hsum[m0 + (m < mr ? m : 0)]);
}
#else
/* int8: acc[m·NR + j] = Σ_k xq[m, k]·row_j[k], exactly */
INLINE void dot_i8(const Int8Rows *xr, int64_t m0, int XR, int64_t mr, int NR, int64_t K, const int8_t *const *rows,
                   int32_t acc[LANES]) {
    const int16_t *xs[XROWS];
    for (int m = 0; m < XR; m++) xs[m] = xr->xq + (m0 + (m < mr ? m : 0)) * K;
#ifdef INT_KERNELS
    __m512i a[UNROLL][LANES];
    for (int u = 0; u < UNROLL; u++)
        for (int c = 0; c < XR * NR; c++) a[u][c] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 * UNROLL <= K; k += 32 * UNROLL)
        for (int u = 0; u < UNROLL; u++)
            for (int j = 0; j < NR; j++) {
                __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(rows[j] + k + 32 * u)));
                for (int m = 0; m < XR; m++)
                    a[u][m * NR + j] = madd16(a[u][m * NR + j], w, _mm512_loadu_si512((const void *)(xs[m] + k + 32 * u)));
            }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        for (int j = 0; j < NR; j++) {
            __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, rows[j] + k));
            for (int m = 0; m < XR; m++)
                a[0][m * NR + j] = madd16(a[0][m * NR + j], w, _mm512_maskz_loadu_epi16(mask, xs[m] + k));
        }
    }
    __m512i t[LANES];
    for (int c = 0; c < XR * NR; c++) {
        t[c] = a[0][c];
        for (int u = 1; u < UNROLL; u++) t[c] = _mm512_add_epi32(t[c], a[u][c]);
    }
    sum_lanes_i32(t, XR * NR, acc);
#else
    for (int m = 0; m < XR; m++)
        for (int j = 0; j < NR; j++) {
            int32_t s = 0;
            for (int64_t k = 0; k < K; k++) s += (int32_t)xs[m][k] * rows[j][k];
            acc[m * NR + j] = s;
        }
#endif
}
#endif

/* int4's activations: x8 [M, Kp] as int8 per group of 32 inputs against the group's largest value (llama.cpp's
 * Q8_0), in the block order; the groups' steps sxb [M, Kp/32] and their sums in real units xsum = sxb·Σ x8. */
typedef struct {
    int64_t Kp; /* K rounded up to a whole block */
    int sh;     /* weight groups of 32 << sh inputs */
    int8_t *x8;
    float *sxb, *xsum;
} Int4Rows;

/* int4 against 8-bit activations: acc[m·NR + j] = Σ_b s_g·sxb[m, b]·Σ_{k∈b} x8[m, k]·q_k + Σ_b (z_g − 8·s_g)·xsum[m, b]
 * over row j's Kp/32 runs b of 32 inputs, g = b >> sh the weight group (of 32 << sh inputs) holding b; K rounded
 * up to 256, the padding holding zero codes, scales and activations. Codes and activations are in the block order
 * (see the header): 32-bit lane l of each 64-byte vector holds four inputs of run l mod 8, so a block's four
 * vpdpbusd sum into one vector of per-run integers, converted and scaled once. */
INLINE void dot_i4(const Int4Rows *xr, int64_t m0, int XR, int64_t mr, int NR, int64_t Kp, int sh,
                   const uint8_t *const *codes, const uint32_t *const *sz, float acc[LANES]) {
    const int64_t Gp = Kp / GROUP;
    const int8_t *xs[XROWS];
    const float *sb[XROWS], *xt[XROWS];
    for (int m = 0; m < XR; m++) {
        int64_t r = m0 + (m < mr ? m : 0);
        xs[m] = xr->x8 + r * Kp, sb[m] = xr->sxb + r * Gp, xt[m] = xr->xsum + r * Gp;
    }
#ifdef INT_KERNELS
    __m512 f[LANES], fz[LANES];
    for (int c = 0; c < XR * NR; c++) f[c] = fz[c] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(15);
    const __m512i run_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), sh);
    for (int64_t gb = 0; gb < Gp; gb += 16) { /* 16 runs (2 blocks): their scales and zeros in one vector each */
        int64_t ng = Gp - gb < 16 ? Gp - gb : 16;
        __mmask16 gm = (__mmask16)((1u << ng) - 1), wm = (__mmask16)((1u << (ng >> sh)) - 1);
        __m512 svm[LANES];
        for (int j = 0; j < NR; j++) {
            /* lane l: the (scale, zero) pair of run gb + l's group, then each as fp32 (a bf16 is its top half) */
            __m512i pair = _mm512_maskz_loadu_epi32(wm, sz[j] + (gb >> sh));
            if (sh) pair = _mm512_permutexvar_epi32(run_group, pair);
            __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 zv = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xFFFF0000u)));
            __m512 cv = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sv, zv);
            for (int m = 0; m < XR; m++) {
                fz[m * NR + j] = _mm512_fmadd_ps(cv, _mm512_maskz_loadu_ps(gm, xt[m] + gb), fz[m * NR + j]);
                svm[m * NR + j] = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(gm, sb[m] + gb));
            }
        }
        for (int64_t b = 0; b < ng / 8; b++) { /* blocks of 256 inputs = 8 runs = two 64-byte loads of codes */
            const int64_t k = (gb + 8 * b) * GROUP;
            __m512i x0[XROWS], x1[XROWS], x2[XROWS], x3[XROWS];
            for (int m = 0; m < XR; m++) {
                x0[m] = _mm512_loadu_si512((const void *)(xs[m] + k)), x1[m] = _mm512_loadu_si512((const void *)(xs[m] + k + 64));
                x2[m] = _mm512_loadu_si512((const void *)(xs[m] + k + 128)), x3[m] = _mm512_loadu_si512((const void *)(xs[m] + k + 192));
            }
            for (int j = 0; j < NR; j++) {
                PREFETCH(codes[j] + k / 2);
                PREFETCH(codes[j] + k / 2 + 64);
                __m512i b0 = _mm512_loadu_si512((const void *)(codes[j] + k / 2));
                __m512i b1 = _mm512_loadu_si512((const void *)(codes[j] + k / 2 + 64));
                __m512i lo0 = _mm512_and_si512(b0, low), hi0 = _mm512_and_si512(_mm512_srli_epi16(b0, 4), low);
                __m512i lo1 = _mm512_and_si512(b1, low), hi1 = _mm512_and_si512(_mm512_srli_epi16(b1, 4), low);
                for (int m = 0; m < XR; m++) {
                    __m512i p = dot4(_mm512_setzero_si512(), lo0, x0[m]);
                    p = dot4(p, hi0, x1[m]);
                    p = dot4(p, lo1, x2[m]);
                    p = dot4(p, hi1, x3[m]);
                    /* lanes l and l + 8 scale by group l's s·sxb: this block's half of svm, in both halves */
                    __m512 sc = b == 0 ? _mm512_shuffle_f32x4(svm[m * NR + j], svm[m * NR + j], 0x44)
                                       : _mm512_shuffle_f32x4(svm[m * NR + j], svm[m * NR + j], 0xEE);
                    f[m * NR + j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, f[m * NR + j]);
                }
            }
        }
    }
    for (int c = 0; c < XR * NR; c++) f[c] = _mm512_add_ps(f[c], fz[c]);
    sum_lanes(f, XR * NR, acc);
#else
    for (int m = 0; m < XR; m++)
        for (int j = 0; j < NR; j++) {
            float total = 0.0f;
            for (int64_t g = 0; g < Gp; g++) {
                const int64_t base = g / 8 * 256; /* the run's block */
                int32_t sum = 0;
                for (int64_t w = 0; w < 8; w++)       /* its 8 pieces of 4 inputs, at p in the block order */
                    for (int64_t i = 0; i < 4; i++) { /* code p: byte p / 128·64 + p % 64, nibble p / 64 % 2 */
                        int64_t p = (w * 8 + g % 8) * 4 + i;
                        uint8_t byte = codes[j][base / 2 + p / 128 * 64 + p % 64];
                        sum += (int32_t)xs[m][base + p] * (p / 64 % 2 ? byte >> 4 : byte & 15);
                    }
                float sg = bf16_to_f32((uint16_t)sz[j][g >> sh]), zg = bf16_to_f32((uint16_t)(sz[j][g >> sh] >> 16));
                total += sg * sb[m][g] * (float)sum + (zg - 8.0f * sg) * xt[m][g];
            }
            acc[m * NR + j] = total;
        }
#endif
}

/* int4's activations: each group of 32 inputs as int8 against its own largest value (llama.cpp's Q8_0), with the
 * group's step sxb and its sum in real units xsum = sxb·Σ x8, written in the block order; rows padded to Kp. */
static void quantize_blocks(const float *x, int64_t M, int64_t K, int64_t Kp, int8_t *x8, float *sxb, float *xsum) {
    int64_t Gp = Kp / GROUP;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < Gp; g++) {
            int8_t q[GROUP];
            float step = 0.0f;
            int32_t t = 0;
            if (g * GROUP < K) {
                const float *v = x + m * K + g * GROUP;
                float top = abs_max(v, GROUP);
                step = top > 0.0f ? top / 127.0f : 1.0f;
                float inv = 1.0f / step;
#ifdef __AVX512F__
                __m512i sum = _mm512_setzero_si512();
                for (int i = 0; i < GROUP; i += 16) {
                    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(inv)));
                    _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(r));
                    sum = _mm512_add_epi32(sum, r);
                }
                t = _mm512_reduce_add_epi32(sum);
#else
                for (int i = 0; i < GROUP; i++) t += q[i] = (int8_t)lrintf(v[i] * inv);
#endif
            } else
                memset(q, 0, GROUP);
            int8_t *block = x8 + m * Kp + g / 8 * 256;
            for (int w = 0; w < 8; w++) memcpy(block + (w * 8 + g % 8) * 4, q + 4 * w, 4); /* piece w of run g */
            sxb[m * Gp + g] = step;
            xsum[m * Gp + g] = step * (float)t;
        }
}

#ifdef __AVX512VNNI__
/* int8's activations split for VNNI: lo = v mod 256, hi = floor(v / 256) ∈ [-64, 63], H = Σ hi per row */
static void split_bytes(Int8Rows *xr, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const int16_t *v = xr->xq + m * K;
        __m512i h = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512i w = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(mask, v + k)), hi = _mm512_srai_epi32(w, 8);
            _mm512_mask_cvtepi32_storeu_epi8(xr->lo + m * K + k, mask, w); /* the low byte */
            _mm512_mask_cvtepi32_storeu_epi8(xr->hi + m * K + k, mask, hi);
            h = _mm512_add_epi32(h, hi);
        }
        xr->hsum[m] = _mm512_reduce_add_epi32(h);
    }
}
#endif

/* ---- one product, its rows split between the threads ---------------------------------------------------------- */

/* y [M, ldy] (row m's outputs at y + m·ldy) = x [M, K] · Wᵀ (W [N, K] in format wtype) + bias (may be NULL), with
 * the activation `act` applied by each thread to its outputs after its products. int8: `scale` holds the fp32 row scales; int4: `scale` the [N, Kp/G]
 * (scale, zero) pairs of groups of G inputs, each a uint32 with the bf16 scale in its low half, the zero in its high
 * (one load for both). */
typedef struct {
    const float *x;
    int64_t M, K, N, ldy;
    const void *W, *scale;
    int wtype, act;
    const float *bias;
    float *y;
    Int8Rows i8; /* the activations quantised once, for int8 */
    Int4Rows i4; /* and for int4 */
} Product;

/* bytes of one weight row in the product's format (int4: codes only, padded to Kp inputs) */
static inline int64_t weight_row_bytes(const Product *p) {
    return p->wtype == INT4 ? p->i4.Kp / 2 : p->K * (p->wtype == 0 ? 4 : p->wtype == 1 ? 2 : 1);
}

/* outputs of activation rows m0.. m0+mr-1 against weight rows n[0..NR-1] (XR, NR constants) */
INLINE void product_block(const Product *p, const int64_t *n, int XR, int NR, int64_t m0, int64_t mr) {
    const int64_t K = p->K;
    float out[LANES];
    if (p->wtype <= 1) {
        const int64_t row_bytes = weight_row_bytes(p);
        const void *rows[STREAMS];
        for (int j = 0; j < NR; j++) rows[j] = (const char *)p->W + n[j] * row_bytes;
        if (p->wtype == 0)
            dot_float(p->x + m0 * K, XR, mr, NR, K, rows, 0, out);
        else
            dot_float(p->x + m0 * K, XR, mr, NR, K, rows, 1, out);
    } else if (p->wtype == INT8) {
        const int8_t *rows[STREAMS];
        for (int j = 0; j < NR; j++) rows[j] = (const int8_t *)p->W + n[j] * K;
        int32_t acc[LANES];
        dot_i8(&p->i8, m0, XR, mr, NR, K, rows, acc);
        const float *scale = p->scale;
        for (int m = 0; m < XR; m++)
            for (int j = 0; j < NR; j++) out[m * NR + j] = (float)acc[m * NR + j] * (p->i8.sx[m0 + (m < mr ? m : 0)] * scale[n[j]]);
    } else {
        const int64_t Kp = p->i4.Kp, Gw = Kp / GROUP >> p->i4.sh; /* weight groups a row */
        const uint8_t *codes[STREAMS];
        const uint32_t *sz[STREAMS];
        for (int j = 0; j < NR; j++) {
            codes[j] = (const uint8_t *)p->W + n[j] * (Kp / 2);
            sz[j] = (const uint32_t *)p->scale + n[j] * Gw;
        }
        dot_i4(&p->i4, m0, XR, mr, NR, Kp, p->i4.sh, codes, sz, out);
    }
    for (int64_t m = 0; m < mr; m++)
        for (int j = 0; j < NR; j++)
            p->y[(m0 + m) * p->ldy + n[j]] = out[m * NR + j] + (p->bias ? p->bias[n[j]] : 0.0f);
}

/* activation rows [m_from, m_to) against weight rows n[0..nr-1] */
static void product_rows(const Product *p, const int64_t *n, int nr, int64_t m_from, int64_t m_to) {
    for (int64_t m0 = m_from; m0 < m_to; m0 += XROWS) {
        int64_t mr = m_to - m0 < XROWS ? m_to - m0 : XROWS;
        /* 1, 2 or XROWS activation rows at once: rows past mr would repeat row 0's arithmetic for nothing */
        if (nr == 1) {
            if (mr == 1)
                product_block(p, n, 1, 1, m0, 1);
            else if (mr == 2)
                product_block(p, n, 2, 1, m0, 2);
            else
                product_block(p, n, XROWS, 1, m0, mr);
        } else if (p->M == 1)
            product_block(p, n, 1, STREAMS, m0, 1);
        else if (mr == 1)
            product_block(p, n, 1, BATCH_STREAMS, m0, 1);
        else if (mr == 2)
            product_block(p, n, 2, BATCH_STREAMS, m0, 2);
        else
            product_block(p, n, XROWS, BATCH_STREAMS, m0, mr);
    }
}

/* Rows n0 + j·q + i of the S streams j, for i in [a, b), then their activation. A few activation rows meet each
 * weight row in turn; many (a prompt) take XROWS at a time across the whole piece, whose weights stay in the core's
 * cache while the activations pass (each (m, n) sum is one product_block call either way: the same bits). */
static void product_piece(const Product *p, int S, int64_t n0, int64_t q, int64_t a, int64_t b) {
    int64_t n[STREAMS];
    const int64_t step = p->M > MANY_ROWS ? XROWS : p->M;
    for (int64_t m0 = 0; m0 < p->M; m0 += step)
        for (int64_t i = a; i < b; i++) {
            for (int j = 0; j < S; j++) n[j] = n0 + j * q + i;
            product_rows(p, n, S, m0, m0 + step < p->M ? m0 + step : p->M);
        }
    for (int j = 0; j < S; j++)
        for (int64_t m = 0; m < p->M; m++) activate(p->y + m * p->ldy + n0 + j * q + a, b - a, p->act);
}

/* A thread's range of rows [n0, n1) as S streams of q rows (n0 + j·q + i) plus the rows past S·q, the streams cut
 * into pieces; front (low 32 bits) and back (high 32 bits) of the pieces not yet claimed in one word: the owner
 * claims from the front, a thread done with its own range from the back. */
typedef struct {
    _Alignas(64) _Atomic uint64_t span;
    int64_t n0, n1, q;
} Claims;

static int64_t claim(Claims *c, int from_back) {
    uint64_t old = atomic_load_explicit(&c->span, memory_order_relaxed), next;
    do {
        uint32_t front = (uint32_t)old, back = (uint32_t)(old >> 32);
        if (front >= back) return -1;
        next = from_back ? (uint64_t)(back - 1) << 32 | front : (uint64_t)back << 32 | (front + 1);
    } while (!atomic_compare_exchange_weak_explicit(&c->span, &old, next, memory_order_relaxed, memory_order_relaxed));
    return from_back ? (int64_t)(old >> 32) - 1 : (int64_t)(uint32_t)old;
}

/* Each thread takes a contiguous range of output rows and reads it as S sub-ranges side by side (rows i, i + q,
 * i + 2q, … of it together, the activation loads shared): one sequential stream per sub-range, where a single
 * stream a core leaves the memory bandwidth unused (on GPT-2 small's matrices with one activation row: 4 streams
 * 1.2–1.3× one on Sapphire Rapids; 2 streams 1.1–1.3× one on Zen 4, where 4 read slower than 2; adjacent rows side
 * by side gained nothing on the first and lost 1.3–1.6× on the second). S = STREAMS for one activation row,
 * BATCH_STREAMS for more (1.2–1.4× at 2–16 fp32 / bf16 rows; 4 × 4 sums would not fit the registers); past 2 rows,
 * int8 with VNNI the same, its 4 × 2 sums in one set (1.14× at 8 rows, 1.19× at 16 on Zen 5, exact either way), int8
 * without VNNI and int4 one, whose 4 × 2 sums spill registers (int4 with two: 0.86× at 4–16 rows on Zen 5).
 * The ranges are equal, the cores not: on a shared machine one ran 1.2–1.5× slower than the other for whole
 * minutes, and the other waited for it. So each range is read in pieces of CLAIM_BYTES a stream, claimed in
 * order by its owner, and a thread done with its own takes the last pieces of the others' (work stealing). A row's
 * sum does not depend on who computes it. */
static void run_product(const Product *p, int threads) {
    const int64_t N = p->N;
    const int T = threads > 1 && N > 1 ? threads : 1;
    const int S = p->M == 1                        ? STREAMS
                  : p->M > 2 && p->wtype == INT4 ? INT4_STREAMS
                  : p->M > 2 && p->wtype == INT8 ? INT8_STREAMS
                                                 : BATCH_STREAMS;
    const int64_t row_bytes = weight_row_bytes(p);
    const int64_t piece = row_bytes >= CLAIM_BYTES ? 1 : CLAIM_BYTES / row_bytes; /* rows a stream per claim */
    Claims *claims = aligned_alloc(64, (size_t)T * sizeof(Claims));
    for (int t = 0; t < T; t++) {
        Claims *c = &claims[t];
        c->n0 = N * t / T, c->n1 = N * (t + 1) / T, c->q = (c->n1 - c->n0) / S;
        atomic_init(&c->span, (uint64_t)((c->q + piece - 1) / piece) << 32);
    }
#pragma omp parallel for schedule(static, 1) num_threads(T) if (T > 1)
    for (int t = 0; t < T; t++) {
        for (int v = 0; v < T; v++) { /* its own range first, from the front; then the others', from the back */
            Claims *c = &claims[(t + v) % T];
            for (int64_t k; (k = claim(c, v > 0)) >= 0;)
                product_piece(p, S, c->n0, c->q, k * piece, (k + 1) * piece < c->q ? (k + 1) * piece : c->q);
            if (v == 0) /* the rows past S·q, fewer than S */
                for (int64_t r = c->n0 + S * c->q; r < c->n1; r++) product_piece(p, 1, r, 0, 0, 1);
        }
    }
    free(claims);
}

static void linear_act(const float *x, int64_t M, int64_t K, const void *W, int wtype, int64_t N, const void *scale,
                       int64_t group, const float *bias, float *y, int64_t ldy, int act, int threads) {
    Product p = {x, M, K, N, ldy, W, scale, wtype, act, bias, y, {0}, {0}};
    if (wtype == INT8) {
        p.i8.xq = aligned_alloc(64, ((size_t)(M * K) * sizeof(int16_t) + 63) / 64 * 64);
        p.i8.sx = malloc((size_t)M * sizeof(float));
        quantize_rows(x, M, K, p.i8.xq, p.i8.sx);
#ifdef __AVX512VNNI__
        p.i8.lo = malloc((size_t)(M * K)), p.i8.hi = malloc((size_t)(M * K));
        p.i8.hsum = malloc((size_t)M * sizeof(int32_t));
        split_bytes(&p.i8, M, K);
#endif
    } else if (wtype == INT4) {
        const int64_t Kp = (K + 255) / 256 * 256, Gp = Kp / GROUP; /* blocks of 256 inputs */
        p.i4.Kp = Kp;
        while (GROUP << p.i4.sh < group) p.i4.sh++;
        p.i4.x8 = aligned_alloc(64, (size_t)(M * Kp));
        p.i4.sxb = malloc((size_t)(M * Gp) * sizeof(float)), p.i4.xsum = malloc((size_t)(M * Gp) * sizeof(float));
        quantize_blocks(x, M, K, Kp, p.i4.x8, p.i4.sxb, p.i4.xsum);
    }
    run_product(&p, threads);
    free(p.i8.xq), free(p.i8.sx), free(p.i8.lo), free(p.i8.hi), free(p.i8.hsum);
    free(p.i4.x8), free(p.i4.sxb), free(p.i4.xsum);
}

/* `group`: int4's inputs per scale and zero (32, 64 or 128), else unused */
void gm_linear(const float *x, int64_t M, int64_t K, const void *W, int wtype, int64_t N, const void *scale,
               int64_t group, const float *bias, float *y, int64_t ldy, int threads) {
    linear_act(x, M, K, W, wtype, N, scale, group, bias, y, ldy, 0, threads);
}

/* ---- one whole decode step (tokens of several cache rows, each at its own position), for models whose every
 * linear is in a format above --------------------------------------------------------------------------------- */

typedef struct {
    const void *w; /* [n_out, n_in] in format wtype */
    int64_t wtype, n_out, n_in, group; /* group: int4's inputs per scale and zero */
    const void *scale;                  /* int8 scales, int4 (scale, zero) pairs (see gm_linear), else NULL */
    const float *bias;        /* or NULL */
} GmLinear;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* fp32; a bias may be NULL */
    const float *q_norm, *k_norm;               /* QK-norm weights [head_dim], or NULL */
    GmLinear attn, attn_proj, fc, proj;
    void *k_cache, *v_cache; /* this layer's [rows, n_head, max_len, head_dim], fp32 or bf16 */
} GmLayer;

typedef struct {
    int64_t n_layer, n_head, n_embd, max_len, cache_bf16, relu2, wte_bf16;
    double eps;
    const void *wte;         /* token embedding [vocab, n_embd], fp32 or bf16 */
    const float *pos_add;    /* learned / sinusoidal positions [block, n_embd] added to the input, or NULL */
    const float *rope;       /* [block, 2, head_dim/2] cos, sin, or NULL */
    const float *lnf_w, *lnf_b;
    GmLinear head;
    const GmLayer *layers;
} GmModel;

static void apply_linear(const GmLinear *l, const float *x, int64_t T, float *y, int act, int threads) {
    linear_act(x, T, l->n_in, l->w, (int)l->wtype, l->n_out, l->scale, l->group, l->bias, y, l->n_out, act, threads);
}

static void layer_norm(const float *x, int64_t n, const float *w, const float *b, double eps, float *out) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = (float)(1.0 / sqrt(var / n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = (float)(x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

static void rms_norm(float *x, int64_t n, const float *w, double eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / n + eps));
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * inv * w[i];
}

static void rotate(float *x, int64_t d, const float *cos_, const float *sin_) {
    int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos_[i] - b * sin_[i];
        x[i + h] = b * cos_[i] + a * sin_[i];
    }
}

static inline float cache_at(const void *c, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)c)[i]) : ((const float *)c)[i];
}

static inline void cache_put(void *c, int bf16, int64_t i, float v) {
    if (!bf16) {
        ((float *)c)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u += 0x7FFF + ((u >> 16) & 1); /* round to nearest even, as PyTorch's cast (finite values) */
    ((uint16_t *)c)[i] = (uint16_t)(u >> 16);
}


/* q · the cached row at `base` (D floats): 16 lanes at a time where D allows (a float sum is not vectorised by
 * the compiler without -ffast-math), in one fixed order either way. */
static inline float dot_cached(const float *q, const void *c, int bf16, int64_t base, int64_t D) {
#ifdef __AVX512F__
    if (D % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) {
            __m512 k = bf16 ? load16((const uint16_t *)c + base, 1, i, (__mmask16)0xFFFF)
                            : _mm512_loadu_ps((const float *)c + base + i);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), k, acc);
        }
        float sum;
        sum_lanes(&acc, 1, &sum); /* the tree attention_scores sums four keys by */
        return sum;
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < D; i++) s += q[i] * cache_at(c, bf16, base + i);
    return s;
}


/* p[t] = q · key t · scale for the n cached keys from `base` (each as dot_cached sums it, four keys at a time where
 * D allows); returns the largest. */
static float attention_scores(const float *q, const void *k, int bf16, int64_t base, int64_t n, int64_t D,
                              float scale, float *p) {
    float top = -INFINITY;
    int64_t t = 0;
#ifdef __AVX512F__
    if (D % 16 == 0)
        for (; t + 4 <= n; t += 4) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t i = 0; i < D; i += 16) {
                __m512 qv = _mm512_loadu_ps(q + i);
                for (int r = 0; r < 4; r++) {
                    int64_t at = base + (t + r) * D;
                    __m512 kv = bf16 ? load16((const uint16_t *)k + at, 1, i, (__mmask16)0xFFFF)
                                     : _mm512_loadu_ps((const float *)k + at + i);
                    acc[r] = _mm512_fmadd_ps(qv, kv, acc[r]);
                }
            }
            float dots[4];
            sum_lanes(acc, 4, dots);
            for (int r = 0; r < 4; r++) {
                p[t + r] = dots[r] * scale;
                if (p[t + r] > top) top = p[t + r];
            }
        }
#endif
    for (; t < n; t++) {
        p[t] = dot_cached(q, k, bf16, base + t * D, D) * scale;
        if (p[t] > top) top = p[t];
    }
    return top;
}

/* p[t] = e^(p[t] − top) for t < n; returns their sum */
static float softmax_numerators(float *p, int64_t n, float top) {
    float sum = 0.0f;
    int64_t t = 0;
#ifdef __AVX512F__
    __m512 s = _mm512_setzero_ps();
    for (; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + t), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(p + t, m, e);
        s = _mm512_add_ps(s, _mm512_maskz_mov_ps(m, e));
    }
    sum = _mm512_reduce_add_ps(s);
#endif
    for (; t < n; t++) sum += (p[t] = expf(p[t] - top));
    return sum;
}

/* out[i] = Σ_t (p[t] / sum)·value t [i] over the n cached values from `base`, t in order (a product, then a sum,
 * as the plain loop compiles without contraction), 16 lanes at a time where D allows. */
static void attention_values(const float *p, float sum, const void *v, int bf16, int64_t base, int64_t n, int64_t D,
                             float *out) {
#ifdef __AVX512F__
    if (D % 16 == 0 && D <= 256) {
        __m512 o[16];
        for (int64_t c = 0; c < D / 16; c++) o[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            __m512 w = _mm512_set1_ps(p[t] / sum);
            int64_t at = base + t * D;
            for (int64_t c = 0; c < D / 16; c++) {
                __m512 vv = bf16 ? load16((const uint16_t *)v + at, 1, 16 * c, (__mmask16)0xFFFF)
                                 : _mm512_loadu_ps((const float *)v + at + 16 * c);
                o[c] = _mm512_add_ps(o[c], _mm512_mul_ps(w, vv));
            }
        }
        for (int64_t c = 0; c < D / 16; c++) _mm512_storeu_ps(out + 16 * c, o[c]);
        return;
    }
#endif
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        float w = p[t] / sum;
        for (int64_t i = 0; i < D; i++) out[i] += w * cache_at(v, bf16, base + t * D + i);
    }
}

/* logits [T, head.n_out] of `tokens` [T], token j at position positions[j] of cache row rows[j] (it sees that row's
 * positions 0..positions[j]); writes their keys and values into the cache first, so several tokens of one row (a
 * prefill, a lookup verify pass) must come in increasing positions. A token's arithmetic never depends on the others
 * in the call: its products sum in one order whatever the rows beside it (see run_product), its integer activations
 * are quantised on their own, and its attention reads its own row only. `keep` [T] (or NULL: all) picks the tokens
 * whose logits are written, one row each in order (a prefill needs its last token's). `work`: T·10·n_embd +
 * threads·max_len floats. */
void gm_decode(const GmModel *m, const int64_t *tokens, const int64_t *rows, const int64_t *positions, int64_t T,
               const uint8_t *keep, float *logits, float *work, int threads) {
    const int64_t C = m->n_embd, H = m->n_head, D = C / H, L = m->max_len, R = H * L * D; /* R: a cache row */
    float *x = work, *h = x + T * C, *qkv = h + T * C, *att = qkv + 3 * T * C, *ff = att + T * C;
    float *probs = ff + 4 * T * C; /* threads · L: one softmax row per thread */
    int64_t keys = 0;              /* (query, key) pairs a layer's attention reads */
    for (int64_t j = 0; j < T; j++) keys += positions[j] + 1;
    for (int64_t j = 0; j < T; j++)
        for (int64_t i = 0; i < C; i++) {
            int64_t at = tokens[j] * C + i;
            float e = m->wte_bf16 ? bf16_to_f32(((const uint16_t *)m->wte)[at]) : ((const float *)m->wte)[at];
            x[j * C + i] = e + (m->pos_add ? m->pos_add[positions[j] * C + i] : 0.0f);
        }
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);
    for (int64_t layer = 0; layer < m->n_layer; layer++) {
        const GmLayer *ly = &m->layers[layer];
        for (int64_t j = 0; j < T; j++) layer_norm(x + j * C, C, ly->ln1_w, ly->ln1_b, m->eps, h + j * C);
        apply_linear(&ly->attn, h, T, qkv, 0, threads);
        for (int64_t j = 0; j < T; j++) {
            float *q = qkv + j * 3 * C, *k = q + C, *v = q + 2 * C;
            const int64_t pos = positions[j], row = rows[j] * R;
            const float *cos_ = m->rope ? m->rope + pos * D : NULL;
            for (int64_t hd = 0; hd < H; hd++) {
                if (ly->q_norm) {
                    rms_norm(q + hd * D, D, ly->q_norm, m->eps);
                    rms_norm(k + hd * D, D, ly->k_norm, m->eps);
                }
                if (cos_) {
                    rotate(q + hd * D, D, cos_, cos_ + D / 2);
                    rotate(k + hd * D, D, cos_, cos_ + D / 2);
                }
                for (int64_t i = 0; i < D; i++) {
                    cache_put(ly->k_cache, (int)m->cache_bf16, row + (hd * L + pos) * D + i, k[hd * D + i]);
                    cache_put(ly->v_cache, (int)m->cache_bf16, row + (hd * L + pos) * D + i, v[hd * D + i]);
                }
            }
        }
        /* every (token, head) pair on its own, claimed one at a time: a slower core takes fewer (see run_product) */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && keys > 64)
        for (int64_t jh = 0; jh < T * H; jh++) {
            /* softmax(q·Kᵀ/√D)·V over keys 0..positions[j] of the token's row, in fp32 */
            const int64_t j = jh / H, hd = jh % H, last = positions[j], base = rows[j] * R + hd * L * D;
            const float *qh = qkv + j * 3 * C + hd * D;
            float *p = probs + (int64_t)omp_get_thread_num() * L;
            const int bf16 = (int)m->cache_bf16;
            float top = attention_scores(qh, ly->k_cache, bf16, base, last + 1, D, inv_sqrt_d, p);
            float sum = softmax_numerators(p, last + 1, top);
            attention_values(p, sum, ly->v_cache, bf16, base, last + 1, D, att + j * C + hd * D);
        }
        apply_linear(&ly->attn_proj, att, T, h, 0, threads);
        for (int64_t i = 0; i < T * C; i++) x[i] += h[i];
        for (int64_t j = 0; j < T; j++) layer_norm(x + j * C, C, ly->ln2_w, ly->ln2_b, m->eps, h + j * C);
        apply_linear(&ly->fc, h, T, ff, m->relu2 ? 2 : 1, threads);
        apply_linear(&ly->proj, ff, T, h, 0, threads);
        for (int64_t i = 0; i < T * C; i++) x[i] += h[i];
    }
    int64_t kept = 0; /* the tokens whose logits are asked for (`keep`, NULL for all), in order */
    for (int64_t j = 0; j < T; j++)
        if (!keep || keep[j]) layer_norm(x + j * C, C, m->lnf_w, m->lnf_b, m->eps, h + kept++ * C);
    if (kept) apply_linear(&m->head, h, kept, logits, 0, threads);
}
