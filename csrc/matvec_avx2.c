/* Fused sparse matvec on AVX2 (no expand instruction), y = x @ W.T straight from the bitmap, and
 * the dense matvec for weights stored plainly (the output head, dense checkpoints).
 *
 * Bitmap, per 8 columns of a row (one mask byte m, n = popcount(m) packed values at p):
 *   bf16: the 16 bytes at p are broadcast to both 128-bit lanes (vbroadcasti128: a load, no
 *         shuffle) and ONE vpshufb with the table row g_bf16_f32[m] moves packed value k to the top
 *         half of the fp32 lane of its column, zeros below it and in the lanes of clear bits. A bf16
 *         is the top half of an fp32, so those are the 8 weights exactly, ready for one FMA with x.
 *   fp16: vpshufb with g_half16[m] (values to their 16-bit columns), then vcvtph2ps.
 * That is one shuffle, one FMA and three loads (values, table row, x) per 8 columns; the pointer
 * of each mask byte's values comes from one popcount of the 64-bit mask word under a constant
 * prefix mask, so the 8 steps of a word are independent of each other.
 * The 16-byte loads may run past a row's values but never past `values`: a row too close to its
 * end is first copied to a padded scratch row (only the last rows of a matrix).
 *
 * Dense bf16 / fp16 / fp32 W: 16 columns per step; for bf16 the even columns are the low halves of
 * the 32-bit lanes (shift left 16) and the odd ones the high halves (mask), multiplied by x stored
 * de-interleaved in the same order. Both kernels accumulate in fp32; x and y are fp32 here.
 * Rows of W run in parallel (OpenMP); rows of x in groups of GROUP per pass over a row of W.
 */
#include "sf_kernels.h"

#include <stdlib.h>
#include <string.h>

#if SF_X86
#include <immintrin.h>

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt,bmi2")))
#define INLINE static inline __attribute__((always_inline))
#define GROUP 4 /* rows of x per pass over a row of W */

static uint8_t g_bf16_f32[256][32] __attribute__((aligned(64)));
static uint8_t g_half16[256][16] __attribute__((aligned(64)));

void sf_init_avx2_tables(void) {
    for (int m = 0; m < 256; m++) {
        int idx = 0;
        memset(g_bf16_f32[m], 0x80, 32);
        memset(g_half16[m], 0x80, 16);
        for (int k = 0; k < 8; k++) {
            if (!(m & (1 << k))) continue;
            /* column k: fp32 lane k, i.e. byte 4k of the 256-bit register (lane k & 3 of 128-bit half k >> 2);
             * pshufb indexes within each half, and both halves hold the same 16 value bytes */
            int b = 4 * (k & 3) + 16 * (k >> 2);
            g_bf16_f32[m][b + 2] = (uint8_t)(2 * idx);
            g_bf16_f32[m][b + 3] = (uint8_t)(2 * idx + 1);
            g_half16[m][2 * k] = (uint8_t)(2 * idx);
            g_half16[m][2 * k + 1] = (uint8_t)(2 * idx + 1);
            idx++;
        }
    }
}

/* The 8 weights of the columns under mask byte m, from the packed 16-bit values at p, as fp32. */
AVX2_TARGET INLINE __m256 weights8(int f16, const uint16_t *p, unsigned m) {
    if (f16) {
        __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p), _mm_load_si128((const __m128i *)g_half16[m]));
        return _mm256_cvtph_ps(v);
    }
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i *)g_bf16_f32[m])));
}

/* The same, with the table row's byte offset m * 32 given. */
AVX2_TARGET INLINE __m256 weights8r(int f16, const uint16_t *p, uint64_t off) {
    if (f16) return weights8(1, p, (unsigned)(off >> 5));
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i *)((const char *)g_bf16_f32 + off))));
}

/* acc[b] = W[row] . x[b] for NB rows of the padded fp32 x (stride xs); values at src (>= 16 bytes
 * readable past the row's last value), mask the row's bitmap. NA accumulators per row of x. */
