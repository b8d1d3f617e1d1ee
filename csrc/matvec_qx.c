/* Fused sparse matvec of quantized values with int8 activations (AVX2): y = x @ W.T where the
 * int8 / int4 codes of W meet x quantized to int8 in integer dot products, llama.cpp's approach
 * for its Q8_0 / Q4_0 types, here straight from the bitmap format.
 *
 * x: per row of x, per block of 32 columns,
 *     d = max|x| / 127 (fp32),  xq = round_half_even(x / d) in [-127, 127]  (0 where d == 0);
 *     a block holding Inf or NaN gets d = NaN (its products, and so the row's result, are NaN).
 * W: value i of a row, in group g, is w_i = code_i (int8) or nibble_i - zeros[g] (int4), an
 *     integer in [-128, 127] (int4: [-15, 15]), times scales[g].
 * y = sum over groups g of scales[g] * sum over blocks b of d_b * sum_{i in g, col(i) in b} w_i * xq[col(i)],
 * the innermost sum exact in int32, the outer two in fp32.
 *
 * An int4 row is first unpacked into an int8 row in L1 (nibble minus its group's zero point, in
 * [-15, 15]: unpack_int4), then multiplied exactly as an int8 row. Per 32 columns (mask m, bytes
 * m0..m3, n = popcount(m) values):
 *   values:  two 16-byte runs of the codes, at the step's first value (for m0, m1) and at its
 *            popcount(m0 | m1 << 8)-th (for m2, m3), one per 128-bit lane;
 *   expand:  ONE vpshufb places them at their columns, zeros elsewhere. Its control per lane is
 *            the sum of two 16-byte table rows, lo[m0] + hi[m1]: lo holds m0's ranks (or 0x80) in
 *            bytes 0-7 and popcount(m0) in bytes 8-15, hi holds m1's ranks (or 0x80) in bytes 8-15,
 *            so the second byte's values are found after the first's;
 *   dot:     vpsignb / vpabsb move w's signs onto xq, vpmaddubsw + vpmaddwd sum 32 products into 8
 *            int32 lanes, which are converted and multiplied by the block's d into the group's
 *            fp32 accumulator (folded into the row's, times the group's scale, when the group ends).
 * |w| <= 128 and |xq| <= 127, so a pair of products (<= 32512) never saturates vpmaddubsw.
 * A group ending inside a step splits the step by values (pdep of the first k remaining values'
 * lanes, as a byte mask), so any group size works; with the default 128 that happens every few steps.
 *
 * This is a lossy kernel: x is rounded to 8 bits per element (error at most d/2 per element, so
 * |y - exact| <= sum_i |w_i * scale| * d_b / 2 plus fp32 rounding), where the exact paths (decode,
 * and sf_matvec_q) round only the weights. The Python wrapper uses it on AVX2 CPUs for bf16 / fp16 x unless
 * SPARSEFERRY_EXACT_QUANT=1; `kernels.reference.sparse_matmul_int8x_reference` is its slow reference.
 */
#include "sf_qx.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The AVX2 layout of x: one 64-byte record per block of 32 columns per row of x: the 32 xq bytes,
 * then d (fp32), then padding (a record is one cache line, its loads aligned). */
#define QX_REC 64

/* The records of x [batch, cols] (fp32 or bf16): [batch][nblk] records, nblk = ceil(cols / 32). */
static void quantize_x(const void *x, int x_dtype, int64_t batch, int64_t cols, int64_t nblk, uint8_t *rec) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t k = 0; k < nblk; k++) {
            float v[QX_BLOCK];
            uint8_t *o = rec + (b * nblk + k) * QX_REC;
            sf_qx_load_block(x, x_dtype, cols, b, k, v);
            float dk = sf_qx_quantize_block(v, (int8_t *)o);
            memcpy(o + QX_BLOCK, &dk, 4);
        }
}

#if SF_X86
#include <immintrin.h>

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt,bmi,bmi2")))
#define INLINE static inline __attribute__((always_inline))
#define GROUP QX_GROUP

