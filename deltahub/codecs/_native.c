/* Native kernels for the hot per-element loops of decoding and encoding (optional; pure numpy/torch fallbacks in
 * _rng.py / deltadq.py / _quant.py compute the same bits, and tests compare the two).
 *
 * - the counter-based generator and exact-count group selection of format_spec.md ("Seeded masks",
 *   "Group-wise dropout"): u_i = H(lo ^ K(hi)) ^ k1, per group the `keep` smallest keys (u_i, j);
 * - group scatter / gather between a dense block and its kept values, and the kept positions;
 * - merging the part-id stream with the per-part low-bit streams of separate quantization;
 * - encoding: 1-D Lloyd iterations, nearest-centroid codes with their error sums, and the packed
 *   part-id / low-bit streams (DeltaDQ's encoder).
 *
 * Every function takes plain buffers, checks their sizes against the arguments before touching
 * them (a stranger's delta chooses the numbers) and releases the GIL while it loops, so the
 * Python side runs blocks of one tensor on several threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the native decode kernels read little-endian words (the numpy paths serve big-endian machines)"
#endif

#define HI_SALT 0x85EBCA6Bu

static inline uint32_t h32(uint32_t x) {
    x ^= x >> 17; x *= 0xED5AD4BBu;
    x ^= x >> 11; x *= 0xAC4C1B51u;
    x ^= x >> 15; x *= 0x31848BABu;
    x ^= x >> 14;
    return x;
}

static inline uint32_t key_hi(uint32_t k2, uint32_t hi) { return h32(k2 ^ h32(hi ^ HI_SALT)); }

/* Vector helpers called from target_clones functions must be inlined into each clone: a call would pass
 * 32-byte vectors in registers from an AVX clone to a function compiled for the baseline ABI (in memory). */
#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CLONES
#endif

/* u[j] = u_(start + j) for j < n. */
CLONES
static void fill_u32(uint32_t *u, size_t n, uint32_t k1, uint32_t k2, uint64_t start) {
    uint64_t i = start;
    size_t done = 0;
    while (done < n) {
        uint32_t hi = (uint32_t)(i >> 32);
        uint32_t lo = (uint32_t)i;
        uint64_t room = ((uint64_t)1 << 32) - lo;
        size_t m = (size_t)((uint64_t)(n - done) < room ? (uint64_t)(n - done) : room);
        uint32_t kh = key_hi(k2, hi);
        for (size_t j = 0; j < m; j++) u[done + j] = h32((lo + (uint32_t)j) ^ kh) ^ k1;
        done += m;
        i += m;
    }
}

/* The (k+1)-th smallest of a[0..n) (distinct values), partially reordering a. Quickselect with a
 * median-of-three pivot; only used on the few keys that share the threshold's histogram bin. */
static uint64_t select_kth(uint64_t *a, size_t n, size_t k) {
    size_t lo = 0, hi = n - 1;
#define SWAP(i, j) do { uint64_t t_ = a[i]; a[i] = a[j]; a[j] = t_; } while (0)
    while (hi > lo) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < a[lo]) SWAP(mid, lo);
        if (a[hi] < a[lo]) SWAP(hi, lo);
        if (a[hi] < a[mid]) SWAP(hi, mid);
        SWAP(mid, hi);  /* the median of the three is the pivot, at hi */
        uint64_t piv = a[hi];
        size_t st = lo;
        for (size_t i = lo; i < hi; i++) if (a[i] < piv) { SWAP(i, st); st++; }
        SWAP(st, hi);
        if (k == st) return a[k];
        if (k < st) hi = st - 1; else lo = st + 1;
    }
#undef SWAP
    return a[lo];
}

enum { MODE_POS = 0, MODE_SCATTER_VALUES = 1, MODE_SCATTER_CODES = 2, MODE_GATHER = 3 };

typedef struct {
    int mode;
    int64_t *pos;          /* MODE_POS: out positions */
    float *dense;          /* scatter: the block written; gather: the block read */
    uint16_t *dense16;     /* scatter into a 16-bit block instead (acc only), of kind half */
    int half;
    const float *values;   /* MODE_SCATTER_VALUES */
    const uint8_t *codes;  /* MODE_SCATTER_CODES */
    const float *table;    /* MODE_SCATTER_CODES: 256 entries */
    float *kept;           /* MODE_GATHER: out values */
    int acc;               /* scatter: add into the block instead of overwriting it */
} walk_t;

/* Scratch for selecting in groups of g (allocated once per block). */
typedef struct {
    uint32_t *hist;   /* 2^hbits bins */
    uint64_t *cand;   /* keys of the threshold bin (at most g) */
    unsigned hbits;
} sel_t;

/* flags[j] = 1 for the keep smallest keys (u[j], j) of one group of g (1 <= keep < g). */
CLONES
static void select_group(const uint32_t *u, uint8_t *flags, size_t g, size_t keep, sel_t *s) {
    size_t small = keep <= g - keep + 1 ? keep : g - keep + 1;
    if (small <= 8 && g <= 128) {
        /* The keep-th smallest u: a sorted list of the `small` smallest (or largest) u seen, kept by
         * branch-free min/max exchanges; then the kept set is u < thr plus the first ties at thr. */
        uint32_t lst[8];
        uint32_t thr;
        if (small == keep) {
            for (size_t t = 0; t < small; t++) lst[t] = 0xFFFFFFFFu;
            for (size_t j = 0; j < g; j++) {
                uint32_t x = u[j];
                for (size_t t = 0; t < small; t++) {
                    uint32_t lo = lst[t] < x ? lst[t] : x;
                    x = lst[t] < x ? x : lst[t];
                    lst[t] = lo;
                }
            }
        } else {  /* the (g - keep + 1)-th largest is the keep-th smallest */
            for (size_t t = 0; t < small; t++) lst[t] = 0;
            for (size_t j = 0; j < g; j++) {
                uint32_t x = u[j];
                for (size_t t = 0; t < small; t++) {
                    uint32_t hi = lst[t] > x ? lst[t] : x;
                    x = lst[t] > x ? x : lst[t];
                    lst[t] = hi;
                }
            }
        }
        thr = lst[small - 1];
        size_t lt = 0;
        for (size_t j = 0; j < g; j++) lt += u[j] < thr;
        size_t need = keep - lt, eq = 0;  /* >= 1: thr itself is among the keep smallest */
        for (size_t j = 0; j < g; j++) {
            size_t e = u[j] == thr;
            flags[j] = (u[j] < thr) | (e & (eq < need));
            eq += e;
        }
        return;
    }
    /* Histogram of the top hbits bits: the bin where the count crosses keep holds the threshold;
     * lower bins are kept, higher ones dropped, and the few keys of that bin are selected exactly. */
    unsigned sh = 32 - s->hbits;
    size_t nb = (size_t)1 << s->hbits;
    memset(s->hist, 0, nb * sizeof(uint32_t));
    for (size_t j = 0; j < g; j++) s->hist[u[j] >> sh]++;
    size_t below = 0, b = 0;
    while (below + s->hist[b] < keep) below += s->hist[b++];
    size_t m = 0;
    for (size_t j = 0; j < g; j++) if ((u[j] >> sh) == b) s->cand[m++] = ((uint64_t)u[j] << 32) | (uint64_t)j;
    uint64_t kth = select_kth(s->cand, m, keep - below - 1);
    uint32_t tu = (uint32_t)(kth >> 32), tj = (uint32_t)kth;
    for (uint32_t j = 0; j < (uint32_t)g; j++) flags[j] = (u[j] < tu) | ((u[j] == tu) & (j <= tj));
}

/* Lane-parallel selection: LANES groups at once, one per vector lane (GCC/Clang vector extensions;
 * AVX2 where the CPU has it, through target clones). Each lane computes its group's u values, keeps
 * a sorted list of the `small` smallest (or largest) by min/max exchanges, and flags u <= the
 * keep-th smallest. A lane whose threshold value is tied (count != keep) is redone by the scalar
 * select_group, so the result is exactly that of the scalar rule. */
#define LANES 16
#define LIST_MAX 16
typedef uint32_t v8u __attribute__((vector_size(4 * LANES)));
typedef int32_t v8i __attribute__((vector_size(4 * LANES)));

ALWAYS_INLINE static inline v8u vh32(v8u x) {
    x ^= x >> 17; x *= 0xED5AD4BBu;
    x ^= x >> 11; x *= 0xAC4C1B51u;
    x ^= x >> 15; x *= 0x31848BABu;
    x ^= x >> 14;
    return x;
}

/* Lane-wise min / max written per lane with scalar MIN/MAX idioms, which GCC's SLP vectoriser turns into one
 * vpminud / vpmaxud (the mask-and-blend form compiled to a compare, a masked move and two logic ops). */
ALWAYS_INLINE static inline v8u vmin(v8u a, v8u b) {
    v8u r;
    for (int k = 0; k < LANES; k++) r[k] = a[k] < b[k] ? a[k] : b[k];
    return r;
}
ALWAYS_INLINE static inline v8u vmax(v8u a, v8u b) {
    v8u r;
    for (int k = 0; k < LANES; k++) r[k] = a[k] < b[k] ? b[k] : a[k];
    return r;
}

/* One batch of LANES groups with a list of S (a compile-time constant in each expansion, so the list stays in
 * vector registers: with S read at run time it lived on the stack, a load and a store per exchange). */
#define LANE_BATCHES(S)                                                                                           \
    for (size_t gi = 0; gi < ngroups; gi += LANES) {                                                             \
        uint32_t lo0 = (uint32_t)(first + gi * g);                                                               \
        v8u lst[(S)];                                                                                            \
        for (size_t t = 0; t < (S); t++) lst[t] = largest ? (v8u){0} : ~(v8u){0};                                \
        for (size_t j = 0; j < g; j++) {                                                                         \
            v8u x;                                                                                               \
            if (given) {  /* test hook: the u values are given (row-major groups), not generated */             \
                for (int k = 0; k < LANES; k++) x[k] = given[(gi + (size_t)k) * g + j];                          \
            } else {                                                                                             \
                x = vh32((lane_off + (lo0 + (uint32_t)j)) ^ kh) ^ k1;                                            \
            }                                                                                                    \
            U[j] = x;                                                                                            \
            if (largest) {                                                                                       \
                for (size_t t = 0; t < (S); t++) { v8u hi = vmax(lst[t], x); x = vmin(lst[t], x); lst[t] = hi; } \
            } else {                                                                                             \
                for (size_t t = 0; t < (S); t++) { v8u lo = vmin(lst[t], x); x = vmax(lst[t], x); lst[t] = lo; } \
            }                                                                                                    \
        }                                                                                                        \
        redo += lane_flags(flags + gi * g, U, lst[(S) - 1], g, keep, s, scratch);                                \
    }

/* Flags of one batch from its u values and each lane's threshold (u <= thr); a lane whose threshold value is
 * tied (count != keep) is redone by the scalar rule. Returns the lanes redone. */
ALWAYS_INLINE static inline size_t lane_flags(uint8_t *f, const v8u *U, v8u thr, size_t g, size_t keep, sel_t *s,
                                              uint32_t *scratch) {
    v8i cnt = {0};
    size_t redo = 0;
    for (size_t j = 0; j < g; j++) {
        v8i le = (v8i)(U[j] <= thr);  /* -1 where flagged */
        cnt -= le;
        for (int k = 0; k < LANES; k++) f[k * g + j] = (uint8_t)(le[k] & 1);
    }
    for (int k = 0; k < LANES; k++) {
        if ((size_t)cnt[k] != keep) {  /* a tie at the threshold: the scalar rule decides */
            for (size_t j = 0; j < g; j++) scratch[j] = U[j][k];
            select_group(scratch, f + k * g, g, keep, s);
            redo++;
        }
    }
    return redo;
}

