/* Native CPU kernels for resident deltas: y[row] += x[row] @ delta^T straight from the resident form,
 * without decoding the delta into a dense matrix (optional; the torch paths of layers.py / kernels.py
 * compute the same products up to float rounding of the summation order, and tests compare them).
 *
 * Two resident forms (deltahub/resident/layers.py):
 * - codebook (DeltaDQ, top-k ternary): a packed non-zero bitmap [R, ceil(C/8)] (LSB first), the
 *   non-zeros' 4-bit codebook indices in row-major order (2 per byte, low nibble first), each row's
 *   first non-zero index (int64 [R+1]) and a float32 codebook of at most 16 entries;
 * - BitDelta: packed sign bits [R, ceil(C/8)] (bit 1 = +scale) and float32 scales per tensor, row or
 *   column group. sum_c x_c * (+-s) = s * (2 * sum_{bit=1} x_c - sum_c x_c): one masked add per 16
 *   weights and batch row.
 *
 * A stored delta is [R, C] = [out, in] (nn.Linear) or [in, out] ("transposed": GPT-2's Conv1D).
 * Batch rows are taken from x and accumulated into y at the same row indices (an optional int64 index
 * list, checked against the row count), so one call serves one adapter's rows of a mixed batch.
 *
 * The AVX-512 paths (F, BW, VL, VBMI2 for byte expansion; BMI2 for nibble unpacking) are chosen at run
 * time; the portable loops run elsewhere. Pointers come from tensors the Python wrapper (_cpu.py) has
 * checked (dtype, contiguity, device, sizes) and adapters the library built itself (the bitmap's row
 * popcounts equal row_ptr's differences; the codebook holds 16 entries); this file checks the
 * numbers it is given against each other before looping, and releases the GIL while it loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>

#define MAXB 8 /* batch rows held in registers at once */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(DELTAHUB_NO_SIMD)
#define HAVE_X86 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512dq,bmi,bmi2,popcnt")))
#endif

/* 16 bits of a packed row starting at bit c (any alignment), bits past nbytes read as 0. */
static inline uint32_t bits16(const uint8_t *row, size_t nbytes, size_t c) {
    size_t b = c >> 3;
    uint32_t w = row[b];
    if (b + 1 < nbytes) w |= (uint32_t)row[b + 1] << 8;
    if (b + 2 < nbytes) w |= (uint32_t)row[b + 2] << 16;
    return (w >> (c & 7)) & 0xFFFFu;
}

static inline unsigned code_at(const uint8_t *codes, int64_t k) { return (codes[k >> 1] >> ((k & 1) * 4)) & 15u; }

/* ------------------------------------------------------------------------------------------------ portable */

static void cb_rows_scalar(const float *x, size_t xs, const int64_t *idx, size_t n, const float *W, size_t ws,
                           const uint8_t *nz, const uint8_t *codes, const int64_t *rp, const float *cbk, size_t R0, size_t R,
                           size_t C, float *y, size_t ys, int transposed) {
    size_t nb = (C + 7) / 8;
    float cb[16] = {0};
    memcpy(cb, cbk, 16 * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        size_t row = idx ? (size_t)idx[i] : i;
        const float *xr = x + row * xs;
        float *yr = y + row * ys;
        for (size_t r = R0; r < R; r++) {
            const uint8_t *m = nz + r * nb;
            int64_t k = rp[r];
            if (W) { /* the rebuilt weight fp32(W + delta) */
                const float *wr = W + r * ws;
                float acc = 0.0f;
                for (size_t c = 0; c < C; c++)
                    acc += (((m[c >> 3] >> (c & 7)) & 1) ? wr[c] + cb[code_at(codes, k++)] : wr[c]) * xr[c];
                yr[r] += acc;
            } else if (!transposed) {
                float acc = 0.0f;
                for (size_t c = 0; c < C; c++)
                    if ((m[c >> 3] >> (c & 7)) & 1) acc += cb[code_at(codes, k++)] * xr[c];
                yr[r] += acc;
            } else {
                float xv = xr[r];
                for (size_t c = 0; c < C; c++)
                    if ((m[c >> 3] >> (c & 7)) & 1) yr[c] += xv * cb[code_at(codes, k++)];
            }
        }
    }
}

static inline float bd_scale(const float *sc, int gran, size_t r, size_t c, size_t ngroups, size_t gcols) {
    return gran == 0 ? sc[0] : gran == 1 ? sc[r] : sc[r * ngroups + c / gcols];
}

static void bd_rows_scalar(const float *x, size_t xs, const int64_t *idx, size_t n, const float *W, size_t ws,
                           const uint8_t *sign, const float *sc, int gran, size_t gcols, size_t R0, size_t R, size_t C,
                           float *y, size_t ys, int transposed) {
    size_t nb = (C + 7) / 8, ng = (C + gcols - 1) / gcols;
    for (size_t i = 0; i < n; i++) {
        size_t row = idx ? (size_t)idx[i] : i;
        const float *xr = x + row * xs;
        float *yr = y + row * ys;
        for (size_t r = R0; r < R; r++) {
            const uint8_t *m = sign + r * nb;
            if (W) { /* the rebuilt weight fp32(W + (bit ? s : -s)) */
                const float *wr = W + r * ws;
                float acc = 0.0f;
                for (size_t c = 0; c < C; c++) {
                    float s = bd_scale(sc, gran, r, c, ng, gcols);
                    acc += (wr[c] + (((m[c >> 3] >> (c & 7)) & 1) ? s : -s)) * xr[c];
                }
                yr[r] += acc;
            } else if (!transposed) {
                float acc = 0.0f;
                for (size_t c = 0; c < C; c++) {
                    float s = bd_scale(sc, gran, r, c, ng, gcols);
                    acc += (((m[c >> 3] >> (c & 7)) & 1) ? s : -s) * xr[c];
                }
                yr[r] += acc;
            } else {
                float xv = xr[r];
                for (size_t c = 0; c < C; c++) {
                    float s = bd_scale(sc, gran, r, c, ng, gcols);
                    yr[c] += xv * (((m[c >> 3] >> (c & 7)) & 1) ? s : -s);
                }
            }
        }
    }
}