/* g_tab[m][0]: ranks of m's bits in bytes 0-7 (0x80 where clear), popcount(m) in bytes 8-15;
 * g_tab[m][1]: 0 in bytes 0-7, ranks of m's bits in bytes 8-15 (0x80 where clear). */
static uint8_t g_tab[256][2][16] __attribute__((aligned(32)));

static int g_qx_paths = -1; /* set by sf_init_qx_tables at module import: the CPU does not change */
static int qx_paths_now(void);

void sf_init_qx_tables(void) {
    for (int m = 0; m < 256; m++) {
        int rank = 0;
        for (int k = 0; k < 8; k++) {
            uint8_t e = (m >> k) & 1 ? (uint8_t)rank++ : 0x80;
            g_tab[m][0][k] = e;
            g_tab[m][1][8 + k] = e;
            g_tab[m][1][k] = 0;
        }
        for (int k = 0; k < 8; k++) g_tab[m][0][8 + k] = (uint8_t)rank;
    }
    sf_init_qx512_tables();
    g_qx_paths = qx_paths_now();
}

/* int4 rows first become int8 rows: out[k] = nibble(pos0 + k) of c minus its group's zero point, for
 * k < n (value k of the row is in group gstart + k / G). Nibbles are unpacked 32 at a time from the
 * even nibble at or before pos0 into raw (raw[k + (pos0 & 1)] = nibble(pos0 + k)), then each group's
 * run is shifted into place with its zero point subtracted. Reads stay within n / 2 + 17 bytes of
 * c + pos0 / 2; raw and out need n + 64 bytes. */
AVX2_TARGET static void unpack_int4(const uint8_t *c, int64_t pos0, int64_t n, const sf_quant *q, int64_t gstart,
                                    uint8_t *raw, int8_t *out) {
    const int64_t o = pos0 & 1, G = q->group_size;
    const uint8_t *p = c + (pos0 >> 1);
    const __m256i lo = _mm256_set1_epi16(0x000f), hi = _mm256_set1_epi16(0x00f0);
    for (int64_t k = 0; k < o + n; k += 32) {
        __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + k / 2)));
        w = _mm256_or_si256(_mm256_and_si256(w, lo), _mm256_slli_epi16(_mm256_and_si256(w, hi), 4));
        _mm256_storeu_si256((__m256i *)(raw + k), w); /* byte 2j: low nibble of byte j, 2j + 1: its high nibble */
    }
    for (int64_t ks = 0, g = gstart; ks < n; ks += G, g++) {
        __m256i z = _mm256_set1_epi8((char)(g < q->nscales ? q->zeros[g] : 0));
        int64_t ke = ks + G < n ? ks + G : n;
        for (int64_t k = ks; k < ke; k += 32) /* lanes past ke are rewritten by the next group */
            _mm256_storeu_si256((__m256i *)(out + k),
                                _mm256_sub_epi8(_mm256_loadu_si256((const __m256i *)(raw + o + k)), z));
    }
}

/* 16 int8 codes from value index pos of the row's codes at c. */
AVX2_TARGET INLINE __m128i codes16(const uint8_t *c, int64_t pos) {
    return _mm_loadu_si128((const __m128i *)(c + pos));
}

/* 0xff in the bytes whose bit is set in the 32-bit column mask cm. */
AVX2_TARGET INLINE __m256i byte_mask(uint32_t cm) {
    const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3,
                                         3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)cm), rep);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* gacc[b] += d * (w . xq) over one 32-column block, for nb rows of x (record xr, rows xrow bytes apart). */
AVX2_TARGET INLINE void dot32(__m256i w, const uint8_t *xr, int64_t xrow, int nb, __m256 *gacc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i aw = _mm256_abs_epi8(w);
    for (int b = 0; b < nb; b++) {
        __m256i sx = _mm256_sign_epi8(_mm256_load_si256((const __m256i *)(xr + b * xrow)), w);
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
        gacc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss((const float *)(xr + b * xrow + QX_BLOCK)),
                                  gacc[b]);
    }
}