#define ROW_SPARSE(NAME, F16, NB, NA)                                                                         \
    AVX2_TARGET static int64_t NAME(const uint16_t *src, const uint8_t *mask, int64_t cols, const float *x,     \
                                    int64_t xs, float *out) {                                                 \
        const uint16_t *src0 = src;                                                                           \
        __m256 acc[NB][NA];                                                                                   \
        for (int b = 0; b < NB; b++)                                                                          \
            for (int a = 0; a < NA; a++) acc[b][a] = _mm256_setzero_ps();                                     \
        int64_t j = 0;                                                                                        \
        for (; j + 64 <= cols; j += 64) {                                                                     \
            uint64_t m;                                                                                       \
            memcpy(&m, mask + j / 8, 8);                                                                      \
            SF_PREFETCH((const char *)src + SF_PREFETCH_AHEAD);                                              \
            SF_PREFETCH((const char *)src + SF_PREFETCH_AHEAD + 64);                                         \
            if (!(j & 511)) SF_PREFETCH(mask + j / 8 + SF_PREFETCH_AHEAD / 8);                               \
            for (int k = 0; k < 8; k++) {                                                                     \
                const uint16_t *p = src + (k ? _mm_popcnt_u64(_bzhi_u64(m, 8 * k)) : 0);                      \
                __m256 w = weights8r(F16, p, k ? ((m >> (8 * k - 5)) | (m << (69 - 8 * k))) & 0x1fe0 : (m & 0xff) << 5); \
                for (int b = 0; b < NB; b++)                                                                  \
                    acc[b][k % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * xs + j + 8 * k), acc[b][k % NA]); \
            }                                                                                                 \
            src += _mm_popcnt_u64(m);                                                                         \
        }                                                                                                     \
        for (; j < cols; j += 8) {                                                                            \
            unsigned m = mask[j / 8];                                                                         \
            if (cols - j < 8) m &= (1u << (cols - j)) - 1;                                                    \
            __m256 w = weights8(F16, src, m);                                                                 \
            for (int b = 0; b < NB; b++) acc[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * xs + j), acc[b][0]); \
            src += _mm_popcnt_u32(m);                                                                         \
        }                                                                                                     \
        for (int b = 0; b < NB; b++) {                                                                        \
            __m256 s = acc[b][0];                                                                             \
            for (int a = 1; a < NA; a++) s = _mm256_add_ps(s, acc[b][a]);                                     \
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));                    \
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                           \
            h = _mm_add_ss(h, _mm_movehdup_ps(h));                                                            \
            out[b] = _mm_cvtss_f32(h);                                                                        \
        }                                                                                                     \
        return src - src0;                                                                                    \
    }

typedef int64_t (*row_fn)(const uint16_t *, const uint8_t *, int64_t, const float *, int64_t, float *);
ROW_SPARSE(sp_bf16_1, 0, 1, 4)
ROW_SPARSE(sp_bf16_2, 0, 2, 2)
ROW_SPARSE(sp_bf16_3, 0, 3, 1)
ROW_SPARSE(sp_bf16_4, 0, 4, 1)
ROW_SPARSE(sp_f16_1, 1, 1, 4)
ROW_SPARSE(sp_f16_2, 1, 2, 2)
ROW_SPARSE(sp_f16_3, 1, 3, 1)
ROW_SPARSE(sp_f16_4, 1, 4, 1)
static const row_fn g_sparse_rows[2][GROUP] = {{sp_bf16_1, sp_bf16_2, sp_bf16_3, sp_bf16_4},
                                               {sp_f16_1, sp_f16_2, sp_f16_3, sp_f16_4}};

/* The fp32 copy of x [batch, cols] (fp32 or bf16), zero-padded to rows of xs = cols rounded up to 16
 * elements; for `interleave` (the dense bf16 kernel) each 16-column block stored evens then odds. */
static float *padded_x(const void *x, int x_dtype, int64_t batch, int64_t cols, int64_t xs, int interleave) {
    float *xp = calloc((size_t)(batch * xs), sizeof(float));
    if (!xp) return NULL;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t j = 0; j < cols; j++) {
            float v = x_dtype == SF_BF16 ? sf_bf16_to_f32(((const uint16_t *)x)[b * cols + j])
                                         : ((const float *)x)[b * cols + j];
            int64_t k = interleave ? (j & ~(int64_t)15) + ((j & 1) ? 8 : 0) + ((j & 15) >> 1) : j;
            xp[b * xs + k] = v;
        }
    return xp;
}

