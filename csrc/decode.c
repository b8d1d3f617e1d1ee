/* The pieces of a Llama-family decode step between the matrix products, on bf16 rows.
 *
 * At a decode step a layer's rows are a few thousand numbers, and transformers spends more time
 * dispatching the tensor operations around its seven matrix products (rotary embedding, the
 * cache's attention, SiLU times up, residual adds: about a hundred operations a layer) than
 * computing them. runtime/decode_layer.py calls these instead, one call per piece, each with
 * transformers' own arithmetic where it rounds (the attention itself stays torch's SDPA):
 *
 *   rope       q * cos + rotate_half(q) * sin: each product and the sum rounded to bf16, as torch
 *              computes the four bf16 operations (bit-exact).
 *   silu_mul   bf16(bf16(silu(g)) * u): torch's silu (fp32, x / (1 + exp(-x))) then its bf16 product.
 *   add        bf16(a + b) (bit-exact).
 *   round      the fp32 rows of a matvec (+ a bf16 bias) to bf16, as y.to(bf16) after y += bias.
 *
 * Every address and size is checked by the caller (sparseferry/kernels/native.py).
 */
#include "sf_kernels.h"

#include <math.h>

#define HD_MAX 512 /* head sizes up to this are handled on the stack */

/* The loops below are compiled for AVX-512, AVX2 + FMA and baseline x86-64, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SF_CLONES
#endif

/* e^x in fp32 without a branch or a libm call, so that loops of it vectorize: x = n ln2 + r with
 * |r| <= ln2 / 2 (ln2 in two parts), e^r by its degree-6 Taylor polynomial (relative error ~2e-7,
 * about 1-2 ulp, below the bf16 step every caller rounds to), times 2^n built in the exponent
 * bits. Below -87.3 it gives 0 and above 88.7 inf, as expf; NaN stays NaN. */
static inline float sf_expf(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    xc = xc > 88.7f ? 88.7f : xc;
    float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f + r * (8.33333377e-3f
                                                                                        + r * 1.38888892e-3f)))));
    int32_t ni = (int32_t)n, hi = ni > 0; /* 2^n as 2^(n - hi) * 2^hi: n runs from -126 to 128 */
    int32_t b1 = (ni - hi + 127) << 23, b2 = (hi + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    float e = p * s1 * s2;
    e = x < -87.3f ? 0.0f : e;
    e = x > 88.7f ? __builtin_inff() : e;
    return x != x ? x : e;
}

SF_CLONES void sf_rope_bf16(uint16_t *x, int64_t b, int64_t t, int64_t heads, int64_t hd, const uint16_t *cos,
                  const uint16_t *sin, int64_t cos_batch) {
    int64_t half = hd / 2;
    float row[HD_MAX];
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t ti = 0; ti < t; ti++) {
            int64_t cr = (cos_batch == 1 ? 0 : bi) * t + ti;
            const uint16_t *c = cos + cr * hd, *s = sin + cr * hd;
            for (int64_t h = 0; h < heads; h++) {
                uint16_t *xh = x + ((bi * t + ti) * heads + h) * hd;
                for (int64_t d = 0; d < hd; d++) row[d] = sf_bf16_to_f32(xh[d]);
                for (int64_t d = 0; d < hd; d++) {
                    float rot = d < half ? -row[d + half] : row[d - half];
                    float a = sf_bf16_to_f32(sf_f32_to_bf16(row[d] * sf_bf16_to_f32(c[d])));
                    float r = sf_bf16_to_f32(sf_f32_to_bf16(rot * sf_bf16_to_f32(s[d])));
                    xh[d] = sf_f32_to_bf16(a + r);
                }
            }
        }
}

SF_CLONES void sf_silu_mul_bf16(const uint16_t *g, const uint16_t *u, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        float x = sf_bf16_to_f32(g[i]);
        float a = sf_bf16_to_f32(sf_f32_to_bf16(x / (1.0f + sf_expf(-x))));
        out[i] = sf_f32_to_bf16(a * sf_bf16_to_f32(u[i]));
    }
}

SF_CLONES void sf_add_bf16(const uint16_t *a, const uint16_t *b, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = sf_f32_to_bf16(sf_bf16_to_f32(a[i]) + sf_bf16_to_f32(b[i]));
}

SF_CLONES void sf_round_bf16(const float *y, int64_t batch, int64_t rows, const uint16_t *bias, uint16_t *out) {
    for (int64_t r = 0; r < batch; r++) {
        const float *yr = y + r * rows;
        uint16_t *o = out + r * rows;
        if (bias)
            for (int64_t i = 0; i < rows; i++) o[i] = sf_f32_to_bf16(yr[i] + sf_bf16_to_f32(bias[i]));
        else
            for (int64_t i = 0; i < rows; i++) o[i] = sf_f32_to_bf16(yr[i]);
    }
}