/* The group a walk over one row is in. */
typedef struct {
    int64_t g, left; /* its index in scales, values not yet seen in it */
    float s;         /* its scale */
} qx_group;

AVX2_TARGET INLINE void qx_enter(const sf_quant *q, int64_t g, qx_group *st) {
    st->g = g;
    st->left = q->group_size;
    st->s = g < q->nscales ? _cvtsh_ss(q->scales[g]) : 0.0f;
}

/* The weights of the 32 columns under mask m, as signed bytes at their columns (zeros elsewhere),
 * from value index pos of the int8 codes at c. */
AVX2_TARGET INLINE __m256i weights32(const uint8_t *c, int64_t pos, uint32_t m) {
    const int64_t n01 = _mm_popcnt_u32(m & 0xffff);
    __m256i v = _mm256_set_m128i(codes16(c, pos + n01), codes16(c, pos));
    __m256i ctl = _mm256_add_epi8(_mm256_set_m128i(_mm_load_si128((const __m128i *)g_tab[(m >> 16) & 0xff][0]),
                                                   _mm_load_si128((const __m128i *)g_tab[m & 0xff][0])),
                                  _mm256_set_m128i(_mm_load_si128((const __m128i *)g_tab[m >> 24][1]),
                                                   _mm_load_si128((const __m128i *)g_tab[(m >> 8) & 0xff][1])));
    return _mm256_shuffle_epi8(v, ctl);
}

/* acc[b] += scale * (gacc[b] + gacc2[b]), both cleared: the end of a group. */
AVX2_TARGET INLINE void qx_flush(int nb, float s, __m256 *acc, __m256 *gacc, __m256 *gacc2) {
    for (int b = 0; b < nb; b++) {
        acc[b] = _mm256_fmadd_ps(_mm256_add_ps(gacc[b], gacc2[b]), _mm256_set1_ps(s), acc[b]);
        gacc[b] = gacc2[b] = _mm256_setzero_ps();
    }
}

/* One 32-column step (mask m, x's record xr) into gacc, moving the walk over the groups on. */
AVX2_TARGET INLINE void qx_step(const sf_quant *q, const uint8_t *c, int64_t *pos, uint32_t m,
                                const uint8_t *xr, int64_t xrow, int nb, qx_group *st,
                                __m256 *acc, __m256 *gacc, __m256 *gacc2) {
    __m256i w = weights32(c, *pos, m);
    int64_t nrest = _mm_popcnt_u32(m);
    *pos += nrest;
    uint32_t rest = m;
    while (__builtin_expect(nrest > st->left, 0)) { /* the group ends inside this step: split it by values */
        uint32_t first = _pdep_u32((1u << st->left) - 1, rest);
        __m256i bm = byte_mask(first);
        dot32(_mm256_and_si256(w, bm), xr, xrow, nb, gacc);
        w = _mm256_andnot_si256(bm, w);
        rest &= ~first;
        nrest -= st->left;
        qx_flush(nb, st->s, acc, gacc, gacc2);
        qx_enter(q, st->g + 1, st);
    }
    dot32(w, xr, xrow, nb, gacc);
    st->left -= nrest;
    if (!st->left) {
        qx_flush(nb, st->s, acc, gacc, gacc2);
        qx_enter(q, st->g + 1, st);
    }
}

/* acc[b] = W[row] . x[b] (see above) for nb rows of x. c: the row's codes (value index pos0 is its
 * first value; every read stays within cols + 32 values of it); returns the values the mask made it read. */