int64_t sf_matvec_avx2(const sf_quant *q, int dtype, int64_t rows, int64_t cols, const void *values, int64_t nnz,
                       const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype,
                       int64_t batch, float *y, int nt) {
    const int64_t mask_stride = (cols + 7) / 8, xs = (cols + 15) / 16 * 16;
    const uint16_t *vals = (const uint16_t *)values;
    float *xp = padded_x(x, x_dtype, batch, cols, xs, 0);
    if (!xp) return -2;
    const row_fn *fns = g_sparse_rows[dtype == SF_F16];
    int64_t bad = -1;
    int oom = 0;
#pragma omp parallel num_threads(nt)
    {
        uint16_t *pad = NULL; /* a row with 16 bytes of slack: rows ending near the end of values, or dequantized */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *m = bitmask + r * mask_stride;
            int64_t start, n;
            /* Plain values are read in place, up to 8 values (16 bytes) past the last one the mask
             * selects (ROW_SPARSE); a padded row (quantized, or near the end) is read from `pad` only. */
            int span = sf_row_span_deferred(r, rows, cols, q ? 0 : cols + 8, nnz, m, row_offsets, &start, &n);
            int ok = span != SF_SPAN_BAD && (!q || sf_quant_row_ok(q, r, start, n));
            const uint16_t *src = q ? NULL : vals + start;
            if (ok && (q || nnz - (start + n) < 8)) { /* quantized, or fewer than 16 bytes after the row's last value */
                if (!pad) pad = calloc((size_t)cols + 16, 2);
                if (!pad) {
                    for (int64_t b = 0; b < batch; b++) y[b * rows + r] = 0.0f;
#pragma omp atomic write
                    oom = 1;
                    continue;
                }
                if (q)
                    sf_dequant_row(SF_PATH_AVX2, q, r, start, n, dtype, pad);
                else
                    memcpy(pad, src, (size_t)n * 2);
                src = pad;
            }
            for (int64_t b0 = 0; ok && b0 < batch; b0 += GROUP) {
                int nb = batch - b0 < GROUP ? (int)(batch - b0) : GROUP;
                float acc[GROUP];
                int64_t used = fns[nb - 1](src, m, cols, xp + b0 * xs, xs, acc);
                if (span == SF_SPAN_DEFERRED && used != n) ok = 0; /* the mask disagrees with the offsets */
                for (int b = 0; b < nb; b++) y[(b0 + b) * rows + r] = acc[b];
            }
            if (!ok) {
                for (int64_t b = 0; b < batch; b++) y[b * rows + r] = 0.0f;
#pragma omp atomic write
                bad = r;
            }
        }
        free(pad);
    }
    free(xp);
    return oom ? -2 : bad;
}

/* ------------------------------------------------------------------------------------------ */
/* Dense W                                                                                     */

/* 16 weights of a dense row at w (dtype 0 fp32, 1 bf16, 2 fp16) as two fp32 vectors, in the order
 * padded_x stores x (bf16: evens then odds). */
AVX2_TARGET INLINE void dense16(int dtype, const void *w, __m256 *w0, __m256 *w1) {
    if (dtype == SF_F32) {
        *w0 = _mm256_loadu_ps((const float *)w);
        *w1 = _mm256_loadu_ps((const float *)w + 8);
    } else if (dtype == SF_BF16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)w);
        *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    } else {
        *w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
        *w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w + 1));
    }
}

