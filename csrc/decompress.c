/* Bitmap -> dense decompression: one row decoder per code path, and the row-parallel driver.
 *
 * Paths (chosen at run time by the caller, see sf_supported_paths):
 *   AVX-512  VBMI2 vpexpandw (16-bit values) / AVX-512F vpexpandd (32-bit): the expand instructions
 *            place packed values at the set bits of a mask register, which is exactly this format's
 *            decode: 32 (16-bit) or 16 (32-bit) columns per instruction.
 *   AVX2     no expand instruction: a 256-entry table maps one mask byte to a byte shuffle (pshufb,
 *            16-bit) or lane permutation (vpermd, 32-bit) that spreads 8 packed values over 8 columns.
 *   C        portable: zero the row, then store each value at the position of its set bit.
 * x86-only code is compiled per function with target attributes, so this file builds with any
 * x86-64 gcc/clang without -march flags, and on other architectures with just the C path.
 */
#include "sf_kernels.h"

#include <string.h>

#if SF_X86
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* CPU features and bit counting                                                              */

#if SF_X86
static int g_has_popcnt = 0;
#endif

int sf_supported_paths(void) {
    int paths = 1 << SF_PATH_C;
#if SF_X86
    __builtin_cpu_init();
    g_has_popcnt = __builtin_cpu_supports("popcnt");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        g_has_popcnt)
        paths |= 1 << SF_PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vbmi2") && g_has_popcnt)
        paths |= 1 << SF_PATH_AVX512;
#endif
    return paths;
}

/* Mask of the valid bits of the last byte of a row (cols % 8 of them, or all 8). */
static inline uint8_t tail_bits(int64_t cols) { return (cols & 7) ? (uint8_t)((1u << (cols & 7)) - 1) : 0xff; }

static size_t count_row_generic(const uint8_t *mask, int64_t cols) {
    int64_t nbytes = (cols + 7) / 8;
    size_t n = 0;
    int64_t k = 0;
    for (; k + 8 <= nbytes - 1; k += 8) {  /* whole words, never the last byte */
        uint64_t w;
        memcpy(&w, mask + k, 8);
        n += (size_t)__builtin_popcountll(w);
    }
    for (; k < nbytes - 1; k++) n += (size_t)__builtin_popcount(mask[k]);
    if (nbytes) n += (size_t)__builtin_popcount(mask[nbytes - 1] & tail_bits(cols));
    return n;
}

#if SF_X86
__attribute__((target("popcnt"))) static size_t count_row_popcnt(const uint8_t *mask, int64_t cols) {
    int64_t nbytes = (cols + 7) / 8;
    size_t n = 0;
    int64_t k = 0;
    for (; k + 8 <= nbytes - 1; k += 8) {
        uint64_t w;
        memcpy(&w, mask + k, 8);
        n += (size_t)_mm_popcnt_u64(w);
    }
    for (; k < nbytes - 1; k++) n += (size_t)_mm_popcnt_u32(mask[k]);
    if (nbytes) n += (size_t)_mm_popcnt_u32(mask[nbytes - 1] & tail_bits(cols));
    return n;
}
#endif

int sf_row_span(int64_t r, int64_t rows, int64_t cols, int64_t nnz, const uint8_t *mask_row,
                const int64_t *row_offsets, int64_t *start) {
    int64_t s, e;
    memcpy(&s, row_offsets + r, 8);
    if (r + 1 < rows) memcpy(&e, row_offsets + r + 1, 8);
    else e = nnz;
    if ((r == 0 && s != 0) || s < 0 || e < s || e > nnz) return 0;
#if SF_X86
    size_t n = g_has_popcnt ? count_row_popcnt(mask_row, cols) : count_row_generic(mask_row, cols);
#else
    size_t n = count_row_generic(mask_row, cols);
#endif
    if ((int64_t)n != e - s) return 0;
    *start = s;
    return 1;
}

int sf_row_span_deferred(int64_t r, int64_t rows, int64_t cols, int64_t reach, int64_t nnz, const uint8_t *mask_row,
                         const int64_t *row_offsets, int64_t *start, int64_t *n) {
    int64_t s, e;
    memcpy(&s, row_offsets + r, 8);
    if (r + 1 < rows) memcpy(&e, row_offsets + r + 1, 8);
    else e = nnz;
    if ((r == 0 && s != 0) || s < 0 || e < s || e > nnz || e - s > cols) return SF_SPAN_BAD;
    *start = s;
    *n = e - s;
    if (reach <= nnz - s) return SF_SPAN_DEFERRED;
    return sf_row_span(r, rows, cols, nnz, mask_row, row_offsets, start) ? SF_SPAN_CHECKED : SF_SPAN_BAD;
}

int sf_threads_for(int threads, int64_t rows, int64_t bytes) {
    /* Below ~256 KiB per thread, starting a thread costs more than it saves. */
    int64_t t = bytes / (256 * 1024);
    if (t > threads) t = threads;
    if (t > rows) t = rows;
    return t < 1 ? 1 : (int)t;
}