/* Flags of `ngroups` (a multiple of LANES) whole groups starting at element `first` (flags[0] is
 * element `first`); the block must not cross a multiple of 2^32 (one key for all). Returns the
 * number of lanes redone by the scalar rule. */
CLONES
static size_t lane_select(uint8_t *flags, uint32_t k1, uint32_t kh, uint64_t first, size_t ngroups, size_t g,
                          size_t keep, sel_t *s, uint32_t *scratch, const uint32_t *given) {
    size_t small = keep <= g - keep + 1 ? keep : g - keep + 1;
    int largest = small != keep;
    v8u lane_off;
    for (int k = 0; k < LANES; k++) lane_off[k] = (uint32_t)(k * g);
    v8u U[64];
    size_t redo = 0;
    switch (small) {
        case 1: LANE_BATCHES(1) break;
        case 2: LANE_BATCHES(2) break;
        case 3: LANE_BATCHES(3) break;
        case 4: LANE_BATCHES(4) break;
        case 5: LANE_BATCHES(5) break;
        case 6: LANE_BATCHES(6) break;
        case 7: LANE_BATCHES(7) break;
        case 8: LANE_BATCHES(8) break;
        case 9: LANE_BATCHES(9) break;
        case 10: LANE_BATCHES(10) break;
        case 11: LANE_BATCHES(11) break;
        case 12: LANE_BATCHES(12) break;
        case 13: LANE_BATCHES(13) break;
        case 14: LANE_BATCHES(14) break;
        case 15: LANE_BATCHES(15) break;
        default: LANE_BATCHES(LIST_MAX) break;  /* (callers use lanes only for small <= LIST_MAX) */
    }
    return redo;
}

typedef float v8f __attribute__((vector_size(32)));

/* Kept-value expansion, 8 elements per step: for the 8 flags of a step (bit k = element k kept),
 * EXPAND_PERM[m] moves the next popcount(m) kept values into the kept lanes (vpermps under AVX2)
 * and EXPAND_LANES[m] zeroes the others. */
static int32_t EXPAND_PERM[256][8];
/* COMPRESS_PERM[m][k] = index of the k-th set bit of m (0 past the last): gathers the kept lanes of 8. */
static int32_t COMPRESS_PERM[256][8];
static int32_t EXPAND_LANES[256][8];

static void init_expand(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int k = 0; k < 8; k++) if ((m >> k) & 1) COMPRESS_PERM[m][c++] = k;
        c = 0;
        for (int k = 0; k < 8; k++) {
            int on = (m >> k) & 1;
            EXPAND_PERM[m][k] = on ? c : 0;
            EXPAND_LANES[m][k] = on ? -1 : 0;
            c += on;
        }
    }
}

/* The 8 flags (bytes of 0/1) at f as the bits of one byte, flag k in bit k: the multiply gathers byte k of the
 * little-endian word into bit 56 + k, with no carries between the terms. */
static inline ALWAYS_INLINE unsigned flags8(const uint8_t *f) {
    uint64_t w;
    memcpy(&w, f, 8);
    return (unsigned)((w * 0x0102040810204080ULL) >> 56);
}

#if defined(__GNUC__) && !defined(__clang__)
typedef int32_t v8s __attribute__((vector_size(32)));

/* The 8 lanes of a step with mask m: lane k gets the next kept value (from vals, in order) where bit k is set,
 * else 0.0f. vals must have 8 readable floats. */
static inline ALWAYS_INLINE v8f expand8(const float *vals, unsigned m) {
    v8f x;
    v8s p, lanes;
    memcpy(&x, vals, sizeof x);
    memcpy(&p, EXPAND_PERM[m], sizeof p);
    memcpy(&lanes, EXPAND_LANES[m], sizeof lanes);
    return (v8f)((v8s)__builtin_shuffle(x, p) & lanes);
}
#endif

/* d[j] (+)= flags[j] ? vals[next kept] : 0.0f for j < n; vals holds the kept values in order and 8
 * readable floats past the last one used (the scratch is padded). `acc` adds (d + 0.0f for dropped
 * elements: the bits of adding the decoded delta), else overwrites. */
CLONES
static void expand_kept(float *d, const uint8_t *flags, size_t n, const float *vals, int acc) {
    size_t j = 0, v = 0;
#if defined(__GNUC__) && !defined(__clang__)
    for (; j + 8 <= n; j += 8) {
        unsigned m = flags8(flags + j);
        v8f x = expand8(vals + v, m), y;
        if (acc) {
            memcpy(&y, d + j, sizeof y);
            x = y + x;
        }
        memcpy(d + j, &x, sizeof x);
        v += (size_t)__builtin_popcount(m);
    }
#endif
    for (; j < n; j++) {
        float x = flags[j] ? vals[v] : 0.0f;
        d[j] = acc ? d[j] + x : x;
        v += flags[j];
    }
}

/* The inverse of expand_kept: o[0..count) = d[j] for the flagged j < n, in order; returns count. Writes up
 * to 8 floats past it (o must have room: a padded scratch). Branch-free, 8 elements per step. */
CLONES
static size_t compress_kept(float *o, const uint8_t *flags, size_t n, const float *d) {
    size_t j = 0, v = 0;
#if defined(__GNUC__) && !defined(__clang__)
    for (; j + 8 <= n; j += 8) {
        unsigned m = flags8(flags + j);
        v8f x;
        v8s p;
        memcpy(&x, d + j, sizeof x);
        memcpy(&p, COMPRESS_PERM[m], sizeof p);
        x = __builtin_shuffle(x, p);
        memcpy(o + v, &x, sizeof x);
        v += (size_t)__builtin_popcount(m);
    }
#endif
    for (; j < n; j++) {
        o[v] = d[j];
        v += flags[j];
    }
    return v;
}

enum { HALF_NONE = 0, HALF_BF16 = 1, HALF_F16 = 2 };

/* bfloat16 targets (the rebuild of a bf16 model: bf16(float32(base) + delta), format_spec.md section 4):
 * widen by a 16-bit shift (exact), add in float32, narrow by round-to-nearest-even; a NaN sum becomes
 * 0xFFFF, as torch's CPU conversion writes it (so these bits equal the torch path's). */
typedef uint32_t v8w __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline float bf16_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__GNUC__) && !defined(__clang__)
ALWAYS_INLINE static inline v8f v_bf16_f32(v8h h) {
    v8w w = __builtin_convertvector(h, v8w) << 16;
    v8f f;
    memcpy(&f, &w, sizeof f);
    return f;
}

ALWAYS_INLINE static inline v8h v_f32_bf16(v8f f) {
    v8w u;
    memcpy(&u, &f, sizeof u);
    v8w nan = (v8w)((u & 0x7FFFFFFFu) > 0x7F800000u);
    v8w r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = (r & ~nan) | (nan & 0xFFFFu);
    return __builtin_convertvector(r, v8h);
}
#endif

/* float16 targets: exact widening and round-to-nearest-even narrowing, branch-free (the FP16 library's
 * algorithm, which torch's scalar conversions use; the hardware conversion gives the same bits for every
 * non-NaN value). */
static inline float f16_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    uint32_t nb = (two_w >> 4) + (0xE0u << 23), db = (two_w >> 17) | (126u << 23);
    float nf, df;
    memcpy(&nf, &nb, 4);
    memcpy(&df, &db, 4);
    nf *= 0x1.0p-112f;
    df -= 0.5f;
    uint32_t r;
    if (two_w < (1u << 27)) memcpy(&r, &df, 4);
    else memcpy(&r, &nf, 4);
    r |= sign;
    float f;
    memcpy(&f, &r, 4);
    return f;
}

