/* The CPU pool's routed-expert layer kernel in C: the job of expert_kernel.py's numba kernel
 * (one call per layer for M tokens, store layout read as it is), plus gpt-oss's clamped
 * activation and expert biases; built by native.py at first use with -march=native. The numba
 * kernel's nibble unpacking was measured compute-bound at ~3 G weights/s per core, a quarter of
 * what DRAM delivers. Here 16 bytes (32 INT4 weights) cost 7 vector instructions per row: one
 * vpmovzxbd from memory, an AND and a shift for the two nibbles, two conversions, two FMAs.
 *
 * Arithmetic: per group of g weights along K, products summed in float32, times the group's bf16
 * scale, summed in float32 over groups. INT4 codes are used as stored (q + 8) and the offset comes
 * back per group as 8 * sum(x over the group), prepared once per input vector; INT4 inputs are
 * prepared as two planes (even and odd elements) to match the low and high nibbles of each byte.
 * With groups of 128, a group is only 64 INT4 bytes, so what is done per group rather than per
 * byte costs as much as the products unless it is kept small: each tile converts the bf16 scales
 * of up to 16 groups per row to float32 at once with vector instructions, after which a group
 * costs one FMA with its scale as a broadcast operand (and the INT4 offsets are subtracted VL
 * groups at a time); groups of 128 weights run code compiled for that size (G128), with no
 * loop or tail over the bytes of a group.
 *
 * INT4 with bf16 x (what the GPU workers send in decode) on CPUs with AVX512_BF16 takes a second
 * inner path: vdpbf16ps multiplies pairs of bf16 values and adds them exactly into float32 lanes,
 * so the codes become bf16 q (-8..7, exact: no offset to fold back) by a table lookup. The codes
 * are read as 16-bit words of 4 nibbles each, not widened: 64 bytes (128 weights, a group of 128)
 * cost one plain load, three shifts, four vpermw and four vdpbf16ps per token, x being prepared
 * as 4 planes (elements mod 4) to match; groups of an odd number of bytes (sizes 2 mod 4) take
 * the float path. Its planes hold x's bf16 values as received; the down projection's input, the
 * float32 activation, is rounded to bf16 for it (the GPU workers round it too in bf16). Built with
 * -DKRASIS_EMULATE_BF16 on other CPUs, the same path, loops and layout included, runs on scalar
 * stand-ins for those instructions at the build's vector width (tests/test_cpu_kernel.py checks it
 * on AVX2).
 *
 * Each weight row is read once per call and applied, while it sits in L1, to every token that
 * chose its expert (tiles of R rows x T tokens, accumulators in registers). One OpenMP region:
 *   0. prepare x;  1. gate and up rows of every active expert, split evenly across threads by
 *   row, -> the activation of every (token, expert) assignment;  2. down rows, split by output
 *   row, so each output element has one owner and no atomics are needed.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Bytes ahead of the rows being read that each row stream prefetches: the hardware prefetcher
 * stops at 4 KiB pages, every 1-10 rows here. 0 turns it off (benchmarks/cpu_experts.py --c-flags
 * compares settings). */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

/* Rows read together (phase 1: gate and up rows, so 2 means one of each) while one or two tokens
 * use them: 2 or 4. Four rows give more independent work per loop, but also twice the concurrent
 * DRAM streams per thread; on an AVX2 EPYC, 2 read INT8 ~45% faster from DRAM at equal arithmetic
 * speed (benchmarks/cpu_experts.py --c-flags=-DTILE_ROWS=4 compares them). */
#ifndef TILE_ROWS
#define TILE_ROWS 2
#endif

/* 1: groups of 128 weights (64 bytes of INT4, 128 of INT8) take code built for that size, their
 * loops unrolled and tails dropped; 0: the code for any size (benchmarks/cpu_experts.py --c-flags
 * compares them). */
#ifndef G128
#define G128 1
#endif

/* VL bytes of codes at a time, widened to VL int32 lanes (GCC's generic vector conversions do not
 * find vpmovzxbd, hence the intrinsics). */
#if defined(__AVX512F__)
#define VL 16
#define WIDEN_U8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define WIDEN_S8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#elif defined(__AVX2__)
#define VL 8
#define WIDEN_U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define WIDEN_S8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#else
#error "the C expert kernel needs AVX2 or AVX-512 (the numba kernel covers other CPUs)"
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vf_u __attribute__((vector_size(4 * VL), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));

