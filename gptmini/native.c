/* gptmini's CPU kernels for few-row products: y[m, n] = scale[n] · Σ_k x[m, k]·W[n, k] + bias[n].
 *
 * Decoding one token multiplies one activation row by every weight matrix, so its speed is the rate at which the
 * weights stream from memory. These loops read each weight once per call, four weight rows at a time (four
 * streams per thread, which the hardware prefetchers follow), widen them to fp32 in registers and accumulate in
 * fp32, against up to four activation rows at once. The output rows are split between the threads.
 *
 * Every (m, n) dot product is summed in the same order whatever the number of rows, so one row decoded alone gets
 * the bits it gets inside a batch (a cached decode equals its recompute).
 *
 * Weight formats (`wtype`): 0 fp32, 1 bf16, 2 int8 with a scale per output row, 3 int4: two codes per byte (low
 * nibble first) with a bf16-valued scale and zero per group of `group` inputs, w = (q − 8)·scale + zero.
 * Built by gptmini/native.py with the machine's C compiler (-O3 -march=native -fopenmp); plain C where AVX-512 is
 * missing.
 */
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifndef UNROLL
#define UNROLL 2 /* independent sums per dot product: 2 streams fastest here (Zen 4), 4 and 8 slower */
#endif
#define XROWS 4 /* activation rows per pass over a block */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One weight element as fp32 (int8: before the row scale). */
static inline __attribute__((always_inline)) float weight_at(const void *W, int wtype, int64_t n, int64_t k, int64_t K, const float *sz, int64_t group) {
    switch (wtype) {
    case 0: return ((const float *)W)[n * K + k];
    case 1: return bf16_to_f32(((const uint16_t *)W)[n * K + k]);
    case 2: return (float)((const int8_t *)W)[n * K + k];
    default: {
        uint8_t byte = ((const uint8_t *)W)[(n * K + k) >> 1];
        int q = (k & 1) ? (byte >> 4) : (byte & 15);
        const float *g = sz + 2 * (n * (K / group) + k / group);
        return (float)(q - 8) * g[0] + g[1];
    }
    }
}

#ifdef __AVX512F__
/* 16 weights W[n, k .. k+16) as fp32 (masked at the tail; int4: k is a multiple of 16 and of the group's start). */
static inline __attribute__((always_inline)) __m512 load16(const void *W, int wtype, int64_t n, int64_t k, int64_t K, __mmask16 mask, const float *sz, int64_t group) {
    switch (wtype) {
    case 0: return _mm512_maskz_loadu_ps(mask, (const float *)W + n * K + k);
    case 1: {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)W + n * K + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case 2: {
        __m128i b = _mm_maskz_loadu_epi8(mask, (const int8_t *)W + n * K + k);
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    default: {
        /* 8 bytes → 16 codes: byte j holds codes 2j (low) and 2j+1 (high) */
        __m128i b = _mm_loadl_epi64((const __m128i *)((const uint8_t *)W + ((n * K + k) >> 1)));
        __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
        __m128i codes = _mm_unpacklo_epi8(lo, hi);
        __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(codes), _mm512_set1_epi32(8)));
        const float *g = sz + 2 * (n * (K / group) + k / group);
        return _mm512_fmadd_ps(q, _mm512_set1_ps(g[0]), _mm512_set1_ps(g[1]));
    }
    }
}
#endif

#define WBYTES(t) ((t) == 0 ? 4 : (t) == 1 ? 2 : 1) /* bytes per weight (int4: per two) */
#define INLINE static inline __attribute__((always_inline))

/* acc[m] = Σ_k x[m, k]·W[n, k] for m < XR: inlined with constant wtype and XR, so each format and row count gets
 * its own straight-line loop. One weight row at a time is one sequential stream (several interleaved rows read
 * 1.5–2× slower here), and UNROLL independent sums along k hide the FMA latency. */