static inline uint16_t f32_f16(float f) {
    uint32_t w, aw, shl1, eb, bb, bits;
    memcpy(&w, &f, 4);
    aw = w & 0x7FFFFFFFu;
    float absf, bf;
    memcpy(&absf, &aw, 4);
    float base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
    shl1 = w + w;
    eb = shl1 & 0xFF000000u;
    if (eb < 0x71000000u) eb = 0x71000000u;
    bb = (eb >> 1) + 0x07800000u;
    memcpy(&bf, &bb, 4);
    base = bf + base;
    memcpy(&bits, &base, 4);
    uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)(((w & 0x80000000u) >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
}

#if defined(__GNUC__) && !defined(__clang__)
ALWAYS_INLINE static inline v8f v_f16_f32(v8h h) {
    v8w w = __builtin_convertvector(h, v8w) << 16;
    v8w sign = w & 0x80000000u, two_w = w + w;
    v8w nb = (two_w >> 4) + (0xE0u << 23), db = (two_w >> 17) | (126u << 23);
    v8f nf, df;
    memcpy(&nf, &nb, sizeof nf);
    memcpy(&df, &db, sizeof df);
    nf = nf * 0x1.0p-112f;
    df = df - 0.5f;
    v8w nfb, dfb;
    memcpy(&nfb, &nf, sizeof nfb);
    memcpy(&dfb, &df, sizeof dfb);
    v8w den = (v8w)(two_w < (1u << 27));
    v8w r = sign | (dfb & den) | (nfb & ~den);
    v8f out;
    memcpy(&out, &r, sizeof out);
    return out;
}

ALWAYS_INLINE static inline v8h v_f32_f16(v8f f) {
    v8w w;
    memcpy(&w, &f, sizeof w);
    v8w aw = w & 0x7FFFFFFFu;
    v8f absf, bf;
    memcpy(&absf, &aw, sizeof absf);
    v8f base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
    v8w shl1 = w + w, eb = shl1 & 0xFF000000u;
    v8w lt = (v8w)(eb < 0x71000000u);
    eb = (eb & ~lt) | (lt & 0x71000000u);
    v8w bb = (eb >> 1) + 0x07800000u;
    memcpy(&bf, &bb, sizeof bf);
    base = bf + base;
    v8w bits;
    memcpy(&bits, &base, sizeof bits);
    v8w nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    v8w nan = (v8w)(shl1 > 0xFF000000u);
    v8w r = ((w & 0x80000000u) >> 16) | (nan & 0x7E00u) | (nonsign & ~nan);
    return __builtin_convertvector(r, v8h);
}

/* dtype(float32(h) + x) for a 16-bit kind: HALF_BF16 or HALF_F16. */
ALWAYS_INLINE static inline v8h v_add16(v8h h, v8f x, int kind) {
    return kind == HALF_BF16 ? v_f32_bf16(v_bf16_f32(h) + x) : v_f32_f16(v_f16_f32(h) + x);
}
#endif

static inline uint16_t add16(uint16_t h, float x, int kind) {
    return kind == HALF_BF16 ? f32_bf16(bf16_f32(h) + x) : f32_f16(f16_f32(h) + x);
}

/* expand_kept's add for a 16-bit target: d[j] = dtype(float32(d[j]) + (kept ? next value : 0.0f)). */
CLONES
static void expand_kept_16(uint16_t *d, const uint8_t *flags, size_t n, const float *vals, int kind) {
    size_t j = 0, v = 0;
#if defined(__GNUC__) && !defined(__clang__)
    for (; j + 8 <= n; j += 8) {
        unsigned m = flags8(flags + j);
        v8f x = expand8(vals + v, m);
        v8h h;
        memcpy(&h, d + j, sizeof h);
        h = v_add16(h, x, kind);
        memcpy(d + j, &h, sizeof h);
        v += (size_t)__builtin_popcount(m);
    }
#endif
    for (; j < n; j++) {
        d[j] = add16(d[j], flags[j] ? vals[v] : 0.0f, kind);
        v += flags[j];
    }
}

/* Elements per pass of walk_groups: scratch of 5 bytes each stays in cache and below malloc's
 * mmap threshold (fresh pages per call cost more than the work on a VM). */
#define CHUNK 16384

/* Walks the groups of [start, start + length) (whole groups of g), visiting kept elements in
 * row-major order; returns the number kept, or -1 when out of memory. */
static int64_t walk_groups(const walk_t *w, uint32_t k1, uint32_t k2, uint64_t start, size_t length,
                           size_t g, size_t keep) {
    size_t chunk = g >= CHUNK ? g : CHUNK / g * g;
    if (chunk > length) chunk = length;
    uint8_t *flags = (uint8_t *)malloc(chunk ? chunk : 1);
    uint32_t *u = (uint32_t *)malloc((chunk ? chunk : 1) * sizeof(uint32_t));
    float *vals = (w->mode == MODE_SCATTER_VALUES || w->mode == MODE_SCATTER_CODES || w->mode == MODE_GATHER)
                  ? (float *)calloc((chunk ? chunk : 1) + 8, sizeof(float)) : NULL;
    sel_t s = {0};
    unsigned hb = 1;
    while (hb < 16 && ((size_t)1 << hb) < g / 2) hb++;
    s.hbits = hb;
    s.hist = (uint32_t *)malloc(((size_t)1 << hb) * sizeof(uint32_t));
    s.cand = (uint64_t *)malloc(g * sizeof(uint64_t));
    if (!flags || !u || !s.hist || !s.cand || (!vals && w->mode != MODE_POS)) {
        free(flags); free(u); free(s.hist); free(s.cand); free(vals); return -1;
    }
    int64_t v = 0;
    size_t small = keep <= g - keep + 1 ? keep : g - keep + 1;
    int lane_ok = keep < g && g <= 64 && small <= LIST_MAX;
    for (size_t c0 = 0; c0 < length; c0 += chunk) {
        size_t n = length - c0 < chunk ? length - c0 : chunk;
        if (keep >= g) {
            memset(flags, 1, n);
        } else if (lane_ok && (start + c0) >> 32 == (start + c0 + n - 1) >> 32 && n / g >= LANES) {
            size_t nl = n / g / LANES * LANES;  /* groups done in lanes; the rest below */
            lane_select(flags, k1, key_hi(k2, (uint32_t)((start + c0) >> 32)), start + c0, nl, g, keep, &s, u, NULL);
            size_t done = nl * g;
            if (done < n) {
                fill_u32(u, n - done, k1, k2, start + c0 + done);
                for (size_t off = 0; off < n - done; off += g) select_group(u + off, flags + done + off, g, keep, &s);
            }
        } else {
            fill_u32(u, n, k1, k2, start + c0);
            if (keep == 1) {  /* the first smallest u of each group */
                memset(flags, 0, n);
                for (size_t off = 0; off < n; off += g) {
                    size_t best = 0;
                    uint32_t bu = u[off];
                    for (size_t j = 1; j < g; j++) {
                        uint32_t x = u[off + j];
                        int lt = x < bu;
                        bu = lt ? x : bu;
                        best = lt ? j : best;
                    }
                    flags[off + best] = 1;
                }
            } else {
                for (size_t off = 0; off < n; off += g) select_group(u + off, flags + off, g, keep, &s);
            }
        }
        switch (w->mode) {
        case MODE_POS:
            for (size_t j = 0; j < n; j++) if (flags[j]) w->pos[v++] = (int64_t)(start + c0 + j);
            break;
        case MODE_SCATTER_VALUES:
        case MODE_SCATTER_CODES: {
            /* the chunk holds whole groups, so exactly n / g * keep kept values (the walk's selection
             * keeps `keep` per group; the caller checked that the stream holds length / g * keep) */
            size_t nk = n / g * keep;
            if (w->mode == MODE_SCATTER_VALUES) memcpy(vals, w->values + v, nk * sizeof(float));
            else for (size_t k = 0; k < nk; k++) vals[k] = w->table[w->codes[v + k]];
            memset(vals + nk, 0, 8 * sizeof(float));
            if (w->dense16) expand_kept_16(w->dense16 + c0, flags, n, vals, w->half);
            else expand_kept(w->dense + c0, flags, n, vals, w->acc);
            v += (int64_t)nk;
            break;
        }
        default: {  /* gather: compact in the padded scratch, then copy the chunk's n / g * keep values */
            size_t nk = compress_kept(vals, flags, n, w->dense + c0), want = n / g * keep;
            if (nk > want) nk = want;  /* the selection keeps exactly `keep` per group; never past the buffer */
            memcpy(w->kept + v, vals, nk * sizeof(float));
            v += (int64_t)nk;
            break;
        }
        }
    }
    free(flags); free(u); free(s.hist); free(s.cand); free(vals);
    return v;
}

static int check_groups(unsigned long long start, Py_ssize_t length, Py_ssize_t g, Py_ssize_t keep) {
    if (g < 1 || keep < 1 || keep > g || length < 0 || length % g || start % (unsigned long long)g) {
        PyErr_Format(PyExc_ValueError, "bad group arguments: start=%llu length=%zd group_size=%zd keep=%zd",
                     start, length, g, keep);
        return -1;
    }
    return 0;
}

/* scatter(k1, k2, start, g, keep, dense_f32 (written), src, table or None, acc): the block's kept
 * elements get src's values in order (float32), or table[src code] (uint8 codes, a 256-entry float32
 * table); the others 0. With acc, those values are added to the block instead (0.0f to the dropped
 * ones, so the bits are those of adding the decoded delta). Returns the number of values used. */
static PyObject *py_scatter(PyObject *self, PyObject *args) {
    unsigned int k1, k2;
    unsigned long long start;
    Py_ssize_t g, keep;
    Py_buffer dense = {0}, src = {0};
    PyObject *table_obj, *ret = NULL;
    Py_buffer table = {0};
    int acc = 0, half = HALF_NONE;
    if (!PyArg_ParseTuple(args, "IIKnnw*y*O|pi", &k1, &k2, &start, &g, &keep, &dense, &src, &table_obj, &acc, &half)) return NULL;
    walk_t w = {0};
    w.acc = acc;
    w.half = half;
    if (half < HALF_NONE || half > HALF_F16 || (half && !acc)) {
        PyErr_SetString(PyExc_ValueError, "half must be 0 (float32), 1 (bf16) or 2 (f16); a 16-bit block is only added to"); goto done;
    }
    Py_ssize_t length = dense.len / (half ? 2 : (Py_ssize_t)sizeof(float));
    if (check_groups(start, length, g, keep)) goto done;
    Py_ssize_t nkept = length / g * keep;
    if (half) w.dense16 = (uint16_t *)dense.buf;
    else w.dense = (float *)dense.buf;
    if (table_obj == Py_None) {
        w.mode = MODE_SCATTER_VALUES;
        if (src.len < nkept * (Py_ssize_t)sizeof(float)) { PyErr_SetString(PyExc_ValueError, "too few values"); goto done; }
        w.values = (const float *)src.buf;
    } else {
        w.mode = MODE_SCATTER_CODES;
        if (PyObject_GetBuffer(table_obj, &table, PyBUF_SIMPLE)) goto done;
        if (table.len != 256 * (Py_ssize_t)sizeof(float)) {
            PyErr_SetString(PyExc_ValueError, "the code table must have 256 float32 entries"); goto done;
        }
        if (src.len < nkept) { PyErr_SetString(PyExc_ValueError, "too few codes"); goto done; }
        w.codes = (const uint8_t *)src.buf;
        w.table = (const float *)table.buf;
    }
    int64_t n;
    Py_BEGIN_ALLOW_THREADS
    n = walk_groups(&w, k1, k2, start, (size_t)length, (size_t)g, (size_t)keep);
    Py_END_ALLOW_THREADS
    if (n < 0) { PyErr_NoMemory(); goto done; }
    ret = PyLong_FromLongLong(n);
done:
    PyBuffer_Release(&dense);
    PyBuffer_Release(&src);
    if (table.obj) PyBuffer_Release(&table);
    return ret;
}

/* gather(k1, k2, start, g, keep, dense_f32 (read), kept_f32 (written)) -> count: the block's kept values in order. */
static PyObject *py_gather(PyObject *self, PyObject *args) {
    unsigned int k1, k2;
    unsigned long long start;
    Py_ssize_t g, keep;
    Py_buffer dense = {0}, kept = {0};
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "IIKnny*w*", &k1, &k2, &start, &g, &keep, &dense, &kept)) return NULL;
    walk_t w = {0};
    Py_ssize_t length = dense.len / (Py_ssize_t)sizeof(float);
    if (check_groups(start, length, g, keep)) goto done;
    if (kept.len < length / g * keep * (Py_ssize_t)sizeof(float)) { PyErr_SetString(PyExc_ValueError, "value buffer too small"); goto done; }
    w.mode = MODE_GATHER;
    w.dense = (float *)dense.buf;
    w.kept = (float *)kept.buf;
    int64_t n;
    Py_BEGIN_ALLOW_THREADS
    n = walk_groups(&w, k1, k2, start, (size_t)length, (size_t)g, (size_t)keep);
    Py_END_ALLOW_THREADS
    if (n < 0) { PyErr_NoMemory(); goto done; }
    ret = PyLong_FromLongLong(n);
done:
    PyBuffer_Release(&dense);
    PyBuffer_Release(&kept);
    return ret;
}

/* positions(k1, k2, start, length, g, keep, out_int64) -> count: kept row-major indices. */
static PyObject *py_positions(PyObject *self, PyObject *args) {
    unsigned int k1, k2;
    unsigned long long start;
    Py_ssize_t length, g, keep;
    Py_buffer out = {0};
    if (!PyArg_ParseTuple(args, "IIKnnnw*", &k1, &k2, &start, &length, &g, &keep, &out)) return NULL;
    PyObject *ret = NULL;
    if (check_groups(start, length, g, keep)) goto done;
    if (out.len < length / g * keep * (Py_ssize_t)sizeof(int64_t)) { PyErr_SetString(PyExc_ValueError, "position buffer too small"); goto done; }
    walk_t w = {0};
    w.mode = MODE_POS;
    w.pos = (int64_t *)out.buf;
    int64_t n;
    Py_BEGIN_ALLOW_THREADS
    n = walk_groups(&w, k1, k2, start, (size_t)length, (size_t)g, (size_t)keep);
    Py_END_ALLOW_THREADS
    if (n < 0) { PyErr_NoMemory(); goto done; }
    ret = PyLong_FromLongLong(n);
done:
    PyBuffer_Release(&out);
    return ret;
}

/* select_flags(u_uint32, g, keep, flags_u8 (written), lanes) -> scalar lanes redone: the selection rule
 * on given u values (a test hook, so ties at the threshold can be made on purpose); lanes=1 runs the
 * vector-lane path (whole batches of LANES groups), lanes=0 the scalar one. */
static PyObject *py_select_flags(PyObject *self, PyObject *args) {
    Py_buffer ub = {0}, fb = {0};
    Py_ssize_t g, keep;
    int lanes;
    if (!PyArg_ParseTuple(args, "y*nnw*p", &ub, &g, &keep, &fb, &lanes)) return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)ub.len / 4, redo = 0;
    sel_t s = {0};
    uint32_t *scratch = NULL;
    if (g < 2 || g > 64 || keep < 1 || keep >= g || n % (size_t)g || (size_t)fb.len != n
        || (lanes && (n / (size_t)g) % LANES)) {
        PyErr_SetString(PyExc_ValueError, "select_flags: bad arguments"); goto done;
    }
    s.hbits = 6;
    s.hist = (uint32_t *)malloc(64 * sizeof(uint32_t));
    s.cand = (uint64_t *)malloc((size_t)g * sizeof(uint64_t));
    scratch = (uint32_t *)malloc((size_t)g * sizeof(uint32_t));
    if (!s.hist || !s.cand || !scratch) { PyErr_NoMemory(); goto done; }
    const uint32_t *u = (const uint32_t *)ub.buf;
    uint8_t *f = (uint8_t *)fb.buf;
    if (lanes) redo = lane_select(f, 0, 0, 0, n / (size_t)g, (size_t)g, (size_t)keep, &s, scratch, u);
    else for (size_t off = 0; off < n; off += (size_t)g) select_group(u + off, f + off, (size_t)g, (size_t)keep, &s);
    ret = PyLong_FromSize_t(redo);
