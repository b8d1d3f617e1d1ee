/* Fused sparse matrix-vector / small-batch matmul, y = x @ W.T, straight from the bitmap format.
 *
 * W is never materialized. Per row of W (rows run in parallel):
 *   AVX-512: per 32 columns, expand the packed values into one register with the row's mask bits
 *            (vpexpandw / vpexpandd), widen to two fp32 vectors (bf16: shift left 16; fp16: vcvtph2ps)
 *            and FMA with x. This reads ~9 bits per bf16 weight at 50% sparsity instead of 16.
 *   AVX2, C: decode 1024 columns of the row into a stack buffer with the same row decoders as
 *            decompress.c (it stays in L1), then dot it with each row of x.
 * Accumulation is in fp32 throughout; x and y are fp32 (the Python wrapper converts).
 * Quantized values (sf_matvec_q): on the AVX-512 path the codes are dequantized inside the same
 * expand + multiply loop (matvec_q.c). Otherwise (and for fp32 values) each row's values are first
 * dequantized into a per-thread scratch row (dequant.c), which takes the place of the packed values.
 */
#include "sf_avx512.h"

#include <stdlib.h>
#include <string.h>

#if SF_X86
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* Scalar value -> fp32                                                                        */



/* ------------------------------------------------------------------------------------------ */
/* Decode-then-dot (C and AVX2 paths)                                                          */

#define CHUNK 1024 /* columns decoded at a time: 4 KiB of fp32 at most, L1-resident */

static float dot_c(int dtype, const void *w, const float *x, int64_t n) {
    float acc = 0.0f;
    if (dtype == SF_F32) {
        const float *v = (const float *)w;
        for (int64_t j = 0; j < n; j++) acc += v[j] * x[j];
    } else if (dtype == SF_BF16) {
        const uint16_t *v = (const uint16_t *)w;
        for (int64_t j = 0; j < n; j++) acc += sf_bf16_to_f32(v[j]) * x[j];
    } else {
        const uint16_t *v = (const uint16_t *)w;
        for (int64_t j = 0; j < n; j++) acc += sf_f16_to_f32(v[j]) * x[j];
    }
    return acc;
}

#if SF_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt")))

AVX2_TARGET static float dot_avx2(int dtype, const void *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 w0, w1;
        if (dtype == SF_F32) {
            w0 = _mm256_loadu_ps((const float *)w + j);
            w1 = _mm256_loadu_ps((const float *)w + j + 8);
        } else {
            __m128i h0 = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + j));
            __m128i h1 = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + j + 8));
            if (dtype == SF_BF16) {
                w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
                w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
            } else {
                w0 = _mm256_cvtph_ps(h0);
                w1 = _mm256_cvtph_ps(h1);
            }
        }
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j + 8), a1);
    }
    __m256 a = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float acc = _mm_cvtss_f32(s);
    if (j < n) {
        int es = dtype == SF_F32 ? 4 : 2;
        acc += dot_c(dtype, (const char *)w + j * es, x + j, n - j);
    }
    return acc;
}
#endif

/* The values of row r, after checking it: the packed values themselves (plain), or the row
 * dequantized into `scratch` (quantized, q != NULL). Sets [*src, *src_end); returns 0 for a bad row. */
static int row_values(int path, const sf_quant *q, int dtype, int64_t r, int64_t rows, int64_t cols, int64_t nnz,
                      const char *vals, const uint8_t *mask, const int64_t *row_offsets, char *scratch,
                      const char **src, const char **src_end) {
    const int es = dtype == SF_F32 ? 4 : 2;
    int64_t start, end = nnz;
    if (!sf_row_span(r, rows, cols, nnz, mask, row_offsets, &start)) return 0;
    if (!q) {
        *src = vals + start * es;
        *src_end = vals + nnz * es;
        return 1;
    }
    if (r + 1 < rows) memcpy(&end, row_offsets + r + 1, 8);
    if (!sf_quant_row_ok(q, r, start, end - start)) return 0;
    sf_dequant_row(path, q, r, start, end - start, dtype, scratch);
    *src = scratch;
    *src_end = scratch + (end - start) * es;
    return 1;
}

