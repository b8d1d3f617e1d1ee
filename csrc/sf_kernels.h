/* Native kernels for the bitmap sparse format (docs/FORMAT.md, section 1).
 *
 * One matrix W[rows, cols] is given as
 *   values:      [nnz] packed non-zeros, row-major, element size 2 (bf16/fp16) or 4 (fp32)
 *   bitmask:     [rows, ceil(cols/8)] uint8, bit j%8 of byte j/8 of row r = (W[r, j] != 0)
 *   row_offsets: [rows] int64, index in values of the first value of row r
 * Pointers need only the alignment of their element type, or none at all: every load is unaligned.
 *
 * Each kernel checks, per row, that row_offsets is consistent with the bitmask before reading any
 * value (row_offsets[0] == 0, each row's set-bit count == its span in values, the last row ends at
 * nnz), so a corrupt matrix never reads outside `values`. A bad row is left zero (decompress) or
 * gives 0 (matvec), and the kernel returns its index; -1 means all rows were consistent.
 * Bits of the last byte of a row past `cols` are ignored, as the reference decode does.
 */
#ifndef SF_KERNELS_H
#define SF_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* x86-64 vector paths; elsewhere (or with -DSF_PORTABLE_ONLY, to check that build) just the C path. */
#if defined(__x86_64__) && !defined(SF_PORTABLE_ONLY)
#define SF_X86 1
#else
#define SF_X86 0
#endif

/* Code paths; the numbers are the ones the Python wrapper passes. */
enum sf_path { SF_PATH_C = 0, SF_PATH_AVX2 = 1, SF_PATH_AVX512 = 2 };
/* Value dtypes for the matvec (decompression only needs the element size). */
enum sf_dtype { SF_F32 = 0, SF_BF16 = 1, SF_F16 = 2 };

/* Which paths this CPU can run: bit (1 << path) set when supported. SF_PATH_C is always set. */
int sf_supported_paths(void);

/* Build the shuffle tables of the AVX2 path (idempotent, called once at module import). */
void sf_init_tables(void);

/* out[rows, cols] (dense, row-major, element size elem_size) = decode of the matrix. */
int64_t sf_decompress(int path, int elem_size, int64_t rows, int64_t cols, const void *values, int64_t nnz,
                      const uint8_t *bitmask, const int64_t *row_offsets, void *out, int threads);

/* y[batch, rows] (fp32) = x[batch, cols] (row-major, x_dtype SF_F32 or SF_BF16) @ W.T, accumulated
 * in fp32. Returns -1, the index of an inconsistent row, or -2 if out of memory (x's scratch copy). */
int64_t sf_matvec(int path, int dtype, int64_t rows, int64_t cols, const void *values, int64_t nnz,
                  const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch,
                  float *y, int threads);

/* The AVX2 fused matvec of bf16 / fp16 values (matvec_avx2.c), called by sf_matvec(_q) on that path;
 * quantized values (q != NULL) are dequantized one row at a time into a scratch row first. */
struct sf_quant_;
int64_t sf_matvec_avx2(const struct sf_quant_ *q, int dtype, int64_t rows, int64_t cols, const void *values, int64_t nnz,
                       const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype,
                       int64_t batch, float *y, int nt);
/* Its tables (called by sf_init_tables). */
void sf_init_avx2_tables(void);

/* y[batch, rows] (fp32) = x[batch, cols] @ W.T for a dense row-major W[rows, cols] of `dtype`
 * (matvec_avx2.c: AVX2 on any x86 path, portable C otherwise). Returns -1, or -2 if out of memory. */
int64_t sf_matvec_dense(int path, int dtype, int64_t rows, int64_t cols, const void *w, const void *x, int x_dtype,
                        int64_t batch, float *y, int threads);

/* ---- quantized values (docs/FORMAT.md, section 1b; dequant.c) ---- */

/* The quantized values of one matrix. Value i of row r (first value s) is in group
 * group_offsets[r] + (i - s) / group_size; it dequantizes to (code(i) - zeros[g]) * scales[g],
 * code(i) = (int8)codes[i] (qbits 8, zeros NULL) or nibble i & 1 (low first) of codes[i / 2] (qbits 4). */
typedef struct sf_quant_ {
    int qbits;                    /* 8 or 4 */
    const uint8_t *codes;         /* int8 [nnz] or uint8 [ceil(nnz / 2)] */
    const uint16_t *scales;       /* fp16 [nscales] */
    const uint8_t *zeros;         /* uint8 [nscales] (qbits 4) or NULL */
    const int64_t *group_offsets; /* [rows]: index in scales of each row's first group */
    int64_t group_size;           /* >= 1 (cols for one group per row) */
    int64_t nscales;
    int64_t ncodes;               /* bytes of codes (set by the matvec from nnz; bounds every read of codes) */
} sf_quant;

/* out[rows, cols] of out_dtype (SF_F32/SF_BF16/SF_F16) = the dequantized decode; returns -1 or a bad row
 * (row_offsets inconsistent with the bitmask, or group_offsets pointing outside scales). */
int64_t sf_decompress_q(int path, const sf_quant *q, int out_dtype, int64_t rows, int64_t cols, int64_t nnz,
                        const uint8_t *bitmask, const int64_t *row_offsets, void *out, int threads);

/* sf_matvec with quantized values: on the AVX-512 path, dequantized inside the expand + multiply loop
 * (matvec_q.c) for bf16 / fp16 out_dtype; otherwise each row is dequantized into a scratch row first.
 * Either way each weight is (code - zero) * scale rounded to out_dtype, as the reference decodes it. */
