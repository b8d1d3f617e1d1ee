/* Shared by the two fused matvecs with int8 activations: matvec_qx.c (the driver: row checks,
 * padded rows, int4 unpacking, threads; and the AVX2 rows) and matvec_qx512.c (the AVX-512 VNNI
 * rows). Both quantize x the same way and compute the same integers; see matvec_qx.c. */
#ifndef SF_QX_H
#define SF_QX_H

#include "sf_kernels.h"

#include <math.h>

#define QX_BLOCK 32 /* columns of x per activation scale */
#define QX_GROUP 4  /* rows of x per pass over a row of W */

/* v[0..QX_BLOCK) (zeros past the end of x's row) -> xq, returns the block's d:
 * d = max|v| / 127, xq = round_half_even(v / d) in [-127, 127] (0 where d == 0); NaN for a block
 * holding Inf or NaN (its products, and so the row's result, are NaN). */
static inline float sf_qx_quantize_block(const float *v, int8_t *xq) {
    float amax = 0.0f;
    int finite = 1;
    for (int i = 0; i < QX_BLOCK; i++) {
        float a = fabsf(v[i]);
        if (!(a <= 3.4028234663852886e38f)) finite = 0; /* Inf or NaN */
        else if (a > amax) amax = a;
    }
    float d = finite ? amax / 127.0f : NAN;
    for (int i = 0; i < QX_BLOCK; i++) {
        float r = finite && d > 0.0f ? nearbyintf(v[i] / d) : 0.0f; /* default mode: half to even */
        xq[i] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r);
    }
    return d;
}

/* Block k of row b of x (fp32 or bf16 [batch, cols]) as fp32, zeros past cols. */
static inline void sf_qx_load_block(const void *x, int x_dtype, int64_t cols, int64_t b, int64_t k, float *v) {
    for (int64_t i = 0, j = k * QX_BLOCK; i < QX_BLOCK; i++, j++)
        v[i] = j >= cols ? 0.0f
               : x_dtype == SF_BF16 ? sf_bf16_to_f32(((const uint16_t *)x)[b * cols + j])
                                    : ((const float *)x)[b * cols + j];
}

/* One row of W times nb rows of quantized x (records at xr, rows xrow bytes apart) into out[nb].
 * c: the row's int8 weights (codes, or an int4 row unpacked minus its zero points), value index
 * pos0 its first; reads stay within cols + 64 values of it. Returns the values its mask consumed. */
typedef int64_t (*sf_qx_row_fn)(const sf_quant *q, const uint8_t *c, int64_t pos0, int64_t gstart,
                                const uint8_t *mask, int64_t cols, const uint8_t *xr, int64_t xrow, float *out);

#if SF_X86
/* The AVX-512 rows (matvec_qx512.c): whether this CPU runs them (AVX512 F/BW/VL/VBMI/VBMI2/VNNI), its tables, the
 * bytes of one row of x's records there, x's records, and the row functions for [int8, int4] and
 * nb = 1..QX_GROUP. These read int4 rows packed: c is then the row's packed codes from the byte
 * holding its first nibble, pos0 that nibble's parity, and the values' group's zero points are
 * taken off inside (not an unpacked row, as on AVX2). */
int sf_qx512_supported(void);
void sf_init_qx512_tables(void);
int64_t sf_qx512_xrow(int qbits, int64_t cols);
void sf_qx512_quantize(int qbits, const void *x, int x_dtype, int64_t batch, int64_t cols, uint8_t *rec);
extern const sf_qx_row_fn sf_qx512_rows[2][QX_GROUP];
#endif

#endif