static void cb_decode_scalar(const uint8_t *nz, const uint8_t *codes, const int64_t *rp, const float *cbk,
                             size_t r0, size_t r1, size_t C, float *out) {
    size_t nb = (C + 7) / 8;
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *m = nz + r * nb;
        int64_t k = rp[r];
        float *o = out + (r - r0) * C;
        for (size_t c = 0; c < C; c++) o[c] = ((m[c >> 3] >> (c & 7)) & 1) ? cbk[code_at(codes, k++)] : 0.0f;
    }
}

/* Columns padded to whole 64-column blocks (the interleaved x of cb_fwd). */
static size_t padded64(size_t C) { return (C + 63) / 64 * 64; }

/* x's n batch rows interleaved for cb_fwd into xp [n, padded64(C)] (64-byte aligned): in each 64-column block,
 * position 16k + i holds column 4i + k; columns past C are 0. */
static void interleave_x(const float *x, size_t xs, const int64_t *idx, size_t n, size_t C, float *xp) {
    size_t Cp = padded64(C);
    for (size_t i = 0; i < n; i++) {
        const float *xr = x + (idx ? (size_t)idx[i] : i) * xs;
        float *o = xp + i * Cp;
        for (size_t c = 0; c < Cp; c++) o[(c & ~(size_t)63) + 16 * (c & 3) + ((c & 63) >> 2)] = c < C ? xr[c] : 0.0f;
    }
}

/* ------------------------------------------------------------------------------------------------ AVX-512 */
#ifdef HAVE_X86
/* Each kernel is instantiated for 1..MAXB batch rows (NB a compile-time constant), so the per-row
 * accumulators stay in registers. */
#define FORCE static inline __attribute__((always_inline))

/* 16 bits of a packed row from bit c, one unaligned load where 4 bytes are there. */
FORCE uint32_t bits16f(const uint8_t *row, size_t nbytes, size_t c) {
    size_t b = c >> 3;
    if (b + 4 <= nbytes) {
        uint32_t w;
        memcpy(&w, row + b, 4);
        return (w >> (c & 7)) & 0xFFFFu;
    }
    return bits16(row, nbytes, c);
}

FORCE __mmask16 tail16(size_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* The codes of the next (up to) 64 non-zeros from nibble k, one per byte, in order (past the buffer: 0). */
AVX512 FORCE __m512i codes64(const uint8_t *codes, const uint8_t *end, int64_t k) {
    const uint8_t *p = codes + (k >> 1);
    ptrdiff_t left = end - p;
    __mmask64 lm = left >= 40 ? (__mmask64)0xFFFFFFFFFFull : (__mmask64)((1ull << (left > 0 ? left : 0)) - 1);
    __m512i raw = _mm512_maskz_loadu_epi8(lm, p);
    __m512i nxt = _mm512_alignr_epi64(raw, raw, 1);                          /* qword i+1 beside qword i */
    __m512i sh = _mm512_shrdv_epi64(raw, nxt, _mm512_set1_epi64((k & 1) * 4)); /* drop a leading half byte */
    __m512i w = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(sh));            /* 32 bytes -> 32 words */
    __m512i lo = _mm512_and_si512(w, _mm512_set1_epi16(0x000F));
    __m512i hi = _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F00));
    return _mm512_or_si512(lo, hi); /* byte 2i: low nibble of byte i, byte 2i+1: its high nibble */
}

/* 64 bits of a packed row from bit c (c a multiple of 8), past the row's nbytes: 0. */
FORCE uint64_t bits64(const uint8_t *row, size_t nbytes, size_t c) {
    size_t b = c >> 3;
    uint64_t w = 0;
    if (__builtin_expect(b + 8 <= nbytes, 1)) memcpy(&w, row + b, 8);
    else memcpy(&w, row + b, nbytes - b);
    return w;
}

FORCE __mmask64 tail64(size_t left) { return __builtin_expect(left >= 64, 1) ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1); }

/* The values of 16 columns j*16.. of a 64-column step: e holds the step's codes expanded to their columns. */
#define SUB_VALUES(e, m, j, cb)                                                                                    \
    _mm512_maskz_permutexvar_ps((__mmask16)((m) >> (16 * (j))),                                                    \
                                _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32((e), (j))), (cb))

typedef struct {
    const float *xr[MAXB];
    float *yr[MAXB];
} Rows;

/* codebook, stored [out, in]: y[b][r] += sum_c x[b][c] * delta[r, c] for every row r, 64 columns a step.
 * x comes interleaved (interleave_x): in each 64-column block, lane i of sub-vector k holds column 4i + k, so the
 * step's expanded codes (one byte per column, 0x10 where the bitmap has no non-zero) are looked up as dwords:
 * byte k of each dword is sub-vector k's index after a shift by 8k (vpermt2ps reads bits 4:0; bit 4 picks the
 * zero table). One shuffle-port op per 16 weights instead of three (extract, widen, permute). */
AVX512 FORCE void cb_fwd(const int NB, const Rows *rw, const uint8_t *nz, const uint8_t *codes, const uint8_t *cend,
                         const int64_t *rp, __m512 cb, size_t R0, size_t R, size_t C) {
    const int ACC = NB <= 4 ? 4 : 2; /* accumulators per batch row (registers: 32) */
    size_t nb = (C + 7) / 8;
    const __m512 zero = _mm512_setzero_ps();
    const __m512i absent = _mm512_set1_epi8(0x10);
    for (size_t r = R0; r < R; r++) {
        const uint8_t *mrow = nz + r * nb;
        int64_t k = rp[r];
        __m512 acc[MAXB][4]; /* independent chains: an FMA's latency is 4 cycles */
        for (int b = 0; b < NB; b++)
            for (int j = 0; j < 4; j++) acc[b][j] = zero;
        for (size_t c = 0; c < C; c += 64) {
            uint64_t m = bits64(mrow, nb, c) & tail64(C - c);
            if (!m) continue;
            __m512i e = _mm512_mask_expand_epi8(absent, (__mmask64)m, codes64(codes, cend, k));
            k += __builtin_popcountll(m);
#define FWD_SUB(j)                                                                                                 \
    {                                                                                                              \
        __m512 v = _mm512_permutex2var_ps(cb, (j) ? _mm512_srli_epi32(e, 8 * (j)) : e, zero);                       \
        for (int b = 0; b < NB; b++)                                                                               \
            acc[b][(j) % ACC] = _mm512_fmadd_ps(v, _mm512_load_ps(rw->xr[b] + c + 16 * (j)), acc[b][(j) % ACC]);   \
    }
            FWD_SUB(0) FWD_SUB(1) FWD_SUB(2) FWD_SUB(3)
#undef FWD_SUB
        }
        for (int b = 0; b < NB; b++)
            rw->yr[b][r] += _mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3])));
    }
}