static void matvec_decode_dot(int path, const sf_quant *q, int dtype, int64_t rows, int64_t cols, const char *vals,
                              const uint8_t *bitmask, const int64_t *row_offsets, int64_t nnz, const float *x,
                              int64_t batch, float *y, int nt, int64_t *bad) {
    const int es = dtype == SF_F32 ? 4 : 2;
    const int64_t mask_stride = (cols + 7) / 8;
    sf_row_decoder decode_row = sf_pick_row_decoder(path, es);
    float (*dot)(int, const void *, const float *, int64_t) = dot_c;
#if SF_X86
    if (path == SF_PATH_AVX2) dot = dot_avx2;
#endif
#pragma omp parallel num_threads(nt)
    {
        char *scratch = q ? malloc((size_t)(cols * es) + 64) : NULL; /* one dequantized row */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            uint32_t buf[CHUNK]; /* one chunk of the row, in the value dtype */
            const uint8_t *m = bitmask + r * mask_stride;
            for (int64_t b = 0; b < batch; b++) y[b * rows + r] = 0.0f;
            const char *src, *src_end;
            if ((q && !scratch) ||
                !row_values(path, q, dtype, r, rows, cols, nnz, vals, m, row_offsets, scratch, &src, &src_end)) {
#pragma omp atomic write
                *bad = q && !scratch ? -2 : r;
                continue;
            }
            for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK;
                src += es * decode_row(src, src_end, m + c0 / 8, n, buf);
                for (int64_t b = 0; b < batch; b++) y[b * rows + r] += dot(dtype, buf, x + b * cols + c0, n);
            }
        }
        free(scratch);
    }
}

#if SF_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX-512 fused expand + multiply-add (the multiply step and its modes: sf_avx512.h)          */

#define GROUP SF_GROUP
#define INLINE SF_INLINE
enum { MODE_DOT_BF16 = SF_MODE_DOT_BF16, MODE_BF16 = SF_MODE_BF16, MODE_F16 = SF_MODE_F16, MODE_F32 = SF_MODE_F32 };

/* Multiply the 32 columns under mask m (values at *src, advanced past them) with x[b][0..32) for
 * nb rows of x (row stride xs elements), adding into acc0[b] (and acc1[b], for two-vector modes). */
AVX512_TARGET INLINE void step32(int mode, const char **src, __mmask32 m, const void *x, int64_t xs, int nb,
                                 __m512 *acc0, __m512 *acc1) {
    if (mode == MODE_F32) {
        const float *s = (const float *)*src;
        __mmask16 lo = (__mmask16)m, hi = (__mmask16)(m >> 16);
        __m512 w0 = _mm512_maskz_expandloadu_ps(lo, s);
        s += _mm_popcnt_u32(lo);
        __m512 w1 = _mm512_maskz_expandloadu_ps(hi, s);
        *src = (const char *)(s + _mm_popcnt_u32(hi));
        for (int b = 0; b < nb; b++) {
            acc0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps((const float *)x + b * xs), acc0[b]);
            acc1[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps((const float *)x + b * xs + 16), acc1[b]);
        }
        return;
    }
    __m512i w = _mm512_maskz_expandloadu_epi16(m, *src); /* 32 x 16-bit, zeros at clear bits */
    *src += 2 * _mm_popcnt_u32(m);
    sf_mul32(mode, w, x, xs, nb, acc0, acc1);
}

/* acc[b] = W[row] . x[b] for nb <= GROUP rows of the padded x (element size xe, stride xs);
 * returns the number of values the row's mask made it read (checked against the row's offsets). */
AVX512_TARGET INLINE int64_t row_group(int mode, const char *src, const uint8_t *mask, int64_t cols, const char *x,
                                    int xe, int64_t xs, int nb, float *acc) {
    const char *src0 = src;
    __m512 a0[GROUP], a1[GROUP];
    for (int b = 0; b < nb; b++) a0[b] = a1[b] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= cols; j += 64) { /* two groups, alternating accumulators: two dependency chains */
        uint64_t m;
        memcpy(&m, mask + j / 8, 8);
        SF_PREFETCH(src + SF_PREFETCH_AHEAD);
        SF_PREFETCH(src + SF_PREFETCH_AHEAD + 64);
        if (!(j & 511)) SF_PREFETCH(mask + j / 8 + SF_PREFETCH_AHEAD / 8);
        step32(mode, &src, (__mmask32)m, x + j * xe, xs, nb, a0, a1);
        step32(mode, &src, (__mmask32)(m >> 32), x + (j + 32) * xe, xs, nb, a1, a0);
    }
    for (; j < cols; j += 32) step32(mode, &src, sf_mask32(mask, j, cols), x + j * xe, xs, nb, a0, a1);
    for (int b = 0; b < nb; b++) acc[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
    return (src - src0) / (mode == MODE_F32 ? 4 : 2);
}