AVX2_TARGET INLINE int64_t qx_row(const sf_quant *q, const uint8_t *c, int64_t pos0, int64_t gstart,
                                  const uint8_t *mask, int64_t cols, const uint8_t *xr, int64_t xrow, int nb,
                                  float *out) {
    __m256 acc[GROUP], g0[GROUP], g1[GROUP]; /* the row's sum; the group's, of even and odd steps */
    for (int b = 0; b < nb; b++) acc[b] = g0[b] = g1[b] = _mm256_setzero_ps();
    qx_group st;
    qx_enter(q, gstart, &st);
    int64_t pos = pos0, j = 0;
    for (; j + 64 <= cols; j += 64) { /* two steps, two accumulators: two dependency chains */
        uint64_t m;
        memcpy(&m, mask + j / 8, 8);
        SF_PREFETCH(c + pos + SF_PREFETCH_AHEAD);
        if (!(j & 511)) SF_PREFETCH(mask + j / 8 + SF_PREFETCH_AHEAD / 8);
        const uint8_t *r = xr + j / QX_BLOCK * QX_REC;
        qx_step(q, c, &pos, (uint32_t)m, r, xrow, nb, &st, acc, g0, g1);
        qx_step(q, c, &pos, (uint32_t)(m >> 32), r + QX_REC, xrow, nb, &st, acc, g1, g0);
    }
    for (; j < cols; j += 32)
        qx_step(q, c, &pos, (uint32_t)sf_mask_bits(mask, j, cols, 32), xr + j / QX_BLOCK * QX_REC, xrow, nb, &st, acc,
                g0, g1);
    for (int b = 0; b < nb; b++) {
        __m256 s = acc[b];
        if (st.left < q->group_size) /* a group in progress */
            s = _mm256_fmadd_ps(_mm256_add_ps(g0[b], g1[b]), _mm256_set1_ps(st.s), s);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[b] = _mm_cvtss_f32(h);
    }
    return pos - pos0;
}

#define QX(NB)                                                                                               \
    AVX2_TARGET static int64_t qx_##NB(const sf_quant *q, const uint8_t *c, int64_t pos0, int64_t gstart,        \
                                       const uint8_t *mask, int64_t cols, const uint8_t *xr, int64_t xrow,         \
                                       float *out) {                                                               \
        return qx_row(q, c, pos0, gstart, mask, cols, xr, xrow, NB, out);                                          \
    }
QX(1) QX(2) QX(3) QX(4)
static const sf_qx_row_fn g_qx[GROUP] = {qx_1, qx_2, qx_3, qx_4};

/* Values a row's reads may run past its last one: int8, two 16-byte runs on AVX2, one 64-byte load
 * on AVX-512; int4, 32-nibble loads on AVX2, the 33 bytes of 64 nibbles on AVX-512 (72 values keep
 * the last byte strictly inside the codes). */
#define READ_SLACK 72

static int qx_paths_now(void) {
    int all = sf_supported_paths(), paths = all & (1 << SF_PATH_AVX2);
    if ((all & (1 << SF_PATH_AVX512)) && sf_qx512_supported()) paths |= 1 << SF_PATH_AVX512;
    return paths;
}

int sf_qx_paths(void) { return g_qx_paths >= 0 ? g_qx_paths : qx_paths_now(); }