done:
    free(s.hist); free(s.cand); free(scratch);
    PyBuffer_Release(&ub);
    PyBuffer_Release(&fb);
    return ret;
}

/* Reads the `bits`-bit code i (LSB-first bit stream); the caller checked the stream's length. */
static inline unsigned read_code(const uint8_t *s, size_t nbytes, uint64_t i, unsigned bits) {
    uint64_t t = i * bits;
    size_t byte = (size_t)(t >> 3);
    unsigned sh = (unsigned)(t & 7);
    unsigned v = s[byte];
    if (byte + 1 < nbytes) v |= (unsigned)s[byte + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1);
}

static inline size_t packed_nbytes(uint64_t n, unsigned bits) { return (size_t)((n * bits + 7) / 8); }

/* counts[p] = members of part p among the n pbits-bit part ids of s (nbytes checked by the caller). */
CLONES
static void count_parts(uint64_t *counts, const uint8_t *s, size_t nbytes, uint64_t n, unsigned pbits) {
    if (pbits == 1) {
        uint64_t ones = 0;
        size_t full = (size_t)(n / 64), i8 = 0;
        for (size_t k = 0; k < full; k++) {
            uint64_t w;
            memcpy(&w, s + 8 * k, 8);
            ones += (uint64_t)__builtin_popcountll(w);
        }
        for (i8 = full * 8; i8 < (size_t)(n / 8); i8++) ones += (uint64_t)__builtin_popcount(s[i8]);
        for (uint64_t i = (uint64_t)(n / 8) * 8; i < n; i++) ones += read_code(s, nbytes, i, 1);
        counts[1] = ones;
        counts[0] = n - ones;
        return;
    }
    for (uint64_t i = 0; i < n; i++) counts[read_code(s, nbytes, i, pbits)]++;
}

/* part_counts(part_packed, n, pbits) -> list of 2^pbits member counts. */
static PyObject *py_part_counts(PyObject *self, PyObject *args) {
    Py_buffer part = {0};
    Py_ssize_t n;
    unsigned int pbits;
    if (!PyArg_ParseTuple(args, "y*nI", &part, &n, &pbits)) return NULL;
    PyObject *ret = NULL;
    uint64_t counts[256] = {0};
    if (n < 0 || pbits < 1 || pbits > 8 || (size_t)part.len != packed_nbytes((uint64_t)n, pbits)) {
        PyErr_SetString(PyExc_ValueError, "part stream does not fit its count"); goto done;
    }
    const uint8_t *s = (const uint8_t *)part.buf;
    Py_BEGIN_ALLOW_THREADS
    count_parts(counts, s, (size_t)part.len, (uint64_t)n, pbits);
    Py_END_ALLOW_THREADS
    ret = PyList_New(1 << pbits);
    if (!ret) goto done;
    for (unsigned j = 0; j < (1u << pbits); j++) PyList_SET_ITEM(ret, j, PyLong_FromUnsignedLongLong(counts[j]));
done:
    PyBuffer_Release(&part);
    return ret;
}

/* 8 bytes of s from byte `at` (zeros past nbytes): a window for reading up to 57 bits from any bit. */
static inline uint64_t load64(const uint8_t *s, size_t nbytes, size_t at) {
    uint64_t w = 0;
    if (at + 8 <= nbytes) memcpy(&w, s + at, 8);
    else if (at < nbytes) memcpy(&w, s + at, nbytes - at);
    return w;  /* little-endian (checked at the top): byte 0 is the low byte */
}

/* merge_parts for two parts (pbits 1), 8 codes per step: the step's 8 part bits choose, position by
 * position, the next low code of part 0 or part 1 from a 64-bit window of each low stream. */
CLONES
static void merge_two_parts(uint8_t *o, uint64_t n, const uint8_t *s, const uint8_t *const *ls, const size_t *llen,
                            unsigned lbits) {
    uint64_t k[2] = {0, 0};  /* codes of each part used so far */
    uint64_t full = n / 8;
    unsigned lmask = (1u << lbits) - 1;
    for (uint64_t b = 0; b < full; b++) {
        unsigned m = s[b];
        uint64_t w[2];
        for (int p = 0; p < 2; p++) {
            uint64_t bit = k[p] * lbits;
            w[p] = load64(ls[p], llen[p], (size_t)(bit >> 3)) >> (bit & 7);
        }
        uint64_t out = 0;
        for (int t = 0; t < 8; t++) {
            unsigned p = (m >> t) & 1u;
            uint64_t c = w[p] & lmask;
            w[p] >>= lbits;
            out |= (uint64_t)((p << lbits) | c) << (8 * t);
        }
        memcpy(o + 8 * b, &out, 8);
        unsigned ones = (unsigned)__builtin_popcount(m);
        k[1] += ones;
        k[0] += 8 - ones;
    }
    for (uint64_t i = full * 8; i < n; i++) {
        unsigned p = (s[i >> 3] >> (i & 7)) & 1u;
        o[i] = (uint8_t)((p << lbits) | read_code(ls[p], llen[p], k[p]++, lbits));
    }
}

/* merge_parts(out_u8, part_packed, pbits, lows (sequence of packed buffers), lbits): code i =
 * (part_i << lbits) | next low of part_i. Each low stream must hold exactly its part's count. */