#define INLINE static inline __attribute__((always_inline))

enum { ACT_SILU = 0, ACT_GPTOSS = 1 };

INLINE float bf16(uint16_t s) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)s << 16};
    return v.f;
}

/* Round to nearest even, as torch does; NaNs stay NaNs. */
INLINE uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1)) >> 16);
}

INLINE float hsum(vf v) {
#if VL == 16
    return _mm512_reduce_add_ps((__m512)v);
#else
    __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
}

/* INT4_BF16: 1 where the bf16 path runs on vdpbf16ps, 2 where it is emulated, 0 without it. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INT4_BF16 1
#elif defined(KRASIS_EMULATE_BF16)
#define INT4_BF16 2
#else
#define INT4_BF16 0
#endif
const int krasis_int4_bf16 = INT4_BF16;

#if INT4_BF16
/* 2 VL bf16 values, or 2 VL words of codes (4 VL bytes). */
typedef uint16_t vw __attribute__((vector_size(4 * VL)));

/* bf16((i & 15) - 8): vpermw reads only the low 5 bits of each index, so a nibble is looked up
 * with the next nibble's low bit still above it, hence the table twice. */
static const uint16_t NIBBLE_BF16[32] = {
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, /* -8..-1 */
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, /* 0..7 */
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, /* -8..-1 */
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, /* 0..7 */
};

/* Loads of n <= 2 VL 16-bit words, the rest zero: n < 2 VL only for a group's last bytes, masked,
 * as they may end the weights' buffer. */
#if INT4_BF16 == 1
INLINE __mmask32 first_n(int n) { return (__mmask32)((1u << n) - 1); }
INLINE vw load_u16(const void *p, int n) {
    return (vw)(n == 2 * VL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(first_n(n), p));
}
INLINE vw nibble_bf16(vw i) { return (vw)_mm512_permutexvar_epi16((__m512i)i, _mm512_loadu_si512(NIBBLE_BF16)); }
/* acc[i] += a[2i + 1] b[2i + 1] + a[2i] b[2i] */
INLINE vf dot_bf16(vf acc, vw a, vw b) { return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b); }
#else
INLINE vw load_u16(const void *p, int n) {
    vw w = {0};
    for (int i = 0; i < n; i++) {
        uint16_t e;
        memcpy(&e, (const char *)p + 2 * i, 2);
        w[i] = e;
    }
    return w;
}
INLINE vw nibble_bf16(vw i) {
    vw w;
    for (int k = 0; k < 2 * VL; k++) w[k] = NIBBLE_BF16[i[k] & 31];
    return w;
}
/* As vdpbf16ps: products exact, two roundings (odd then even); its flushing of subnormals aside. */
INLINE vf dot_bf16(vf acc, vw a, vw b) {
    for (int i = 0; i < VL; i++) {
        acc[i] += bf16(a[2 * i + 1]) * bf16(b[2 * i + 1]);
        acc[i] += bf16(a[2 * i]) * bf16(b[2 * i]);
    }
    return acc;
}
#endif
#endif

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* An input vector of length K as the dot products read it, `bytes` apart: 2^lp planes `plane`
 * elements apart, plane m holding elements m, m + 2^lp, m + 2 * 2^lp, ...: INT4 [evens | odds |
 * 8 * group sums], each part padded to 16 floats; INT4 for the bf16 path (bf16 set) its 4 planes
 * (elements mod 4) as bf16, each padded to 32; INT8 [x]. */
typedef struct {
    int bf16, lp, plane, sums, bytes;
} prep_t;

static prep_t prep_layout(int bits, int bf16, int k, int groups) {
    prep_t p = {.bf16 = bf16};
    if (bf16) {
        p.lp = 2, p.plane = round_up(k / 4, 32);
        p.sums = 4 * p.plane;
        p.bytes = 2 * p.sums;
    } else if (bits == 4) {
        p.lp = 1, p.plane = round_up(k / 2, 16);
        p.sums = 2 * p.plane;
        p.bytes = 4 * (p.sums + round_up(groups, 16));
    } else {
        p.lp = 0, p.plane = round_up(k, 16);
        p.sums = p.plane;
        p.bytes = 4 * p.plane;
    }
    return p;
}

/* Where element k of an input vector goes in it (shifts: a division per element was measurable). */
INLINE int place(prep_t p, int k) { return (k & ((1 << p.lp) - 1)) * p.plane + (k >> p.lp); }

