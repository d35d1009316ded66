/* The CPU pool's routed-expert layer kernel in C: the job of expert_kernel.py's numba kernel
 * (one call per layer for M tokens, store layout read as it is), plus gpt-oss's clamped
 * activation and expert biases; built by native.py at first use with -march=native. The numba
 * kernel's nibble unpacking was measured compute-bound at ~3 G weights/s per core, a quarter of
 * what DRAM delivers. Here 16 bytes (32 INT4 weights) cost 7 vector instructions per row: one
 * vpmovzxbd from memory, an AND and a shift for the two nibbles, two conversions, two FMAs.
 *
 * Arithmetic, float32 x (and INT8 weights): per group of g weights along K, products summed in
 * float32, times the group's bf16 scale, summed in float32 over groups. INT4 codes are used as
 * stored (q + 8) and the offset comes back per group as 8 * sum(x over the group), prepared once per
 * input vector; INT4 inputs are prepared as two planes (even and odd elements) to match the low and
 * high nibbles of each byte. With groups of 128, a group is only 64 INT4 bytes, so what is done per
 * group rather than per byte costs as much as the products unless it is kept small: each tile
 * converts the bf16 scales of up to 16 groups per row to float32 at once with vector instructions,
 * after which a group costs one FMA with its scale as a broadcast operand (and the INT4 offsets are
 * subtracted VL groups at a time); groups of 128 weights run code compiled for that size (G128),
 * with no loop or tail over the bytes of a group. CI's exactness tests run float32, so this path
 * stays the scheme's weight-only arithmetic.
 *
 * INT4 with bf16 x (what the GPU workers send in decode) takes the Q8 path, as llama.cpp does for
 * Q4 x Q8: the float path (and a vdpbf16ps one after it) measured bound by its arithmetic, at 54% of
 * DRAM read at M=1, and integer dot products do twice the multiply-adds per instruction with no
 * nibble-to-float conversion. x, or the down projection's input (the float32 activation, quantized
 * straight from float32), is quantized per group of the weights' K-group: xs = max|x| / 127 in
 * float32, xq = round-half-even(x / xs) (0 for an all-zero group). A row's group then adds
 * f32(scale) * xs * (S - 8 X): S = sum code * xq over the group, u8 codes as stored times s8, and
 * X = sum xq, both exact in int32, so any two implementations (shared/moe.py:moe_reference_q8 is
 * the plain one) differ only in the float32 order of the group sums. -8 X is prepared once per
 * vector and seeds each group's int32 accumulator, so the offset costs a load, not arithmetic. xq
 * is two int8 planes (even and odd elements), byte j of each meeting byte j of a row's codes (its
 * low and high nibble), so the codes are read as they are stored: a group of 128 weights is one
 * zmm, split into nibbles by an AND and a 16-bit shift + AND, and with AVX512-VNNI two vpdpbusd add
 * each aligned 4 bytes' products into an int32 lane; without it (AVX2, what CI runs, or AVX-512
 * without VNNI) vpmaddubsw makes u8 x s8 pairs into s16 (at most 2 x 15 x 127: four such sums stay
 * below 2^15, so two registers' worth add in s16) and vpmaddwd by ones widens them. Per group and
 * (row, token) what is left is one conversion and one FMA with the product of the two scales as a
 * broadcast operand, those products being made 16 groups at a time with the scale conversion.
 *
 * Each weight row is read once per call and applied, while it sits in L1, to every token that
 * chose its expert (tiles of R rows x T tokens, accumulators in registers). One OpenMP region:
 *   0. prepare x;  1. gate and up rows of every active expert, split evenly across threads by
 *   row, -> the activation of every (token, expert) assignment, then (INT4) its group sums or
 *   Q8 planes, which need the whole vector;  2. down rows of every active expert, split the same
 *   way, -> each assignment's output vector;  3. their weighted sum per token, split by output
 *   element, each summed by one thread in expert order, so no atomics and the same bits for any
 *   team. In phases 1 and 2 a thread takes its share a chunk at a time and, once done, chunks of
 *   the shares of threads still at work (claim, below).
 */
#define _GNU_SOURCE /* sched_setaffinity, sched_getcpu */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Bytes ahead of the rows being read that each row stream prefetches: the hardware prefetcher
 * stops at 4 KiB pages, every 1-10 rows here. 0 turns it off (benchmarks/cpu_experts.py --c-flags
 * compares settings). */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

/* Where those prefetches land: __builtin_prefetch's locality, 3 = every level (prefetcht0), 2 = L2
 * and beyond (prefetcht1), 1 = prefetcht2, 0 = non-temporal. A core tracks only ~16 misses into L1
 * at once, ~100 ns each: ~10 GB/s a core, and session 29's pool read ~8.7 GB/s a thread (121 GB/s
 * of 14 threads where the DRAM gave 184). Prefetches into L2 use its larger miss queue instead
 * (benchmarks/cpu_experts.py --c-flags=-DPREFETCH_HINT=2 compares them). */
#ifndef PREFETCH_HINT
#define PREFETCH_HINT 3
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
typedef int32_t vi_u __attribute__((vector_size(4 * VL), aligned(4)));

#define INLINE static inline __attribute__((always_inline))

enum { ACT_SILU = 0, ACT_GPTOSS = 1 };

INLINE float bf16(uint16_t s) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)s << 16};
    return v.f;
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

/* INT4_Q8: the Q8 path's instructions, 1 vpdpbusd (AVX512-VNNI, or AVX-VNNI's on 256-bit registers
 * in a build without AVX-512: `-mno-avx512f`, which benchmarks/cpu_experts.py --c-flags compares on a
 * core where 512-bit work may lower its clock), 2 vpmaddubsw + vpmaddwd (AVX2, or AVX-512 without
 * VNNI). Its registers are one vector of VL int32 lanes: QB bytes of codes. */
#if VL == 16 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT4_Q8 1
#elif VL == 16 && defined(__AVX512BW__)
#define INT4_Q8 2
#elif VL == 8 && defined(__AVXVNNI__)
#define INT4_Q8 1
#elif VL == 8
#define INT4_Q8 2
#else
#error "the C expert kernel's Q8 path needs AVX512BW with AVX-512 (or an AVX2 build)"
#endif
const int krasis_int4_q8 = INT4_Q8;
#define QB (4 * VL)