/* codebook with the base weight, stored [out, in]: y[b][r] += sum_c x[b][c] * (W[r, c] + delta[r, c]), the rebuilt
 * weight fp32(W + delta) formed in registers (one pass over W and the resident delta instead of a GEMM over W and
 * a second product over the delta). x in its natural column order (W is read as stored). */
AVX512 FORCE void cbw_fwd(const int NB, const Rows *rw, const float *W, size_t ws, const uint8_t *nz, const uint8_t *codes,
                          const uint8_t *cend, const int64_t *rp, __m512 cb, size_t R0, size_t R, size_t C) {
    const int ACC = NB <= 4 ? 4 : 2;
    size_t nb = (C + 7) / 8;
    for (size_t r = R0; r < R; r++) {
        const uint8_t *mrow = nz + r * nb;
        const float *wr = W + r * ws;
        int64_t k = rp[r];
        __m512 acc[MAXB][4];
        for (int b = 0; b < NB; b++)
            for (int j = 0; j < 4; j++) acc[b][j] = _mm512_setzero_ps();
        for (size_t c = 0; c < C; c += 64) {
            uint64_t t = tail64(C - c), m = bits64(mrow, nb, c) & t;
            __m512i e = _mm512_setzero_si512();
            if (m) {
                e = _mm512_maskz_expand_epi8((__mmask64)m, codes64(codes, cend, k));
                k += __builtin_popcountll(m);
            }
            if (c + 64 <= C) {
#define FWDW_SUB(j)                                                                                                \
    {                                                                                                              \
        __m512 v = _mm512_loadu_ps(wr + c + 16 * (j));                                                             \
        if ((__mmask16)(m >> (16 * (j)))) v = _mm512_add_ps(v, SUB_VALUES(e, m, j, cb));                           \
        for (int b = 0; b < NB; b++)                                                                               \
            acc[b][(j) % ACC] = _mm512_fmadd_ps(v, _mm512_loadu_ps(rw->xr[b] + c + 16 * (j)), acc[b][(j) % ACC]);  \
    }
                FWDW_SUB(0) FWDW_SUB(1) FWDW_SUB(2) FWDW_SUB(3)
#undef FWDW_SUB
            } else {
                for (int j = 0; j < 4 && c + 16 * (size_t)j < C; j++) {
                    __mmask16 tj = (__mmask16)(t >> (16 * j));
                    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(tj, wr + c + 16 * j), SUB_VALUES(e, m, j, cb));
                    for (int b = 0; b < NB; b++)
                        acc[b][0] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(tj, rw->xr[b] + c + 16 * j), acc[b][0]);
                }
            }
        }
        for (int b = 0; b < NB; b++)
            rw->yr[b][r] += _mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3])));
    }
}

/* codebook, stored [in, out] (Conv1D): y[b][c] += x[b][r] * delta[r, c]. */
AVX512 FORCE void cb_bwd(const int NB, const Rows *rw, const uint8_t *nz, const uint8_t *codes, const uint8_t *cend,
                         const int64_t *rp, __m512 cb, size_t R0, size_t R, size_t C) {
    size_t nb = (C + 7) / 8;
    for (size_t r = R0; r < R; r++) {
        const uint8_t *mrow = nz + r * nb;
        int64_t k = rp[r];
        __m512 xv[MAXB];
        for (int b = 0; b < NB; b++) xv[b] = _mm512_set1_ps(rw->xr[b][r]);
        for (size_t c = 0; c < C; c += 64) {
            uint64_t m = bits64(mrow, nb, c) & tail64(C - c);
            if (!m) continue;
            __m512i e = _mm512_maskz_expand_epi8((__mmask64)m, codes64(codes, cend, k));
            k += __builtin_popcountll(m);
#define BWD_SUB(j)                                                                                                 \
    if ((__mmask16)(m >> (16 * (j)))) {                                                                            \
        __mmask16 mj = (__mmask16)(m >> (16 * (j)));                                                               \
        __m512 v = SUB_VALUES(e, m, j, cb);                                                                        \
        for (int b = 0; b < NB; b++) {                                                                             \
            float *yp = rw->yr[b] + c + 16 * (j);                                                                  \
            _mm512_mask_storeu_ps(yp, mj, _mm512_fmadd_ps(xv[b], v, _mm512_maskz_loadu_ps(mj, yp)));                \
        }                                                                                                          \
    }
            BWD_SUB(0) BWD_SUB(1) BWD_SUB(2) BWD_SUB(3)
#undef BWD_SUB
        }
    }
}

/* BitDelta, stored [out, in]: per row and column group, s * (2 * sum_{bit=1} x - sum x); gsum[b][g] holds the
 * column-group sums of x. */
AVX512 FORCE void bd_fwd(const int NB, const Rows *rw, const uint8_t *sign, const float *sc, int gran, size_t gcols,
                         size_t R0, size_t R, size_t C, const float *gsum) {
    const int ACC = NB <= 4 ? 4 : 2;
    size_t nb = (C + 7) / 8, ng = (C + gcols - 1) / gcols;
    for (size_t r = R0; r < R; r++) {
        const uint8_t *mrow = sign + r * nb;
        float res[MAXB] = {0};
        for (size_t g = 0; g < ng; g++) {
            size_t c0 = g * gcols, c1 = c0 + gcols < C ? c0 + gcols : C;
            __m512 acc[MAXB][4]; /* independent chains: an add's latency is 4 cycles */
            for (int b = 0; b < NB; b++)
                for (int j = 0; j < 4; j++) acc[b][j] = _mm512_setzero_ps();
            size_t c = c0;
            for (; c + 64 <= c1; c += 64) {
                uint64_t m64;
                if (!(c & 7)) memcpy(&m64, mrow + (c >> 3), 8); /* c + 64 <= C: the 8 bytes are in the row */
                else m64 = bits16f(mrow, nb, c) | (uint64_t)bits16f(mrow, nb, c + 16) << 16 |
                           (uint64_t)bits16f(mrow, nb, c + 32) << 32 | (uint64_t)bits16f(mrow, nb, c + 48) << 48;
                for (int j = 0; j < 4; j++) {
                    __mmask16 m = (__mmask16)(m64 >> (16 * j));
                    for (int b = 0; b < NB; b++)
                        acc[b][j % ACC] = _mm512_mask_add_ps(acc[b][j % ACC], m, acc[b][j % ACC], _mm512_loadu_ps(rw->xr[b] + c + 16 * j));
                }
            }
            for (; c + 16 <= c1; c += 16) {
                __mmask16 m = (__mmask16)bits16f(mrow, nb, c);
                for (int b = 0; b < NB; b++) acc[b][0] = _mm512_mask_add_ps(acc[b][0], m, acc[b][0], _mm512_loadu_ps(rw->xr[b] + c));
            }
            if (c < c1) {
                __mmask16 m = (__mmask16)(bits16(mrow, nb, c) & tail16(c1 - c));
                for (int b = 0; b < NB; b++) acc[b][0] = _mm512_add_ps(acc[b][0], _mm512_maskz_loadu_ps(m, rw->xr[b] + c));
            }
            float s = gran == 0 ? sc[0] : gran == 1 ? sc[r] : sc[r * ng + g];
            for (int b = 0; b < NB; b++) {
                __m512 t = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3]));
                res[b] += s * (2.0f * _mm512_reduce_add_ps(t) - gsum[b * ng + g]);
            }
        }
        for (int b = 0; b < NB; b++) rw->yr[b][r] += res[b];
    }
}