static void group_sums(float *v, prep_t p, int half_k, int groups) {
    int gb = half_k / groups;
    for (int gi = 0; gi < groups; gi++) {
        float s = 0.0f;
        for (int j = gi * gb; j < (gi + 1) * gb; j++) s += v[j] + v[p.plane + j];
        v[p.sums + gi] = 8.0f * s;
    }
    for (int gi = groups; gi < round_up(groups, 16); gi++) v[p.sums + gi] = 0.0f; /* read as whole vectors */
}

/* x is float32, or bf16 when xbf16 (widened here rather than by a torch call per layer, or kept
 * as it is for the bf16 path). */
static void prepare(int bits, const void *x, int xbf16, int k, int groups, prep_t p, void *v) {
    const float *xf = x;
    const uint16_t *xb = x;
    for (int j = 0; j < k; j++) {
        const int i = place(p, j);
        if (p.bf16)
            ((uint16_t *)v)[i] = xb[j];
        else
            ((float *)v)[i] = xbf16 ? bf16(xb[j]) : xf[j];
    }
    if (bits == 4 && !p.bf16) group_sums(v, p, k / 2, groups);
}

/* A prepared vector, set through p and read as float32 (f) or as the bf16 path's planes (w). */
typedef union {
    const void *p;
    const float *f;
    const uint16_t *w;
} vec_t;

#if INT4_BF16
/* acc[r][t] += 4 VL bytes (n of them; j and n even) of row r from byte j . x_t, on the bf16 path.
 * The bytes are read as they are, as 16-bit words: no widening, one plain load a row (a group of
 * 128 weights, 64 bytes, is one zmm). Word k holds bytes j + 2k and j + 2k + 1, i.e. weights
 * 2j + 4k + m for its nibbles m = 0..3 (low first), so a shift and a vpermw lookup per nibble give
 * 4 vectors of bf16 weights, and nibble m's pairs elementwise with x's plane m (elements mod 4)
 * from element j / 2, as vdpbf16ps multiplies (lane i of acc gets words 2i and 2i + 1 of a plane:
 * weights 8 apart, in the same group). Planes 0, 2 and 1, 3 add to separate chains when S = 2. */
INLINE void int4_bf16(const int R, const int T, const int S, const uint8_t *const *rows, const vec_t *v, int plane, int j,
                      int n, vf acc[4][4][2]) {
    for (int r = 0; r < R; r++) {
        const vw c = load_u16(rows[r] + j, n / 2);
        const vw q[4] = {nibble_bf16(c), nibble_bf16(c >> 4), nibble_bf16(c >> 8), nibble_bf16(c >> 12)};
        for (int t = 0; t < T; t++)
            for (int m = 0; m < 4; m++) {
                /* element j / 2 of the plane is at byte j, as the codes: one index for all loads */
                const char *x = (const char *)(v[t].w + m * plane) + j;
                acc[r][t][m & (S - 1)] = dot_bf16(acc[r][t][m & (S - 1)], q[m], load_u16(x, n / 2));
            }
    }
}
#endif

/* Groups whose scales are converted to float32 together, once per tile: per group, the scale is
 * then one broadcast operand of the FMA that adds the group's sum to the row's total. */
#define CHUNK 16

/* min(n, VL) bf16 scales from s (n > 0) as float32, lanes from n on zero: a chunk can end a row's
 * scales, and the last row's end the buffer, so only n are read. */
INLINE vf scales(const uint16_t *s, int n) {
#if VL == 16 && defined(__AVX512BW__) && defined(__AVX512VL__)
    const __m256i h = n >= VL ? _mm256_loadu_si256((const __m256i *)s) : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), s);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
    typedef uint16_t vh __attribute__((vector_size(2 * VL), aligned(2)));
    vh h = {0};
    if (n >= VL)
        h = *(const vh *)s;
    else /* one insertion a lane, in registers (scalar stores read back as a vector stall) */
        for (int i = 0; i < VL; i++)
            if (i < n) h[i] = s[i];
    return (vf)(__builtin_convertvector(h, vi) << 16);
#endif
}

/* acc[r][t][0..S) (vectors) + sacc[r][t] (the scalar tail) = row r's group of bytes [j0, j0 + gb)
 * . vector t, unscaled. The loops run over offsets within the group, so that a gb known at
 * compile time unrolls them and drops the tails. */