int64_t sf_matvec_qx(int path, const sf_quant *q, int64_t rows, int64_t cols, int64_t nnz, const uint8_t *bitmask,
                     const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch, float *y, int threads) {
    if ((path != SF_PATH_AVX2 && path != SF_PATH_AVX512) || !(sf_qx_paths() & (1 << path)) ||
        (q->qbits != 8 && q->qbits != 4) || cols < 1)
        return -3;
    uint8_t wide_zero = 0; /* a zero point above 15 (not 4-bit): c - z would not fit the byte lanes */
    for (int64_t g = 0; q->zeros && g < q->nscales; g++) wide_zero |= q->zeros[g] > 15; /* no early exit: vectorized */
    if (wide_zero) return -3;
    const int wide = path == SF_PATH_AVX512;
    const int64_t mask_stride = (cols + 7) / 8, nblk = (cols + QX_BLOCK - 1) / QX_BLOCK;
    const int64_t xrow = wide ? sf_qx512_xrow(q->qbits, cols) : nblk * QX_REC;
    uint8_t *xr = aligned_alloc(64, (size_t)(batch * xrow));
    if (!xr) return -2;
    if (wide) sf_qx512_quantize(q->qbits, x, x_dtype, batch, cols, xr);
    else quantize_x(x, x_dtype, batch, cols, nblk, xr);
    const sf_qx_row_fn *fns = wide ? sf_qx512_rows[q->qbits == 4] : g_qx;
    const int unpack = q->qbits == 4 && !wide; /* AVX2 multiplies int4 rows unpacked into int8 rows */
    int nt = sf_threads_for(threads, rows, rows * cols / 2);
    int64_t bad = -1;
    int oom = 0;
#pragma omp parallel num_threads(nt)
    {
        uint8_t *pad = NULL; /* a row's codes with slack: rows ending near the end of the codes */
        uint8_t *raw = NULL, *row8 = NULL; /* int4: the row's nibbles as bytes, then as int8 weights */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *m = bitmask + r * mask_stride;
            int64_t start, n, gstart;
            int span = sf_row_span_deferred(r, rows, cols, cols + READ_SLACK, nnz, m, row_offsets, &start, &n);
            int ok = span != SF_SPAN_BAD && sf_quant_row_ok(q, r, start, n);
            memcpy(&gstart, q->group_offsets + r, 8);
            /* Deferred only where even `cols` values would stay inside the scales (see sf_row_span_deferred). */
            if (ok && span == SF_SPAN_DEFERRED && !sf_quant_row_ok(q, r, start, cols))
                ok = sf_row_span(r, rows, cols, nnz, m, row_offsets, &start), span = SF_SPAN_CHECKED;
            /* The codes from the row's first value on, or (near the end) a padded copy of them. */
            const uint8_t *c = q->codes + (q->qbits == 8 ? start : start >> 1);
            int64_t pos0 = q->qbits == 8 ? 0 : start & 1;
            if (ok && span != SF_SPAN_DEFERRED && start + n + READ_SLACK > nnz) {
                size_t bytes = (size_t)(q->qbits == 8 ? n : ((start + n + 1) >> 1) - (start >> 1));
                size_t cap = (size_t)(q->qbits == 8 ? cols : cols / 2 + 1) + 64;
                if (!pad) pad = calloc(cap, 1);
                if (!pad) {
                    ok = 0;
#pragma omp atomic write
                    oom = 1;
                } else {
                    memset(pad, 0, cap);
                    memcpy(pad, c, bytes);
                    c = pad;
                }
            }
            if (ok && unpack) { /* unpacked into an int8 row (L1-resident), multiplied as int8 */
                if (!raw) raw = malloc((size_t)cols + 64), row8 = malloc((size_t)cols + 64);
                if (!raw || !row8) {
                    ok = 0;
#pragma omp atomic write
                    oom = 1;
                } else {
                    unpack_int4(c, pos0, n < cols ? n : cols, q, gstart, raw, (int8_t *)row8);
                    c = row8, pos0 = 0;
                }
            }
            for (int64_t b0 = 0; ok && b0 < batch; b0 += GROUP) {
                int nb = batch - b0 < GROUP ? (int)(batch - b0) : GROUP;
                float acc[GROUP];
                int64_t used = fns[nb - 1](q, c, pos0, gstart, m, cols, xr + b0 * xrow, xrow, acc);
                if (span == SF_SPAN_DEFERRED && used != n) ok = 0; /* the mask disagrees with the offsets */
                for (int b = 0; b < nb; b++) y[(b0 + b) * rows + r] = acc[b];
            }
            if (!ok) {
                for (int64_t b = 0; b < batch; b++) y[b * rows + r] = 0.0f;
                if (!oom) {
#pragma omp atomic write
                    bad = r;
                }
            }
        }
        free(pad);
        free(raw);
        free(row8);
    }
    free(xr);
    return oom ? -2 : bad;
}

#else
void sf_init_qx_tables(void) {}
int sf_qx_paths(void) { return 0; }
int64_t sf_matvec_qx(int path, const sf_quant *q, int64_t rows, int64_t cols, int64_t nnz, const uint8_t *bitmask,
                     const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch, float *y, int threads) {
    (void)path, (void)q, (void)rows, (void)cols, (void)nnz, (void)bitmask, (void)row_offsets, (void)x, (void)x_dtype;
    (void)batch, (void)y, (void)threads, (void)quantize_x;
    return -3;
}
#endif /* SF_X86 */