/* BitDelta with the base weight, stored [out, in], tensor or row scales: y[b][r] += sum_c x[b][c] * (W[r, c] +-s),
 * the rebuilt weight fp32(W + (bit ? s : -s)) formed in registers (one pass over W and the signs). */
AVX512 FORCE void bdw_fwd(const int NB, const Rows *rw, const float *W, size_t ws, const uint8_t *sign, const float *sc,
                          int gran, size_t R0, size_t R, size_t C) {
    const int ACC = NB <= 4 ? 4 : 2;
    size_t nb = (C + 7) / 8;
    for (size_t r = R0; r < R; r++) {
        const uint8_t *mrow = sign + r * nb;
        const float *wr = W + r * ws;
        __m512 pos = _mm512_set1_ps(gran == 0 ? sc[0] : sc[r]);
        __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), pos);
        __m512 acc[MAXB][4];
        for (int b = 0; b < NB; b++)
            for (int j = 0; j < 4; j++) acc[b][j] = _mm512_setzero_ps();
        size_t c = 0;
        for (; c + 64 <= C; c += 64) {
            uint64_t m64 = bits64(mrow, nb, c);
            for (int j = 0; j < 4; j++) {
                __m512 v = _mm512_add_ps(_mm512_loadu_ps(wr + c + 16 * j),
                                         _mm512_mask_blend_ps((__mmask16)(m64 >> (16 * j)), neg, pos));
                for (int b = 0; b < NB; b++)
                    acc[b][j % ACC] = _mm512_fmadd_ps(v, _mm512_loadu_ps(rw->xr[b] + c + 16 * j), acc[b][j % ACC]);
            }
        }
        for (; c < C; c += 16) {
            __mmask16 t = tail16(C - c);
            __m512 v = _mm512_maskz_add_ps(t, _mm512_maskz_loadu_ps(t, wr + c),
                                           _mm512_mask_blend_ps((__mmask16)bits16(mrow, nb, c), neg, pos));
            for (int b = 0; b < NB; b++) acc[b][0] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(t, rw->xr[b] + c), acc[b][0]);
        }
        for (int b = 0; b < NB; b++)
            rw->yr[b][r] += _mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3])));
    }
}

/* BitDelta stored [in, out] (Conv1D), tensor or row scales: y[b][c] += x[b][r] * (bit ? s : -s). */
AVX512 FORCE void bd_bwd(const int NB, const Rows *rw, const uint8_t *sign, const float *sc, int gran, size_t R0, size_t R,
                         size_t C) {
    size_t nb = (C + 7) / 8;
    for (size_t r = R0; r < R; r++) {
        const uint8_t *mrow = sign + r * nb;
        __m512 pos = _mm512_set1_ps(gran == 0 ? sc[0] : sc[r]);
        __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), pos);
        __m512 xv[MAXB];
        for (int b = 0; b < NB; b++) xv[b] = _mm512_set1_ps(rw->xr[b][r]);
        for (size_t c = 0; c < C; c += 16) {
            __mmask16 t = tail16(C - c);
            __m512 v = _mm512_mask_blend_ps((__mmask16)bits16f(mrow, nb, c), neg, pos);
            for (int b = 0; b < NB; b++) {
                __m512 yv = _mm512_maskz_loadu_ps(t, rw->yr[b] + c);
                _mm512_mask_storeu_ps(rw->yr[b] + c, t, _mm512_fmadd_ps(xv[b], v, yv));
            }
        }
    }
}

#define INSTANCES(NB)                                                                                              \
    AVX512 static void bdw_fwd_##NB(const Rows *rw, const float *W, size_t ws, const uint8_t *sign, const float *sc,   \
                                    int gran, size_t R0, size_t R, size_t C) {                                     \
        bdw_fwd(NB, rw, W, ws, sign, sc, gran, R0, R, C);                                                          \
    }                                                                                                              \
    AVX512 static void cbw_fwd_##NB(const Rows *rw, const float *W, size_t ws, const uint8_t *nz, const uint8_t *codes,\
                                    const uint8_t *cend, const int64_t *rp, __m512 cb, size_t R0, size_t R, size_t C) {  \
        cbw_fwd(NB, rw, W, ws, nz, codes, cend, rp, cb, R0, R, C);                                                     \
    }                                                                                                              \
    AVX512 static void cb_fwd_##NB(const Rows *rw, const uint8_t *nz, const uint8_t *codes, const uint8_t *cend,   \
                                   const int64_t *rp, __m512 cb, size_t R0, size_t R, size_t C) {                             \
        cb_fwd(NB, rw, nz, codes, cend, rp, cb, R0, R, C);                                                             \
    }                                                                                                              \
    AVX512 static void cb_bwd_##NB(const Rows *rw, const uint8_t *nz, const uint8_t *codes, const uint8_t *cend,   \
                                   const int64_t *rp, __m512 cb, size_t R0, size_t R, size_t C) {                             \
        cb_bwd(NB, rw, nz, codes, cend, rp, cb, R0, R, C);                                                             \
    }                                                                                                              \
    AVX512 static void bd_fwd_##NB(const Rows *rw, const uint8_t *sign, const float *sc, int gran, size_t gcols,    \
                                   size_t R0, size_t R, size_t C, const float *gsum) {                                        \
        bd_fwd(NB, rw, sign, sc, gran, gcols, R0, R, C, gsum);                                                         \
    }                                                                                                              \
    AVX512 static void bd_bwd_##NB(const Rows *rw, const uint8_t *sign, const float *sc, int gran, size_t R0, size_t R,\
                                   size_t C) {                                                                     \
        bd_bwd(NB, rw, sign, sc, gran, R0, R, C);                                                                      \
    }
