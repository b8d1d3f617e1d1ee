/* The rows of the fused matvec with int8 activations on AVX-512 VNNI (the driver, the quantization
 * of x and the integers computed are matvec_qx.c's; see there). Per 64 columns of a row of W
 * (mask m, n = popcount(m) values):
 *   expand:  one vpexpandb of the 64 bytes of codes at the step's first value puts the n int8
 *            weights at their columns, zeros elsewhere (VBMI2);
 *   dot:     vpdpbusd multiplies unsigned by signed bytes and sums each 4 products into an int32
 *            lane (VNNI), so x is stored as xq + 128 (in [1, 255]) and the excess, 128 * sum(w)
 *            per lane, is one more vpdpbusd per step (of 0x80 bytes with w), shared by the rows of
 *            x and taken off first: w . (xq + 128) - 128 * sum(w) = w . xq, exact in int32 (each
 *            lane at most 4 * 255 * 128 in magnitude);
 *   scale:   the 16 lanes are converted to fp32 and multiplied by the d of their block (lanes 0-7:
 *            the first 32 columns, 8-15: the next 32) into the group's fp32 accumulator.
 * Group ends inside a step split it by values, as on AVX2 (pdep of the remaining values' columns,
 * now a 64-bit byte mask register). Steps alternate between two group accumulators (two
 * dependency chains) and software prefetch runs ahead on the codes and the mask.
 *
 * int4 rows are read packed (no unpacked copy, unlike AVX2): per step the 33 bytes holding the
 * step's 64 nibbles are loaded, one vpermb gives each qword the 4-5 bytes of its 8 nibbles, one
 * vpmultishiftqb moves nibble k to byte k (from bit 4k, or 4k + 4 where the step starts on an odd
 * nibble) and an AND clears the high halves. The expand fills the columns without a value with the
 * group's zero point z instead of zeros, so u - z is the weight at every value's column and 0 at
 * the others, and (u - z) . xq = u . xq + z . (-xq): two vpdpbusd with the unsigned nibbles and z
 * (all in [0, 15]) against xq and -xq, exact in int32 and the same integers as the int8 form, with
 * no excess to take off and no subtraction of the zero point.
 *
 * x's records: per row of x, per 64 columns, one aligned load each of
 *   int8 rows (128 bytes): the 64 bytes xq + 128 (128 past the end of the row), then 16 fp32, d of
 *                          the first block 8 times, then d of the second (0 past the end of the row);
 *   int4 rows (192 bytes): the 64 bytes xq (0 past the end), the 64 bytes -xq, then the 16 d.
 */
#include "sf_qx.h"

#if SF_X86
#include <immintrin.h>

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,bmi,bmi2,popcnt,f16c")))
#define INLINE static inline __attribute__((always_inline))
/* Bytes of x's record per 64 columns: int8 rows, 64 of xq + 128 then 64 of d; int4 rows, 64 of xq,
 * 64 of -xq, then 64 of d. */
#define REC(QB) ((QB) == 8 ? 128 : 192)
#define DOFF(QB) ((QB) == 8 ? 64 : 128)

int sf_qx512_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}

int64_t sf_qx512_xrow(int qbits, int64_t cols) { return (cols + 63) / 64 * REC(qbits); }

/* One 32-column block of x (v: 32 fp32, zeros past the row) quantized as sf_qx_quantize_block does
 * it, bit for bit (the same IEEE division and round-half-even), into 32 bytes at o: xq + 128 (int8
 * rows), or xq and 64 bytes on, -xq (int4 rows); returns d. */
