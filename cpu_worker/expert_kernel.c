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
 *
 * INT4 with bf16 x (what the GPU workers send in decode) on CPUs with AVX512_BF16 takes a second
 * inner path: vdpbf16ps multiplies pairs of bf16 values and adds them exactly into float32 lanes,
 * so the codes become bf16 q (-8..7, exact: no offset to fold back) by a table lookup and 32 bytes
 * (64 weights) cost one vpmovzxbw from memory, a vpermw per nibble, a shift, and two vdpbf16ps per
 * token. Its planes hold x's bf16 values as received; the down projection's input, the float32
 * activation, is rounded to bf16 for it (the GPU workers round it too in bf16). Built with
 * -DKRASIS_EMULATE_BF16 on other CPUs, the same path runs on scalar stand-ins for those
 * instructions at the build's vector width (tests/test_cpu_kernel.py checks it on AVX2).
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
/* 2 VL bf16 values, or codes widened to 16 bits. */
typedef uint16_t vw __attribute__((vector_size(4 * VL)));

/* bf16((i & 15) - 8): vpermw reads only the low 5 bits of each index, so a byte's low nibble is
 * looked up with the high nibble's low bit still above it, hence the table twice. */
static const uint16_t NIBBLE_BF16[32] = {
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, /* -8..-1 */
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, /* 0..7 */
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, /* -8..-1 */
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, /* 0..7 */
};

/* Loads of n <= 2 VL elements, the rest zero: n < 2 VL only for a group's last bytes, masked, as
 * they may end the weights' buffer. */