INSTANCES(1)
INSTANCES(2)
INSTANCES(3)
INSTANCES(4)
INSTANCES(5)
INSTANCES(6)
INSTANCES(7)
INSTANCES(8)

typedef void (*cb_fn)(const Rows *, const uint8_t *, const uint8_t *, const uint8_t *, const int64_t *, __m512, size_t, size_t, size_t);
typedef void (*bdf_fn)(const Rows *, const uint8_t *, const float *, int, size_t, size_t, size_t, size_t, const float *);
typedef void (*bdb_fn)(const Rows *, const uint8_t *, const float *, int, size_t, size_t, size_t);
static const cb_fn CB_FWD[MAXB] = {cb_fwd_1, cb_fwd_2, cb_fwd_3, cb_fwd_4, cb_fwd_5, cb_fwd_6, cb_fwd_7, cb_fwd_8};
typedef void (*cbw_fn)(const Rows *, const float *, size_t, const uint8_t *, const uint8_t *, const uint8_t *,
                       const int64_t *, __m512, size_t, size_t, size_t);
static const cbw_fn CBW_FWD[MAXB] = {cbw_fwd_1, cbw_fwd_2, cbw_fwd_3, cbw_fwd_4, cbw_fwd_5, cbw_fwd_6, cbw_fwd_7, cbw_fwd_8};
typedef void (*bdw_fn)(const Rows *, const float *, size_t, const uint8_t *, const float *, int, size_t, size_t, size_t);
static const bdw_fn BDW_FWD[MAXB] = {bdw_fwd_1, bdw_fwd_2, bdw_fwd_3, bdw_fwd_4, bdw_fwd_5, bdw_fwd_6, bdw_fwd_7, bdw_fwd_8};
static const cb_fn CB_BWD[MAXB] = {cb_bwd_1, cb_bwd_2, cb_bwd_3, cb_bwd_4, cb_bwd_5, cb_bwd_6, cb_bwd_7, cb_bwd_8};
static const bdf_fn BD_FWD[MAXB] = {bd_fwd_1, bd_fwd_2, bd_fwd_3, bd_fwd_4, bd_fwd_5, bd_fwd_6, bd_fwd_7, bd_fwd_8};
static const bdb_fn BD_BWD[MAXB] = {bd_bwd_1, bd_bwd_2, bd_bwd_3, bd_bwd_4, bd_bwd_5, bd_bwd_6, bd_bwd_7, bd_bwd_8};

static size_t next_rows(Rows *rw, const float *x, size_t xs, const int64_t *idx, size_t n, float *y, size_t ys, size_t i0) {
    size_t bn = n - i0 < MAXB ? n - i0 : MAXB;
    for (size_t b = 0; b < bn; b++) {
        size_t row = idx ? (size_t)idx[i0 + b] : i0 + b;
        rw->xr[b] = x + row * xs;
        rw->yr[b] = y + row * ys;
    }
    return bn;
}

/* xp: x interleaved (interleave_x) for the [out, in] layout, else NULL (transposed: x as given). */
AVX512 static void cb_rows_avx512(const float *x, size_t xs, const int64_t *idx, size_t n, const float *xp,
                                  const float *W, size_t ws, const uint8_t *nz, const uint8_t *codes, size_t ncb,
                                  const int64_t *rp, const float *cbk, size_t R0, size_t R, size_t C, float *y, size_t ys,
                                  int transposed) {
    __m512 cb = _mm512_loadu_ps(cbk);
    Rows rw;
    for (size_t i0 = 0; i0 < n; i0 += MAXB) {
        size_t bn = next_rows(&rw, x, xs, idx, n, y, ys, i0);
        if (W) {
            CBW_FWD[bn - 1](&rw, W, ws, nz, codes, codes + ncb, rp, cb, R0, R, C);
            continue;
        }
        if (!transposed)
            for (size_t b = 0; b < bn; b++) rw.xr[b] = xp + (i0 + b) * padded64(C);
        (transposed ? CB_BWD : CB_FWD)[bn - 1](&rw, nz, codes, codes + ncb, rp, cb, R0, R, C);
    }
}

AVX512 static void cb_decode_avx512(const uint8_t *nz, const uint8_t *codes, size_t ncb, const int64_t *rp,
                                    const float *cbk, size_t r0, size_t r1, size_t C, float *out) {
    size_t nb = (C + 7) / 8;
    const uint8_t *cend = codes + ncb;
    __m512 cb = _mm512_loadu_ps(cbk);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *mrow = nz + r * nb;
        int64_t k = rp[r];
        float *o = out + (r - r0) * C;
        for (size_t c = 0; c < C; c += 64) {
            uint64_t t = tail64(C - c), m = bits64(mrow, nb, c) & t;
            __m512i e = _mm512_setzero_si512();
            if (m) e = _mm512_maskz_expand_epi8((__mmask64)m, codes64(codes, cend, k));
            k += __builtin_popcountll(m);
            for (int j = 0; j < 4; j++)
                _mm512_mask_storeu_ps(o + c + 16 * j, (__mmask16)(t >> (16 * j)), SUB_VALUES(e, m, j, cb));
        }
    }
}

