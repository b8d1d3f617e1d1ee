/* Fused sparse matvec of quantized values (docs/FORMAT.md, section 1b), AVX-512: dequantization
 * happens inside the expand + multiply-add loop, so a row's codes are read once, straight from the
 * format, and no dequantized row is ever written.
 *
 * Per 32 columns of a row (mask m, n = popcount(m) values, the next n codes):
 *   int8: vpexpandb places the n codes at the set bits of m (zeros elsewhere); they are widened to
 *         fp32 (vpmovsxbd, vcvtdq2ps), multiplied by their group's scale, and rounded to the matrix
 *         dtype (vcvtne2ps2bf16 / vcvtps2ph): exactly the reference's (code * s) rounded once.
 *   int4: a group has only 16 possible values, so on entering a group its table
 *         t[c] = round((c - zero) * s) (16 x 16-bit) is built once; the 32 nibbles are unpacked to
 *         16-bit indices, expanded to the set bits (vpexpandw) and looked up (vpermw, zeros at clear
 *         bits). One table lookup per 32 columns replaces the arithmetic.
 * The resulting 32 bf16 / fp16 weights go through the same multiply-add step as plain values
 * (sf_avx512.h: vdpbf16ps with bf16 x, else widen + FMA).
 *
 * Groups run over a row's non-zeros, so a group may end inside a 32-column step. There the step is
 * split by values: the lanes of the first k remaining values are pdep(2^k - 1, m); lanes after the
 * boundary take the next group's scale (int8: a per-lane scale vector) or table (int4: a second,
 * merging lookup). Any group size works; with the default 128 a boundary falls every few steps.
 * fp32 values (no 16-bit register form) and CPUs without AVX512_BF16 (bf16 values) get NULL from
 * sf_pick_qrow: the caller dequantizes each row into a scratch row first (matvec.c).
 */
#include "sf_avx512.h"

#if SF_X86

/* The group a walk over one row is in: its index, values left in it, and its scale or table. */
typedef struct {
    int64_t g, left;
    __m512 scale;  /* int8: the scale, broadcast */
    __m512i table; /* int4: words 0..15 = round((c - zero) * scale) for c = 0..15 */
} group_state;

AVX512_TARGET SF_INLINE void enter_group(int qbits, int mode, const sf_quant *q, int64_t g, group_state *st) {
    st->g = g;
    st->left = q->group_size;
    __m512 s = _mm512_set1_ps(_cvtsh_ss(q->scales[g]));
    if (qbits == 8) {
        st->scale = s;
        return;
    }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iota, _mm512_set1_epi32(q->zeros[g]))), s);
    __m256i t = mode == SF_MODE_F16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                    : (__m256i)_mm512_cvtneps_pbh(v);
    st->table = _mm512_zextsi256_si512(t);
}

/* Lanes of the first k set bits of m (k < popcount(m)). */
AVX512_TARGET SF_INLINE uint32_t first_bits(uint32_t m, int64_t k) {
    return k ? _pdep_u32((1u << k) - 1, m) : 0u;
}

/* The 32 codes from code index pos on, as 16-bit indices 0..15 in value order (int4). Reads at
 * most 17 bytes, never past the q->ncodes bytes of codes (a row's last steps copy what remains). */
AVX512_TARGET SF_INLINE __m512i nibbles32(const sf_quant *q, int64_t pos) {
    const uint8_t *p = q->codes + (pos >> 1);
    uint64_t lo, hi;
    uint8_t extra;
    if ((pos >> 1) + 17 <= q->ncodes) {
        memcpy(&lo, p, 8);
        memcpy(&hi, p + 8, 8);
        extra = p[16];
    } else {
        uint8_t buf[17] = {0};
        memcpy(buf, p, (size_t)(q->ncodes - (pos >> 1)));
        memcpy(&lo, buf, 8);
        memcpy(&hi, buf + 8, 8);
        extra = buf[16];
    }
    /* Start at the high nibble of the first byte when pos is odd: without a branch, which the
     * popcounts that move pos would make unpredictable (x << 1 << (63 - sh) is x << (64 - sh), 0 for sh 0). */
    const unsigned sh = (unsigned)(pos & 1) * 4;
    lo = (lo >> sh) | (hi << 1 << (63 - sh));
    hi = (hi >> sh) | ((uint64_t)extra << 1 << (63 - sh));
    /* byte j -> dword j; its low nibble to word 2j, its high nibble to word 2j + 1 */
    __m512i d = _mm512_cvtepu8_epi32(_mm_set_epi64x((long long)hi, (long long)lo));
    return _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0x0f)),
                           _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf0)), 12));
}

/* The 32 weights (16-bit, of the mode's dtype) under mask m, from code index *pos on; advances *pos
 * and the group state past them. */