#ifdef __AVX512F__
INLINE void dot_row(const float *x, int XR, int64_t mr, int64_t K, const void *W, int wtype, int64_t n,
                    const float *sz, int64_t group, float acc[XROWS]) {
    __m512 a[UNROLL][XROWS];
    for (int u = 0; u < UNROLL; u++)
        for (int m = 0; m < XR; m++) a[u][m] = _mm512_setzero_ps();
    const float *xs[XROWS];
    for (int m = 0; m < XR; m++) xs[m] = x + (m < mr ? m : 0) * K; /* rows past mr repeat row 0, unused */
    int64_t k = 0;
    for (; k + 16 * UNROLL <= K; k += 16 * UNROLL)
        for (int u = 0; u < UNROLL; u++) {
            __m512 w = load16(W, wtype, n, k + 16 * u, K, (__mmask16)0xFFFF, sz, group);
            for (int m = 0; m < XR; m++) a[u][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[m] + k + 16 * u), a[u][m]);
        }
    for (; k < K; k += 16) {
        __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 w = load16(W, wtype, n, k, K, mask, sz, group);
        for (int m = 0; m < XR; m++) a[0][m] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, xs[m] + k), a[0][m]);
    }
    for (int m = 0; m < XR; m++) {
        __m512 s = a[0][m];
        for (int u = 1; u < UNROLL; u++) s = _mm512_add_ps(s, a[u][m]);
        acc[m] = _mm512_reduce_add_ps(s);
    }
}
#else
INLINE void dot_row(const float *x, int XR, int64_t mr, int64_t K, const void *W, int wtype, int64_t n,
                    const float *sz, int64_t group, float acc[XROWS]) {
    for (int m = 0; m < XR; m++) {
        float s = 0.0f;
        const float *xm = x + (m < mr ? m : 0) * K;
        for (int64_t k = 0; k < K; k++) s += xm[k] * weight_at(W, wtype, n, k, K, sz, group);
        acc[m] = s;
    }
}
#endif

/* One output value: the row scale (int8), then the bias. */
INLINE void store(float *y, int64_t ldy, int64_t m, int64_t n, float v, int wtype, const float *scale,
                  const float *bias) {
    if (wtype == 2) v *= scale[n];
    if (bias) v += bias[n];
    y[m * ldy + n] = v;
}

INLINE void linear_impl(const float *x, int64_t M, int64_t K, const void *W, int wtype, int64_t N,
                        const float *scale, const float *bias, float *y, int64_t ldy, int64_t group, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N > 1)
    for (int64_t n = 0; n < N; n++) {
        float acc[XROWS];
        for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
            int64_t mr = M - m0 < XROWS ? M - m0 : XROWS;
            if (mr == 1)
                dot_row(x + m0 * K, 1, 1, K, W, wtype, n, scale, group, acc);
            else
                dot_row(x + m0 * K, XROWS, mr, K, W, wtype, n, scale, group, acc);
            for (int64_t m = 0; m < mr; m++) store(y, ldy, m0 + m, n, acc[m], wtype, scale, bias);
        }
    }
}

/* int8 weights: each activation row is rounded to 16-bit integers against its own max (|x|/sx ≤ 16383, a relative
 * step of 6e-5 of the row's largest value), and each dot product is an exact int32 sum of int8 × int16 products
 * (VNNI's vpdpwssd: 32 per instruction, against 16 for widening to fp32), scaled once at the end. 16383 leaves
 * room for K up to 2^31 / (2·127·16383) · 32 ≈ 16,500 inputs without overflow. */
#define XQ_MAX 16383.0f

#if defined(__AVX512F__) && defined(__AVX512BW__)
INLINE __m512i madd16(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

INLINE void dot_row_i8(const int16_t *xq, int XR, int64_t mr, int64_t K, const int8_t *W, int64_t n,
                       int32_t acc[XROWS]) {
    __m512i a[UNROLL][XROWS];
    for (int u = 0; u < UNROLL; u++)
        for (int m = 0; m < XR; m++) a[u][m] = _mm512_setzero_si512();
    const int16_t *xs[XROWS];
    for (int m = 0; m < XR; m++) xs[m] = xq + (m < mr ? m : 0) * K;
    const int8_t *row = W + n * K;
    int64_t k = 0;
    for (; k + 32 * UNROLL <= K; k += 32 * UNROLL)
        for (int u = 0; u < UNROLL; u++) {
            __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k + 32 * u)));
            for (int m = 0; m < XR; m++)
                a[u][m] = madd16(a[u][m], w, _mm512_loadu_si512((const void *)(xs[m] + k + 32 * u)));
        }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row + k));
        for (int m = 0; m < XR; m++) a[0][m] = madd16(a[0][m], w, _mm512_maskz_loadu_epi16(mask, xs[m] + k));
    }
    for (int m = 0; m < XR; m++) {
        __m512i t = a[0][m];
        for (int u = 1; u < UNROLL; u++) t = _mm512_add_epi32(t, a[u][m]);
        acc[m] = _mm512_reduce_add_epi32(t);
    }
}
#else
INLINE void dot_row_i8(const int16_t *xq, int XR, int64_t mr, int64_t K, const int8_t *W, int64_t n,
                       int32_t acc[XROWS]) {
    for (int m = 0; m < XR; m++) {
        const int16_t *xm = xq + (m < mr ? m : 0) * K;
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += (int32_t)xm[k] * W[n * K + k];
        acc[m] = s;
    }
}
#endif