static PyObject *py_merge_parts(PyObject *self, PyObject *args) {
    Py_buffer out = {0}, part = {0};
    unsigned int pbits, lbits;
    PyObject *lows;
    if (!PyArg_ParseTuple(args, "w*y*IOI", &out, &part, &pbits, &lows, &lbits)) return NULL;
    PyObject *ret = NULL, *seq = NULL;
    Py_buffer lb[256];
    Py_ssize_t nl = 0, got = 0;
    uint64_t counts[256] = {0};
    uint64_t next[256] = {0};
    const uint8_t *ls[256];
    size_t llen[256];
    uint64_t n = (uint64_t)out.len;
    if (pbits < 1 || pbits > 8 || lbits < 1 || pbits + lbits > 8 || (size_t)part.len != packed_nbytes(n, pbits)) {
        PyErr_SetString(PyExc_ValueError, "merge_parts: streams do not fit the code count"); goto done;
    }
    seq = PySequence_Fast(lows, "lows must be a sequence");
    if (!seq) goto done;
    nl = PySequence_Fast_GET_SIZE(seq);
    if (nl != (Py_ssize_t)(1 << pbits)) { PyErr_SetString(PyExc_ValueError, "merge_parts: one low stream per part"); goto done; }
    for (; got < nl; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &lb[got], PyBUF_SIMPLE)) goto done;
        ls[got] = (const uint8_t *)lb[got].buf;
        llen[got] = (size_t)lb[got].len;
    }
    const uint8_t *s = (const uint8_t *)part.buf;
    uint8_t *o = (uint8_t *)out.buf;
    count_parts(counts, s, (size_t)part.len, n, pbits);
    for (Py_ssize_t j = 0; j < nl; j++) {
        if (llen[j] != packed_nbytes(counts[j], lbits)) {
            PyErr_Format(PyExc_ValueError, "merge_parts: low stream %zd has %zu bytes, its %llu codes need %zu",
                         j, llen[j], (unsigned long long)counts[j], packed_nbytes(counts[j], lbits));
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (pbits == 1) {
        merge_two_parts(o, n, s, ls, llen, lbits);
    } else {
        for (uint64_t i = 0; i < n; i++) {
            unsigned p = read_code(s, part.len, i, pbits);
            uint64_t k = next[p]++;
            o[i] = (uint8_t)((p << lbits) | read_code(ls[p], llen[p], k, lbits));
        }
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    for (Py_ssize_t j = 0; j < got; j++) PyBuffer_Release(&lb[j]);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    PyBuffer_Release(&part);
    return ret;
}

/* Byte value -> its 8 signs as floats (bit 1 = +1, bit 0 = -1), LSB first. */
static float PM1[256][8];

static void init_pm1(void) {
    for (int v = 0; v < 256; v++)
        for (int k = 0; k < 8; k++) PM1[v][k] = ((v >> k) & 1) ? 1.0f : -1.0f;
}

/* sign_add for scale groups that are whole bytes (gcols % 8 == 0, or one group per row): 8 columns
 * per step, +-1 from the table times the scale (exact), then one add per element. */
CLONES
static void sign_add_rows8(size_t rows, size_t cols, float *d, const uint8_t *b, const float *sc, size_t stride, size_t gcols) {
    size_t pc = (cols + 7) / 8, full = cols / 8;
    for (size_t r = 0; r < rows; r++) {
        float *dr = d + r * cols;
        const uint8_t *br = b + r * pc;
        const float *sr = sc + r * stride;
        for (size_t k = 0; k < full; k++) {
            float s = sr[(k * 8) / gcols];
            v8f t, x;
            memcpy(&t, PM1[br[k]], sizeof t);
            memcpy(&x, dr + k * 8, sizeof x);
            x = x + t * s;
            memcpy(dr + k * 8, &x, sizeof x);
        }
        for (size_t c = full * 8; c < cols; c++) {
            float s = sr[c / gcols];
            dr[c] = dr[c] + (((br[c >> 3] >> (c & 7)) & 1) ? s : -s);
        }
    }
}

/* sign_add into a 16-bit block: d = dtype(float32(d) + (bit ? s : -s)), 8 columns per step where the scale
 * groups are whole bytes. */
CLONES
static void sign_add_16(size_t rows, size_t cols, uint16_t *d, const uint8_t *b, const float *sc, size_t stride, size_t gcols,
                        int kind) {
    size_t pc = (cols + 7) / 8, full = (gcols % 8 == 0 || gcols >= cols) ? cols / 8 : 0;
    for (size_t r = 0; r < rows; r++) {
        uint16_t *dr = d + r * cols;
        const uint8_t *br = b + r * pc;
        const float *sr = sc + r * stride;
#if defined(__GNUC__) && !defined(__clang__)
        for (size_t k = 0; k < full; k++) {
            float s = sr[(k * 8) / gcols];
            v8f t;
            v8h h;
            memcpy(&t, PM1[br[k]], sizeof t);
            memcpy(&h, dr + k * 8, sizeof h);
            h = v_add16(h, t * s, kind);
            memcpy(dr + k * 8, &h, sizeof h);
        }
#else
        full = 0;
#endif
        for (size_t c = full * 8; c < cols; c++) {
            float s = sr[c / gcols];
            dr[c] = add16(dr[c], ((br[c >> 3] >> (c & 7)) & 1) ? s : -s, kind);
        }
    }
}

/* sign_add(dense_f32 [rows, cols] (added to in place), packed [rows, ceil(cols/8)], scales_f32, scale_stride,
 * group_cols): dense[r, c] += bit(r, c) ? s : -s with s = scales[r * scale_stride + c / group_cols]
 * (BitDelta; +-1 * s is exact, so this is the bits of float32(base) + delta). */
static PyObject *py_sign_add(PyObject *self, PyObject *args) {
    Py_buffer dense = {0}, packed = {0}, scales = {0};
    Py_ssize_t rows, cols, stride, gcols;
    PyObject *ret = NULL;
    int half = HALF_NONE;
    if (!PyArg_ParseTuple(args, "w*y*y*nnnn|i", &dense, &packed, &scales, &rows, &cols, &stride, &gcols, &half)) return NULL;
    Py_ssize_t pc = (cols + 7) / 8;
    if (half < HALF_NONE || half > HALF_F16 || rows < 0 || cols < 0 || stride < 0 || gcols < 1
        || dense.len != rows * cols * (half ? 2 : (Py_ssize_t)sizeof(float))
        || packed.len != rows * pc) {
        PyErr_SetString(PyExc_ValueError, "sign_add: buffers do not fit the shape"); goto done;
    }
    Py_ssize_t ng = cols ? (cols - 1) / gcols + 1 : 0;
    if (rows && cols && ((rows - 1) * stride + ng) * (Py_ssize_t)sizeof(float) > scales.len) {
        PyErr_SetString(PyExc_ValueError, "sign_add: too few scales"); goto done;
    }
    float *d = (float *)dense.buf;
    const uint8_t *b = (const uint8_t *)packed.buf;
    const float *sc = (const float *)scales.buf;
    Py_BEGIN_ALLOW_THREADS
    if (half) sign_add_16((size_t)rows, (size_t)cols, (uint16_t *)dense.buf, b, sc, (size_t)stride, (size_t)gcols, half);
    else if (gcols % 8 == 0 || gcols >= cols) sign_add_rows8((size_t)rows, (size_t)cols, d, b, sc, (size_t)stride, (size_t)gcols);
    else for (Py_ssize_t r = 0; r < rows; r++) {
        float *dr = d + r * cols;
        const uint8_t *br = b + r * pc;
        const float *sr = sc + r * stride;
        for (Py_ssize_t c0 = 0; c0 < cols; c0 += gcols) {
            Py_ssize_t c1 = c0 + gcols < cols ? c0 + gcols : cols;
            float pos = sr[c0 / gcols], neg = -pos;
            for (Py_ssize_t c = c0; c < c1; c++) {
                int bit = (br[c >> 3] >> (c & 7)) & 1;
                dr[c] = dr[c] + (bit ? pos : neg);
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    PyBuffer_Release(&dense);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&scales);
    return ret;
}

/* unshuffle(dst, planes, itemsize, xor): element i's byte k is planes[k * n + i] (byte planes, as
 * raw's shuffle writes them); written into dst, or XORed into it (raw's xor mode, straight into the
 * base tensor's bytes). One pass, no transposed copy. */
CLONES
static void unshuffle4(uint32_t *d, const uint8_t *p, size_t n, int x) {
    const uint8_t *p0 = p, *p1 = p + n, *p2 = p + 2 * n, *p3 = p + 3 * n;
    if (x) for (size_t i = 0; i < n; i++) d[i] ^= (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 | (uint32_t)p3[i] << 24;
    else for (size_t i = 0; i < n; i++) d[i] = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 | (uint32_t)p3[i] << 24;
}

CLONES
static void unshuffle2(uint16_t *d, const uint8_t *p, size_t n, int x) {
    const uint8_t *p0 = p, *p1 = p + n;
    if (x) for (size_t i = 0; i < n; i++) d[i] ^= (uint16_t)(p0[i] | p1[i] << 8);
    else for (size_t i = 0; i < n; i++) d[i] = (uint16_t)(p0[i] | p1[i] << 8);
}

static PyObject *py_unshuffle(PyObject *self, PyObject *args) {
    Py_buffer dst = {0}, planes = {0};
    Py_ssize_t itemsize;
    int x = 0;
    if (!PyArg_ParseTuple(args, "w*y*n|p", &dst, &planes, &itemsize, &x)) return NULL;
    PyObject *ret = NULL;
    if (itemsize < 1 || itemsize > 16 || dst.len != planes.len || dst.len % itemsize) {
        PyErr_SetString(PyExc_ValueError, "unshuffle: buffers do not fit the item size"); goto done;
    }
    size_t n = (size_t)(dst.len / itemsize), isz = (size_t)itemsize;
    uint8_t *d = (uint8_t *)dst.buf;
    const uint8_t *p = (const uint8_t *)planes.buf;
    Py_BEGIN_ALLOW_THREADS
    if (isz == 4 && ((uintptr_t)d & 3) == 0) unshuffle4((uint32_t *)d, p, n, x);
    else if (isz == 2 && ((uintptr_t)d & 1) == 0) unshuffle2((uint16_t *)d, p, n, x);
    else for (size_t k = 0; k < isz; k++) {
        const uint8_t *pk = p + k * n;
        if (x) for (size_t i = 0; i < n; i++) d[i * isz + k] ^= pk[i];
        else for (size_t i = 0; i < n; i++) d[i * isz + k] = pk[i];
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&planes);
    return ret;
}

/* xor_plane(dst, seg, itemsize, k, i0): XOR seg[i] into byte k of element i0 + i of dst: one byte plane's
 * segment of raw's shuffled xor payload, as a streamed decompression hands it out (so the payload is never
 * whole in memory). */
CLONES
static void xor_plane2(uint16_t *d, const uint8_t *s, size_t m, int sh) {
    for (size_t i = 0; i < m; i++) d[i] ^= (uint16_t)((uint16_t)s[i] << sh);
}

CLONES
static void xor_plane4(uint32_t *d, const uint8_t *s, size_t m, int sh) {
    for (size_t i = 0; i < m; i++) d[i] ^= (uint32_t)s[i] << sh;
}

static PyObject *py_xor_plane(PyObject *self, PyObject *args) {
    Py_buffer dst = {0}, seg = {0};
    Py_ssize_t itemsize, k, i0;
    if (!PyArg_ParseTuple(args, "w*y*nnn", &dst, &seg, &itemsize, &k, &i0)) return NULL;
    PyObject *ret = NULL;
    if (itemsize < 1 || itemsize > 16 || k < 0 || k >= itemsize || i0 < 0 || dst.len % itemsize
        || i0 > dst.len / itemsize || seg.len > dst.len / itemsize - i0) {
        PyErr_SetString(PyExc_ValueError, "xor_plane: the segment does not fit the buffer"); goto done;
    }
    size_t m = (size_t)seg.len, isz = (size_t)itemsize;
    uint8_t *d = (uint8_t *)dst.buf + (size_t)i0 * isz;
    const uint8_t *p = (const uint8_t *)seg.buf;
    Py_BEGIN_ALLOW_THREADS
    if (isz == 4 && ((uintptr_t)d & 3) == 0) xor_plane4((uint32_t *)d, p, m, (int)(8 * k));
    else if (isz == 2 && ((uintptr_t)d & 1) == 0) xor_plane2((uint16_t *)d, p, m, (int)(8 * k));
    else for (size_t i = 0; i < m; i++) d[i * isz + (size_t)k] ^= p[i];
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&seg);
    return ret;
}

/* ------------------------------------------------------------------------------------------ encoding
 * Encoder kernels (DeltaDQ's k-means and code streams). Their results are bit-identical to the
 * numpy/torch paths of _quant.py / deltadq.py for codes, codebooks and packed bytes; the float64
 * error sums are the same sums in another order (last-bit differences only). */

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Number of elements of sorted s[0..n) that are <= v (numpy searchsorted side="right"). */
static inline size_t upper_bound_f(const float *s, size_t n, float v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s[mid] <= v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* companded_init(sorted_f32, bins, cbrt_f64, out_f32) -> True, or False when a bin holds more values than the
 * table covers: _companded_init's start codebook, step for step what its numpy lines compute (float64 bin
 * edges rounded to float32, counts by binary search, cube roots from cbrt_f64[count] (numpy's own values:
 * cbrt_f64[c] = cbrt(c)), sequential float64 prefix sums, quantiles by searchsorted side="left"). No
 * target_clones: a fused multiply-add would round the edges differently. */
static int companded_c(const float *s, size_t n, size_t bins, const double *cb, size_t nt, float *o, size_t k,
                       double *cdf) {
    double lo = (double)s[0], hi = (double)s[n - 1];
    double width = (hi - lo) / (double)bins, acc = 0.0;
    size_t prev = 0;
    int fits = 1;
    for (size_t i = 0; i < bins && fits; i++) {
        size_t cut = n;
        if (i + 1 < bins) {
            double e64 = width * (double)(i + 1);
            e64 = lo + e64;
            float e = (float)e64;
            size_t a = 0, b = n;  /* first index with s[j] >= e (side="left") */
            while (a < b) {
                size_t mid = a + (b - a) / 2;
                if (s[mid] < e) a = mid + 1;
                else b = mid;
            }
            cut = a;
        }
        size_t cnt = cut >= prev ? cut - prev : 0;
        if (cut < prev || cnt >= nt) fits = 0;
        else { acc += cb[cnt]; cdf[i] = acc; prev = cut; }
    }
    if (fits) {
        double total = cdf[bins - 1];
        for (size_t i = 0; i < bins; i++) cdf[i] /= total;
        for (size_t j = 0; j < k; j++) {
            double t = ((double)j + 0.5) / (double)k;
            size_t a = 0, b = bins;  /* first index with cdf[i] >= t */
            while (a < b) {
                size_t mid = a + (b - a) / 2;
                if (cdf[mid] < t) a = mid + 1;
                else b = mid;
            }
            if (a > bins - 1) a = bins - 1;
            double v = ((double)a + 0.5) * width;
            v = lo + v;
            o[j] = (float)v;
        }
    }
    return fits;
}

static PyObject *py_companded_init(PyObject *self, PyObject *args) {
    Py_buffer srt = {0}, tab = {0}, out = {0};
    Py_ssize_t bins_;
    if (!PyArg_ParseTuple(args, "y*ny*w*", &srt, &bins_, &tab, &out)) return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)srt.len / sizeof(float), k = (size_t)out.len / sizeof(float);
    size_t nt = (size_t)tab.len / sizeof(double);
    double *cdf = NULL;
    if (n < 1 || k < 1 || bins_ < 1 || srt.len % sizeof(float) || out.len % sizeof(float) || tab.len % sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "companded_init: bad sizes"); goto done;
    }
    size_t bins = (size_t)bins_;
    cdf = (double *)malloc(bins * sizeof(double));
    if (!cdf) { PyErr_NoMemory(); goto done; }
    int fits;
    Py_BEGIN_ALLOW_THREADS
    fits = companded_c((const float *)srt.buf, n, bins, (const double *)tab.buf, nt, (float *)out.buf, k, cdf);
    Py_END_ALLOW_THREADS
    ret = PyBool_FromLong(fits);
done:
    free(cdf);
    PyBuffer_Release(&srt);
    PyBuffer_Release(&tab);
    PyBuffer_Release(&out);
    return ret;
}

/* sort_f32(values_f32, out_f32): out = values in ascending order (LSD radix sort on order-preserving uint32 keys,
 *   three 11-bit passes; numpy's sort took ~20 ns per value here, this ~2). Values compare as floats do (-0.0 sorts
 *   before +0.0: equal values, interchangeable for the k-means fit); NaNs sort to the ends (callers pass finite
 *   values). */
static inline uint32_t f32_key(uint32_t u) { return (u & 0x80000000u) ? ~u : (u ^ 0x80000000u); }
static inline uint32_t key_f32(uint32_t k) { return (k & 0x80000000u) ? (k ^ 0x80000000u) : ~k; }

/* Sorts the n floats of in (as their bits) into out; tmp: n words of scratch. -1 when out of memory. */
static int sort_f32_c(const uint32_t *in, uint32_t *out, uint32_t *tmp, size_t n) {
    enum { B = 11, NB = 1 << B };
    static const int shift[3] = {0, B, 2 * B};
    size_t (*cnt)[NB] = calloc(3, sizeof(*cnt));
    if (!cnt) return -1;
    for (size_t i = 0; i < n; i++) {
        uint32_t k = f32_key(in[i]);
        tmp[i] = k;
        cnt[0][k & (NB - 1)]++;
        cnt[1][(k >> B) & (NB - 1)]++;
        cnt[2][k >> (2 * B)]++;
    }
    uint32_t *a = tmp, *b = out;
    for (int pass = 0; pass < 3; pass++) {
        size_t *c = cnt[pass], sum = 0;
        for (size_t j = 0; j < NB; j++) { size_t t = c[j]; c[j] = sum; sum += t; }
        int sh = shift[pass];
        for (size_t i = 0; i < n; i++) { uint32_t k = a[i]; b[c[(k >> sh) & (NB - 1)]++] = k; }
        uint32_t *t = a; a = b; b = t;
    }
    if (a != out) memcpy(out, a, n * sizeof(uint32_t));  /* (an odd pass count ends in out: never taken) */
    for (size_t i = 0; i < n; i++) out[i] = key_f32(out[i]);
    free(cnt);
    return 0;
}

static PyObject *py_sort_f32(PyObject *self, PyObject *args) {
    Py_buffer src = {0}, dst = {0};
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    PyObject *ret = NULL;
    uint32_t *tmp = NULL;
    int ok;
    if (src.len != dst.len || src.len % sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "sort_f32: bad sizes"); goto done;
    }
    size_t n = (size_t)src.len / sizeof(float);
    tmp = (uint32_t *)malloc((n ? n : 1) * sizeof(uint32_t));
    if (!tmp) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    ok = sort_f32_c((const uint32_t *)src.buf, (uint32_t *)dst.buf, tmp, n) == 0;
    Py_END_ALLOW_THREADS
    if (!ok) { PyErr_NoMemory(); goto done; }
    ret = Py_None; Py_INCREF(ret);
done:
    free(tmp);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

/* lloyd(sorted_f32, codebook_f32 (in/out, sorted), iters) -> iterations run: 1-D Lloyd on sorted data,
 * each step exactly what kmeans_codebook's numpy loop computes (float32 midpoints, float64 prefix sums,
 * float64 means rounded to float32, sorted). */
static Py_ssize_t lloyd_c(const float *s, size_t n, float *c, size_t k, Py_ssize_t iters, double *csum) {
    Py_ssize_t it = 0;
    csum[0] = 0.0;
    for (size_t i = 0; i < n; i++) csum[i + 1] = csum[i] + (double)s[i];
    size_t cuts[257];
    float nw[256];
    for (; it < iters; it++) {
        cuts[0] = 0;
        cuts[k] = n;
        for (size_t j = 0; j + 1 < k; j++) cuts[j + 1] = upper_bound_f(s, n, (c[j] + c[j + 1]) / 2.0f);
        for (size_t j = 0; j < k; j++) {
            size_t cnt = cuts[j + 1] - cuts[j];
            nw[j] = cnt ? (float)((csum[cuts[j + 1]] - csum[cuts[j]]) / (double)cnt) : c[j];
        }
        qsort(nw, k, sizeof(float), cmp_float);
        if (!memcmp(nw, c, k * sizeof(float))) break;
        memcpy(c, nw, k * sizeof(float));
    }
    return it;
}

static PyObject *py_lloyd(PyObject *self, PyObject *args) {
    Py_buffer srt = {0}, cb = {0};
    Py_ssize_t iters;
    if (!PyArg_ParseTuple(args, "y*w*n", &srt, &cb, &iters)) return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)srt.len / sizeof(float), k = (size_t)cb.len / sizeof(float);
    double *csum = NULL;
    if (k < 1 || k > 256 || srt.len % sizeof(float) || cb.len % sizeof(float) || iters < 0) {
        PyErr_SetString(PyExc_ValueError, "lloyd: bad sizes"); goto done;
    }
    csum = (double *)malloc((n + 1) * sizeof(double));
    if (!csum) { PyErr_NoMemory(); goto done; }
    Py_ssize_t it;
    Py_BEGIN_ALLOW_THREADS
    it = lloyd_c((const float *)srt.buf, n, (float *)cb.buf, k, iters, csum);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromSsize_t(it);
done:
    free(csum);
    PyBuffer_Release(&srt);
    PyBuffer_Release(&cb);
    return ret;
}

/* quantize(kept_f32, scale, codebook_f32 (sorted, 1..256), codes_u8 (written), stats)
 *   -> (sum kept^2, sum err^2, sum err*kept): the code of value v = float32(kept * scale) is the number of
 *   codebook midpoints strictly below v, as assign_codebook (torch.bucketize) gives it; err = codebook[code]
 *   - kept, the sums in float64 ((0, 0, 0) without stats). scale 1 codes the given values themselves. */
CLONES
static void assign_codes(uint8_t *codes, const float *kept, float scale, size_t n, const float *mids, size_t nm) {
    enum { CH = 2048 };
    float v[CH];
    for (size_t a = 0; a < n; a += CH) {
        size_t m = n - a < CH ? n - a : CH;
        uint8_t *o = codes + a;
        for (size_t i = 0; i < m; i++) v[i] = kept[a + i] * scale;
        if (nm <= 15) {  /* one comparison pass per midpoint over the chunk (vectorised across values) */
            memset(o, 0, m);
            for (size_t j = 0; j < nm; j++) {
                float t = mids[j];
                for (size_t i = 0; i < m; i++) o[i] += (uint8_t)(v[i] > t);
            }
        } else {
            for (size_t i = 0; i < m; i++) {
                size_t lo = 0, hi = nm;
                float x = v[i];
                while (lo < hi) {  /* first midpoint >= x */
                    size_t mid = lo + (hi - lo) / 2;
                    if (mids[mid] < x) lo = mid + 1;
                    else hi = mid;
                }
                o[i] = (uint8_t)lo;
            }
        }
    }
}

/* Codes of float32(kept * scale) against the sorted codebook c (k entries), and with stats the float64 sums
 * (kept^2, err^2, err*kept) into sums. */
static void quantize_c(uint8_t *o, const float *kp, float scale, size_t n, const float *c, size_t k, int stats,
                       double sums[3]) {
    float mids[255];
    for (size_t j = 0; j + 1 < k; j++) mids[j] = (c[j] + c[j + 1]) / 2.0f;
    assign_codes(o, kp, scale, n, mids, k - 1);
    sums[0] = sums[1] = sums[2] = 0.0;
    if (stats) {
        double a[4] = {0}, b[4] = {0}, d[4] = {0};
        size_t i = 0;
        for (; i + 4 <= n; i += 4)
            for (int t = 0; t < 4; t++) {
                double x = kp[i + t], e = (double)c[o[i + t]] - x;
                a[t] += x * x; b[t] += e * e; d[t] += e * x;
            }
        for (; i < n; i++) {
            double x = kp[i], e = (double)c[o[i]] - x;
            a[0] += x * x; b[0] += e * e; d[0] += e * x;
        }
        sums[0] = (a[0] + a[1]) + (a[2] + a[3]); sums[1] = (b[0] + b[1]) + (b[2] + b[3]); sums[2] = (d[0] + d[1]) + (d[2] + d[3]);
    }
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    Py_buffer kept = {0}, cb = {0}, codes = {0};
    float scale;
    int stats = 0;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*fy*w*|p", &kept, &scale, &cb, &codes, &stats)) return NULL;
    size_t n = (size_t)kept.len / sizeof(float), k = (size_t)cb.len / sizeof(float);
    if (kept.len % sizeof(float) || cb.len % sizeof(float) || k < 1 || k > 256 || (size_t)codes.len != n) {
        PyErr_SetString(PyExc_ValueError, "quantize: buffers do not fit"); goto done;
    }
    double sums[3];
    Py_BEGIN_ALLOW_THREADS
    quantize_c((uint8_t *)codes.buf, (const float *)kept.buf, scale, n, (const float *)cb.buf, k, stats, sums);
    Py_END_ALLOW_THREADS
    ret = Py_BuildValue("(ddd)", sums[0], sums[1], sums[2]);
done:
    PyBuffer_Release(&kept);
    PyBuffer_Release(&cb);
    PyBuffer_Release(&codes);
    return ret;
}

/* sumsq(f32) -> float64 sum of squares, squared in float64 (inf or nan when any element is: a finite
 * float32 squared cannot overflow a double). */
CLONES
static double sumsq_f(const float *x, size_t n) {
    double a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int t = 0; t < 8; t++) a[t] += (double)x[i + t] * (double)x[i + t];
    for (; i < n; i++) a[0] += (double)x[i] * (double)x[i];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

static PyObject *py_sumsq(PyObject *self, PyObject *args) {
    Py_buffer x = {0};
    if (!PyArg_ParseTuple(args, "y*", &x)) return NULL;
    PyObject *ret = NULL;
    if (x.len % sizeof(float)) { PyErr_SetString(PyExc_ValueError, "sumsq: not float32"); goto done; }
    double s;
    Py_BEGIN_ALLOW_THREADS
    s = sumsq_f((const float *)x.buf, (size_t)x.len / sizeof(float));
    Py_END_ALLOW_THREADS
    ret = PyFloat_FromDouble(s);
done:
    PyBuffer_Release(&x);
    return ret;
}

/* A little-endian bit writer: values LSB first, 32 bits stored at a time (never past the stream's
 * exact length: a word is stored only when all its bits belong to the stream). */
typedef struct { uint8_t *p; size_t pos; uint64_t acc; unsigned n; } bitw_t;

static inline void bw_put(bitw_t *w, unsigned v, unsigned b) {
    w->acc |= (uint64_t)v << w->n;
    w->n += b;
    if (w->n >= 32) {
        uint32_t word = (uint32_t)w->acc;
        memcpy(w->p + w->pos, &word, 4);
        w->pos += 4;
        w->acc >>= 32;
        w->n -= 32;
    }
}

static inline void bw_flush(bitw_t *w) {
    while (w->n > 0) {
        w->p[w->pos++] = (uint8_t)w->acc;
        w->acc >>= 8;
        w->n = w->n > 8 ? w->n - 8 : 0;
    }
}

/* bw_put of k values in a row (on a local copy of the writer, whose fields then stay in registers); 1-bit values
 * eight at a time, gathered into one byte by a multiply (bit j from value j). */
static void bw_put_many(bitw_t *w, const uint8_t *v, size_t k, unsigned b) {
    bitw_t s = *w;
    size_t i = 0;
    if (b == 1)
        for (; i + 8 <= k; i += 8) {
            uint64_t x;
            memcpy(&x, v + i, 8);
            bw_put(&s, (unsigned)(((x & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56), 8);
        }
    for (; i < k; i++) bw_put(&s, v[i], b);
    *w = s;
}

/* Packs codes into the part stream pw (pbits > 0) and the low streams lw[part] (lbits > 0), buffers sized by
 * packed_nbytes of their counts. */
static void pack_split(const uint8_t *c, size_t n, unsigned pbits, unsigned lbits, bitw_t *pw, bitw_t *lw) {
    unsigned lmask = (1u << lbits) - 1, pmask = (1u << pbits) - 1;
    if (pbits == 1 && lbits) {
        /* two parts, a chunk at a time: the part ids and each part's low bits gathered branch-free (every low value
         * stored in both buffers, the count of its own part advanced), then each stream written in a row */
        enum { CH = 4096 };
        uint8_t tp[CH], t0[CH], t1[CH];
        for (size_t a = 0; a < n; a += CH) {
            size_t m = n - a < CH ? n - a : CH, c0 = 0, c1 = 0;
            for (size_t i = 0; i < m; i++) {
                unsigned x = c[a + i], p = (x >> lbits) & 1u, v = x & lmask;
                tp[i] = (uint8_t)p;
                t0[c0] = (uint8_t)v;
                t1[c1] = (uint8_t)v;
                c0 += p ^ 1u;
                c1 += p;
            }
            bw_put_many(pw, tp, m, 1);
            bw_put_many(&lw[0], t0, c0, lbits);
            bw_put_many(&lw[1], t1, c1, lbits);
        }
        bw_flush(pw);
        bw_flush(&lw[0]);
        bw_flush(&lw[1]);
        return;
    }
    if (pbits && lbits) {
        for (size_t i = 0; i < n; i++) {
            unsigned p = (c[i] >> lbits) & pmask;
            bw_put(pw, p, pbits);
            bw_put(&lw[p], c[i] & lmask, lbits);
        }
    } else if (pbits) {
        for (size_t i = 0; i < n; i++) bw_put(pw, (c[i] >> lbits) & pmask, pbits);
    } else if (lbits == 8) {
        memcpy(lw[0].p, c, n);
    } else {
        for (size_t i = 0; i < n; i++) bw_put(&lw[0], c[i] & lmask, lbits);
    }
    if (pbits) bw_flush(pw);
    if (lbits) for (unsigned j = 0; j < (1u << pbits); j++) bw_flush(&lw[j]);
}

/* The bits of a part id for `parts` parts of `bits`-bit codes (parts a power of two, at most 2^bits), or -1. */
static int part_bits(unsigned bits, unsigned parts) {
    unsigned pbits = 0;
    while (pbits < 9 && (1u << pbits) < parts) pbits++;
    return (bits < 1 || bits > 8 || parts < 1 || (1u << pbits) != parts || pbits > bits) ? -1 : (int)pbits;
}

/* (part stream or None, [low stream of each part] or None) of n codes: the parts counted and the streams made with
 * the GIL, packed without it. */
static PyObject *split_streams(const uint8_t *c, size_t n, unsigned pbits, unsigned lbits) {
    PyObject *ret = NULL, *part_obj = NULL, *lows = NULL;
    unsigned parts = 1u << pbits, pmask = parts - 1;
    uint64_t counts[256] = {0};
    if (pbits) {
        for (size_t i = 0; i < n; i++) counts[(c[i] >> lbits) & pmask]++;
    } else counts[0] = n;
    bitw_t pw = {0}, lw[256];
    memset(lw, 0, sizeof lw);
    if (pbits) {
        part_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)packed_nbytes(n, pbits));
        if (!part_obj) goto done;
        pw.p = (uint8_t *)PyByteArray_AS_STRING(part_obj);
    } else { Py_INCREF(Py_None); part_obj = Py_None; }
    if (lbits) {
        lows = PyList_New(parts);
        if (!lows) goto done;
        for (unsigned j = 0; j < parts; j++) {
            PyObject *b = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)packed_nbytes(counts[j], lbits));
            if (!b) goto done;
            PyList_SET_ITEM(lows, j, b);
            lw[j].p = (uint8_t *)PyByteArray_AS_STRING(b);
        }
    } else { Py_INCREF(Py_None); lows = Py_None; }
    Py_BEGIN_ALLOW_THREADS
    pack_split(c, n, pbits, lbits, &pw, lw);
    Py_END_ALLOW_THREADS
    ret = PyTuple_Pack(2, part_obj, lows);