AVX512_TARGET SF_INLINE __m512i qweights32(int qbits, int mode, const sf_quant *q, int64_t *pos, uint32_t m,
                                           group_state *st) {
    const int64_t n = _mm_popcnt_u32(m);
    if (qbits == 8) { /* dequantize the n codes in value order, then expand the 16-bit results */
        __m256i c = _mm256_maskz_loadu_epi8((__mmask32)_bzhi_u32(~0u, (unsigned)n), q->codes + *pos);
        __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
        __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
        __m512 s0 = st->scale, s1 = st->scale;
        int64_t k = 0; /* values of this step taken by the groups before the current one */
        while (n - k > st->left) { /* a group ends inside this step: value k + left on is the next */
            k += st->left;
            enter_group(qbits, mode, q, st->g + 1, st);
            uint32_t later = ~_bzhi_u32(~0u, (unsigned)k);
            s0 = _mm512_mask_mov_ps(s0, (__mmask16)later, st->scale);
            s1 = _mm512_mask_mov_ps(s1, (__mmask16)(later >> 16), st->scale);
        }
        st->left -= n - k;
        *pos += n;
        f0 = _mm512_mul_ps(f0, s0);
        f1 = _mm512_mul_ps(f1, s1);
        __m512i w;
        if (mode == SF_MODE_F16) {
            __m256i h0 = _mm512_cvtps_ph(f0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i h1 = _mm512_cvtps_ph(f1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            w = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
        } else {
            w = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
        }
        return _mm512_maskz_expand_epi16((__mmask32)m, w);
    }
    __m512i idx = _mm512_maskz_expand_epi16((__mmask32)m, nibbles32(q, *pos));
    __m512i w = _mm512_setzero_si512();
    uint32_t rest = m;
    while (_mm_popcnt_u32(rest) > st->left) {
        uint32_t first = first_bits(rest, st->left);
        w = _mm512_mask_permutexvar_epi16(w, (__mmask32)first, idx, st->table);
        rest &= ~first;
        enter_group(qbits, mode, q, st->g + 1, st);
    }
    w = _mm512_mask_permutexvar_epi16(w, (__mmask32)rest, idx, st->table);
    st->left -= _mm_popcnt_u32(rest);
    *pos += n;
    return w;
}

AVX512_TARGET SF_INLINE int64_t qrow(int qbits, int mode, const sf_quant *q, int64_t start, int64_t gstart,
                                  const uint8_t *mask, int64_t cols, const char *x, int xe, int64_t xs, int nb,
                                  float *acc) {
    __m512 a0[SF_GROUP], a1[SF_GROUP];
    for (int b = 0; b < nb; b++) a0[b] = a1[b] = _mm512_setzero_ps();
    group_state st = {0, INT64_MAX, _mm512_setzero_ps(), _mm512_setzero_si512()};
    if (gstart < q->nscales) enter_group(qbits, mode, q, gstart, &st); /* else: no values, no group */
    int64_t pos = start, j = 0;
    for (; j + 64 <= cols; j += 64) { /* two steps, alternating accumulators: two dependency chains */
        uint64_t m;
        memcpy(&m, mask + j / 8, 8);
        SF_PREFETCH(q->codes + (qbits == 8 ? pos : pos >> 1) + SF_PREFETCH_AHEAD);
        if (!(j & 511)) SF_PREFETCH(mask + j / 8 + SF_PREFETCH_AHEAD / 8);
        if (!m) continue;
        __m512i w = qweights32(qbits, mode, q, &pos, (uint32_t)m, &st);
        sf_mul32(mode, w, x + j * xe, xs, nb, a0, a1);
        w = qweights32(qbits, mode, q, &pos, (uint32_t)(m >> 32), &st);
        sf_mul32(mode, w, x + (j + 32) * xe, xs, nb, a1, a0);
    }
    for (; j < cols; j += 32) {
        __mmask32 m = sf_mask32(mask, j, cols);
        __m512i w = qweights32(qbits, mode, q, &pos, (uint32_t)m, &st);
        sf_mul32(mode, w, x + j * xe, xs, nb, a0, a1);
    }
    for (int b = 0; b < nb; b++) acc[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
    return pos - start;
}

/* One specialization per (qbits, mode, rows of x) so the loops above unroll with constants. */
#define QR(QB, MODE, XE, NB)                                                                                  \
    AVX512_TARGET static int64_t qr_##QB##_##MODE##_##NB(const sf_quant *q, int64_t start, int64_t gstart,      \
                                                         const uint8_t *mask, int64_t cols, const char *x,        \
                                                         int64_t xs, float *acc) {                                \
        return qrow(QB, MODE, q, start, gstart, mask, cols, x, XE, xs, NB, acc);                                   \
    }
#define QR4(QB, MODE, XE) QR(QB, MODE, XE, 1) QR(QB, MODE, XE, 2) QR(QB, MODE, XE, 3) QR(QB, MODE, XE, 4)
#define QR_MODES(QB) QR4(QB, SF_MODE_DOT_BF16, 2) QR4(QB, SF_MODE_BF16, 4) QR4(QB, SF_MODE_F16, 4)
QR_MODES(8)
QR_MODES(4)
#define QR_ROW(QB, MODE) {qr_##QB##_##MODE##_1, qr_##QB##_##MODE##_2, qr_##QB##_##MODE##_3, qr_##QB##_##MODE##_4}
static const sf_qrow_fn g_qrows[2][3][SF_GROUP] = {
    {QR_ROW(8, SF_MODE_DOT_BF16), QR_ROW(8, SF_MODE_BF16), QR_ROW(8, SF_MODE_F16)},
    {QR_ROW(4, SF_MODE_DOT_BF16), QR_ROW(4, SF_MODE_BF16), QR_ROW(4, SF_MODE_F16)},
};

sf_qrow_fn sf_pick_qrow(int qbits, int mode, int nb) {
    if (mode == SF_MODE_F32 || nb < 1 || nb > SF_GROUP || (qbits != 8 && qbits != 4)) return NULL;
    if (mode != SF_MODE_F16 && !__builtin_cpu_supports("avx512bf16")) return NULL; /* vcvt(ne2)ps2bf16 */
    if (!__builtin_cpu_supports("bmi2") || !__builtin_cpu_supports("f16c")) return NULL;
    return g_qrows[qbits == 4][mode][nb - 1];
}

#endif /* SF_X86 */