int64_t sf_matvec_q(int path, const sf_quant *q, int out_dtype, int64_t rows, int64_t cols, int64_t nnz,
                    const uint8_t *bitmask, const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch,
                    float *y, int threads);

/* y[batch, rows] (fp32) = x @ W.T with x quantized to int8 per 32 columns and integer dot products
 * (matvec_qx.c: AVX2, and AVX-512 VNNI in matvec_qx512.c; lossy in x, see there). Returns -1, a bad
 * row, -2 (out of memory) or -3 where it does not apply (a path not in sf_qx_paths(), or a zero
 * point above 15): the caller then takes sf_matvec_q. */
int sf_qx_paths(void); /* bit (1 << path) set for each path this CPU runs it on */
int64_t sf_matvec_qx(int path, const sf_quant *q, int64_t rows, int64_t cols, int64_t nnz, const uint8_t *bitmask,
                     const int64_t *row_offsets, const void *x, int x_dtype, int64_t batch, float *y, int threads);
void sf_init_qx_tables(void);

/* out[rows, h] = transformers' RMSNorm of the bf16 rows x[rows, h] with bf16 weight w[h] (norm.c). */
void sf_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, int64_t rows, int64_t h, float eps, uint16_t *out);

/* The other pieces of a Llama-family decode step on bf16 rows (decode.c). */
void sf_rope_bf16(uint16_t *x, int64_t b, int64_t t, int64_t heads, int64_t hd, const uint16_t *cos,
                  const uint16_t *sin, int64_t cos_batch);
void sf_silu_mul_bf16(const uint16_t *g, const uint16_t *u, int64_t n, uint16_t *out);
void sf_add_bf16(const uint16_t *a, const uint16_t *b, int64_t n, uint16_t *out);
void sf_round_bf16(const float *y, int64_t batch, int64_t rows, const uint16_t *bias, uint16_t *out);

/* Row r's n values (first value `start`) refer only to groups inside scales. */
int sf_quant_row_ok(const sf_quant *q, int64_t r, int64_t start, int64_t n);
/* dst[0..n) = row r's n dequantized values (first value `start`), in out_dtype. */
void sf_dequant_row(int path, const sf_quant *q, int64_t r, int64_t start, int64_t n, int out_dtype, void *dst);

/* ---- shared by decompress.c, dequant.c and matvec.c ---- */

/* Values [start, end) of row r, after checking consistency (see above); returns 0 if bad. */
int sf_row_span(int64_t r, int64_t rows, int64_t cols, int64_t nnz, const uint8_t *mask_row,
                const int64_t *row_offsets, int64_t *start);

/* The same check with the count of the mask left to the caller where that is safe: a row whose
 * offsets are in order and for which the most a kernel can read from its first value on (`reach`
 * values: cols, plus any over-read of its vector loads) lies inside the `nnz` values cannot make
 * that kernel read outside the buffer, whatever its mask says, so its mask is not counted here; the kernel counts the values it consumes as it goes and compares with *n at the end
 * of the row (SF_SPAN_DEFERRED). Rows near the end of the values are counted first, as by
 * sf_row_span (SF_SPAN_CHECKED). 0 (SF_SPAN_BAD) for a bad row. Sets *start and *n = end - start. */
enum { SF_SPAN_BAD = 0, SF_SPAN_CHECKED = 1, SF_SPAN_DEFERRED = 2 };
int sf_row_span_deferred(int64_t r, int64_t rows, int64_t cols, int64_t reach, int64_t nnz, const uint8_t *mask_row,
                         const int64_t *row_offsets, int64_t *start, int64_t *n);

/* Decode `cols` columns (a multiple of 8 unless it is the end of the row) of one row from `src`
 * into `out`; `src_end` bounds every read of values (the vector paths over-read up to 32 bytes
 * when it is safe). Returns the number of values consumed. */
typedef size_t (*sf_row_decoder)(const void *src, const void *src_end, const uint8_t *mask, int64_t cols,
                                 void *out);
sf_row_decoder sf_pick_row_decoder(int path, int elem_size);

/* Threads worth using for `bytes` of output over `rows` rows (>= 1, <= threads). */
int sf_threads_for(int threads, int64_t rows, int64_t bytes);

/* Software prefetch of the streams a kernel reads once (packed values, codes, mask bytes), this many
 * bytes ahead of where it reads now. A row's values follow the previous row's, so the prefetch runs
 * on into the next rows of the same thread. The hardware prefetchers alone leave a core at a
 * quarter of its read bandwidth here: the loads of the values depend on popcounts of the mask, so
 * few are in flight at once. A prefetch never faults, also past the end of a buffer. */
#ifndef SF_PREFETCH_AHEAD
#define SF_PREFETCH_AHEAD 8192
#endif
#define SF_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

/* The mask bits of the (at most 64) columns j .. j + width of a row of `cols`, bit 0 = column j;
 * bits past cols cleared, bytes past the row's never read (the tail step of every fused kernel). */
static inline uint64_t sf_mask_bits(const uint8_t *mask, int64_t j, int64_t cols, int width) {
    int64_t n = cols - j < width ? cols - j : width;
    uint64_t m = 0;
    memcpy(&m, mask + j / 8, (size_t)((n + 7) / 8));
    return n < 64 ? m & ((1ull << n) - 1) : m;
}

static inline float sf_bf16_to_f32(uint16_t h) { /* bf16 is the top half of an fp32: exact */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16 as torch rounds it (nearest even; NaN to 0x7fc0), without a branch so loops vectorize. */
static inline uint16_t sf_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
}

static inline float sf_f16_to_f32(uint16_t h) { /* IEEE binary16 -> binary32, exact (subnormals, Inf, NaN) */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