done:
    Py_XDECREF(part_obj);
    Py_XDECREF(lows);
    return ret;
}

/* split_pack(codes_u8, bits, parts) -> (part stream or None, [low stream of each part] or None): separate
 * quantization's streams packed as pack_codes packs them (part = code >> lbits, low = code & (2^lbits-1);
 * the lows of part j in order form stream j). Streams are bytearrays of exactly ceil(count * b / 8) bytes. */
static PyObject *py_split_pack(PyObject *self, PyObject *args) {
    Py_buffer codes = {0};
    unsigned int bits, parts;
    if (!PyArg_ParseTuple(args, "y*II", &codes, &bits, &parts)) return NULL;
    PyObject *ret = NULL;
    int pbits = part_bits(bits, parts);
    if (pbits < 0) PyErr_SetString(PyExc_ValueError, "split_pack: bad bits / parts");
    else ret = split_streams((const uint8_t *)codes.buf, (size_t)codes.len, (unsigned)pbits, bits - (unsigned)pbits);
    PyBuffer_Release(&codes);
    return ret;
}

/* dq_ladder(delta_f32, settings, cbrt_f64, fit_max, iters) -> [result or None per setting]: DeltaDQ's native kmeans
 * encoder (deltadq.DeltaDQ.encode) for several settings of one delta in one call, as the allocation measures its
 * ladder on a row sample. settings: (k1, k2, group_size, keep, bits, parts) tuples. For each, exactly the steps of
 * encode: the kept values (gather), the fit sample (every ceil(n / fit_max)-th kept value, times float32(g / keep)),
 * sorted, its companded start (_companded_init; cbrt_f64[c] = cbrt(c)), Lloyd, the codes and error sums (quantize)
 * and the packed streams (split_pack). A result is (codebook float32 bytes, (sum kept^2, sum err^2, sum err*kept),
 * part stream or None, [low streams] or None); None where the companded start needs a larger cube-root table (the
 * caller encodes that setting alone). */