VNNI_TARGET static float quantize_block(int qbits, __m512 v0, __m512 v1, uint8_t *o) {
    const __m512 lim = _mm512_set1_ps(3.4028234663852886e38f);
    __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
    /* Inf or NaN anywhere: not (|v| <= FLT_MAX) */
    __mmask16 bad = _mm512_cmp_ps_mask(a0, lim, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, lim, _CMP_NLE_UQ);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    float d = bad ? NAN : amax / 127.0f;
    __m128i q0 = _mm_setzero_si128(), q1 = _mm_setzero_si128();
    if (!bad && d > 0.0f) {
        const __m512 dv = _mm512_set1_ps(d), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
        __m512 r0 = _mm512_roundscale_ps(_mm512_div_ps(v0, dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r1 = _mm512_roundscale_ps(_mm512_div_ps(v1, dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r0, lo), hi)));
        q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r1, lo), hi)));
    }
    if (qbits == 8) {
        const __m128i off = _mm_set1_epi8((char)0x80);
        _mm_storeu_si128((__m128i *)o, _mm_add_epi8(q0, off));
        _mm_storeu_si128((__m128i *)(o + 16), _mm_add_epi8(q1, off));
    } else {
        const __m128i zero = _mm_setzero_si128();
        _mm_storeu_si128((__m128i *)o, q0);
        _mm_storeu_si128((__m128i *)(o + 16), q1);
        _mm_storeu_si128((__m128i *)(o + 64), _mm_sub_epi8(zero, q0));
        _mm_storeu_si128((__m128i *)(o + 80), _mm_sub_epi8(zero, q1));
    }
    return d;
}

/* 16 columns of row b of x from column j as fp32 (zeros past cols). */
VNNI_TARGET static inline __m512 load16(const void *x, int x_dtype, int64_t cols, int64_t b, int64_t j) {
    int64_t n = cols - j;
    __mmask16 k = n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
    if (x_dtype == SF_BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)x + b * cols + j);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(k, (const float *)x + b * cols + j);
}

VNNI_TARGET void sf_qx512_quantize(int qbits, const void *x, int x_dtype, int64_t batch, int64_t cols, uint8_t *rec) {
    const int64_t nch = (cols + 63) / 64;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t k = 0; k < nch; k++) {
            uint8_t *o = rec + (b * nch + k) * REC(qbits);
            float *d = (float *)(o + DOFF(qbits));
            for (int h = 0; h < 2; h++) {
                int64_t j = (2 * k + h) * QX_BLOCK;
                float dk = quantize_block(qbits, load16(x, x_dtype, cols, b, j), load16(x, x_dtype, cols, b, j + 16),
                                          o + QX_BLOCK * h);
                for (int i = 0; i < 8; i++) d[8 * h + i] = dk;
            }
        }
}

/* The group a walk over one row is in. */
typedef struct {
    int64_t g, left; /* its index in scales, values not yet seen in it */
    float s;         /* its scale */
    __m512i z;       /* its zero point in every byte (int4; 0 for int8) */
} grp;

VNNI_TARGET INLINE void enter(const sf_quant *q, int64_t g, grp *st) {
    st->g = g;
    st->left = q->group_size;
    st->s = g < q->nscales ? _cvtsh_ss(q->scales[g]) : 0.0f;
    st->z = _mm512_set1_epi8((char)(q->zeros && g < q->nscales ? q->zeros[g] : 0));
}

/* int4: g_spread puts bytes 4j .. 4j + 7 of the codes in qword j (vpermb); g_nib[parity] then picks
 * nibble k of qword j at bit 4k (+4 where the step starts on an odd nibble) into byte k (vpmultishiftqb). */
static uint8_t g_spread[64] __attribute__((aligned(64)));
static uint8_t g_nib[2][64] __attribute__((aligned(64)));

void sf_init_qx512_tables(void) {
    for (int i = 0; i < 64; i++) {
        g_spread[i] = (uint8_t)(4 * (i / 8) + i % 8);
        g_nib[0][i] = (uint8_t)(4 * (i % 8));
        g_nib[1][i] = (uint8_t)(4 * (i % 8) + 4);
    }
}

/* The 64 codes from value index pos of the row's codes at c, one per byte in order: int8 bytes, or
 * int4 nibbles (0..15; nibble k of the codes is the low half of byte k / 2 when k is even). An int4
 * step reads the 33 bytes holding nibbles pos .. pos + 63 (a masked load: nothing past them). */