#if VL == 16
typedef __m512i qv;
INLINE qv q_load(const void *p) { return _mm512_loadu_si512(p); }
/* The first n < QB bytes, the rest zero: a group's last bytes, which may end the weights' buffer. */
INLINE qv q_load_n(const void *p, int n) { return _mm512_maskz_loadu_epi8(~0ull >> (64 - n), p); }
INLINE qv q_lo(qv c) { return _mm512_and_si512(c, _mm512_set1_epi8(15)); }
INLINE qv q_hi(qv c) { return _mm512_and_si512(_mm512_srli_epi16(c, 4), _mm512_set1_epi8(15)); }
#if INT4_Q8 == 1
/* lane i += sum over bytes 4i..4i+3 of codes x xq (u8 x s8) */
INLINE vi q_dpbusd(vi acc, qv c, qv x) { return (vi)_mm512_dpbusd_epi32((__m512i)acc, c, x); }
#else
INLINE qv q_pairs(qv c, qv x) { return _mm512_maddubs_epi16(c, x); }
INLINE qv q_add16(qv a, qv b) { return _mm512_add_epi16(a, b); }
INLINE vi q_widen(qv s) { return (vi)_mm512_madd_epi16(s, _mm512_set1_epi16(1)); }
#endif
#else
typedef __m256i qv;
INLINE qv q_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
INLINE qv q_lo(qv c) { return _mm256_and_si256(c, _mm256_set1_epi8(15)); }
INLINE qv q_hi(qv c) { return _mm256_and_si256(_mm256_srli_epi16(c, 4), _mm256_set1_epi8(15)); }
#if INT4_Q8 == 1
INLINE vi q_dpbusd(vi acc, qv c, qv x) { return (vi)_mm256_dpbusd_avx_epi32((__m256i)acc, c, x); }
#else
INLINE qv q_pairs(qv c, qv x) { return _mm256_maddubs_epi16(c, x); }
INLINE qv q_add16(qv a, qv b) { return _mm256_add_epi16(a, b); }
INLINE vi q_widen(qv s) { return (vi)_mm256_madd_epi16(s, _mm256_set1_epi16(1)); }
#endif
#endif

/* acc + the products of one register of codes c (its nibbles lo, hi) with x's planes e, o. */
INLINE vi q_dot(vi acc, qv lo, qv hi, qv e, qv o) {
#if INT4_Q8 == 1
    return q_dpbusd(q_dpbusd(acc, lo, e), hi, o);
#else
    return acc + q_widen(q_add16(q_pairs(lo, e), q_pairs(hi, o)));
#endif
}

/* The same for two registers of codes: with vpmaddubsw, their four s16 sums add before one widening. */
INLINE vi q_dot2(vi acc, const qv lo[2], const qv hi[2], const qv e[2], const qv o[2]) {
#if INT4_Q8 == 1
    return q_dot(q_dot(acc, lo[0], hi[0], e[0], o[0]), lo[1], hi[1], e[1], o[1]);
#else
    return acc + q_widen(q_add16(q_add16(q_pairs(lo[0], e[0]), q_pairs(hi[0], o[0])),
                                 q_add16(q_pairs(lo[1], e[1]), q_pairs(hi[1], o[1]))));
#endif
}

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* An input vector of length K as the dot products read it, `bytes` apart: 2^lp planes `plane`
 * elements apart, plane m holding elements m, m + 2^lp, m + 2 * 2^lp, ...: INT4 [evens | odds |
 * 8 * group sums], each part padded to 16 floats; INT8 [x]; on the Q8 path (q8 set) [evens | odds]
 * as int8, each padded to 64 bytes, then per group xs (float32) and -8 X (int32), each padded to
 * 16, then `raw`, the float32 vector the planes are quantized from. */
typedef struct {
    int q8, lp, plane, sums, xs, off, raw, bytes;
} prep_t;