INLINE void group_dots(const int bits, const int xb, const int R, const int T, const int S, const uint8_t *const *rows,
                       const vec_t *v, prep_t p, int j0, const int gb, vf acc[4][4][2], float sacc[4][4]) {
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t][0] = acc[r][t][S - 1] = (vf){0}, sacc[r][t] = 0.0f;
    int o = 0;
    if (xb) {
#if INT4_BF16
        for (; o + 4 * VL <= gb; o += 4 * VL) int4_bf16(R, T, S, rows, v, p.plane, j0 + o, 4 * VL, acc);
        if (o < gb) int4_bf16(R, T, S, rows, v, p.plane, j0 + o, gb - o, acc);
        o = gb; /* no scalar tail: the masked step took the group's last bytes */
#endif
    } else if (bits == 4) {
        for (; o + VL <= gb; o += VL)
            for (int r = 0; r < R; r++) {
                const int j = j0 + o;
                vi b = (vi)WIDEN_U8(rows[r] + j);
                vf lo = __builtin_convertvector(b & 15, vf), hi = __builtin_convertvector(b >> 4, vf);
                for (int t = 0; t < T; t++) {
                    acc[r][t][0] += lo * *(const vf_u *)(v[t].f + j);
                    acc[r][t][S - 1] += hi * *(const vf_u *)(v[t].f + p.plane + j);
                }
            }
    } else {
        for (; o + S * VL <= gb; o += S * VL)
            for (int c = 0; c < S; c++)
                for (int r = 0; r < R; r++) {
                    const int j = j0 + o + c * VL;
                    vf w = __builtin_convertvector((vi)WIDEN_S8(rows[r] + j), vf);
                    for (int t = 0; t < T; t++) acc[r][t][c] += w * *(const vf_u *)(v[t].f + j);
                }
        for (; o + VL <= gb; o += VL)
            for (int r = 0; r < R; r++) {
                const int j = j0 + o;
                vf w = __builtin_convertvector((vi)WIDEN_S8(rows[r] + j), vf);
                for (int t = 0; t < T; t++) acc[r][t][0] += w * *(const vf_u *)(v[t].f + j);
            }
    }
    for (; o < gb; o++) {
        const int j = j0 + o;
        for (int r = 0; r < R; r++) {
            if (bits == 4) {
                uint8_t b = rows[r][j];
                for (int t = 0; t < T; t++)
                    sacc[r][t] += (float)(b & 15) * v[t].f[j] + (float)(b >> 4) * v[t].f[p.plane + j];
            } else {
                float w = (float)(int8_t)rows[r][j];
                for (int t = 0; t < T; t++) sacc[r][t] += w * v[t].f[j];
            }
        }
    }
}

/* d[r * T + t] = row r . vector t for R rows of `groups` groups of `gb` bytes each; xb: the bf16
 * path (vectors prepared with bf16 set); g128: groups of 128 weights, a gb known here. */
typedef void dots_fn(const uint8_t *const *rows, const uint16_t *const *sc, const vec_t *v, int groups, int gb, prep_t p,
                     float *d);

INLINE void dots(const int bits, const int xb, const int R, const int T, const int g128, const uint8_t *const *rows,
                 const uint16_t *const *sc, const vec_t *v, int groups, int gb, prep_t p, float *d) {
    if (g128) gb = 128 * bits / 8;
    /* Independent chains per (row, token) within a group: with one token, two (INT4: low and high
     * nibbles, or x's planes 0, 2 and 1, 3; INT8: even and odd vectors), else the tokens' own
     * chains are enough to hide the latency. (Two groups per step, each into its own total, measured
     * 2-6% slower on AVX2: the group's work already hides the total's.) */
    const int S = T == 1 ? 2 : 1;
    /* Whether bytes past a group's last whole vector are summed as scalars. */
    const int tails = !xb && gb % VL;
    /* INT4's +8 offsets come back as scale x 8 sum(x over the group), VL groups at a time. */
    const int offsets = bits == 4 && !xb;
    vf tot[4][4];
    float stot[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) tot[r][t] = (vf){0}, stot[r][t] = 0.0f;
    for (int g0 = 0; g0 < groups; g0 += CHUNK) {
        const int n = groups - g0 < CHUNK ? groups - g0 : CHUNK;
        float sf[4][CHUNK] __attribute__((aligned(64)));
        for (int r = 0; r < R; r++)
            for (int c = 0; c < n; c += VL) {
                const vf s = scales(sc[r] + g0 + c, n - c);
                *(vf *)(sf[r] + c) = s;
                /* lanes past n: zero scales, times zero sums (the padding past `groups`) */
                if (offsets)
                    for (int t = 0; t < T; t++) tot[r][t] -= s * *(const vf_u *)(v[t].f + p.sums + g0 + c);
            }
        for (int c = 0; c < n; c++) {
            vf acc[4][4][2];
            float sacc[4][4];
            group_dots(bits, xb, R, T, S, rows, v, p, (g0 + c) * gb, gb, acc, sacc);
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++) {
                    tot[r][t] += (S == 2 ? acc[r][t][0] + acc[r][t][1] : acc[r][t][0]) * sf[r][c];
                    if (tails) stot[r][t] += sacc[r][t] * sf[r][c];
                }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) d[r * T + t] = hsum(tot[r][t]) + stot[r][t];
}

