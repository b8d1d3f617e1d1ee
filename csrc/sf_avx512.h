/* The AVX-512 multiply-add step shared by the fused matvec of plain values (matvec.c) and of
 * quantized values (matvec_q.c): 32 columns of one row of W, held in one register as 16-bit
 * values (bf16 or fp16, zeros at the columns without a value), times 32 columns of x.
 *
 * Modes, by W's dtype and x's:
 *   DOT_BF16: W bf16, x bf16 -> vdpbf16ps: the 32 products (exact in fp32) are summed pairwise
 *             into 16 fp32 lanes; one instruction per 32 columns. Needs AVX512_BF16. Like all
 *             AVX512_BF16 arithmetic it treats subnormal inputs as zero.
 *   BF16:     W bf16, x fp32 -> each bf16 is the top half of an fp32: interleaving zeros below
 *             (vpunpck{l,h}wd) widens 32 values to two fp32 vectors, in the lane order
 *             [0-3, 8-11, 16-19, 24-27] / [4-7, 12-15, 20-23, 28-31]; x is stored permuted to match.
 *   F16:      W fp16, x fp32 -> vcvtph2ps.
 *   F32:      W fp32, x fp32 (matvec.c only: two 16-lane expands, not this step).
 * x is a zero-padded copy (row stride xs = cols rounded up to 32), so the last, partial group needs
 * no masked loads: its missing weights are 0 and meet x = 0, never garbage (0 * NaN would be NaN).
 */
#ifndef SF_AVX512_H
#define SF_AVX512_H

#include "sf_kernels.h"

#if SF_X86
#include <immintrin.h>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,bmi2,f16c,popcnt")))
#define SF_INLINE static inline __attribute__((always_inline))
#define SF_GROUP 4 /* rows of x per pass over a row of W: 8 accumulators live in registers */

enum { SF_MODE_DOT_BF16, SF_MODE_BF16, SF_MODE_F16, SF_MODE_F32 };

/* acc0[b] (+ acc1[b], two-vector modes) += the 32 values in w times x[b][0..32), for nb rows of x
 * (row stride xs elements). */
AVX512_TARGET SF_INLINE void sf_mul32(int mode, __m512i w, const void *x, int64_t xs, int nb, __m512 *acc0,
                                      __m512 *acc1) {
    if (mode == SF_MODE_DOT_BF16) {
        for (int b = 0; b < nb; b++)
            acc0[b] = _mm512_dpbf16_ps(acc0[b], (__m512bh)w, (__m512bh)_mm512_loadu_si512((const uint16_t *)x + b * xs));
        return;
    }
    __m512 w0, w1;
    if (mode == SF_MODE_BF16) {
        const __m512i zero = _mm512_setzero_si512();
        w0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w));
        w1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w));
    } else {
        w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
        w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
    }
    for (int b = 0; b < nb; b++) {
        acc0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps((const float *)x + b * xs), acc0[b]);
        acc1[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps((const float *)x + b * xs + 16), acc1[b]);
    }
}

/* The mask of the 32 columns starting at column j of a row of `cols` (bits past cols cleared). */
SF_INLINE __mmask32 sf_mask32(const uint8_t *mask, int64_t j, int64_t cols) {
    return (__mmask32)sf_mask_bits(mask, j, cols, 32);
}

/* Fused matvec of one quantized row (matvec_q.c): acc[b] = dequant(W[row]) . x[b] for nb rows of the
 * padded x. The row's first value is `start`, its first group `gstart`; all checked by the caller,
 * who compares the returned number of values the mask made it read with the row's offsets. */
typedef int64_t (*sf_qrow_fn)(const sf_quant *q, int64_t start, int64_t gstart, const uint8_t *mask, int64_t cols,
                           const char *x, int64_t xs, float *acc);
/* The fused row function for (q's qbits, mode, nb rows of x), or NULL where there is none (fp32
 * values, or a CPU without AVX512_BF16 for bf16 values): the caller then dequantizes rows first. */
sf_qrow_fn sf_pick_qrow(int qbits, int mode, int nb);

#endif /* SF_X86 */
#endif