typedef struct {
    uint32_t k1, k2;
    size_t g, keep, nk, k;
    unsigned bits, pbits, lbits;
    float *kept, cb[256];
    uint8_t *codes;
    double sums[3];
    int ok;
} ladder_t;

static PyObject *py_dq_ladder(PyObject *self, PyObject *args) {
    Py_buffer d = {0}, tab = {0};
    PyObject *settings, *seq = NULL, *ret = NULL;
    Py_ssize_t fit_max, iters;
    if (!PyArg_ParseTuple(args, "y*Oy*nn", &d, &settings, &tab, &fit_max, &iters)) return NULL;
    ladder_t *L = NULL;
    Py_ssize_t ns = 0;
    size_t length = (size_t)d.len / sizeof(float), nt = (size_t)tab.len / sizeof(double);
    seq = PySequence_Fast(settings, "settings must be a sequence");
    if (!seq) goto done;
    ns = PySequence_Fast_GET_SIZE(seq);
    if (d.len % sizeof(float) || tab.len % sizeof(double) || fit_max < 1 || iters < 0) {
        PyErr_SetString(PyExc_ValueError, "dq_ladder: bad arguments"); goto done;
    }
    L = (ladder_t *)calloc(ns ? (size_t)ns : 1, sizeof(ladder_t));
    if (!L) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < ns; i++) {
        unsigned int k1, k2, bits, parts;
        Py_ssize_t g, keep;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "IInnII", &k1, &k2, &g, &keep, &bits, &parts)) goto done;
        if (check_groups(0, (Py_ssize_t)length, g, keep)) goto done;
        int pbits = part_bits(bits, parts);
        if (pbits < 0) { PyErr_SetString(PyExc_ValueError, "dq_ladder: bad bits / parts"); goto done; }
        ladder_t *x = &L[i];
        x->k1 = k1; x->k2 = k2; x->g = (size_t)g; x->keep = (size_t)keep; x->bits = bits; x->pbits = (unsigned)pbits;
        x->lbits = bits - pbits; x->k = (size_t)1 << bits; x->nk = length / (size_t)g * (size_t)keep;
        x->kept = (float *)malloc((x->nk ? x->nk : 1) * sizeof(float));
        x->codes = (uint8_t *)malloc(x->nk ? x->nk : 1);
        if (!x->kept || !x->codes) { PyErr_NoMemory(); goto done; }
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    size_t most = 1;
    for (Py_ssize_t i = 0; i < ns; i++) most = L[i].nk > most ? L[i].nk : most;
    size_t fm = (size_t)fit_max < most ? (size_t)fit_max : most;
    float *fit = (float *)malloc(fm * sizeof(float)), *srt = (float *)malloc(fm * sizeof(float));
    uint32_t *tmp = (uint32_t *)malloc(fm * sizeof(uint32_t));
    double *csum = (double *)malloc((fm + 1) * sizeof(double)), *cdf = (double *)malloc(4096 * sizeof(double));
    if (!fit || !srt || !tmp || !csum || !cdf) failed = 1;
    for (Py_ssize_t i = 0; i < ns && !failed; i++) {
        ladder_t *x = &L[i];
        walk_t w = {0};
        w.mode = MODE_GATHER;
        w.dense = (float *)d.buf;
        w.kept = x->kept;
        if (walk_groups(&w, x->k1, x->k2, 0, length, x->g, x->keep) < 0) { failed = 1; break; }
        float scale = (float)((double)x->g / (double)x->keep);
        size_t n = x->nk, step = (n + (size_t)fit_max - 1) / (size_t)fit_max, m = 0;
        if (step < 1) step = 1;
        for (size_t j = 0; j < n; j += step) fit[m++] = x->kept[j] * scale;
        x->ok = 1;
        if (m == 0) {
            for (size_t j = 0; j < x->k; j++) x->cb[j] = 0.0f;
        } else {
            if (sort_f32_c((const uint32_t *)fit, (uint32_t *)srt, tmp, m) < 0) { failed = 1; break; }
            if (!((double)srt[m - 1] > (double)srt[0])) {
                for (size_t j = 0; j < x->k; j++) x->cb[j] = srt[0];
            } else {
                size_t bins = m / 16 > 256 ? m / 16 : 256;
                if (bins > 4096) bins = 4096;
                x->ok = companded_c(srt, m, bins, (const double *)tab.buf, nt, x->cb, x->k, cdf);
            }
            if (x->ok) lloyd_c(srt, m, x->cb, x->k, iters, csum);
        }
        if (!x->ok) continue;
        quantize_c(x->codes, x->kept, scale, n, x->cb, x->k, 1, x->sums);
    }
    free(fit); free(srt); free(tmp); free(csum); free(cdf);
    Py_END_ALLOW_THREADS
    if (failed) { PyErr_NoMemory(); goto done; }
    ret = PyList_New(ns);
    if (!ret) goto done;
    for (Py_ssize_t i = 0; i < ns; i++) {
        ladder_t *x = &L[i];
        if (!x->ok) { Py_INCREF(Py_None); PyList_SET_ITEM(ret, i, Py_None); continue; }
        PyObject *cb = PyByteArray_FromStringAndSize((const char *)x->cb, (Py_ssize_t)(x->k * sizeof(float)));
        PyObject *streams = cb ? split_streams(x->codes, x->nk, x->pbits, x->lbits) : NULL;
        PyObject *item = streams ? Py_BuildValue("(O(ddd)OO)", cb, x->sums[0], x->sums[1], x->sums[2],
                                                 PyTuple_GET_ITEM(streams, 0), PyTuple_GET_ITEM(streams, 1)) : NULL;
        Py_XDECREF(cb);
        Py_XDECREF(streams);
        if (!item) { Py_CLEAR(ret); goto done; }
        PyList_SET_ITEM(ret, i, item);
    }
done:
    if (L) for (Py_ssize_t i = 0; i < ns; i++) { free(L[i].kept); free(L[i].codes); }
    free(L);
    Py_XDECREF(seq);
    PyBuffer_Release(&d);
    PyBuffer_Release(&tab);
    return ret;
}

/* spread_sums(delta_f32, rows, cols, sizes) -> (sum D^2, [sum over groups of (group sum)^2 for each size]):
 * DeltaDQ's group-size sums (deltadq.spread_sums), in float64. sizes are ascending powers of two dividing
 * cols, or cols itself; group sums of each power of two come from the previous one's by adding neighbours. */