/* The tiles used: R = TILE_ROWS rows for 1-2 tokens at a time, 2 rows for 4 (register budget),
 * and 1-2 rows at the ends of ranges; each for any group size and for groups of 128 (_g). */
#define TILE(B, X, R, T)                                                                                         \
    static void dots_##B##X##_##R##_##T(const uint8_t *const *rows, const uint16_t *const *sc, const vec_t *v,   \
                                        int groups, int gb, prep_t p, float *d) {                                \
        dots(B, X, R, T, 0, rows, sc, v, groups, gb, p, d);                                                      \
    }                                                                                                            \
    static void dots_##B##X##_##R##_##T##_g(const uint8_t *const *rows, const uint16_t *const *sc, const vec_t *v, \
                                            int groups, int gb, prep_t p, float *d) {                            \
        dots(B, X, R, T, 1, rows, sc, v, groups, gb, p, d);                                                      \
    }
#define TILES(B, X)                                                                                       \
    TILE(B, X, 4, 1) TILE(B, X, 4, 2) TILE(B, X, 2, 1) TILE(B, X, 2, 2) TILE(B, X, 2, 4) TILE(B, X, 1, 1) \
    TILE(B, X, 1, 2) TILE(B, X, 1, 4)
#define SHAPES(B, X, G)                                                                                            \
    {                                                                                                              \
        [4] = {[1] = dots_##B##X##_4_1##G, [2] = dots_##B##X##_4_2##G},                                            \
        [2] = {[1] = dots_##B##X##_2_1##G, [2] = dots_##B##X##_2_2##G, [4] = dots_##B##X##_2_4##G},                \
        [1] = {[1] = dots_##B##X##_1_1##G, [2] = dots_##B##X##_1_2##G, [4] = dots_##B##X##_1_4##G},                \
    }
#define TABLE(B, X) {SHAPES(B, X, ), SHAPES(B, X, _g)}
/* [INT4, INT8, INT4 on the bf16 path][any group size, groups of 128] */
TILES(4, 0)
TILES(8, 0)
#if INT4_BF16
TILES(4, 1)
static dots_fn *const TILE_FN[3][2][5][5] = {TABLE(4, 0), TABLE(8, 0), TABLE(4, 1)};
#else
static dots_fn *const TILE_FN[2][2][5][5] = {TABLE(4, 0), TABLE(8, 0)};
#endif

/* Rows per tile for an expert with n tokens, and tokens per tile of the n - done left. */
static int tile_rows(int n) { return n >= 4 ? 2 : TILE_ROWS; }
static int tile_tokens(int left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

INLINE void prefetch_ahead(const uint8_t *const *rows, int R, int nbytes) {
    if (PREFETCH > 0)
        for (int r = 0; r < R; r++)
            for (int o = 0; o < nbytes; o += 64) __builtin_prefetch(rows[r] + PREFETCH + o, 0, 3);
}

INLINE float activation(int act, float g, float u) {
    if (act == ACT_GPTOSS) {
        g = fminf(g, 7.0f);
        u = fminf(fmaxf(u, -7.0f), 7.0f);
        return (u + 1.0f) * (g / (1.0f + expf(-1.702f * g)));
    }
    return g / (1.0f + expf(-g)) * u;
}

/* Per-thread scratch, grown as needed and kept: allocating the activation buffers each call
 * would fault fresh pages in every layer. Thread-local, so concurrent callers never share it. */
static _Thread_local void *scratch;
static _Thread_local size_t scratch_size;

static void *scratch_get(size_t n) {
    if (n > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, (n + 63) & ~(size_t)63);
        scratch_size = scratch ? n : 0;
    }
    return scratch;
}

/* out [M, H] = sum over the top-k slots of each token whose expert e = ids - first lies in
 * [0, count): weights * (W2_e act(W13_e x + b13_e) + b2_e); x and out are bf16 when xbf16, else
 * float32 (a bf16 out is rounded once, from float32 sums; on the bf16 path act is rounded to bf16
 * too). Returns 0, or -1 when out of memory.
 * Layout per expert (contiguous): q13 [2I, H/2 or H] u8/i8, s13 [2I, G13] bf16, q2 [H, I/2 or I],
 * s2 [H, G2], b13 [2I] and b2 [H] float32 or NULL. INT4 needs even group sizes. */
int krasis_moe_layer(int bits, int act, int nthreads, int M, int topk, int H, int I, int G13, int G2, int xbf16,
                     const void *x, const int64_t *ids, const float *weights, int64_t first, int64_t count,
                     const uint8_t *q13, const uint16_t *s13, const uint8_t *q2, const uint16_t *s2, const float *b13,
                     const float *b2, void *out) {
    const int nb13 = bits == 4 ? H / 2 : H, nb2 = bits == 4 ? I / 2 : I, gb13 = nb13 / G13, gb2 = nb2 / G2;
    /* The bf16 path reads codes as 16-bit words, a group never sharing one: odd bytes per group
     * (group sizes 2 mod 4, not seen in practice) take the float path. */
    const int xb = INT4_BF16 && xbf16 && bits == 4 && gb13 % 2 == 0 && gb2 % 2 == 0;
    const int bi = bits == 8 ? 1 : xb ? 2 : 0;
    const int g13 = G128 && gb13 == 16 * bits, g2 = G128 && gb2 == 16 * bits; /* groups of 128 weights */
    const prep_t p1 = prep_layout(bits, xb, H, G13), p2 = prep_layout(bits, xb, I, G2);
    const size_t mk = (size_t)M * topk;

    size_t n_idx = 2 * (size_t)count + 1 + 3 * mk;
    const size_t n_acc = xbf16 ? (size_t)M * H : 0;
    size_t bytes = (size_t)M * p1.bytes + mk * p2.bytes + sizeof(float) * n_acc + sizeof(int32_t) * n_idx;
    char *xp = scratch_get(bytes);
    if (!xp) return -1;
    char *ap = xp + (size_t)M * p1.bytes;
    float *osum = xbf16 ? (float *)(ap + mk * p2.bytes) : out; /* float32 sums of out */
    int32_t *fill = (int32_t *)(ap + mk * p2.bytes + sizeof(float) * n_acc), *active = fill + count, *off = active + count;
    int32_t *tok = off + mk + 1, *slot = tok + mk;

    /* Assignments grouped by expert, in token order within each. */
    memset(fill, 0, sizeof(int32_t) * count);
    for (size_t i = 0; i < mk; i++) {
        int64_t e = ids[i] - first;
        if (e >= 0 && e < count) fill[e]++;
    }
    int na = 0, P = 0;
    for (int64_t e = 0; e < count; e++)
        if (fill[e]) {
            active[na] = (int32_t)e;
            off[na++] = P;
            int c = fill[e];
            fill[e] = P;
            P += c;
        }
    off[na] = P;
    for (size_t i = 0; i < mk; i++) {
        int64_t e = ids[i] - first;
        if (e >= 0 && e < count) {
            tok[fill[e]] = (int32_t)(i / topk);
            slot[fill[e]++] = (int32_t)(i % topk);
        }
    }
    if (!na) {
        memset(out, 0, (xbf16 ? sizeof(uint16_t) : sizeof(float)) * M * H);
        return 0;
    }

    const size_t q13_e = (size_t)2 * I * nb13, s13_e = (size_t)2 * I * G13;
    const size_t q2_e = (size_t)H * nb2, s2_e = (size_t)H * G2;

#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();

#pragma omp for schedule(static)
        for (int t = 0; t < M; t++)
            prepare(bits, (const char *)x + (size_t)t * H * (xbf16 ? 2 : 4), xbf16, H, G13, p1, xp + (size_t)t * p1.bytes);

        /* Phase 1: unit u = row r of expert active[u / I], i.e. gate row r and up row I + r. */
        const long n1 = (long)na * I;
        for (long u = n1 * tid / nt, u1 = n1 * (tid + 1) / nt; u < u1;) {
            const int a = (int)(u / I), r = (int)(u % I), e = active[a];
            const int n = off[a + 1] - off[a];
            const int pairs = tile_rows(n) / 2 <= u1 - u && tile_rows(n) / 2 <= I - r ? tile_rows(n) / 2 : 1;
            const uint8_t *q = q13 + e * q13_e;
            const uint16_t *s = s13 + e * s13_e;
            const uint8_t *rows[4];
            const uint16_t *sc[4];
            for (int i = 0; i < pairs; i++) {
                rows[2 * i] = q + (size_t)(r + i) * nb13, sc[2 * i] = s + (size_t)(r + i) * G13;
                rows[2 * i + 1] = q + (size_t)(I + r + i) * nb13, sc[2 * i + 1] = s + (size_t)(I + r + i) * G13;
            }
            prefetch_ahead(rows, 2 * pairs, nb13);
            for (int p = off[a]; p < off[a + 1];) {
                const int T = tile_tokens(off[a + 1] - p);
                vec_t v[4];
                float d[16];
                for (int t = 0; t < T; t++) v[t].p = xp + (size_t)tok[p + t] * p1.bytes;
                TILE_FN[bi][g13][2 * pairs][T](rows, sc, v, G13, gb13, p1, d);
                for (int i = 0; i < pairs; i++)
                    for (int t = 0; t < T; t++) {
                        float g = d[2 * i * T + t], up = d[(2 * i + 1) * T + t];
                        if (b13) g += b13[(size_t)e * 2 * I + r + i], up += b13[(size_t)e * 2 * I + I + r + i];
                        char *dst = ap + (size_t)(p + t) * p2.bytes;
                        const int at = place(p2, r + i);
                        const float y = activation(act, g, up);
                        if (xb)
                            ((uint16_t *)dst)[at] = to_bf16(y);
                        else
                            ((float *)dst)[at] = y;
                    }
                p += T;
            }
            u += pairs;
        }
#pragma omp barrier
        if (bits == 4 && !xb) {
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) group_sums((float *)(ap + (size_t)p * p2.bytes), p2, I / 2, G2);
        }

        /* Phase 2: this thread's output rows [h0, h1) for every token. */
        const int h0 = (int)((long)H * tid / nt), h1 = (int)((long)H * (tid + 1) / nt);
        for (int t = 0; t < M; t++) memset(osum + (size_t)t * H + h0, 0, sizeof(float) * (h1 - h0));
        for (int a = 0; a < na; a++) {
            const int e = active[a], n = off[a + 1] - off[a];
            const uint8_t *q = q2 + e * q2_e;
            const uint16_t *s = s2 + e * s2_e;
            for (int h = h0; h < h1;) {
                int R = tile_rows(n);
                while (R > h1 - h) R /= 2;
                const uint8_t *rows[4];
                const uint16_t *sc[4];
                for (int i = 0; i < R; i++) rows[i] = q + (size_t)(h + i) * nb2, sc[i] = s + (size_t)(h + i) * G2;
                prefetch_ahead(rows, R, nb2);
                for (int p = off[a]; p < off[a + 1];) {
                    const int T = tile_tokens(off[a + 1] - p);
                    vec_t v[4];
                    float d[16];
                    for (int t = 0; t < T; t++) v[t].p = ap + (size_t)(p + t) * p2.bytes;
                    TILE_FN[bi][g2][R][T](rows, sc, v, G2, gb2, p2, d);
                    for (int i = 0; i < R; i++)
                        for (int t = 0; t < T; t++) {
                            float y = d[i * T + t] + (b2 ? b2[(size_t)e * H + h + i] : 0.0f);
                            osum[(size_t)tok[p + t] * H + h + i] += weights[(size_t)tok[p + t] * topk + slot[p + t]] * y;
                        }
                    p += T;
                }
                h += R;
            }
        }
        if (xbf16)
            for (int t = 0; t < M; t++)
                for (int h = h0; h < h1; h++) ((uint16_t *)out)[(size_t)t * H + h] = to_bf16(osum[(size_t)t * H + h]);
    }
    return 0;
}
