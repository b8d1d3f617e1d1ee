/* Quantized bitmap -> dense, dequantizing on the way (docs/FORMAT.md, section 1b).
 *
 * A row is produced in chunks of CHUNK columns. For each chunk, the run of its packed codes is
 * dequantized into an L1-resident scratch array of the output dtype — (code - zero) * scale in
 * fp32, one group (one broadcast scale) at a time, then rounded to bf16 / fp16 / fp32 — and the
 * chunk's columns are expanded from that scratch by the same row decoders as plain decompression
 * (decompress.c: vpexpandw, pshufb tables, or scalar). The dense output is written once, with no
 * dense intermediate; the scratch never leaves L1.
 *
 * Value i of a row starting at value s is in group group_offsets[r] + (i - s) / G (G = group_size,
 * or cols when it is 0) and its code is codes[i] (int8) or nibble i & 1 of byte i / 2 (int4, low
 * nibble first). (code - zero) is an integer of at most 8 bits and scale an fp16, so their product
 * is exact in fp32; the only rounding is the final one to the output dtype (round to nearest even),
 * which therefore matches torch's `.to(dtype)` bit for bit.
 */
#include "sf_kernels.h"

#include <string.h>

#if SF_X86
#include <immintrin.h>
#endif

#define CHUNK 1024 /* columns per chunk: the scratch is at most 4 KiB (fp32) */

/* ------------------------------------------------------------------------------------------ */
/* Scalar conversions                                                                          */


static uint16_t f2bf(float f) { /* round to nearest even (inputs are finite here) */
    uint32_t x;
    memcpy(&x, &f, 4);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static uint16_t f2h(float f) { /* IEEE binary32 -> binary16, round to nearest even, subnormals, overflow */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;      /* NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00;     /* >= 65520: Inf */
    if (ax < 0x38800000u) {                          /* below 2**-14: fp16 subnormal (or zero) */
        if (ax < 0x33000000u) return sign;           /* <= 2**-25 (a tie at it goes to 0, even) */
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        int shift = (int)(126 - e);                  /* value in units of 2**-24 = m >> shift */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return sign | (uint16_t)r;
    }
    uint32_t r = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu; /* rebias the exponent by 127 - 15 */
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;       /* a carry into the exponent is right */
    return sign | (uint16_t)r;
}

static inline int code_at(int qbits, const uint8_t *codes, int64_t i) {
    return qbits == 8 ? (int)(int8_t)codes[i] : (codes[i >> 1] >> ((i & 1) * 4)) & 0xf;
}

/* dst[0..n) = round_out((code(i0 + k) - zero) * scale): one run inside one group. */
typedef void (*span_fn)(int qbits, const uint8_t *codes, int64_t i0, int64_t n, int zero, float scale,
                        int out_dtype, void *dst);

static void span_c(int qbits, const uint8_t *codes, int64_t i0, int64_t n, int zero, float scale, int out_dtype,
                   void *dst) {
    for (int64_t k = 0; k < n; k++) {
        float f = (float)(code_at(qbits, codes, i0 + k) - zero) * scale;
        if (out_dtype == SF_F32) ((float *)dst)[k] = f;
        else if (out_dtype == SF_BF16) ((uint16_t *)dst)[k] = f2bf(f);
        else ((uint16_t *)dst)[k] = f2h(f);
    }
}

#if SF_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2: 8 values per step                                                                     */

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt")))

AVX2_TARGET static void span_avx2(int qbits, const uint8_t *codes, int64_t i0, int64_t n, int zero, float scale,
                                  int out_dtype, void *dst) {
    int64_t k = 0;
    if (qbits == 4 && (i0 & 1) && n) { /* start on a byte boundary */
        span_c(qbits, codes, i0, 1, zero, scale, out_dtype, dst);
        k = 1;
    }
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256i vz = _mm256_set1_epi32(zero);
    const size_t es = out_dtype == SF_F32 ? 4 : 2;
    for (; k + 8 <= n; k += 8) {
        int64_t i = i0 + k;
        __m256i q;
        if (qbits == 8) {
            long long b;
            memcpy(&b, codes + i, 8);
            q = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b));
        } else { /* 4 bytes = 8 nibbles, low nibble first */
            int b;
            memcpy(&b, codes + (i >> 1), 4);
            __m128i by = _mm_cvtsi32_si128(b), lo = _mm_and_si128(by, _mm_set1_epi8(0x0f));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(by, 4), _mm_set1_epi8(0x0f));
            q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), vz);
        }
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(q), vs);
        char *o = (char *)dst + k * es;
        if (out_dtype == SF_F32) {
            _mm256_storeu_ps((float *)o, f);
        } else if (out_dtype == SF_F16) {
            _mm_storeu_si128((__m128i *)o, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else {
            __m256i x = _mm256_castps_si256(f);
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
            x = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
            x = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0x08); /* words 0-3 | 4-7 into the low half */
            _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(x));
        }
    }
    if (k < n) span_c(qbits, codes, i0 + k, n - k, zero, scale, out_dtype, (char *)dst + k * es);
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512: 16 values per step                                                                 */

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))