/* One specialization per (mode, group size) so the loops above unroll with constants. */
typedef int64_t (*row_group_fn)(const char *, const uint8_t *, int64_t, const char *, int64_t, float *);
#define RG(MODE, XE, NB)                                                                                       \
    AVX512_TARGET static int64_t rg_##MODE##_##NB(const char *src, const uint8_t *mask, int64_t cols,           \
                                                  const char *x, int64_t xs, float *acc) {                    \
        return row_group(MODE, src, mask, cols, x, XE, xs, NB, acc);                                          \
    }
#define RG4(MODE, XE) RG(MODE, XE, 1) RG(MODE, XE, 2) RG(MODE, XE, 3) RG(MODE, XE, 4)
RG4(MODE_DOT_BF16, 2)
RG4(MODE_BF16, 4)
RG4(MODE_F16, 4)
RG4(MODE_F32, 4)
#define RG_ROW(MODE) {rg_##MODE##_1, rg_##MODE##_2, rg_##MODE##_3, rg_##MODE##_4}
static const row_group_fn g_row_groups[4][GROUP] = {RG_ROW(MODE_DOT_BF16), RG_ROW(MODE_BF16), RG_ROW(MODE_F16),
                                                    RG_ROW(MODE_F32)};

static inline float x_at(const void *x, int x_dtype, int64_t i) {
    return x_dtype == SF_BF16 ? sf_bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static int64_t matvec_avx512(const sf_quant *q, int dtype, int64_t rows, int64_t cols, const char *vals,
                             const uint8_t *bitmask, const int64_t *row_offsets, int64_t nnz, const void *x,
                             int x_dtype, int64_t batch, float *y, int nt) {
    const int es = dtype == SF_F32 ? 4 : 2;
    const int64_t mask_stride = (cols + 7) / 8, xs = (cols + 31) / 32 * 32;
    int mode = dtype == SF_F32 ? MODE_F32 : dtype == SF_F16 ? MODE_F16 : MODE_BF16;
    if (mode == MODE_BF16 && x_dtype == SF_BF16 && __builtin_cpu_supports("avx512bf16")) mode = MODE_DOT_BF16;
    /* The padded (and for MODE_BF16 permuted) copy of x: [batch, xs], zeros past cols. */
    const int xe = mode == MODE_DOT_BF16 ? 2 : 4;
    char *xp = calloc((size_t)(batch * xs), (size_t)xe);
    if (!xp) return -2;
    for (int64_t b = 0; b < batch; b++) {
        if (mode == MODE_DOT_BF16) {
            memcpy(xp + b * xs * 2, (const uint16_t *)x + b * cols, (size_t)cols * 2);
            continue;
        }
        float *row = (float *)xp + b * xs;
        for (int64_t j = 0; j < cols; j++) {
            int64_t k = j;
            if (mode == MODE_BF16) { /* column j -> its lane after vpunpck{l,h}wd (see above) */
                int64_t g = j & ~(int64_t)31, i = j & 31, lane = i >> 3, hi = (i >> 2) & 1, q = i & 3;
                k = g + hi * 16 + lane * 4 + q;
            }
            row[k] = x_at(x, x_dtype, b * cols + j);
        }
    }
    const row_group_fn *fns = g_row_groups[mode];
    sf_qrow_fn qfns[GROUP] = {NULL}; /* quantized values dequantized inside the loop (matvec_q.c) */
    for (int nb = 1; q && nb <= GROUP; nb++) qfns[nb - 1] = sf_pick_qrow(q->qbits, mode, nb);
    int64_t bad = -1;
    if (qfns[0]) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *m = bitmask + r * mask_stride;
            int64_t start, n, gstart;
            int span = sf_row_span_deferred(r, rows, cols, cols, nnz, m, row_offsets, &start, &n);
            int ok = span != SF_SPAN_BAD && sf_quant_row_ok(q, r, start, n);
            memcpy(&gstart, q->group_offsets + r, 8);
            /* Deferred only where even `cols` values would stay inside the scales (see sf_row_span_deferred). */
            if (ok && span == SF_SPAN_DEFERRED && !sf_quant_row_ok(q, r, start, cols))
                ok = sf_row_span(r, rows, cols, nnz, m, row_offsets, &start), span = SF_SPAN_CHECKED;
            for (int64_t b0 = 0; ok && b0 < batch; b0 += GROUP) {
                int nb = batch - b0 < GROUP ? (int)(batch - b0) : GROUP;
                float acc[GROUP];
                int64_t used = qfns[nb - 1](q, start, gstart, m, cols, xp + b0 * xs * xe, xs, acc);
                if (span == SF_SPAN_DEFERRED && used != n) ok = 0;
                for (int b = 0; b < nb; b++) y[(b0 + b) * rows + r] = acc[b];
            }
            if (!ok) {
                for (int64_t b = 0; b < batch; b++) y[b * rows + r] = 0.0f;
#pragma omp atomic write
                bad = r;
            }
        }
        free(xp);
        return bad;
    }