AVX512 static void bd_rows_avx512(const float *x, size_t xs, const int64_t *idx, size_t n, const float *W, size_t ws,
                                  const uint8_t *sign, const float *sc, int gran, size_t gcols, size_t R0, size_t R, size_t C,
                                  float *y, size_t ys, float *gsum, int transposed) {
    size_t ng = (C + gcols - 1) / gcols;
    Rows rw;
    for (size_t i0 = 0; i0 < n; i0 += MAXB) {
        size_t bn = next_rows(&rw, x, xs, idx, n, y, ys, i0);
        if (W) { /* tensor / row scales (the caller keeps group scales on the portable loop) */
            BDW_FWD[bn - 1](&rw, W, ws, sign, sc, gran, R0, R, C);
            continue;
        }
        if (transposed) {
            BD_BWD[bn - 1](&rw, sign, sc, gran, R0, R, C);
            continue;
        }
        for (size_t b = 0; b < bn; b++)
            for (size_t g = 0; g < ng; g++) {
                size_t c0 = g * gcols, c1 = c0 + gcols < C ? c0 + gcols : C;
                __m512 s = _mm512_setzero_ps();
                for (size_t c = c0; c < c1; c += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail16(c1 - c), rw.xr[b] + c));
                gsum[b * ng + g] = _mm512_reduce_add_ps(s);
            }
        BD_FWD[bn - 1](&rw, sign, sc, gran, gcols, R0, R, C, gsum);
    }
}

static int simd_ok(void) {
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
    }
    return ok;
}
#else
static int simd_ok(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------------------------ threads */
/* The output rows of one product are split over torch's own OpenMP team (GOMP_parallel of the libgomp torch
 * loaded, found at run time): its threads are the ones already running torch's ops, so no second pool competes
 * with them for the cores. Without that symbol (another threading runtime) the product runs on the calling
 * thread. */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_t)(void);
static gomp_parallel_t gomp_parallel;
static omp_int_t omp_thread_num, omp_num_threads;

static void load_omp(void) {
    gomp_parallel = (gomp_parallel_t)dlsym(RTLD_DEFAULT, "GOMP_parallel");
    omp_thread_num = (omp_int_t)dlsym(RTLD_DEFAULT, "omp_get_thread_num");
    omp_num_threads = (omp_int_t)dlsym(RTLD_DEFAULT, "omp_get_num_threads");
    if (!omp_thread_num || !omp_num_threads) gomp_parallel = NULL;
}

typedef struct {
    int kind; /* 0 codebook, 1 BitDelta */
    int simd, transposed, gran;
    const float *x;
    const int64_t *idx;
    float *y;
    size_t n, xs, ys, R, C, gcols, ncb;
    const uint8_t *bits, *codes;
    const int64_t *rp;
    const float *vals; /* codebook (16) or scales */
    const float *xp;   /* codebook [out, in] on AVX-512: x interleaved (interleave_x) */
    const float *w;    /* codebook [out, in] with the base weight (cbw): W [R, C], row stride ws */
    size_t ws;
    int failed;
} Job;

static void job_rows(Job *j, size_t r0, size_t r1) {
    if (r0 >= r1) return;
#ifdef HAVE_X86
    if (j->simd && j->kind == 0) {
        cb_rows_avx512(j->x, j->xs, j->idx, j->n, j->xp, j->w, j->ws, j->bits, j->codes, j->ncb, j->rp, j->vals, r0, r1, j->C, j->y, j->ys,
                       j->transposed);
        return;
    }
    if (j->simd && j->kind == 1) {
        size_t ng = (j->C + j->gcols - 1) / j->gcols;
        float *gsum = (float *)malloc((size_t)MAXB * (ng ? ng : 1) * sizeof(float));
        if (!gsum) { j->failed = 1; return; }
        bd_rows_avx512(j->x, j->xs, j->idx, j->n, j->w, j->ws, j->bits, j->vals, j->gran, j->gcols, r0, r1, j->C, j->y, j->ys, gsum,
                       j->transposed);
        free(gsum);
        return;
    }
#endif
    if (j->kind == 0)
        cb_rows_scalar(j->x, j->xs, j->idx, j->n, j->w, j->ws, j->bits, j->codes, j->rp, j->vals, r0, r1, j->C, j->y, j->ys,
                       j->transposed);
    else
        bd_rows_scalar(j->x, j->xs, j->idx, j->n, j->w, j->ws, j->bits, j->vals, j->gran, j->gcols, r0, r1, j->C, j->y, j->ys,
                       j->transposed);
}

static void job_body(void *p) {
    Job *j = (Job *)p;
    size_t t = (size_t)omp_thread_num(), T = (size_t)omp_num_threads();
    job_rows(j, j->R * t / T, j->R * (t + 1) / T);
}

/* Below this many multiply-adds a product stays on one thread (a team's start costs a few microseconds). */
#define PARALLEL_MIN (1u << 16)