#define ROW_DENSE(NAME, DT, NB)                                                                               \
    AVX2_TARGET static void NAME(const char *w, int64_t cols, const float *x, int64_t xs, float *out) {       \
        const int es = DT == SF_F32 ? 4 : 2;                                                                  \
        __m256 a0[NB], a1[NB];                                                                                \
        for (int b = 0; b < NB; b++) a0[b] = a1[b] = _mm256_setzero_ps();                                     \
        int64_t j = 0;                                                                                        \
        for (; j + 16 <= cols; j += 16) {                                                                     \
            __m256 w0, w1;                                                                                    \
            if (!(j & (64 / es - 1))) SF_PREFETCH(w + j * es + SF_PREFETCH_AHEAD); /* once a cache line */   \
            dense16(DT, w + j * es, &w0, &w1);                                                                \
            for (int b = 0; b < NB; b++) {                                                                    \
                a0[b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * xs + j), a0[b]);                          \
                a1[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + b * xs + j + 8), a1[b]);                      \
            }                                                                                                 \
        }                                                                                                     \
        if (j < cols) { /* the last, partial block: copied into a zero-padded one */                          \
            char tail[64] = {0};                                                                              \
            memcpy(tail, w + j * es, (size_t)((cols - j) * es));                                              \
            __m256 w0, w1;                                                                                    \
            dense16(DT, tail, &w0, &w1);                                                                      \
            for (int b = 0; b < NB; b++) {                                                                    \
                a0[b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * xs + j), a0[b]);                          \
                a1[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + b * xs + j + 8), a1[b]);                      \
            }                                                                                                 \
        }                                                                                                     \
        for (int b = 0; b < NB; b++) {                                                                        \
            __m256 s = _mm256_add_ps(a0[b], a1[b]);                                                           \
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));                    \
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                           \
            h = _mm_add_ss(h, _mm_movehdup_ps(h));                                                            \
            out[b] = _mm_cvtss_f32(h);                                                                        \
        }                                                                                                     \
    }

typedef void (*dense_fn)(const char *, int64_t, const float *, int64_t, float *);
#define ROW_DENSE4(NAME, DT) ROW_DENSE(NAME##_1, DT, 1) ROW_DENSE(NAME##_2, DT, 2) ROW_DENSE(NAME##_3, DT, 3) ROW_DENSE(NAME##_4, DT, 4)
ROW_DENSE4(dn_f32, SF_F32)
ROW_DENSE4(dn_bf16, SF_BF16)
ROW_DENSE4(dn_f16, SF_F16)
static const dense_fn g_dense_rows[3][GROUP] = {{dn_f32_1, dn_f32_2, dn_f32_3, dn_f32_4},
                                                {dn_bf16_1, dn_bf16_2, dn_bf16_3, dn_bf16_4},
                                                {dn_f16_1, dn_f16_2, dn_f16_3, dn_f16_4}};
#endif /* SF_X86 */

static float w_at(int dtype, const void *w, int64_t i) {
    if (dtype == SF_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return dtype == SF_F16 ? sf_f16_to_f32(h) : sf_bf16_to_f32(h);
}

int64_t sf_matvec_dense(int path, int dtype, int64_t rows, int64_t cols, const void *w, const void *x, int x_dtype,
                        int64_t batch, float *y, int threads) {
    const int es = dtype == SF_F32 ? 4 : 2;
    int nt = sf_threads_for(threads, rows, rows * cols * es);
#if SF_X86
    if (path != SF_PATH_C) { /* AVX2 (also on AVX-512 CPUs: this loop is bound by memory, not by width) */
        const int64_t xs = (cols + 15) / 16 * 16;
        float *xp = padded_x(x, x_dtype, batch, cols, xs, dtype == SF_BF16);
        if (!xp) return -2;
        const dense_fn *fns = g_dense_rows[dtype];
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const char *wr = (const char *)w + r * cols * es;
            for (int64_t b0 = 0; b0 < batch; b0 += GROUP) {
                int nb = batch - b0 < GROUP ? (int)(batch - b0) : GROUP;
                float acc[GROUP];
                fns[nb - 1](wr, cols, xp + b0 * xs, xs, acc);
                for (int b = 0; b < nb; b++) y[(b0 + b) * rows + r] = acc[b];
            }
        }
        free(xp);
        return -1;
    }
#else
    (void)path;
#endif
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < batch; b++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < cols; j++) {
                float xv = x_dtype == SF_BF16 ? w_at(SF_BF16, x, b * cols + j) : ((const float *)x)[b * cols + j];
                acc += w_at(dtype, w, r * cols + j) * xv;
            }
            y[b * rows + r] = acc;
        }
    return -1;
}