static PyObject *py_spread_sums(PyObject *self, PyObject *args) {
    Py_buffer d = {0};
    Py_ssize_t rows, cols;
    PyObject *sizes_obj, *ret = NULL, *seq = NULL;
    if (!PyArg_ParseTuple(args, "y*nnO", &d, &rows, &cols, &sizes_obj)) return NULL;
    double *buf = NULL, t2[64] = {0}, t1 = 0.0;
    Py_ssize_t sz[64], ns = 0;
    seq = PySequence_Fast(sizes_obj, "sizes must be a sequence");
    if (!seq) goto done;
    ns = PySequence_Fast_GET_SIZE(seq);
    if (rows < 0 || cols < 1 || d.len != rows * cols * (Py_ssize_t)sizeof(float) || ns > 64) {
        PyErr_SetString(PyExc_ValueError, "spread_sums: bad sizes"); goto done;
    }
    for (Py_ssize_t j = 0; j < ns; j++) {
        sz[j] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, j));
        if (sz[j] == -1 && PyErr_Occurred()) goto done;
        int pow2 = sz[j] >= 1 && !(sz[j] & (sz[j] - 1));
        if ((!pow2 && sz[j] != cols) || cols % sz[j] || (j && sz[j] <= sz[j - 1])) {
            PyErr_SetString(PyExc_ValueError, "spread_sums: sizes must ascend, divide the row and be powers of two or the row");
            goto done;
        }
    }
    buf = (double *)malloc((size_t)cols * sizeof(double));
    if (!buf) { PyErr_NoMemory(); goto done; }
    const float *x = (const float *)d.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * (size_t)cols;
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        Py_ssize_t i = 0;
        for (; i + 4 <= cols; i += 4) {
            double v0 = row[i], v1 = row[i + 1], v2 = row[i + 2], v3 = row[i + 3];
            buf[i] = v0; buf[i + 1] = v1; buf[i + 2] = v2; buf[i + 3] = v3;
            a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
        }
        for (; i < cols; i++) { double v = row[i]; buf[i] = v; a0 += v * v; }
        t1 += (a0 + a1) + (a2 + a3);
        Py_ssize_t size = 1, len = cols;
        for (Py_ssize_t j = 0; j < ns; j++) {
            Py_ssize_t g = sz[j];
            while (size < g && g % (2 * size) == 0) {
                len /= 2;
                for (Py_ssize_t k = 0; k < len; k++) buf[k] = buf[2 * k] + buf[2 * k + 1];
                size *= 2;
            }
            double acc = 0.0;
            if (size == g) for (Py_ssize_t k = 0; k < len; k++) acc += buf[k] * buf[k];
            else { for (Py_ssize_t k = 0; k < len; k++) acc += buf[k]; acc *= acc; }  /* g = cols: the row sum */
            t2[j] += acc;
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *lst = PyList_New(ns);
    if (!lst) goto done;
    for (Py_ssize_t j = 0; j < ns; j++) PyList_SET_ITEM(lst, j, PyFloat_FromDouble(t2[j]));
    ret = Py_BuildValue("(dN)", t1, lst);
done:
    free(buf);
    Py_XDECREF(seq);
    PyBuffer_Release(&d);
    return ret;
}

/* diff_sumsq(ft, ft_kind, base, base_kind) -> sum over elements of (float32(ft) - float32(base))^2, squared
 * and summed in float64 (kinds: 0 float32, 1 bfloat16, 2 float16): ||delta||^2 without the delta tensor. */
static inline float load_kind(const void *p, size_t i, int kind) {
    if (kind == HALF_BF16) return bf16_f32(((const uint16_t *)p)[i]);
    if (kind == HALF_F16) return f16_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

CLONES
static double diff_sumsq_f32(const float *a, const float *b, size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int t = 0; t < 8; t++) { double d = (double)(a[i + t] - b[i + t]); acc[t] += d * d; }
    for (; i < n; i++) { double d = (double)(a[i] - b[i]); acc[0] += d * d; }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static PyObject *py_diff_sumsq(PyObject *self, PyObject *args) {
    Py_buffer a = {0}, b = {0};
    int ka, kb;
    if (!PyArg_ParseTuple(args, "y*iy*i", &a, &ka, &b, &kb)) return NULL;
    PyObject *ret = NULL;
    size_t sa = ka ? 2 : 4, sb = kb ? 2 : 4;
    if (ka < 0 || ka > 2 || kb < 0 || kb > 2 || a.len % sa || b.len % sb || a.len / sa != b.len / sb) {
        PyErr_SetString(PyExc_ValueError, "diff_sumsq: buffers do not fit"); goto done;
    }
    size_t n = (size_t)a.len / sa;
    double s = 0.0;
    Py_BEGIN_ALLOW_THREADS
    if (!ka && !kb) s = diff_sumsq_f32((const float *)a.buf, (const float *)b.buf, n);
    else {
        double acc[4] = {0};
        for (size_t i = 0; i < n; i++) {
            double d = (double)(load_kind(a.buf, i, ka) - load_kind(b.buf, i, kb));
            acc[i & 3] += d * d;
        }
        s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
    Py_END_ALLOW_THREADS
    ret = PyFloat_FromDouble(s);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return ret;
}

/* pack_signs(delta_f32, rows, cols, out_u8): out[r, b] bit j = delta[r, 8b + j] >= 0 (format_spec.md "Packed
 * bits": LSB first, rows padded with 0 bits), as pack_bits(delta >= 0) gives it (NaN: 0, -0.0: 1). */
CLONES
static void pack_sign_row(uint8_t *o, const float *x, size_t cols) {
    size_t full = cols / 8;
    for (size_t b = 0; b < full; b++) {
        const float *y = x + 8 * b;
        unsigned m = 0;
        for (unsigned j = 0; j < 8; j++) m |= (unsigned)(y[j] >= 0.0f) << j;
        o[b] = (uint8_t)m;
    }
    if (cols % 8) {
        unsigned m = 0;
        for (size_t j = 0; j < cols % 8; j++) m |= (unsigned)(x[8 * full + j] >= 0.0f) << j;
        o[full] = (uint8_t)m;
    }
}

static PyObject *py_pack_signs(PyObject *self, PyObject *args) {
    Py_buffer d = {0}, out = {0};
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "y*nnw*", &d, &rows, &cols, &out)) return NULL;
    PyObject *ret = NULL;
    size_t pc = (size_t)(cols + 7) / 8;
    if (rows < 0 || cols < 0 || (size_t)d.len != (size_t)rows * (size_t)cols * sizeof(float)
            || (size_t)out.len != (size_t)rows * pc) {
        PyErr_SetString(PyExc_ValueError, "pack_signs: buffers do not fit"); goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++)
        pack_sign_row((uint8_t *)out.buf + (size_t)r * pc, (const float *)d.buf + (size_t)r * (size_t)cols, (size_t)cols);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    PyBuffer_Release(&d);
    PyBuffer_Release(&out);
    return ret;
}

/* diff(ft, ft_kind, base, base_kind, out_f32): out = float32(ft) - float32(base) in one pass (kinds: 0 float32,
 * 1 bfloat16, 2 float16; the widening is exact, the subtraction one float32 rounding: torch's bits). */
CLONES
static void diff_f32(float *o, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) o[i] = a[i] - b[i];
}

static PyObject *py_diff(PyObject *self, PyObject *args) {
    Py_buffer a = {0}, b = {0}, o = {0};
    int ka, kb;
    if (!PyArg_ParseTuple(args, "y*iy*iw*", &a, &ka, &b, &kb, &o)) return NULL;
    PyObject *ret = NULL;
    size_t sa = ka ? 2 : 4, sb = kb ? 2 : 4;
    if (ka < 0 || ka > 2 || kb < 0 || kb > 2 || a.len % sa || b.len % sb || a.len / sa != b.len / sb
            || (size_t)o.len != (size_t)(a.len / sa) * sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "diff: buffers do not fit"); goto done;
    }
    size_t n = (size_t)a.len / sa;
    float *out = (float *)o.buf;
    Py_BEGIN_ALLOW_THREADS
    if (!ka && !kb) diff_f32(out, (const float *)a.buf, (const float *)b.buf, n);
    else for (size_t i = 0; i < n; i++) out[i] = load_kind(a.buf, i, ka) - load_kind(b.buf, i, kb);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&o);
    return ret;
}

/* row_sums(x_f32, rows, cols, sq_f64 (written), abs_f64 (written)): per row, the float64 sums of x^2 and |x|
 * (squared in float64: inf or nan only where the row has one). */
CLONES
static void row_sums_1(const float *x, size_t cols, double *sq, double *ab) {
    double a[4] = {0}, b[4] = {0};
    size_t i = 0;
    for (; i + 4 <= cols; i += 4)
        for (int t = 0; t < 4; t++) { double v = x[i + t]; a[t] += v * v; b[t] += fabs(v); }
    for (; i < cols; i++) { double v = x[i]; a[0] += v * v; b[0] += fabs(v); }
    *sq = (a[0] + a[1]) + (a[2] + a[3]);
    *ab = (b[0] + b[1]) + (b[2] + b[3]);
}

static PyObject *py_row_sums(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, sq = {0}, ab = {0};
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "y*nnw*w*", &x, &rows, &cols, &sq, &ab)) return NULL;
    PyObject *ret = NULL;
    if (rows < 0 || cols < 0 || (size_t)x.len != (size_t)rows * (size_t)cols * sizeof(float)
            || (size_t)sq.len != (size_t)rows * sizeof(double) || (size_t)ab.len != (size_t)rows * sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "row_sums: buffers do not fit"); goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++)
        row_sums_1((const float *)x.buf + (size_t)r * (size_t)cols, (size_t)cols, (double *)sq.buf + r, (double *)ab.buf + r);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&sq);
    PyBuffer_Release(&ab);
    return ret;
}

static PyMethodDef methods[] = {
    {"scatter", py_scatter, METH_VARARGS, "Write a block: its kept elements from values or coded values, the others 0."},
    {"gather", py_gather, METH_VARARGS, "The kept values of a block, in order."},
    {"positions", py_positions, METH_VARARGS, "Kept row-major indices of whole groups of a block."},
    {"unshuffle", py_unshuffle, METH_VARARGS, "raw: byte planes into elements, written or XORed into a buffer."},
    {"xor_plane", py_xor_plane, METH_VARARGS, "raw: one byte plane's segment XORed into a buffer's elements."},
    {"sign_add", py_sign_add, METH_VARARGS, "BitDelta: add +-scale by the packed sign bits, in place."},
    {"select_flags", py_select_flags, METH_VARARGS, "Test hook: the group selection on given u values."},
    {"part_counts", py_part_counts, METH_VARARGS, "Members of each part in a packed part-id stream."},
    {"merge_parts", py_merge_parts, METH_VARARGS, "Codes from a part-id stream and per-part low-bit streams."},
    {"companded_init", py_companded_init, METH_VARARGS, "k-means start codebook at the companded quantiles."},
    {"sort_f32", py_sort_f32, METH_VARARGS, "Ascending sort of float32 values (radix sort) into a buffer."},
    {"lloyd", py_lloyd, METH_VARARGS, "1-D Lloyd iterations on sorted float32 values (k-means codebook)."},
    {"dq_ladder", py_dq_ladder, METH_VARARGS, "DeltaDQ's kmeans encoder for several settings of one delta at once."},
    {"quantize", py_quantize, METH_VARARGS, "Nearest-centroid codes, and the error sums against the kept values."},
    {"sumsq", py_sumsq, METH_VARARGS, "float64 sum of squares of float32 values."},
    {"pack_signs", py_pack_signs, METH_VARARGS, "BitDelta: the packed sign bits (delta >= 0) of a float32 matrix."},
    {"row_sums", py_row_sums, METH_VARARGS, "Per row: float64 sums of squares and of absolute values."},
    {"diff", py_diff, METH_VARARGS, "float32(a) - float32(b) of float32/bf16/f16 buffers, into a float32 buffer."},
    {"diff_sumsq", py_diff_sumsq, METH_VARARGS, "float64 sum of squared differences of two float32/bf16/f16 buffers."},
    {"spread_sums", py_spread_sums, METH_VARARGS, "DeltaDQ group-size sums for several group sizes."},
    {"split_pack", py_split_pack, METH_VARARGS, "Separate quantization: packed part-id and per-part low-bit streams."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "deltahub's native decode and encode kernels.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    init_pm1();
    init_expand();
    return PyModule_Create(&module);
}