static int job_run(Job *j, int threads) {
    j->failed = 0;
    /* the transposed layouts accumulate every stored row into the same outputs: one thread */
    if (threads > 1 && gomp_parallel && !j->transposed && j->R >= 2 * (size_t)threads
        && (double)j->R * (double)j->C * (double)j->n >= PARALLEL_MIN)
        gomp_parallel(job_body, j, (unsigned)threads, 0);
    else
        job_rows(j, 0, j->R);
    return j->failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------ Python */

typedef struct {
    const float *x;
    const int64_t *idx;
    float *y;
    size_t n, xs, ys, xrows, yrows;
} Batch;

/* Parse x, xs, xrows, idx (0: rows 0..n-1), n, y, ys, yrows and check every row index. */
static int parse_batch(Batch *bt, unsigned long long x, Py_ssize_t xs, Py_ssize_t xrows, unsigned long long idx,
                       Py_ssize_t n, unsigned long long y, Py_ssize_t ys, Py_ssize_t yrows, size_t xlen, size_t ylen) {
    if (!x || !y || xs < 0 || xrows < 0 || n < 0 || ys < 0 || yrows < 0 || (size_t)xs < xlen || (size_t)ys < ylen
        || (!idx && (n > xrows || n > yrows))) {
        PyErr_SetString(PyExc_ValueError, "resident kernel: batch does not fit its buffers");
        return -1;
    }
    const int64_t *ix = (const int64_t *)(uintptr_t)idx;
    for (Py_ssize_t i = 0; ix && i < n; i++)
        if (ix[i] < 0 || ix[i] >= xrows || ix[i] >= yrows) {
            PyErr_SetString(PyExc_ValueError, "resident kernel: row index out of range");
            return -1;
        }
    bt->x = (const float *)(uintptr_t)x;
    bt->y = (float *)(uintptr_t)y;
    bt->idx = ix;
    bt->n = (size_t)n;
    bt->xs = (size_t)xs;
    bt->ys = (size_t)ys;
    bt->xrows = (size_t)xrows;
    bt->yrows = (size_t)yrows;
    return 0;
}

/* cb_matmul(x, xs, xrows, idx, n, y, ys, yrows, nz, codes, ncodes_bytes, row_ptr, codebook16, R, C, transposed,
 * simd, threads[, w, ws, wrows]); with the base weight w ([R, C] float32, row stride ws; not transposed):
 * y[rows] += x[rows] @ (W + delta)^T, the rebuilt layer's product in one pass. Parsed and checked into j. */
static int parse_cb(PyObject *args, Job *j, int *threads) {
    unsigned long long x, idx, y, nz, codes, rp, cbk;
    Py_ssize_t xs, xrows, n, ys, yrows, ncb, R, C;
    int transposed, simd;
    unsigned long long w = 0;
    Py_ssize_t ws = 0, wrows = 0;
    if (!PyArg_ParseTuple(args, "KnnKnKnnKKnKKnnppi|Knn", &x, &xs, &xrows, &idx, &n, &y, &ys, &yrows, &nz, &codes, &ncb,
                          &rp, &cbk, &R, &C, &transposed, &simd, threads, &w, &ws, &wrows))
        return -1;
    if (R < 0 || C < 0 || !nz || !rp || !cbk) {
        PyErr_SetString(PyExc_ValueError, "cb_matmul: bad delta");
        return -1;
    }
    if (w && (transposed || wrows != R || ws < C)) {
        PyErr_SetString(PyExc_ValueError, "cb_matmul: the base weight does not fit the delta");
        return -1;
    }
    const int64_t *rowp = (const int64_t *)(uintptr_t)rp;
    if (R && (rowp[0] != 0 || rowp[R] < 0 || (rowp[R] + 1) / 2 > ncb || (rowp[R] && !codes))) {
        PyErr_SetString(PyExc_ValueError, "cb_matmul: code buffer does not fit the non-zero count");
        return -1;
    }
    Batch b;
    if (parse_batch(&b, x, xs, xrows, idx, n, y, ys, yrows, (size_t)(transposed ? R : C), (size_t)(transposed ? C : R)) < 0)
        return -1;
    memset(j, 0, sizeof(*j));
    j->kind = 0;
    j->simd = simd && simd_ok();
    j->transposed = transposed;
    j->x = b.x; j->idx = b.idx; j->y = b.y; j->n = b.n; j->xs = b.xs; j->ys = b.ys;
    j->R = (size_t)R; j->C = (size_t)C; j->ncb = (size_t)ncb;
    j->bits = (const uint8_t *)(uintptr_t)nz; j->codes = (const uint8_t *)(uintptr_t)codes; j->rp = rowp;
    j->vals = (const float *)(uintptr_t)cbk;
    j->w = (const float *)(uintptr_t)w;
    j->ws = (size_t)ws;
    return 0;
}

/* bd_matmul(x, xs, xrows, idx, n, y, ys, yrows, sign, scale, nscale, gran, gcols, R, C, transposed, simd, threads
 * [, w, ws, wrows]); gran: 0 tensor, 1 row, 2 column groups of gcols; with the base weight w (not transposed):
 * y[rows] += x[rows] @ (W + delta)^T. Parsed and checked into j. */
static int parse_bd(PyObject *args, Job *j, int *threads) {
    unsigned long long x, idx, y, sign, scale;
    Py_ssize_t xs, xrows, n, ys, yrows, nscale, gcols, R, C;
    int gran, transposed, simd;
    unsigned long long w = 0;
    Py_ssize_t ws = 0, wrows = 0;
    if (!PyArg_ParseTuple(args, "KnnKnKnnKKninnnppi|Knn", &x, &xs, &xrows, &idx, &n, &y, &ys, &yrows, &sign, &scale,
                          &nscale, &gran, &gcols, &R, &C, &transposed, &simd, threads, &w, &ws, &wrows))
        return -1;
    if (w && (transposed || wrows != R || ws < C)) {
        PyErr_SetString(PyExc_ValueError, "bd_matmul: the base weight does not fit the delta");
        return -1;
    }
    if (gran == 0 || gran == 1) gcols = C > 0 ? C : 1;
    Py_ssize_t ng = C > 0 ? (C + gcols - 1) / gcols : 0;
    Py_ssize_t need = gran == 0 ? 1 : gran == 1 ? R : R * ng;
    if (R < 0 || C < 0 || gran < 0 || gran > 2 || gcols < 1 || !sign || !scale || nscale < need) {
        PyErr_SetString(PyExc_ValueError, "bd_matmul: bad delta");
        return -1;
    }
    Batch b;
    if (parse_batch(&b, x, xs, xrows, idx, n, y, ys, yrows, (size_t)(transposed ? R : C), (size_t)(transposed ? C : R)) < 0)
        return -1;
    memset(j, 0, sizeof(*j));
    j->kind = 1;
    /* the transposed group-scale layout and the fused group-scale product: portable loop */
    j->simd = simd && simd_ok() && ((!transposed && !w) || gran != 2);
    j->transposed = transposed;
    j->gran = gran;
    j->gcols = (size_t)gcols;
    j->x = b.x; j->idx = b.idx; j->y = b.y; j->n = b.n; j->xs = b.xs; j->ys = b.ys;
    j->R = (size_t)R; j->C = (size_t)C;
    j->bits = (const uint8_t *)(uintptr_t)sign;
    j->vals = (const float *)(uintptr_t)scale;
    j->w = (const float *)(uintptr_t)w;
    j->ws = (size_t)ws;
    return 0;
}

typedef struct {
    Job *jobs;
    size_t n;
} Many;

/* Every non-transposed job's output rows split the same way over the team (they have one R: each output
 * element belongs to one thread). */
static void many_body(void *p) {
    Many *m = (Many *)p;
    size_t t = (size_t)omp_thread_num(), T = (size_t)omp_num_threads();
    for (size_t i = 0; i < m->n; i++)
        if (!m->jobs[i].transposed) job_rows(&m->jobs[i], m->jobs[i].R * t / T, m->jobs[i].R * (t + 1) / T);
}

/* Run parsed jobs (no GIL needed): x interleaved where cb_fwd wants it, one OpenMP team for all of them, the
 * transposed ones on this thread after it. 0, or -1 when out of memory. */
static int run_jobs(Job *js, size_t nj, int threads) {
    int rc = 0;
    double work = 0;
    for (size_t i = 0; i < nj; i++) {
        Job *j = &js[i];
        j->failed = 0;
        j->xp = NULL;
        if (j->kind == 0 && j->simd && !j->transposed && !j->w && j->n && j->R && j->C) {
            void *xp = NULL;
            if (posix_memalign(&xp, 64, j->n * padded64(j->C) * sizeof(float)) != 0) { rc = -1; break; }
            interleave_x(j->x, j->xs, j->idx, j->n, j->C, (float *)xp);
            j->xp = (const float *)xp;
        }
        if (!j->transposed) work += (double)j->R * (double)j->C * (double)j->n;
    }
    if (rc == 0) {
        if (nj == 1) {
            rc = job_run(&js[0], threads);
        } else {
            Many m = {js, nj};
            if (threads > 1 && gomp_parallel && work >= PARALLEL_MIN)
                gomp_parallel(many_body, &m, (unsigned)threads, 0);
            else
                for (size_t i = 0; i < nj; i++)
                    if (!js[i].transposed) job_rows(&js[i], 0, js[i].R);
            for (size_t i = 0; i < nj; i++)
                if (js[i].transposed) job_rows(&js[i], 0, js[i].R);
            for (size_t i = 0; i < nj; i++)
                if (js[i].failed) rc = -1;
        }
    }
    for (size_t i = 0; i < nj; i++) free((void *)js[i].xp);
    return rc;
}

static PyObject *run_parsed(Job *js, size_t nj, int threads) {
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_jobs(js, nj, threads);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_cb_matmul(PyObject *self, PyObject *args) {
    Job j;
    int threads;
    if (parse_cb(args, &j, &threads) < 0) return NULL;
    return run_parsed(&j, 1, threads);
}

static PyObject *py_bd_matmul(PyObject *self, PyObject *args) {
    Job j;
    int threads;
    if (parse_bd(args, &j, &threads) < 0) return NULL;
    return run_parsed(&j, 1, threads);
}

#define MANY_MAX 64

/* matmul_many(jobs, threads): jobs a sequence of (kind, args), kind 0 = cb_matmul's args, 1 = bd_matmul's; run in
 * one OpenMP team (a mixed batch's adapters of one layer: one team start, one call). Every non-transposed job
 * must have the same R. */
static PyObject *py_matmul_many(PyObject *self, PyObject *args) {
    PyObject *seq;
    int threads;
    if (!PyArg_ParseTuple(args, "Oi", &seq, &threads)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "matmul_many: jobs must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t nj = PySequence_Fast_GET_SIZE(fast);
    Job js[MANY_MAX];
    if (nj < 1 || nj > MANY_MAX) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "matmul_many: 1 to 64 jobs");
        return NULL;
    }
    size_t R = 0;
    int have_r = 0;
    for (Py_ssize_t i = 0; i < nj; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        int kind, unused;
        PyObject *jargs;
        if (!PyArg_ParseTuple(item, "iO!", &kind, &PyTuple_Type, &jargs)
            || (kind == 0 ? parse_cb(jargs, &js[i], &unused) : kind == 1 ? parse_bd(jargs, &js[i], &unused) : -2) < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "matmul_many: kind must be 0 or 1");
            Py_DECREF(fast);
            return NULL;
        }
        if (!js[i].transposed) {
            if (have_r && js[i].R != R) {
                Py_DECREF(fast);
                PyErr_SetString(PyExc_ValueError, "matmul_many: jobs of different output sizes");
                return NULL;
            }
            R = js[i].R, have_r = 1;
        }
    }
    Py_DECREF(fast);
    return run_parsed(js, (size_t)nj, threads);
}