VNNI_TARGET INLINE __m512i codes64(int qbits, const uint8_t *c, int64_t pos) {
    if (qbits == 8) {
        __m512i v = _mm512_loadu_si512((const void *)(c + pos));
        __asm__("" : "+v"(v)); /* a plain load, then the register-form expand: no slower, never a masked load */
        return v;
    }
    __m512i b = _mm512_maskz_loadu_epi8((__mmask64)0x1ffffffffull, (const void *)(c + (pos >> 1)));
    b = _mm512_permutexvar_epi8(_mm512_load_si512((const void *)g_spread), b);
    b = _mm512_multishift_epi64_epi8(_mm512_load_si512((const void *)g_nib[pos & 1]), b);
    return _mm512_and_si512(b, _mm512_set1_epi8(0x0f));
}

/* An expanded step (see step) cut to the values under byte mask k: int8, w there and zero
 * elsewhere; int4, the nibbles there and the group's zero point elsewhere. */
VNNI_TARGET INLINE __m512i part(int qbits, __m512i w, uint64_t k, const grp *st) {
    return qbits == 8 ? _mm512_maskz_mov_epi8((__mmask64)k, w) : _mm512_mask_mov_epi8(st->z, (__mmask64)k, w);
}

/* gacc[b] += d * (w . xq) over one record's 64 columns, for nb rows of x. int8: w holds the weights
 * (zeros between them). int4: w holds the nibbles u, and z (the group's zero point, z in every
 * byte of zb) at every other column, so u - z is the weight at the values' columns and 0 elsewhere:
 * u . xq + z . (-xq) = (u - z) . xq, both on vpdpbusd's unsigned side (u, z in [0, 15]), exact in int32. */
VNNI_TARGET INLINE void dot64(int qbits, __m512i w, __m512i zb, const uint8_t *xr, int64_t xrow, int nb, __m512 *gacc) {
    const __m512i zero = _mm512_setzero_si512();
    if (qbits == 4) {
        for (int b = 0; b < nb; b++) {
            const uint8_t *r = xr + b * xrow;
            __m512i p = _mm512_dpbusd_epi32(zero, w, _mm512_load_si512((const void *)r));
            p = _mm512_dpbusd_epi32(p, zb, _mm512_load_si512((const void *)(r + 64)));
            gacc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_load_ps((const float *)(r + DOFF(4))), gacc[b]);
        }
        return;
    }
    __m512i base = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8((char)0x80), w));
    for (int b = 0; b < nb; b++) {
        __m512i p = _mm512_dpbusd_epi32(base, _mm512_load_si512((const void *)(xr + b * xrow)), w);
        gacc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_load_ps((const float *)(xr + b * xrow + DOFF(8))), gacc[b]);
    }
}

/* acc[b] += scale * (gacc[b] + gacc2[b]), both cleared: the end of a group. */
VNNI_TARGET INLINE void flush(int nb, float s, __m512 *acc, __m512 *gacc, __m512 *gacc2) {
    for (int b = 0; b < nb; b++) {
        acc[b] = _mm512_fmadd_ps(_mm512_add_ps(gacc[b], gacc2[b]), _mm512_set1_ps(s), acc[b]);
        gacc[b] = gacc2[b] = _mm512_setzero_ps();
    }
}