/* ------------------------------------------------------------------------------------------ */
/* Portable C                                                                                 */

#define DEFINE_ROW_C(NAME, T)                                                                      \
    static size_t NAME(const void *src_, const void *src_end, const uint8_t *mask, int64_t cols,   \
                       void *out_) {                                                               \
        (void)src_end;                                                                             \
        const T *src = (const T *)src_;                                                            \
        const T *const src0 = src;                                                                 \
        T *out = (T *)out_;                                                                        \
        memset(out, 0, (size_t)cols * sizeof(T));                                                  \
        int64_t nbytes = (cols + 7) / 8;                                                           \
        for (int64_t k = 0; k < nbytes; k++) {                                                     \
            unsigned b = mask[k];                                                                  \
            if (k == nbytes - 1) b &= tail_bits(cols);                                             \
            while (b) { /* one iteration per set bit: position = count of trailing zeros */       \
                T v;                                                                               \
                memcpy(&v, src++, sizeof(T));                                                      \
                memcpy(out + 8 * k + __builtin_ctz(b), &v, sizeof(T));                             \
                b &= b - 1;                                                                        \
            }                                                                                      \
        }                                                                                          \
        return (size_t)(src - src0);                                                               \
    }
DEFINE_ROW_C(row16_c, uint16_t)
DEFINE_ROW_C(row32_c, uint32_t)

#if SF_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX-512                                                                                    */

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt")))

/* Load n <= 8 mask bytes as a little-endian word (bit j = column j). */
static inline uint64_t load_bits(const uint8_t *p, int64_t n) {
    uint64_t w = 0;
    memcpy(&w, p, (size_t)n);
    return w;
}

AVX512_TARGET static size_t row16_avx512(const void *src_, const void *src_end, const uint8_t *mask, int64_t cols,
                                         void *out_) {
    const uint16_t *src = (const uint16_t *)src_, *const src0 = src;
    (void)src_end; /* expand-loads read exactly popcount(mask) elements: never past the row */
    uint16_t *out = (uint16_t *)out_;
    int64_t j = 0;
    for (; j + 64 <= cols; j += 64) { /* 64 columns = 8 mask bytes = two 32-lane expands */
        uint64_t m;
        memcpy(&m, mask + j / 8, 8);
        SF_PREFETCH((const char *)src + SF_PREFETCH_AHEAD);
        SF_PREFETCH((const char *)src + SF_PREFETCH_AHEAD + 64);
        __mmask32 lo = (__mmask32)m, hi = (__mmask32)(m >> 32);
        __m512i a = _mm512_maskz_expandloadu_epi16(lo, src);
        src += _mm_popcnt_u32(lo);
        __m512i b = _mm512_maskz_expandloadu_epi16(hi, src);
        src += _mm_popcnt_u32(hi);
        _mm512_storeu_si512((void *)(out + j), a);
        _mm512_storeu_si512((void *)(out + j + 32), b);
    }
    for (; j < cols; j += 32) { /* tail: fewer than 64 columns, 32 at a time */
        int64_t n = cols - j < 32 ? cols - j : 32;
        __mmask32 valid = n == 32 ? 0xffffffffu : (__mmask32)((1u << n) - 1);
        __mmask32 m = (__mmask32)load_bits(mask + j / 8, (n + 7) / 8) & valid;
        __m512i a = _mm512_maskz_expandloadu_epi16(m, src);
        src += _mm_popcnt_u32(m);
        _mm512_mask_storeu_epi16(out + j, valid, a);
    }
    return (size_t)(src - src0);
}

AVX512_TARGET static size_t row32_avx512(const void *src_, const void *src_end, const uint8_t *mask, int64_t cols,
                                         void *out_) {
    (void)src_end;
    const uint32_t *src = (const uint32_t *)src_, *const src0 = src;
    uint32_t *out = (uint32_t *)out_;
    int64_t j = 0;
    for (; j + 64 <= cols; j += 64) { /* 64 columns = four 16-lane expands */
        uint64_t m;
        memcpy(&m, mask + j / 8, 8);
        for (int q = 0; q < 4; q++) {
            __mmask16 k = (__mmask16)(m >> (16 * q));
            __m512i a = _mm512_maskz_expandloadu_epi32(k, src);
            src += _mm_popcnt_u32(k);
            _mm512_storeu_si512((void *)(out + j + 16 * q), a);
        }
    }
    for (; j < cols; j += 16) {
        int64_t n = cols - j < 16 ? cols - j : 16;
        __mmask16 valid = (__mmask16)((1u << n) - 1);
        __mmask16 m = (__mmask16)load_bits(mask + j / 8, (n + 7) / 8) & valid;
        __m512i a = _mm512_maskz_expandloadu_epi32(m, src);
        src += _mm_popcnt_u32(m);
        _mm512_mask_storeu_epi32(out + j, valid, a);
    }
    return (size_t)(src - src0);
}

/* ------------------------------------------------------------------------------------------ */
/* AVX2                                                                                       */

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt")))