#pragma omp parallel num_threads(nt)
    {
        char *scratch = q ? malloc((size_t)(cols * es) + 64) : NULL; /* one dequantized row */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *m = bitmask + r * mask_stride;
            const char *src = NULL, *src_end;
            int64_t start, n = -1; /* n >= 0: the row's mask is counted by the kernel and checked after */
            int ok = 0;
            if (!q) {
                int span = sf_row_span_deferred(r, rows, cols, cols, nnz, m, row_offsets, &start, &n);
                ok = span != SF_SPAN_BAD;
                if (span != SF_SPAN_DEFERRED) n = -1;
                src = vals + start * es;
            } else if (scratch) { /* dequantized into scratch: its mask counted first (row_values) */
                ok = row_values(SF_PATH_AVX512, q, dtype, r, rows, cols, nnz, vals, m, row_offsets, scratch, &src,
                                &src_end);
            }
            /* Groups of GROUP rows of x; after the first, the row of W comes from L1/L2, not memory. */
            for (int64_t b0 = 0; ok && b0 < batch; b0 += GROUP) {
                int nb = batch - b0 < GROUP ? (int)(batch - b0) : GROUP;
                float acc[GROUP];
                int64_t used = fns[nb - 1](src, m, cols, xp + b0 * xs * xe, xs, acc);
                if (n >= 0 && used != n) ok = 0; /* the mask holds more or fewer values than the offsets say */
                for (int b = 0; b < nb; b++) y[(b0 + b) * rows + r] = acc[b];
            }
            if (!ok) {
                for (int64_t b = 0; b < batch; b++) y[b * rows + r] = 0.0f;
#pragma omp atomic write
                bad = q && !scratch ? -2 : r;
            }
        }
        free(scratch);
    }
    free(xp);
    return bad;
}
#endif /* SF_X86 */

static int64_t matvec_any(int path, const sf_quant *q, int dtype, int64_t rows, int64_t cols, const void *values,
                          int64_t nnz, const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype,
                          int64_t batch, float *y, int threads) {
    const int es = dtype == SF_F32 ? 4 : 2;
    const char *vals = (const char *)values;
    /* Work scales with the bytes of W read, not the output size. */
    int nt = sf_threads_for(threads, rows, rows * cols * es / 2);
#if SF_X86
    if (path == SF_PATH_AVX2 && dtype != SF_F32)
        return sf_matvec_avx2(q, dtype, rows, cols, vals, nnz, bitmask, row_offsets, x, x_dtype, batch, y, nt);
    if (path == SF_PATH_AVX512)
        return matvec_avx512(q, dtype, rows, cols, vals, bitmask, row_offsets, nnz, x, x_dtype, batch, y, nt);
#endif
    /* The decode-dot paths read fp32 x. */
    float *xf = NULL;
    if (x_dtype == SF_BF16) {
        xf = malloc((size_t)(batch * cols) * sizeof(float));
        if (!xf) return -2;
        for (int64_t i = 0; i < batch * cols; i++) xf[i] = sf_bf16_to_f32(((const uint16_t *)x)[i]);
    }
    int64_t bad = -1;
    matvec_decode_dot(path, q, dtype, rows, cols, vals, bitmask, row_offsets, nnz, xf ? xf : (const float *)x, batch,
                      y, nt, &bad);
    free(xf);
    return bad;
}

int64_t sf_matvec(int path, int dtype, int64_t rows, int64_t cols, const void *values, int64_t nnz,
                  const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch,
                  float *y, int threads) {
    return matvec_any(path, NULL, dtype, rows, cols, values, nnz, bitmask, row_offsets, x, x_dtype, batch, y, threads);
}

int64_t sf_matvec_q(int path, const sf_quant *q, int out_dtype, int64_t rows, int64_t cols, int64_t nnz,
                    const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch,
                    float *y, int threads) {
    return matvec_any(path, q, out_dtype, rows, cols, NULL, nnz, bitmask, row_offsets, x, x_dtype, batch, y, threads);
}
