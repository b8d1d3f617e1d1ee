/* RMSNorm of bf16 rows in one call: transformers' LlamaRMSNorm (and the many copies of it:
 * Mistral, Qwen2/3, Mixtral, ...) computes
 *     h = x (fp32);  r = 1 / sqrt(mean(h * h) + eps);  out = w * bf16(h * r)
 * in about seven tensor operations, each a dispatch of its own, where a decode step's row is a few
 * thousand numbers: on a slow CPU the dispatches, not the arithmetic, are the cost (tens of
 * microseconds a norm, 45 norms a token for a 22-layer model). This is the same arithmetic in one
 * pass per row: the squares summed in fp32 (in 16 partial sums: the order differs from torch's, so
 * the mean can differ in its last bits, and an output element by one bf16 step in rare cases),
 * sqrt and the division correctly rounded as torch's, each product rounded to bf16 (nearest even,
 * NaN to 0x7fc0, as torch) where torch rounds it.
 */
#include "sf_kernels.h"

#include <math.h>

void sf_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, int64_t rows, int64_t h, float eps, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * h;
        float part[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= h; j += 16)
            for (int k = 0; k < 16; k++) {
                float v = sf_bf16_to_f32(xr[j + k]);
                part[k] += v * v;
            }
        for (int k = 0; j < h; j++, k++) {
            float v = sf_bf16_to_f32(xr[j]);
            part[k] += v * v;
        }
        float s = 0.0f;
        for (int k = 0; k < 16; k++) s += part[k];
        float inv = 1.0f / sqrtf(s / (float)h + eps);
        uint16_t *o = out + r * h;
        for (j = 0; j < h; j++)
            o[j] = sf_f32_to_bf16(sf_bf16_to_f32(w[j]) * sf_bf16_to_f32(sf_f32_to_bf16(sf_bf16_to_f32(xr[j]) * inv)));
    }
}