#if INT4_BF16 == 1
INLINE __mmask32 first_n(int n) { return (__mmask32)((1u << n) - 1); }
INLINE vw load_u8(const uint8_t *p, int n) {
    __m256i b = n == 2 * VL ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi8(first_n(n), p);
    return (vw)_mm512_cvtepu8_epi16(b);
}
INLINE vw load_u16(const uint16_t *p, int n) {
    return (vw)(n == 2 * VL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(first_n(n), p));
}
INLINE vw nibble_bf16(vw i) { return (vw)_mm512_permutexvar_epi16((__m512i)i, _mm512_loadu_si512(NIBBLE_BF16)); }
/* acc[i] += a[2i + 1] b[2i + 1] + a[2i] b[2i] */
INLINE vf dot_bf16(vf acc, vw a, vw b) { return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b); }
#else
INLINE vw load_u8(const uint8_t *p, int n) {
    vw w = {0};
    for (int i = 0; i < n; i++) w[i] = p[i];
    return w;
}
INLINE vw load_u16(const uint16_t *p, int n) {
    vw w = {0};
    for (int i = 0; i < n; i++) w[i] = p[i];
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

/* An input vector of length K as the dot products read it, `bytes` apart: INT4 [evens | odds |
 * 8 * group sums], each part padded to 16 floats; INT4 for the bf16 path (bf16 set) [evens | odds]
 * as bf16, each padded to 32; INT8 [x]. */
typedef struct {
    int bf16, half, sums, bytes;
} prep_t;

static prep_t prep_layout(int bits, int bf16, int k, int groups) {
    prep_t p = {.bf16 = bf16};
    if (bf16) {
        p.half = round_up(k / 2, 32);
        p.sums = 2 * p.half;
        p.bytes = 2 * p.sums;
    } else if (bits == 4) {
        p.half = round_up(k / 2, 16);
        p.sums = 2 * p.half;
        p.bytes = 4 * (p.sums + round_up(groups, 16));
    } else {
        p.half = round_up(k, 16);
        p.sums = p.half;
        p.bytes = 4 * p.half;
    }
    return p;
}

static void group_sums(float *v, prep_t p, int half_k, int groups) {
    int gb = half_k / groups;
    for (int gi = 0; gi < groups; gi++) {
        float s = 0.0f;
        for (int j = gi * gb; j < (gi + 1) * gb; j++) s += v[j] + v[p.half + j];
        v[p.sums + gi] = 8.0f * s;
    }
}

/* x is float32, or bf16 when xbf16 (widened here rather than by a torch call per layer, or kept
 * as it is for the bf16 path). */
static void prepare(int bits, const void *x, int xbf16, int k, int groups, prep_t p, void *v) {
    const float *xf = x;
    const uint16_t *xb = x;
    for (int j = 0; j < k; j++) {
        const int i = bits == 8 ? j : (j & 1) * p.half + j / 2;
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
/* acc[r][t] += 2 VL bytes (n of them) of row r from byte j . x_t, on the bf16 path. Byte j + k
 * holds weights 2(j + k) (low nibble) and 2(j + k) + 1 (high), so word k of lo and hi pairs with
 * element j + k of the even and odd planes: elementwise, as vdpbf16ps multiplies (lane i of acc
 * gets words 2i and 2i + 1: weights 2j + 4i and 2j + 4i + 2 from lo, 2j + 4i + 1 and 2j + 4i + 3
 * from hi, so lo and hi add to separate lanes or chains and the float32 group sum is the same). */
INLINE void int4_bf16(const int R, const int T, const int S, const uint8_t *const *rows, const vec_t *v, int half, int j,
                      int n, vf acc[4][4][2]) {
    for (int r = 0; r < R; r++) {
        const vw b = load_u8(rows[r] + j, n), lo = nibble_bf16(b), hi = nibble_bf16(b >> 4);
        for (int t = 0; t < T; t++) {
            const uint16_t *x = v[t].w;
            acc[r][t][0] = dot_bf16(acc[r][t][0], lo, load_u16(x + j, n));
            acc[r][t][S - 1] = dot_bf16(acc[r][t][S - 1], hi, load_u16(x + half + j, n));
        }
    }
}
#endif

/* d[r * T + t] = row r . vector t for R rows of `groups` groups of `gb` bytes each; xb: the bf16
 * path (vectors prepared with bf16 set). */
typedef void dots_fn(const uint8_t *const *rows, const uint16_t *const *sc, const vec_t *v, int groups, int gb, prep_t p,
                     float *d);

INLINE void dots(const int bits, const int xb, const int R, const int T, const uint8_t *const *rows,
                 const uint16_t *const *sc, const vec_t *v, int groups, int gb, prep_t p, float *d) {
    /* Independent FMA chains per (row, token): with one token, two (INT4: low and high nibbles;
     * INT8: even and odd vectors), else the tokens' own chains are enough to hide FMA latency. */
    const int S = T == 1 ? 2 : 1;
    vf tot[4][4];
    float stot[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) tot[r][t] = (vf){0}, stot[r][t] = 0.0f;
    for (int gi = 0; gi < groups; gi++) {
        vf acc[4][4][2];
        float sacc[4][4];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) acc[r][t][0] = acc[r][t][S - 1] = (vf){0}, sacc[r][t] = 0.0f;
        const int j0 = gi * gb, j1 = j0 + gb;
        int j = j0;
        if (xb) {
#if INT4_BF16
            for (; j + 2 * VL <= j1; j += 2 * VL) int4_bf16(R, T, S, rows, v, p.half, j, 2 * VL, acc);
            if (j < j1) int4_bf16(R, T, S, rows, v, p.half, j, j1 - j, acc);
            j = j1; /* no scalar tail: the masked step took the group's last bytes */
#endif
        } else if (bits == 4) {
            for (; j + VL <= j1; j += VL)
                for (int r = 0; r < R; r++) {
                    vi b = (vi)WIDEN_U8(rows[r] + j);
                    vf lo = __builtin_convertvector(b & 15, vf), hi = __builtin_convertvector(b >> 4, vf);
                    for (int t = 0; t < T; t++) {
                        acc[r][t][0] += lo * *(const vf_u *)(v[t].f + j);
                        acc[r][t][S - 1] += hi * *(const vf_u *)(v[t].f + p.half + j);
                    }
                }
        } else {
            for (; j + S * VL <= j1; j += S * VL)
                for (int c = 0; c < S; c++)
                    for (int r = 0; r < R; r++) {
                        vf w = __builtin_convertvector((vi)WIDEN_S8(rows[r] + j + c * VL), vf);
                        for (int t = 0; t < T; t++) acc[r][t][c] += w * *(const vf_u *)(v[t].f + j + c * VL);
                    }
            for (; j + VL <= j1; j += VL)
                for (int r = 0; r < R; r++) {
                    vf w = __builtin_convertvector((vi)WIDEN_S8(rows[r] + j), vf);
                    for (int t = 0; t < T; t++) acc[r][t][0] += w * *(const vf_u *)(v[t].f + j);
                }
        }
        for (; j < j1; j++) {
            for (int r = 0; r < R; r++) {
                if (bits == 4) {
                    uint8_t b = rows[r][j];
                    for (int t = 0; t < T; t++)
                        sacc[r][t] += (float)(b & 15) * v[t].f[j] + (float)(b >> 4) * v[t].f[p.half + j];
                } else {
                    float w = (float)(int8_t)rows[r][j];
                    for (int t = 0; t < T; t++) sacc[r][t] += w * v[t].f[j];
                }
            }
        }
        for (int r = 0; r < R; r++) {
            float s = bf16(sc[r][gi]);
            for (int t = 0; t < T; t++) {
                tot[r][t] += (S == 2 ? acc[r][t][0] + acc[r][t][1] : acc[r][t][0]) * s;
                if (!xb) stot[r][t] += (bits == 4 ? sacc[r][t] - v[t].f[p.sums + gi] : sacc[r][t]) * s;
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) d[r * T + t] = hsum(tot[r][t]) + stot[r][t];
}

/* The tiles used: R = TILE_ROWS rows for 1-2 tokens at a time, 2 rows for 4 (register budget),
 * and 1-2 rows at the ends of ranges. */
#define TILE(B, X, R, T)                                                                                       \
    static void dots_##B##X##_##R##_##T(const uint8_t *const *rows, const uint16_t *const *sc, const vec_t *v, \
                                        int groups, int gb, prep_t p, float *d) {                              \
        dots(B, X, R, T, rows, sc, v, groups, gb, p, d);                                                       \
    }
#define TILES(B, X)                                                                                       \
    TILE(B, X, 4, 1) TILE(B, X, 4, 2) TILE(B, X, 2, 1) TILE(B, X, 2, 2) TILE(B, X, 2, 4) TILE(B, X, 1, 1) \
    TILE(B, X, 1, 2) TILE(B, X, 1, 4)
#define TABLE(B, X)                                                                        \
    {                                                                                      \
        [4] = {[1] = dots_##B##X##_4_1, [2] = dots_##B##X##_4_2},                          \
        [2] = {[1] = dots_##B##X##_2_1, [2] = dots_##B##X##_2_2, [4] = dots_##B##X##_2_4}, \
        [1] = {[1] = dots_##B##X##_1_1, [2] = dots_##B##X##_1_2, [4] = dots_##B##X##_1_4}, \
    }
/* [INT4, INT8, INT4 on the bf16 path] */
TILES(4, 0)
TILES(8, 0)
#if INT4_BF16
TILES(4, 1)
static dots_fn *const TILE_FN[3][5][5] = {TABLE(4, 0), TABLE(8, 0), TABLE(4, 1)};
#else
static dots_fn *const TILE_FN[2][5][5] = {TABLE(4, 0), TABLE(8, 0)};
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
    const int nb13 = bits == 4 ? H / 2 : H, nb2 = bits == 4 ? I / 2 : I;
    const int xb = INT4_BF16 && xbf16 && bits == 4;
    const int gb13 = nb13 / G13, gb2 = nb2 / G2, bi = bits == 8 ? 1 : xb ? 2 : 0;
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
                TILE_FN[bi][2 * pairs][T](rows, sc, v, G13, gb13, p1, d);
                for (int i = 0; i < pairs; i++)
                    for (int t = 0; t < T; t++) {
                        float g = d[2 * i * T + t], up = d[(2 * i + 1) * T + t];
                        if (b13) g += b13[(size_t)e * 2 * I + r + i], up += b13[(size_t)e * 2 * I + I + r + i];
                        char *dst = ap + (size_t)(p + t) * p2.bytes;
                        const int k = r + i, at = bits == 4 ? (k & 1) * p2.half + k / 2 : k;
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
                    TILE_FN[bi][R][T](rows, sc, v, G2, gb2, p2, d);
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