/* cb_decode(nz, codes, ncodes_bytes, row_ptr, codebook16, R, C, r0, r1, out): rows r0:r1 as float32 [r1-r0, C]. */
static PyObject *py_cb_decode(PyObject *self, PyObject *args) {
    unsigned long long nz, codes, rp, cbk, out;
    Py_ssize_t ncb, R, C, r0, r1;
    int simd;
    if (!PyArg_ParseTuple(args, "KKnKKnnnnKp", &nz, &codes, &ncb, &rp, &cbk, &R, &C, &r0, &r1, &out, &simd)) return NULL;
    const int64_t *rowp = (const int64_t *)(uintptr_t)rp;
    if (R < 0 || C < 0 || r0 < 0 || r1 < r0 || r1 > R || !nz || !rp || !cbk || !out
        || (R && (rowp[0] != 0 || rowp[R] < 0 || (rowp[R] + 1) / 2 > ncb || (rowp[R] && !codes)))) {
        PyErr_SetString(PyExc_ValueError, "cb_decode: bad arguments");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86
    if (simd && simd_ok())
        cb_decode_avx512((const uint8_t *)(uintptr_t)nz, (const uint8_t *)(uintptr_t)codes, (size_t)ncb, rowp,
                         (const float *)(uintptr_t)cbk, (size_t)r0, (size_t)r1, (size_t)C, (float *)(uintptr_t)out);
    else
#endif
        cb_decode_scalar((const uint8_t *)(uintptr_t)nz, (const uint8_t *)(uintptr_t)codes, rowp,
                         (const float *)(uintptr_t)cbk, (size_t)r0, (size_t)r1, (size_t)C, (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *args) { return PyBool_FromLong(simd_ok()); }

static PyObject *py_threaded(PyObject *self, PyObject *args) { return PyBool_FromLong(gomp_parallel != NULL); }

static PyMethodDef methods[] = {
    {"cb_matmul", py_cb_matmul, METH_VARARGS, "y[rows] += x[rows] @ delta^T from the codebook form."},
    {"cb_decode", py_cb_decode, METH_VARARGS, "Rows of the codebook form as dense float32."},
    {"bd_matmul", py_bd_matmul, METH_VARARGS, "y[rows] += x[rows] @ delta^T from BitDelta signs and scales."},
    {"matmul_many", py_matmul_many, METH_VARARGS, "Several cb_matmul / bd_matmul jobs in one OpenMP team."},
    {"simd", py_simd, METH_NOARGS, "Whether the AVX-512 paths run on this CPU."},
    {"threaded", py_threaded, METH_NOARGS, "Whether products can run on torch's OpenMP team."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "deltahub's resident-delta CPU kernels.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    load_omp();
    return PyModule_Create(&module);
}