static void linear_i8(const float *x, int64_t M, int64_t K, const int8_t *W, int64_t N, const float *scale,
                      const float *bias, float *y, int64_t ldy, int threads) {
    int16_t *xq = malloc((size_t)(M * K + 32) * sizeof *xq);
    float *sx = malloc((size_t)M * sizeof *sx);
    for (int64_t m = 0; m < M; m++) {
        float top = 0.0f;
        for (int64_t k = 0; k < K; k++) top = fmaxf(top, fabsf(x[m * K + k]));
        sx[m] = top > 0.0f ? top / XQ_MAX : 1.0f;
        float inv = 1.0f / sx[m];
        for (int64_t k = 0; k < K; k++) xq[m * K + k] = (int16_t)lrintf(x[m * K + k] * inv);
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N > 1)
    for (int64_t n = 0; n < N; n++) {
        int32_t acc[XROWS];
        for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
            int64_t mr = M - m0 < XROWS ? M - m0 : XROWS;
            if (mr == 1)
                dot_row_i8(xq + m0 * K, 1, 1, K, W, n, acc);
            else
                dot_row_i8(xq + m0 * K, XROWS, mr, K, W, n, acc);
            for (int64_t m = 0; m < mr; m++)
                y[(m0 + m) * ldy + n] = (float)acc[m] * (sx[m0 + m] * scale[n]) + (bias ? bias[n] : 0.0f);
        }
    }
    free(xq);
    free(sx);
}

/* y [M, ldy] (row m's outputs at y + m·ldy) = x [M, K] · Wᵀ (W [N, K] in format wtype), times scale[n]
 * (int8), plus bias[n] (may be NULL). int4: `scale` holds the [N, K/group, 2] scales and zeros. */
void gm_linear(const float *x, int64_t M, int64_t K, const void *W, int wtype, int64_t N, const float *scale,
               const float *bias, float *y, int64_t ldy, int64_t group, int threads) {
    switch (wtype) {
    case 0: linear_impl(x, M, K, W, 0, N, scale, bias, y, ldy, group, threads); break;
    case 1: linear_impl(x, M, K, W, 1, N, scale, bias, y, ldy, group, threads); break;
    case 2: linear_i8(x, M, K, (const int8_t *)W, N, scale, bias, y, ldy, threads); break;
    default: linear_impl(x, M, K, W, 3, N, scale, bias, y, ldy, group, threads); break;
    }
}