/* g_shuf16[m]: pshufb control placing the packed 16-bit values of mask byte m at their columns
 * (0x80 = write zero). g_perm32[m]: vpermd lane index of each column (0 where the bit is clear;
 * those lanes are zeroed separately). */
static uint8_t g_shuf16[256][16];
static uint8_t g_perm32[256][8];
static int g_tables_ready = 0;

void sf_init_tables(void) {
    if (g_tables_ready) return;
    for (int m = 0; m < 256; m++) {
        int idx = 0;
        for (int k = 0; k < 8; k++) {
            if (m & (1 << k)) {
                g_shuf16[m][2 * k] = (uint8_t)(2 * idx);
                g_shuf16[m][2 * k + 1] = (uint8_t)(2 * idx + 1);
                g_perm32[m][k] = (uint8_t)idx;
                idx++;
            } else {
                g_shuf16[m][2 * k] = g_shuf16[m][2 * k + 1] = 0x80;
                g_perm32[m][k] = 0;
            }
        }
    }
    sf_init_avx2_tables();
    sf_init_qx_tables();
    g_tables_ready = 1;
}

AVX2_TARGET static size_t row16_avx2(const void *src_, const void *src_end, const uint8_t *mask, int64_t cols,
                                     void *out_) {
    const uint16_t *src = (const uint16_t *)src_, *const src0 = src;
    const uint16_t *const end = (const uint16_t *)src_end;
    uint16_t *out = (uint16_t *)out_;
    int64_t j = 0;
    /* 16 columns per step: two 16-byte loads (8 values each, only popcount used) while both stay
     * inside `values`; the rest of the row goes through the scalar loop below. */
    for (; j + 16 <= cols && end - src >= 16; j += 16) {
        if (!(j & 31)) SF_PREFETCH((const char *)src + SF_PREFETCH_AHEAD);
        unsigned m0 = mask[j / 8], m1 = mask[j / 8 + 1];
        const uint16_t *s1 = src + _mm_popcnt_u32(m0);
        __m256i v = _mm256_loadu2_m128i((const __m128i *)s1, (const __m128i *)src);
        __m256i ctl = _mm256_loadu2_m128i((const __m128i *)g_shuf16[m1], (const __m128i *)g_shuf16[m0]);
        _mm256_storeu_si256((__m256i *)(out + j), _mm256_shuffle_epi8(v, ctl));
        src = s1 + _mm_popcnt_u32(m1);
    }
    src += row16_c(src, end, mask + j / 8, cols - j, out + j);
    return (size_t)(src - src0);
}

AVX2_TARGET static size_t row32_avx2(const void *src_, const void *src_end, const uint8_t *mask, int64_t cols,
                                     void *out_) {
    const uint32_t *src = (const uint32_t *)src_, *const src0 = src;
    const uint32_t *const end = (const uint32_t *)src_end;
    uint32_t *out = (uint32_t *)out_;
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    int64_t j = 0;
    for (; j + 8 <= cols && end - src >= 8; j += 8) { /* 8 columns = one mask byte = one 32-byte load */
        unsigned m = mask[j / 8];
        __m256i v = _mm256_loadu_si256((const __m256i *)src);
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)g_perm32[m]));
        __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bits), bits);
        _mm256_storeu_si256((__m256i *)(out + j), _mm256_and_si256(_mm256_permutevar8x32_epi32(v, idx), set));
        src += _mm_popcnt_u32(m);
    }
    src += row32_c(src, end, mask + j / 8, cols - j, out + j);
    return (size_t)(src - src0);
}
#else
void sf_init_tables(void) {}
#endif /* SF_X86 */

sf_row_decoder sf_pick_row_decoder(int path, int elem_size) {
#if SF_X86
    if (path == SF_PATH_AVX512) return elem_size == 2 ? row16_avx512 : row32_avx512;
    if (path == SF_PATH_AVX2) return elem_size == 2 ? row16_avx2 : row32_avx2;
#else
    (void)path;
#endif
    return elem_size == 2 ? row16_c : row32_c;
}

/* ------------------------------------------------------------------------------------------ */
/* Driver                                                                                     */

int64_t sf_decompress(int path, int elem_size, int64_t rows, int64_t cols, const void *values, int64_t nnz,
                      const uint8_t *bitmask, const int64_t *row_offsets, void *out, int threads) {
    sf_row_decoder decode_row = sf_pick_row_decoder(path, elem_size);
    const int64_t mask_stride = (cols + 7) / 8;
    const char *vals = (const char *)values, *vals_end = vals + nnz * elem_size;
    int nt = sf_threads_for(threads, rows, rows * cols * elem_size);
    int64_t bad = -1;
    /* Rows are independent: each thread writes a contiguous band of the output. */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *m = bitmask + r * mask_stride;
        char *o = (char *)out + r * cols * elem_size;
        int64_t start;
        if (!sf_row_span(r, rows, cols, nnz, m, row_offsets, &start)) {
            memset(o, 0, (size_t)(cols * elem_size));
#pragma omp atomic write
            bad = r;
            continue;
        }
        decode_row(vals + start * elem_size, vals_end, m, cols, o);
    }
    return bad;
}