static prep_t prep_layout(int bits, int q8, int k, int groups) {
    prep_t p = {.q8 = q8};
    if (q8) {
        p.lp = 1, p.plane = round_up(k / 2, 64);
        p.xs = 2 * p.plane;
        p.off = p.xs + 4 * round_up(groups, 16);
        p.raw = p.off + 4 * round_up(groups, 16);
        p.bytes = p.raw + 4 * round_up(k, 16);
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

/* Round half to even, as nearbyintf in the default rounding mode (and torch.round). */
#if VL == 16
INLINE vf round_even(vf v) { return (vf)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
INLINE vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
/* Lanes idx of a then b, narrowed to int8 (GCC 12 splits a generic two-vector shuffle of 16 lanes
 * into lane extractions). */
INLINE void store_i8(int8_t *d, vi a, vi b, vi idx) {
    _mm_storeu_si128((__m128i *)d, _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32((__m512i)a, (__m512i)idx, (__m512i)b)));
}
#else
INLINE vf round_even(vf v) { return (vf)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
INLINE vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
INLINE void store_i8(int8_t *d, vi a, vi b, vi idx) {
    typedef int8_t vq __attribute__((vector_size(VL), aligned(1)));
    *(vq *)d = __builtin_convertvector(__builtin_shuffle(a, b, idx), vq);
}
#endif

/* The Q8 planes, scales and offsets of the vector at v from its raw float32 values, VL at a time
 * (one element at a time it took 11 us per 2048 on AVX2, a few % of a layer at M=1). */
static void quantize_q8(char *v, prep_t p, int k, int groups) {
#if VL == 16
    const vi evens = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, odds = evens + 1;
#else
    const vi evens = {0, 2, 4, 6, 8, 10, 12, 14}, odds = evens + 1;
#endif
    const float *x = (const float *)(v + p.raw);
    int8_t *q = (int8_t *)v;
    float *xs = (float *)(v + p.xs);
    int32_t *off = (int32_t *)(v + p.off);
    const int gk = k / groups; /* even: an INT4 group ends on a byte */
    for (int gi = 0; gi < groups; gi++) {
        const float *xg = x + gi * gk;
        int8_t *qe = q + gi * gk / 2, *qo = qe + p.plane;
        vf mv = {0};
        int j = 0;
        for (; j + VL <= gk; j += VL) mv = vmax((vf)((vi)(*(const vf_u *)(xg + j)) & 0x7fffffff), mv); /* |x| */
        float m = 0.0f;
        for (int i = 0; i < VL; i++) m = fmaxf(m, mv[i]);
        for (; j < gk; j++) m = fmaxf(m, fabsf(xg[j]));
        const float s = m / 127.0f; /* a division, as the reference: x / s must round as it does */
        int32_t sum = 0;
        j = 0;
        if (s > 0.0f) {
            vi sv = {0};
            for (; j + 2 * VL <= gk; j += 2 * VL) {
                const vi a = __builtin_convertvector(round_even(*(const vf_u *)(xg + j) / s), vi);
                const vi b = __builtin_convertvector(round_even(*(const vf_u *)(xg + j + VL) / s), vi);
                sv += a + b;
                store_i8(qe + j / 2, a, b, evens);
                store_i8(qo + j / 2, a, b, odds);
            }
            for (int i = 0; i < VL; i++) sum += sv[i];
        }
        for (; j < gk; j++) {
            const int32_t y = s > 0.0f ? (int32_t)nearbyintf(xg[j] / s) : 0;
            (j & 1 ? qo : qe)[j / 2] = (int8_t)y;
            sum += y;
        }
        xs[gi] = s > 0.0f ? s : 0.0f, off[gi] = -8 * sum;
    }
    for (int gi = groups; gi < round_up(groups, 16); gi++) xs[gi] = 0.0f, off[gi] = 0; /* read as whole vectors */
    for (int j = k / 2; j < p.plane; j++) q[j] = q[p.plane + j] = 0;
}

/* x is float32, or bf16 when xbf16 (widened here rather than by a torch call per layer). */
static void prepare(int bits, const void *x, int xbf16, int k, int groups, prep_t p, void *v) {
    const float *xf = x;
    const uint16_t *xb = x;
    if (p.q8) {
        float *raw = (float *)((char *)v + p.raw);
        for (int j = 0; j < k; j++) raw[j] = xbf16 ? bf16(xb[j]) : xf[j];
        quantize_q8(v, p, k, groups);
        return;
    }
    for (int j = 0; j < k; j++) ((float *)v)[place(p, j)] = xbf16 ? bf16(xb[j]) : xf[j];
    if (bits == 4) group_sums(v, p, k / 2, groups);
}

/* A prepared vector, set through p and read as float32 (f) or as the Q8 path's planes (b). */
typedef union {
    const void *p;
    const float *f;
    const char *b;
} vec_t;

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
INLINE void group_dots(const int bits, const int R, const int T, const int S, const uint8_t *const *rows,
                       const vec_t *v, prep_t p, int j0, const int gb, vf acc[4][4][2], float sacc[4][4]) {
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t][0] = acc[r][t][S - 1] = (vf){0}, sacc[r][t] = 0.0f;
    int o = 0;
    if (bits == 4) {
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

/* acc[r][t] = row r's group gi, bytes [j0, j0 + gb), . vector t on the Q8 path: int32 lanes, the
 * first seeded with the group's -8 X (so the lanes sum to S - 8 X), exact. */
INLINE void group_q8(const int R, const int T, const uint8_t *const *rows, const vec_t *v, prep_t p, int gi, int j0,
                     const int gb, vi acc[4][4]) {
    for (int t = 0; t < T; t++) {
        const vi seed = {((const int32_t *)(v[t].b + p.off))[gi]};
        for (int r = 0; r < R; r++) acc[r][t] = seed;
    }
    int o = 0;
    for (; o + 2 * QB <= gb; o += 2 * QB)
        for (int r = 0; r < R; r++) {
            const int j = j0 + o;
            const qv c[2] = {q_load(rows[r] + j), q_load(rows[r] + j + QB)};
            const qv lo[2] = {q_lo(c[0]), q_lo(c[1])}, hi[2] = {q_hi(c[0]), q_hi(c[1])};
            for (int t = 0; t < T; t++) {
                const qv e[2] = {q_load(v[t].b + j), q_load(v[t].b + j + QB)};
                const qv od[2] = {q_load(v[t].b + p.plane + j), q_load(v[t].b + p.plane + j + QB)};
                acc[r][t] = q_dot2(acc[r][t], lo, hi, e, od);
            }
        }
    for (; o + QB <= gb; o += QB)
        for (int r = 0; r < R; r++) {
            const int j = j0 + o;
            const qv c = q_load(rows[r] + j), lo = q_lo(c), hi = q_hi(c);
            for (int t = 0; t < T; t++)
                acc[r][t] = q_dot(acc[r][t], lo, hi, q_load(v[t].b + j), q_load(v[t].b + p.plane + j));
        }
#if VL == 16
    if (o < gb) { /* masked: zero codes and zero x past the group's end */
        for (int r = 0; r < R; r++) {
            const int j = j0 + o;
            const qv c = q_load_n(rows[r] + j, gb - o), lo = q_lo(c), hi = q_hi(c);
            for (int t = 0; t < T; t++)
                acc[r][t] = q_dot(acc[r][t], lo, hi, q_load_n(v[t].b + j, gb - o), q_load_n(v[t].b + p.plane + j, gb - o));
        }
        o = gb;
    }
#endif
    for (; o < gb; o++) {
        const int j = j0 + o;
        for (int r = 0; r < R; r++) {
            const uint8_t b = rows[r][j];
            for (int t = 0; t < T; t++)
                acc[r][t][0] += (b & 15) * (int8_t)v[t].b[j] + (b >> 4) * (int8_t)v[t].b[p.plane + j];
        }
    }
}

/* d[r * T + t] = row r . vector t on the Q8 path (see group_q8), groups as in dots. */
INLINE void dots_q8(const int R, const int T, const int g128, const uint8_t *const *rows, const uint16_t *const *sc,
                    const vec_t *v, int groups, int gb, prep_t p, float *d) {
    if (g128) gb = 64;
    vf tot[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) tot[r][t] = (vf){0};
    for (int g0 = 0; g0 < groups; g0 += CHUNK) {
        const int n = groups - g0 < CHUNK ? groups - g0 : CHUNK;
        /* per group, weight scale x activation scale: one broadcast FMA operand a group */
        float cs[4][4][CHUNK] __attribute__((aligned(64)));
        for (int r = 0; r < R; r++)
            for (int c = 0; c < n; c += VL) {
                const vf s = scales(sc[r] + g0 + c, n - c);
                for (int t = 0; t < T; t++)
                    *(vf *)(cs[r][t] + c) = s * *(const vf_u *)((const float *)(v[t].b + p.xs) + g0 + c);
            }
        for (int c = 0; c < n; c++) {
            vi acc[4][4];
            group_q8(R, T, rows, v, p, g0 + c, (g0 + c) * gb, gb, acc);
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++) tot[r][t] += __builtin_convertvector(acc[r][t], vf) * cs[r][t][c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) d[r * T + t] = hsum(tot[r][t]);
}

/* Whether groups of gb bytes are smaller than one register of codes and tile it (INT4 groups of 32
 * weights are 16 bytes, against 32 on AVX2 and 64 on AVX-512): then dots_q8_small runs them. */
INLINE int small_groups(int gb, int groups) {
    return gb < QB && QB % gb == 0 && gb % 4 == 0 && groups % (QB / gb) == 0 && CHUNK % (QB / gb) == 0;
}

/* dots_q8 for groups smaller than a register: one register of codes holds QB / gb whole groups, and
 * each int32 lane sums the products of 4 bytes, so group i's sum is the sum of lanes [i * gb / 4,
 * (i + 1) * gb / 4). The register's products are scaled lane by lane, each lane by its group's weight
 * scale x activation scale (a permute of the chunk's per-group factors), and summed with the
 * others; the -8 X offsets, scaled the same, are added once per chunk as a vector over its groups.
 * Taking each group through dots_q8 instead ran it on a masked (AVX-512) or scalar (AVX2) tail:
 * 18x slower on AVX2 at groups of 32. */
INLINE void dots_q8_small(const int R, const int T, const uint8_t *const *rows, const uint16_t *const *sc,
                          const vec_t *v, int groups, int gb, prep_t p, float *d) {
    const int per = QB / gb;
    vi idx;
    for (int l = 0; l < VL; l++) idx[l] = l / (gb / 4);
    vf tot[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) tot[r][t] = (vf){0};
    for (int g0 = 0; g0 < groups; g0 += CHUNK) {
        const int n = groups - g0 < CHUNK ? groups - g0 : CHUNK;
        /* The chunk's per-group factors stay in registers, and each code register takes its lanes'
         * by a permute: read back from a stack array at a group's offset, each load straddled the
         * vector stores that wrote it, which store forwarding cannot serve (a stall per register). */
        vf fs[4][4][CHUNK / VL];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < n; c += VL) {
                const vf s = scales(sc[r] + g0 + c, n - c); /* lanes past n: zero */
                for (int t = 0; t < T; t++) {
                    const vf f = s * *(const vf_u *)((const float *)(v[t].b + p.xs) + g0 + c);
                    fs[r][t][c / VL] = f;
                    tot[r][t] += f * __builtin_convertvector(*(const vi_u *)((const int32_t *)(v[t].b + p.off) + g0 + c), vf);
                }
            }
        for (int c = 0; c < n; c += per) {
            const int j = (g0 + c) * gb;
            const vi lanes = idx + c % VL;
            for (int r = 0; r < R; r++) {
                const qv codes = q_load(rows[r] + j), lo = q_lo(codes), hi = q_hi(codes);
                for (int t = 0; t < T; t++) {
                    const vi acc = q_dot((vi){0}, lo, hi, q_load(v[t].b + j), q_load(v[t].b + p.plane + j));
                    tot[r][t] += __builtin_convertvector(acc, vf) * __builtin_shuffle(fs[r][t][c / VL], lanes);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) d[r * T + t] = hsum(tot[r][t]);
}

/* d[r * T + t] = row r . vector t for R rows of `groups` groups of `gb` bytes each; q8: the Q8 path
 * (vectors prepared with q8 set); g128: groups of 128 weights, a gb known here. */
typedef void dots_fn(const uint8_t *const *rows, const uint16_t *const *sc, const vec_t *v, int groups, int gb, prep_t p,
                     float *d);

INLINE void dots(const int bits, const int q8, const int R, const int T, const int g128, const uint8_t *const *rows,
                 const uint16_t *const *sc, const vec_t *v, int groups, int gb, prep_t p, float *d) {
    if (q8) {
        if (!g128 && small_groups(gb, groups))
            dots_q8_small(R, T, rows, sc, v, groups, gb, p, d);
        else
            dots_q8(R, T, g128, rows, sc, v, groups, gb, p, d);
        return;
    }
    if (g128) gb = 128 * bits / 8;
    /* Independent chains per (row, token) within a group: with one token, two (INT4: low and high
     * nibbles; INT8: even and odd vectors), else the tokens' own chains are enough to hide the
     * latency. (Two groups per step, each into its own total, measured 2-6% slower on AVX2: the
     * group's work already hides the total's.) */
    const int S = T == 1 ? 2 : 1;
    /* Whether bytes past a group's last whole vector are summed as scalars. */
    const int tails = gb % VL;
    /* INT4's +8 offsets come back as scale x 8 sum(x over the group), VL groups at a time. */
    const int offsets = bits == 4;
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
            group_dots(bits, R, T, S, rows, v, p, (g0 + c) * gb, gb, acc, sacc);
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
/* [INT4, INT8, INT4 on the Q8 path][any group size, groups of 128] */
TILES(4, 0)
TILES(8, 0)
TILES(4, 1)
static dots_fn *const TILE_FN[3][2][5][5] = {TABLE(4, 0), TABLE(8, 0), TABLE(4, 1)};

/* Rows per tile for an expert with n tokens, and tokens per tile of the n - done left. */
static int tile_rows(int n) { return n >= 4 ? 2 : TILE_ROWS; }
static int tile_tokens(int left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

INLINE void prefetch_ahead(const uint8_t *const *rows, int R, int nbytes) {
    if (PREFETCH > 0)
        for (int r = 0; r < R; r++)
            for (int o = 0; o < nbytes; o += 64) __builtin_prefetch(rows[r] + PREFETCH + o, 0, PREFETCH_HINT);
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

/* The assignments of ids [mk] (top-k slots of mk / topk tokens) whose expert e = id - first lies in
 * [0, count), grouped by expert: the na active experts in increasing order, assignment p of active
 * expert a in [off[a], off[a + 1]) with its token tok[p] and slot[p], in token order. fill [count] is
 * scratch. Returns na. */
static int group_by_expert(const int32_t *ids, size_t mk, int topk, int64_t first, int64_t count, int32_t *fill,
                           int32_t *active, int32_t *off, int32_t *tok, int32_t *slot) {
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
    return na;
}

/* Where the calls' time goes, summed until read (krasis_clock), on omp_get_wtime's clock: from a
 * call's start to its last thread's start (an OpenMP thread that went to sleep between calls is woken
 * through the OS: 3-20 us on the lent hosts, against a layer of ~300 us), to phase 1's first and
 * last thread's end (the phase waits for the slowest), to phase 2's last thread's end; and
 * the lookahead's start to its guess (router, top-k, grouping: not interruptible). One process calls
 * the kernels one at a time (the pool's loop), so these plain sums are not contended. */
#define CLOCK_THREADS 1024
enum { CLK_CALLS, CLK_WAKE, CLK_P1_FIRST, CLK_P1_LAST, CLK_P2, CLK_AHEAD_CALLS, CLK_AHEAD_WAKE, CLK_AHEAD_GUESS, CLK_N };
static double clk[CLK_N], clk_in[CLOCK_THREADS], clk_p1[CLOCK_THREADS], clk_end[CLOCK_THREADS];
/* per thread of the team: its phase 1 summed over calls, and the CPU it last ran phase 1 on (a
 * thread that shares its core, or whose core is slow, shows here) */
static double clk_thread_p1[CLOCK_THREADS];
static int clk_cpu[CLOCK_THREADS], clk_team;

INLINE void clock_mark(double *at, int tid) {
    if (tid < CLOCK_THREADS) at[tid] = omp_get_wtime();
}

/* The earliest and the latest of the team's first n marks. */
static void clock_span(const double *at, int n, double *first, double *last) {
    *first = *last = at[0];
    for (int i = 1; i < n && i < CLOCK_THREADS; i++) {
        if (at[i] < *first) *first = at[i];
        if (at[i] > *last) *last = at[i];
    }
}

/* The sums since the last read, in seconds (index CLK_*), into out[CLK_N]; each thread's phase 1
 * and its CPU into p1 and cpu (n of them at most); then zeroes the sums. Returns the team's size. */
int krasis_clock(double *out, double *p1, int *cpu, int n) {
    const int team = clk_team < CLOCK_THREADS ? clk_team : CLOCK_THREADS;
    memcpy(out, clk, sizeof clk);
    for (int i = 0; i < team && i < n; i++) p1[i] = clk_thread_p1[i], cpu[i] = clk_cpu[i];
    memset(clk, 0, sizeof clk);
    memset(clk_thread_p1, 0, sizeof clk_thread_p1);
    return team;
}

/* Pins thread t of an n-thread team to cpus[t] (the pool's cores, one each; the caller's thread is
 * thread 0): unpinned, the scheduler may put two of the team's threads on one core, where each runs
 * at half speed, and a lookahead's reads land in a core other than the one that will use them
 * (measured no faster or slower on the lent hosts, session 24: kept for the latter). libgomp gives a
 * team of one size the same threads in the same order every time (the clock saw thread i on cpus[i]
 * in every run of session 24). Returns how many threads could not be pinned. */
int krasis_pin(const int *cpus, int n) {
    int failed = 0;
#pragma omp parallel num_threads(n) reduction(+ : failed)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[omp_get_thread_num()], &set);
        failed += sched_setaffinity(0, sizeof set, &set) != 0;
    }
    return failed;
}

/* Thread tid's share [*a, *b) of n work items split evenly over nt threads: the rows of the active
 * experts, phase 1's (gate and up) and phase 2's (down) (the lookahead reads each thread's share of a
 * layer by the same split, so the bytes land in the caches of the core that will read them). */
INLINE void share(long n, int tid, int nt, long *a, long *b) {
    *a = n * tid / nt;
    *b = n * (tid + 1) / nt;
}

/* A phase's items are handed out a chunk at a time: each thread takes chunks of its own share, in
 * order, and then chunks of the shares of threads still at work. With the even split alone, a
 * phase lasted as long as its slowest thread: on the lent H100 host, phase 1 of a decode layer
 * ended after 116 us on its first thread and 204 on its last (cores do not get equal shares of
 * DRAM, pinned or not), while the DRAM could have read the whole phase in ~150; claimed, its threads
 * end within a few us of each other and the layer took 318 us against 364 (BENCHMARKS.md, session
 * 24). Which thread computes an item
 * changes nothing in its arithmetic, so results stay bit for bit those of the even split. A cursor
 * per share, a cache line each, counts the items taken from it. */
typedef struct {
    long taken;
    char pad[64 - sizeof(long)];
} cursor_t;

/* Chunk sizes (benchmarks/cpu_experts.py --c-flags=-DCHUNK2=32 compares others): larger ones read
 * longer runs of a matrix's rows between claims, and a share's last chunks are smaller (claim). */
#ifndef CHUNK1
#define CHUNK1 32 /* phase 1 units (a gate and an up row: ~2.3 KB at H = 2048, INT4) */
#endif
#ifndef CHUNK2
#define CHUNK2 64 /* phase 2 units (a down row of one active expert: ~0.4 KB at I = 768, INT4) */
#endif

/* The next chunk [*a, *b) of n items for thread tid of nt, from share *from onwards (which it then
 * keeps: its next call starts there); 0 once every share is taken. A phase ends when the last chunk
 * taken does, so a share's chunks halve once fewer than two are left in it, down to an eighth of
 * `chunk`: with 32 units a chunk throughout, phase 1's threads ended 18 us apart (session 24's call 4,
 * a chunk ~11 us of one thread's DRAM reads). */
INLINE int claim(cursor_t *cur, long n, long chunk, int tid, int nt, int *from, long *a, long *b) {
    const long least = chunk / 8 > 0 ? chunk / 8 : 1;
    for (; *from < nt; (*from)++) {
        const int t = (tid + *from) % nt;
        long lo, hi;
        share(n, t, nt, &lo, &hi);
        long at = __atomic_load_n(&cur[t].taken, __ATOMIC_RELAXED);
        while (at < hi - lo) {
            const long left = hi - lo - at;
            long c = left >= 2 * chunk ? chunk : (left + 1) / 2;
            if (c < least) c = least < left ? least : left;
            if (__atomic_compare_exchange_n(&cur[t].taken, &at, at + c, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                *a = lo + at, *b = lo + at + c;
                return 1;
            }
        }
    }
    return 0;
}

/* out [M, H] float32 = sum over the top-k slots of each token whose expert e = ids - first lies in
 * [0, count): weights * (W2_e act(W13_e x + b13_e) + b2_e); x is bf16 when xbf16, else float32 (INT4
 * with bf16 x runs the Q8 path). ids are int32 and out float32 whatever x is, because those are the
 * mailbox slot's own types (shared/mailbox.py): the pool process calls this on a slot's bytes as
 * they lie, with no conversion or copy around the call. Returns the number of (token, expert) pairs
 * it ran, those whose expert lies in the block (the pool's share of the choices: its counters), or -1
 * when out of memory.
 * Layout per expert (contiguous): q13 [2I, H/2 or H] u8/i8, s13 [2I, G13] bf16, q2 [H, I/2 or I],
 * s2 [H, G2], b13 [2I] and b2 [H] float32 or NULL. INT4 needs even group sizes. */
static int moe_layer(int bits, int act, int nthreads, int M, int topk, int H, int I, int G13, int G2, int xbf16,
                     const void *x, const int32_t *ids, const float *weights, int64_t first, int64_t count,
                     const uint8_t *q13, const uint16_t *s13, const uint8_t *q2, const uint16_t *s2, const float *b13,
                     const float *b2, float *out) {
    const int nb13 = bits == 4 ? H / 2 : H, nb2 = bits == 4 ? I / 2 : I, gb13 = nb13 / G13, gb2 = nb2 / G2;
    const int q8 = xbf16 && bits == 4;
    const int bi = bits == 8 ? 1 : q8 ? 2 : 0;
    const int g13 = G128 && gb13 == 16 * bits, g2 = G128 && gb2 == 16 * bits; /* groups of 128 weights */
    const prep_t p1 = prep_layout(bits, q8, H, G13), p2 = prep_layout(bits, q8, I, G2);
    const size_t mk = (size_t)M * topk;

    size_t n_idx = 2 * (size_t)count + 1 + 3 * mk;
    size_t cursors = 2 * (size_t)nthreads * sizeof(cursor_t);
    size_t bytes = cursors + (size_t)M * p1.bytes + mk * p2.bytes + sizeof(float) * mk * H + sizeof(int32_t) * n_idx;
    char *xp = scratch_get(bytes);
    if (!xp) return -1;
    cursor_t *cur1 = (cursor_t *)xp, *cur2 = cur1 + nthreads; /* phase 1's and phase 2's */
    memset(cur1, 0, cursors);
    xp += cursors;
    char *ap = xp + (size_t)M * p1.bytes;
    float *ys = (float *)(ap + mk * p2.bytes); /* [P, H]: phase 2's down projection of each assignment */
    int32_t *fill = (int32_t *)(ys + mk * H), *active = fill + count, *off = active + count;
    int32_t *tok = off + mk + 1, *slot = tok + mk;

    const int na = group_by_expert(ids, mk, topk, first, count, fill, active, off, tok, slot), P = off[na];
    if (!na) {
        memset(out, 0, sizeof(float) * M * H);
        return 0;
    }

    const size_t q13_e = (size_t)2 * I * nb13, s13_e = (size_t)2 * I * G13;
    const size_t q2_e = (size_t)H * nb2, s2_e = (size_t)H * G2;

    const double t0 = omp_get_wtime();
    int team = 1;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        clock_mark(clk_in, tid);
        if (tid == 0) team = nt;

#pragma omp for schedule(static)
        for (int t = 0; t < M; t++)
            prepare(bits, (const char *)x + (size_t)t * H * (xbf16 ? 2 : 4), xbf16, H, G13, p1, xp + (size_t)t * p1.bytes);

        /* Phase 1: unit u = row r of expert active[u / I], i.e. gate row r and up row I + r. */
        const double p1_start = omp_get_wtime(); /* after the barrier that ends the loop above */
        long u, u1, h0, h1;
        int from = 0;
        while (claim(cur1, (long)na * I, CHUNK1, tid, nt, &from, &u, &u1)) {
            while (u < u1) {
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
                            const float y = activation(act, g, up);
                            if (q8)
                                ((float *)(dst + p2.raw))[r + i] = y;
                            else
                                ((float *)dst)[place(p2, r + i)] = y;
                        }
                    p += T;
                }
                u += pairs;
            }
        }
        clock_mark(clk_p1, tid);
        if (tid < CLOCK_THREADS) clk_thread_p1[tid] += clk_p1[tid] - p1_start, clk_cpu[tid] = sched_getcpu();
#pragma omp barrier
        if (q8) {
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) quantize_q8(ap + (size_t)p * p2.bytes, p2, I, G2);
        } else if (bits == 4) {
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) group_sums((float *)(ap + (size_t)p * p2.bytes), p2, I / 2, G2);
        }

        /* Phase 2: unit u = down row h of expert active[u / H], for each of its assignments p into
         * ys[p]. Units run along each expert's rows, as phase 1's do: split by output row instead,
         * a thread's chunk was a few KB of each of the 8 experts at M = 1, and the phase read DRAM at
         * ~60% of phase 1's rate (session 24). */
        from = 0;
        while (claim(cur2, (long)na * H, CHUNK2, tid, nt, &from, &u, &u1)) {
            while (u < u1) {
                const int a = (int)(u / H), h = (int)(u % H), e = active[a];
                int R = tile_rows(off[a + 1] - off[a]);
                while (R > u1 - u || R > H - h) R /= 2;
                const uint8_t *q = q2 + e * q2_e;
                const uint16_t *s = s2 + e * s2_e;
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
                        for (int t = 0; t < T; t++) ys[(size_t)(p + t) * H + h + i] = d[i * T + t] + (b2 ? b2[(size_t)e * H + h + i] : 0.0f);
                    p += T;
                }
                u += R;
            }
        }
#pragma omp barrier
        /* out[t] = sum of weight x ys[p] over token t's assignments, in increasing expert order
         * whichever thread ran them: each output row has one owner here. */
        share(H, tid, nt, &h0, &h1);
        for (int t = 0; t < M; t++) memset(out + (size_t)t * H + h0, 0, sizeof(float) * (h1 - h0));
        for (int p = 0; p < P && h0 < h1; p++) { /* p runs the active experts in order */
            float *o = out + (size_t)tok[p] * H;
            const float w = weights[(size_t)tok[p] * topk + slot[p]], *y = ys + (size_t)p * H;
            for (long h = h0; h < h1; h++) o[h] += w * y[h];
        }
        clock_mark(clk_end, tid);
    }
    clk[CLK_CALLS] += 1;
    clk_team = team;
    double in0, in1, p1_0, p1_1, end0, end1;
    clock_span(clk_in, team, &in0, &in1);
    clock_span(clk_p1, team, &p1_0, &p1_1);
    clock_span(clk_end, team, &end0, &end1);
    clk[CLK_WAKE] += in1 - t0;
    clk[CLK_P1_FIRST] += p1_0 - t0;
    clk[CLK_P1_LAST] += p1_1 - t0;
    clk[CLK_P2] += end1 - p1_1;
    return P;
}

/* Lookahead. In decode the pool's cores and DRAM idle while the GPU worker runs its part of the
 * next layer (attention, router: ~90 us a layer on the H200 hosts, a quarter of a layer's time at
 * M=1), and then the next call reads its experts from DRAM. The next layer's router applied to this
 * layer's input names most of the experts the next layer will choose: the residual stream changes
 * little from one layer to the next (the "pre-gated MoE" observation). krasis_lookahead reads those
 * experts' bytes during the wait, each thread the rows that krasis_moe_layer will give it first if
 * the guess holds (the same grouping and split: its own share; claim lets a thread done early take
 * rows of others' shares), in the order it will read them, so they wait in that
 * core's L2 (and the L3). It stops when any of the mailbox request numbers `words` differs from
 * `seen` (the next request is in: the kernel must not wait for the lookahead), at `max_s` seconds
 * (> 0), or when each thread has read its share of `budget` bytes (what its caches keep). A wrong
 * guess only costs DRAM time nobody was using.
 *
 * router [E, H] bf16 (plus bias [E] float32 or NULL) of the next layer: ids = top-k over experts of
 * x . router + bias, per token of x [M, H] (bf16 when xbf16, else float32), written into
 * predicted [M, topk]. router NULL: predicted holds the ids to read (given by the caller). Guessed
 * ids that `allowed` [E_all] (when not NULL) marks 0 are not read: with hcs_hybrid the GPU runs its
 * hot experts itself, and the pool, which never sees them asked for, leaves them out (lookahead.py).
 * Returns the bytes read, or -1 when out of memory. */
static volatile uint64_t lookahead_sink; /* keeps the reads from being optimised away */

typedef struct {
    const int64_t *const *words;
    const int64_t *seen;
    int nwords;
    double until;
    volatile int stop;
} halt_t;

/* Whether a request came: a word at `words` differs from the number seen. */
static int requested(const halt_t *h) {
    for (int i = 0; i < h->nwords; i++)
        if (*(const volatile int64_t *)h->words[i] != h->seen[i]) return 1;
    return 0;
}

/* A request word shares its cache line with the header the GPU writes before it and the reply word
 * it spins on over PCIe, so polling adds traffic on the line both sides use: a team's first thread
 * alone reads the words (the others see its stop), and a poller waits POLL_PAUSES pauses between
 * reads (~0.5 us on the lent hosts, about the pace of the Python loop that polled before). Session
 * 25 suspected tight polling of the ~1.1 ms that requests waited in its calls 3 and 4; the cause was
 * the pool's Python side napping (main.py: still_idle), and this pace was not measured apart. */
#ifndef POLL_PAUSES
#define POLL_PAUSES 8
#endif
INLINE void relax(void) {
    for (int i = 0; i < POLL_PAUSES; i++) _mm_pause();
}

static int halted(halt_t *h) {
    if (h->stop) return 1;
    if ((omp_get_thread_num() == 0 && requested(h)) || (h->until > 0 && omp_get_wtime() >= h->until)) return h->stop = 1;
    return 0;
}

/* Read n bytes from p, a cache line at a time, in pieces of 4 KiB between checks of `h`, no more
 * than *left in all; returns 0 once halted or out of budget. */
static int touch(const uint8_t *p, size_t n, int64_t *left, halt_t *h, uint64_t *acc) {
    for (size_t done = 0; done < n;) {
        if (*left <= 0 || halted(h)) return 0;
        size_t c = n - done < 4096 ? n - done : 4096;
        for (size_t o = 0; o < c; o += 64) *acc += p[done + o];
        done += c;
        *left -= (int64_t)c;
    }
    return 1;
}

/* A bf16 row of the router . float32 x over H: four chains of vector FMAs, since one waited on its
 * own latency (128 experts x 2048 took 22 us on one AVX-512 core of the dev machine). */
static float router_dot(const uint16_t *w, const float *x, int H) {
    vf a[4] = {{0}, {0}, {0}, {0}};
    int k = 0;
    for (; k + 4 * VL <= H; k += 4 * VL)
        for (int i = 0; i < 4; i++) a[i] += scales(w + k + i * VL, VL) * *(const vf_u *)(x + k + i * VL);
    float s = hsum(a[0] + a[1] + a[2] + a[3]);
    for (; k < H; k++) s += bf16(w[k]) * x[k];
    return s;
}

static int64_t lookahead(int bits, int nthreads, int M, int topk, int H, int I, int G13, int G2, int xbf16, const void *x,
                         const uint16_t *router, const float *bias, int E, int64_t first, int64_t count,
                         const uint8_t *q13, const uint16_t *s13, const uint8_t *q2, const uint16_t *s2,
                         const int64_t *const *words, const int64_t *seen, int nwords, double max_s, int64_t budget,
                         int32_t *predicted, const uint8_t *allowed, int E_all) {
    const int nb13 = bits == 4 ? H / 2 : H, nb2 = bits == 4 ? I / 2 : I;
    const size_t mk = (size_t)M * topk;
    const size_t q13_e = (size_t)2 * I * nb13, s13_e = (size_t)2 * I * G13;
    const size_t q2_e = (size_t)H * nb2, s2_e = (size_t)H * G2;
    halt_t h = {words, seen, nwords, max_s > 0 ? omp_get_wtime() + max_s : 0.0, 0};
    /* A request that came while the caller did its bookkeeping is served first: with a short GPU turn
     * it arrives before the guess is made, and the router, top-k and grouping below are not
     * interruptible. A guess not made is no guess (-1), not the last layer's. */
    if (halted(&h)) {
        if (router)
            for (size_t i = 0; i < mk; i++) predicted[i] = -1;
        return 0;
    }
    float *logits = malloc(sizeof(float) * (size_t)M * (router ? E + H : 1)); /* and x as float32 */
    int32_t *idx = malloc(sizeof(int32_t) * (2 * (size_t)count + 1 + 4 * mk));
    if (!logits || !idx) {
        free(logits), free(idx);
        return -1;
    }
    int32_t *fill = idx, *active = fill + count, *off = active + count, *tok = off + mk + 1, *slot = tok + mk;
    int32_t *want = slot + mk; /* the guess less the experts `allowed` rules out */
    int na = 0, team = 1, reading = 0;
    int64_t total = 0;
    const double t0 = omp_get_wtime();
    double guessed = t0;

#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        clock_mark(clk_in, tid);
        if (tid == 0) team = reading = nt; /* seen by all after the barrier below */
        if (router) {
            float *xf = logits + (size_t)M * E;
            if (xbf16) {
#pragma omp for schedule(static)
                for (size_t j = 0; j < (size_t)M * H; j++) xf[j] = bf16(((const uint16_t *)x)[j]);
            }
#pragma omp for schedule(static)
            for (int e = 0; e < E; e++)
                for (int t = 0; t < M; t++)
                    logits[(size_t)t * E + e] = router_dot(router + (size_t)e * H, (xbf16 ? xf : (const float *)x) + (size_t)t * H, H)
                                                + (bias ? bias[e] : 0.0f);
        }
        /* The guess's serial part, on the first thread: the one that watches for requests (halted). */
        if (tid == 0) {
            for (int t = 0; router && t < M; t++) { /* top-k by selection: k and E are small */
                if (halted(&h)) { /* came during the router: no guess (see above) */
                    for (size_t i = (size_t)t * topk; i < mk; i++) predicted[i] = -1;
                    break;
                }
                float *l = logits + (size_t)t * E;
                for (int j = 0; j < topk; j++) {
                    int best = 0;
                    for (int e = 1; e < E; e++)
                        if (l[e] > l[best]) best = e;
                    predicted[(size_t)t * topk + j] = best;
                    l[best] = -INFINITY;
                }
            }
            for (size_t i = 0; i < mk; i++)
                want[i] = allowed && predicted[i] >= 0 && predicted[i] < E_all && !allowed[predicted[i]] ? -1 : predicted[i];
            na = halted(&h) ? 0 : group_by_expert(want, mk, topk, first, count, fill, active, off, tok, slot);
            guessed = omp_get_wtime();
        }
#pragma omp barrier

        int64_t left = budget / nt;
        uint64_t acc = 0;
        long u, u1, h0, h1;
        share((long)na * I, tid, nt, &u, &u1);
        int go = 1;
        for (; go && u < u1; u++) { /* phase 1: gate row r and up row I + r of expert active[u / I] */
            const size_t e = active[u / I], r = u % I;
            const uint8_t *q = q13 + e * q13_e;
            const uint16_t *s = s13 + e * s13_e;
            go = touch(q + r * nb13, nb13, &left, &h, &acc) && touch(q + (I + r) * nb13, nb13, &left, &h, &acc)
                 && touch((const uint8_t *)(s + r * G13), 2 * G13, &left, &h, &acc)
                 && touch((const uint8_t *)(s + (I + r) * G13), 2 * G13, &left, &h, &acc);
        }
        share((long)na * H, tid, nt, &h0, &h1);
        for (long a = h0 / H; go && a < na && a * H < h1; a++) { /* phase 2: down rows [h0, h1) of the active experts */
            const size_t e = active[a], r0 = h0 > a * H ? h0 - a * H : 0, r1 = h1 < (a + 1) * H ? h1 - a * H : H;
            go = touch(q2 + e * q2_e + r0 * nb2, (r1 - r0) * nb2, &left, &h, &acc)
                 && touch((const uint8_t *)(s2 + e * s2_e + r0 * G2), 2 * (r1 - r0) * G2, &left, &h, &acc);
        }
#pragma omp atomic
        lookahead_sink += acc;
        total += budget / nt - left;
        /* the first thread alone watches for the next request (halted): done early, it watches on
         * until the others are done too */
        __atomic_fetch_sub(&reading, 1, __ATOMIC_RELEASE);
        if (tid == 0)
            while (__atomic_load_n(&reading, __ATOMIC_ACQUIRE) > 0 && !halted(&h)) relax();
    }
    free(logits), free(idx);
    clk[CLK_AHEAD_CALLS] += 1;
    double in0, in1;
    clock_span(clk_in, team, &in0, &in1);
    clk[CLK_AHEAD_WAKE] += in1 - t0;
    clk[CLK_AHEAD_GUESS] += guessed - t0;
    return total;
}

/* Keeps the team's threads running until a request arrives (a word at `words` differs from `seen`)
 * or max_s seconds pass: the pool's loop calls it after answering a layer when no lookahead runs.
 * Threads left idle between two layers' calls are woken through the OS when the next call starts,
 * which cost its start 7-20 us on one lent host (3 on others, and on all while a lookahead kept them
 * reading). Returns 1 when a request came, 0 at max_s. */
int krasis_hold(const int64_t *const *words, const int64_t *seen, int nwords, double max_s, int nthreads) {
    halt_t h = {words, seen, nwords, omp_get_wtime() + max_s, 0};
#pragma omp parallel num_threads(nthreads)
    while (!halted(&h)) relax();
    return requested(&h);
}

/* The entry points take their arguments as structs that the caller fills once per bound block and
 * once per distinct set of token buffers (native.py): converting ~25 arguments per call through
 * ctypes cost more than 10 us, against a layer call of ~250 us in decode. */
typedef struct { /* a block of experts [first, first + count) of one layer, as the store holds them */
    int bits, act, nthreads, H, I, G13, G2;
    int64_t first, count;
    const uint8_t *q13;
    const uint16_t *s13;
    const uint8_t *q2;
    const uint16_t *s2;
    const float *b13, *b2;
} block_t;

typedef struct { /* a call's tokens: x [M, H], ids and weights [M, topk], out [M, H] */
    int M, topk, xbf16;
    const void *x;
    const int32_t *ids;
    const float *weights;
    float *out;
} tokens_t;

typedef struct { /* the lookahead's: router, bias, E; when to stop; where its guess goes; what to skip */
    const uint16_t *router;
    const float *bias;
    int E, nwords;
    const int64_t *const *words;
    const int64_t *seen;
    double max_s;
    int64_t budget;
    int32_t *predicted;
    const uint8_t *allowed; /* [experts] of the layer, 0: not read even when guessed; NULL: all */
    int experts;
} ahead_t;

/* moe_layer's work; see above it for the contract. */
int krasis_moe_layer(const block_t *b, const tokens_t *t) {
    return moe_layer(b->bits, b->act, b->nthreads, t->M, t->topk, b->H, b->I, b->G13, b->G2, t->xbf16, t->x, t->ids,
                     t->weights, b->first, b->count, b->q13, b->s13, b->q2, b->s2, b->b13, b->b2, t->out);
}

/* lookahead's work on block b (the next layer's) from tokens t (x, M, topk); see above it. */
int64_t krasis_lookahead(const block_t *b, const tokens_t *t, const ahead_t *a) {
    return lookahead(b->bits, b->nthreads, t->M, t->topk, b->H, b->I, b->G13, b->G2, t->xbf16, t->x, a->router, a->bias,
                     a->E, b->first, b->count, b->q13, b->s13, b->q2, b->s2, a->words, a->seen, a->nwords, a->max_s,
                     a->budget, a->predicted, a->allowed, a->experts);
}