/* One 64-column step (mask m, x's record xr) into gacc, moving the walk over the groups on. */
VNNI_TARGET INLINE void step(int qbits, const sf_quant *q, const uint8_t *c, int64_t *pos, uint64_t m,
                             const uint8_t *xr, int64_t xrow, int nb, grp *st, __m512 *acc, __m512 *gacc,
                             __m512 *gacc2) {
    /* int8: the codes at their columns, zeros elsewhere; int4: the nibbles, the group's zero point elsewhere */
    __m512i w = qbits == 8 ? _mm512_maskz_expand_epi8((__mmask64)m, codes64(qbits, c, *pos))
                           : _mm512_mask_expand_epi8(st->z, (__mmask64)m, codes64(qbits, c, *pos));
    int64_t nrest = _mm_popcnt_u64(m);
    *pos += nrest;
    uint64_t rest = m;
    while (__builtin_expect(nrest > st->left, 0)) { /* the group ends inside this step (left < 64) */
        uint64_t first = _pdep_u64((1ull << st->left) - 1, rest);
        dot64(qbits, part(qbits, w, first, st), st->z, xr, xrow, nb, gacc);
        rest &= ~first;
        nrest -= st->left;
        flush(nb, st->s, acc, gacc, gacc2);
        enter(q, st->g + 1, st);
    }
    dot64(qbits, rest == m ? w : part(qbits, w, rest, st), st->z, xr, xrow, nb, gacc);
    st->left -= nrest;
    if (!st->left) {
        flush(nb, st->s, acc, gacc, gacc2);
        enter(q, st->g + 1, st);
    }
}

/* out[b] = W[row] . x[b] for nb rows of x; pos0: the row's first value in c (int4: a nibble index,
 * 0 or 1). Reads stay within cols + 64 values of it. Returns the values its mask consumed. */
VNNI_TARGET INLINE int64_t row(int qbits, const sf_quant *q, const uint8_t *c, int64_t pos0, int64_t gstart,
                               const uint8_t *mask, int64_t cols, const uint8_t *xr, int64_t xrow, int nb,
                               float *out) {
    __m512 acc[QX_GROUP], g0[QX_GROUP], g1[QX_GROUP]; /* the row's sum; the group's, of even and odd steps */
    for (int b = 0; b < nb; b++) acc[b] = g0[b] = g1[b] = _mm512_setzero_ps();
    grp st;
    enter(q, gstart, &st);
    int64_t pos = pos0, j = 0;
    for (; j + 128 <= cols; j += 128) {
        uint64_t m0, m1;
        memcpy(&m0, mask + j / 8, 8);
        memcpy(&m1, mask + j / 8 + 8, 8);
        SF_PREFETCH(c + (qbits == 8 ? pos : pos >> 1) + SF_PREFETCH_AHEAD);
        if (!(j & 511)) SF_PREFETCH(mask + j / 8 + SF_PREFETCH_AHEAD / 8);
        const uint8_t *r = xr + j / 64 * REC(qbits);
        step(qbits, q, c, &pos, m0, r, xrow, nb, &st, acc, g0, g1);
        step(qbits, q, c, &pos, m1, r + REC(qbits), xrow, nb, &st, acc, g1, g0);
    }
    for (; j < cols; j += 64)
        step(qbits, q, c, &pos, sf_mask_bits(mask, j, cols, 64), xr + j / 64 * REC(qbits), xrow, nb, &st, acc, g0, g1);
    for (int b = 0; b < nb; b++) {
        __m512 s = acc[b];
        if (st.left < q->group_size) /* a group in progress */
            s = _mm512_fmadd_ps(_mm512_add_ps(g0[b], g1[b]), _mm512_set1_ps(st.s), s);
        out[b] = _mm512_reduce_add_ps(s);
    }
    return pos - pos0;
}

#define ROW(QB, NB)                                                                                                 \
    VNNI_TARGET static int64_t row##QB##_##NB(const sf_quant *q, const uint8_t *c, int64_t pos0, int64_t gstart,     \
                                              const uint8_t *mask, int64_t cols, const uint8_t *xr, int64_t xrow,  \
                                              float *out) {                                                        \
        return row(QB, q, c, pos0, gstart, mask, cols, xr, xrow, NB, out);                                         \
    }
ROW(8, 1) ROW(8, 2) ROW(8, 3) ROW(8, 4)
ROW(4, 1) ROW(4, 2) ROW(4, 3) ROW(4, 4)
const sf_qx_row_fn sf_qx512_rows[2][QX_GROUP] = {{row8_1, row8_2, row8_3, row8_4}, {row4_1, row4_2, row4_3, row4_4}};

#endif /* SF_X86 */