AVX512_TARGET static void span_avx512(int qbits, const uint8_t *codes, int64_t i0, int64_t n, int zero, float scale,
                                      int out_dtype, void *dst) {
    int64_t k = 0;
    if (qbits == 4 && (i0 & 1) && n) {
        span_c(qbits, codes, i0, 1, zero, scale, out_dtype, dst);
        k = 1;
    }
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512i vz = _mm512_set1_epi32(zero);
    const size_t es = out_dtype == SF_F32 ? 4 : 2;
    for (; k < n; k += 16) {
        int64_t i = i0 + k, m = n - k < 16 ? n - k : 16;
        __mmask16 valid = (__mmask16)((1u << m) - 1);
        __m512i q;
        if (qbits == 8) { /* masked load: never past the run */
            q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(valid, codes + i));
        } else { /* (m + 1) / 2 bytes hold the m nibbles */
            __m128i by = _mm_maskz_loadu_epi8((__mmask16)((1u << ((m + 1) / 2)) - 1), codes + (i >> 1));
            __m128i lo = _mm_and_si128(by, _mm_set1_epi8(0x0f));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(by, 4), _mm_set1_epi8(0x0f));
            q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), vz);
        }
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(q), vs);
        char *o = (char *)dst + k * es;
        if (out_dtype == SF_F32) {
            _mm512_mask_storeu_ps(o, valid, f);
        } else if (out_dtype == SF_F16) {
            _mm256_mask_storeu_epi16(o, valid, _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else {
            __m512i x = _mm512_castps_si512(f);
            __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
            x = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
            _mm256_mask_storeu_epi16(o, valid, _mm512_cvtepi32_epi16(x));
        }
    }
}
#endif /* SF_X86 */

static span_fn pick_span(int path) {
#if SF_X86
    if (path == SF_PATH_AVX512) return span_avx512;
    if (path == SF_PATH_AVX2) return span_avx2;
#else
    (void)path;
#endif
    return span_c;
}

/* Dequantize values [a, b) of a row (its first value is `start`, its first group `gstart`) into
 * dst, splitting the run at group boundaries. */
static void dequant_run(span_fn span, const sf_quant *q, int64_t start, int64_t gstart, int64_t a, int64_t b,
                        int out_dtype, void *dst) {
    const size_t es = out_dtype == SF_F32 ? 4 : 2;
    while (a < b) {
        int64_t k = a - start, g = k / q->group_size;
        int64_t e = start + (g + 1) * q->group_size;
        if (e > b) e = b;
        float scale = sf_f16_to_f32(q->scales[gstart + g]);
        int zero = q->zeros ? q->zeros[gstart + g] : 0;
        span(q->qbits, q->codes, a, e - a, zero, scale, out_dtype, dst);
        dst = (char *)dst + (e - a) * es;
        a = e;
    }
}

int sf_quant_row_ok(const sf_quant *q, int64_t r, int64_t start, int64_t n) {
    (void)start;
    int64_t gstart;
    memcpy(&gstart, q->group_offsets + r, 8);
    if (gstart < 0 || gstart > q->nscales || n < 0) return 0;
    /* ceil(n / G) groups fit the avail scales left, without a division (once a row in every kernel):
     * n <= avail * G, and where that product overflows it is far above any n */
    int64_t avail = q->nscales - gstart, cap;
    return avail >= n || __builtin_mul_overflow(avail, q->group_size, &cap) || n <= cap;
}

void sf_dequant_row(int path, const sf_quant *q, int64_t r, int64_t start, int64_t n, int out_dtype, void *dst) {
    int64_t gstart;
    memcpy(&gstart, q->group_offsets + r, 8);
    dequant_run(pick_span(path), q, start, gstart, start, start + n, out_dtype, dst);
}

/* Set bits among the first `cols` columns of a row's mask (cols <= CHUNK, a multiple of 8 unless
 * it is the end of the row). */
static int64_t chunk_count(const uint8_t *mask, int64_t cols) {
    int64_t nbytes = (cols + 7) / 8, n = 0;
    for (int64_t k = 0; k < nbytes; k++) {
        unsigned b = mask[k];
        if (k == nbytes - 1 && (cols & 7)) b &= (1u << (cols & 7)) - 1;
        n += __builtin_popcount(b);
    }
    return n;
}

int64_t sf_decompress_q(int path, const sf_quant *q, int out_dtype, int64_t rows, int64_t cols, int64_t nnz,
                        const uint8_t *bitmask, const int64_t *row_offsets, void *out, int threads) {
    const int es = out_dtype == SF_F32 ? 4 : 2;
    sf_row_decoder decode_row = sf_pick_row_decoder(path, es);
    span_fn span = pick_span(path);
    const int64_t mask_stride = (cols + 7) / 8;
    int nt = sf_threads_for(threads, rows, rows * cols * es);
    int64_t bad = -1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint32_t scratch[CHUNK]; /* CHUNK dequantized values of the output dtype */
        const uint8_t *m = bitmask + r * mask_stride;
        char *o = (char *)out + r * cols * es;
        int64_t start, gstart;
        int ok = sf_row_span(r, rows, cols, nnz, m, row_offsets, &start);
        int64_t end = nnz;
        if (r + 1 < rows) memcpy(&end, row_offsets + r + 1, 8);
        if (!ok || !sf_quant_row_ok(q, r, start, end - start)) {
            memset(o, 0, (size_t)(cols * es));
#pragma omp atomic write
            bad = r;
            continue;
        }
        memcpy(&gstart, q->group_offsets + r, 8);
        int64_t a = start;
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t nc = cols - c0 < CHUNK ? cols - c0 : CHUNK;
            int64_t n = chunk_count(m + c0 / 8, nc);
            dequant_run(span, q, start, gstart, a, a + n, out_dtype, scratch);
            decode_row(scratch, (const char *)scratch + n * es, m + c0 / 8, nc, o + c0 * es);
            a += n;
        }
    }
    return bad;
}