/* Whether this build uses the AVX-512 loops (for the benchmark's and the tests' notes). */
int gm_vectorized(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* ---- one whole decode step (batch 1, one token), for models whose every linear is in a format above ---------- */

#include <math.h>

typedef struct {
    const void *w; /* [n_out, n_in] in format wtype */
    int64_t wtype, n_out, n_in;
    const float *scale, *bias; /* int8 row scales; bias: either may be NULL */
} GmLinear;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* fp32; a bias may be NULL */
    const float *q_norm, *k_norm;               /* QK-norm weights [head_dim], or NULL */
    GmLinear attn, attn_proj, fc, proj;
    void *k_cache, *v_cache; /* this layer's [n_head, max_len, head_dim], fp32 or bf16 */
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


/* logits [T, head.n_out] of `tokens` [T] at positions pos.. pos+T-1 (token j sees positions 0..pos+j); writes
 * their keys and values into the cache. `work`: T·10·n_embd + n_head·max_len floats. */
void gm_decode(const GmModel *m, const int64_t *tokens, int64_t T, int64_t pos, float *logits, float *work,
               int threads) {
    const int64_t C = m->n_embd, H = m->n_head, D = C / H, L = m->max_len;
    float *x = work, *h = x + T * C, *qkv = h + T * C, *att = qkv + 3 * T * C, *ff = att + T * C;
    float *probs = ff + 4 * T * C;
    for (int64_t j = 0; j < T; j++)
        for (int64_t i = 0; i < C; i++) {
            int64_t at = tokens[j] * C + i;
            float e = m->wte_bf16 ? bf16_to_f32(((const uint16_t *)m->wte)[at]) : ((const float *)m->wte)[at];
            x[j * C + i] = e + (m->pos_add ? m->pos_add[(pos + j) * C + i] : 0.0f);
        }
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);
    for (int64_t layer = 0; layer < m->n_layer; layer++) {
        const GmLayer *ly = &m->layers[layer];
        for (int64_t j = 0; j < T; j++) layer_norm(x + j * C, C, ly->ln1_w, ly->ln1_b, m->eps, h + j * C);
        gm_linear(h, T, C, ly->attn.w, (int)ly->attn.wtype, 3 * C, ly->attn.scale, ly->attn.bias, qkv, 3 * C, 0,
                  threads);
        for (int64_t j = 0; j < T; j++) {
            float *q = qkv + j * 3 * C, *k = q + C, *v = q + 2 * C;
            const float *cos_ = m->rope ? m->rope + (pos + j) * D : NULL;
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
                    cache_put(ly->k_cache, (int)m->cache_bf16, (hd * L + pos + j) * D + i, k[hd * D + i]);
                    cache_put(ly->v_cache, (int)m->cache_bf16, (hd * L + pos + j) * D + i, v[hd * D + i]);
                }
            }
        }
        for (int64_t j = 0; j < T; j++) {
            const int64_t last = pos + j; /* this query sees keys 0..last */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && last > 64)
            for (int64_t hd = 0; hd < H; hd++) {
                /* softmax(q·Kᵀ/√D)·V, in fp32 */
                const float *qh = qkv + j * 3 * C + hd * D;
                float *p = probs + hd * L, top = -INFINITY, sum = 0.0f;
                for (int64_t t = 0; t <= last; t++) {
                    float s = 0.0f;
                    int64_t base = (hd * L + t) * D;
                    if (m->cache_bf16)
                        for (int64_t i = 0; i < D; i++)
                            s += qh[i] * bf16_to_f32(((const uint16_t *)ly->k_cache)[base + i]);
                    else
                        for (int64_t i = 0; i < D; i++) s += qh[i] * ((const float *)ly->k_cache)[base + i];
                    p[t] = s * inv_sqrt_d;
                    if (p[t] > top) top = p[t];
                }
                for (int64_t t = 0; t <= last; t++) sum += (p[t] = expf(p[t] - top));
                float *out = att + j * C + hd * D;
                for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
                for (int64_t t = 0; t <= last; t++) {
                    float w = p[t] / sum;
                    int64_t base = (hd * L + t) * D;
                    for (int64_t i = 0; i < D; i++) out[i] += w * cache_at(ly->v_cache, (int)m->cache_bf16, base + i);
                }
            }
        }
        gm_linear(att, T, C, ly->attn_proj.w, (int)ly->attn_proj.wtype, C, ly->attn_proj.scale, ly->attn_proj.bias,
                  h, C, 0, threads);
        for (int64_t i = 0; i < T * C; i++) x[i] += h[i];
        for (int64_t j = 0; j < T; j++) layer_norm(x + j * C, C, ly->ln2_w, ly->ln2_b, m->eps, h + j * C);
        gm_linear(h, T, C, ly->fc.w, (int)ly->fc.wtype, 4 * C, ly->fc.scale, ly->fc.bias, ff, 4 * C, 0, threads);
        for (int64_t i = 0; i < 4 * T * C; i++) {
            float a = ff[i];
            if (m->relu2) {
                a = a > 0.0f ? a : 0.0f;
                ff[i] = a * a;
            } else {
                ff[i] = 0.5f * a * (1.0f + tanhf(0.7978845608028654f * (a + 0.044715f * a * a * a)));
            }
        }
        gm_linear(ff, T, 4 * C, ly->proj.w, (int)ly->proj.wtype, C, ly->proj.scale, ly->proj.bias, h, C, 0, threads);
        for (int64_t i = 0; i < T * C; i++) x[i] += h[i];
    }
    for (int64_t j = 0; j < T; j++) layer_norm(x + j * C, C, m->lnf_w, m->lnf_b, m->eps, h + j * C);
    gm_linear(h, T, C, m->head.w, (int)m->head.wtype, m->head.n_out, m->head.scale, m->head.bias, logits,
              m->head.n_out, 0, threads);
}
