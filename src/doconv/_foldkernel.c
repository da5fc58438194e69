/*
 * doconv._foldkernel: the three products of DO-Conv's kernel composition, one pass each.
 *
 *   folded[o, c, k] = sum_s W[o, c, s] * D_hat[i, k, s]            (forward)
 *   grad_W[o, c, s] = sum_k G[o, c, k] * D_hat[i, k, s]            (backward, W)
 *   grad_D[i, k, s] = sum_{o in group(i)} G[o, c, k] * W[o, c, s]  (backward, D)
 *
 * with i = (o / (C_out/g)) * (C_in/g) + c, the input channel that the grouped convolution
 * applies folded[o, c] to (docs/maths.rst). W, G and the folded kernel are laid out
 * (C_out, C_in/g, ·) and read or written row after row, in memory order: the per-channel
 * matrix products that a BLAS would batch are strided across the whole tensor, and for large
 * layers those strided passes, not the arithmetic, are what costs (PERF-NOTES). D_hat is
 * small and stays in cache. The work is split by rows (forward, grad_W) or input channels
 * (grad_D) between threads: on the OpenMP runtime given to use_gomp_parallel, or by the caller
 * (see `run` below); every function releases the GIL.
 *
 * Each entry point takes its three arrays as Python objects (NumPy arrays from doconv/_fold_cpu.py,
 * for doconv/torch.py and doconv/gluon.py) and checks them itself, through the buffer protocol,
 * before any pointer reaches a loop: 3-D, C-contiguous, float32 or float64 alike, shapes that agree
 * with each other and with `groups` (every size is read from the shapes, none is passed apart), an
 * output that is writable and overlaps neither input. A mismatch raises ValueError naming the array
 * and both shapes, so no call can make the loops leave the arrays. The loops keep no stack array
 * sized by the problem (see the accumulators below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The bodies take K (and the kernel of work) as inline arguments: called with a literal K
 * below, the compiler unrolls and vectorises the loops over taps, which a run-time K of 9
 * (8 lanes + 1) leaves slow. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif
#define INLINE static inline __attribute__((always_inline))

/* Accumulators: the bodies named *_regs keep a row's (or a channel's) sums in a local array and
 * write them once; they are called only with literal K and D_mul (the switches below), so that
 * array has a size fixed at compile time and lives in registers. Every other size sums straight
 * into the output, which the entry points have checked to overlap no input (hence restrict): no
 * stack array grows with the problem, whatever K and D_mul are (the sanitize env builds with
 * -Werror=stack-usage to keep it so). */
#define DEFINE_KERNELS(T, SUFFIX)                                                                 \
    /* out[o, c, :] = in[o, c, :] @ M[i(o, c)] for rows [o0, o1), M being (C_in, J, L): the forward    \
       (in = W, M = D_hat transposed, J = D_mul, L = K), and grad_W (in = G, M = D_hat, J = K,       \
       L = D_mul) where it has no literal body below. */                                           \
    INLINE void rows_body_##SUFFIX(const T *restrict in, const T *restrict M, T *restrict out,      \
                                   Py_ssize_t C_in_g, const Py_ssize_t J, const Py_ssize_t L,    \
                                   Py_ssize_t out_per_group, Py_ssize_t o0, Py_ssize_t o1) {      \
        for (Py_ssize_t o = o0; o < o1; o++) {                                                    \
            Py_ssize_t base = (o / out_per_group) * C_in_g;                                       \
            for (Py_ssize_t c = 0; c < C_in_g; c++) {                                             \
                const T *restrict x = in + (o * C_in_g + c) * J;                                  \
                const T *restrict m = M + (base + c) * J * L;                                     \
                T *restrict y = out + (o * C_in_g + c) * L;                                       \
                for (Py_ssize_t l = 0; l < L; l++) y[l] = 0;                                      \
                for (Py_ssize_t j = 0; j < J; j++) {                                              \
                    const T xj = x[j];                                                            \
                    const T *restrict mj = m + j * L;                                             \
                    for (Py_ssize_t l = 0; l < L; l++) y[l] += xj * mj[l];                        \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* Each row is summed in registers (literal K and S: no stores in the inner loop), then written. */ \
    INLINE void grad_W_body_regs_##SUFFIX(const T *G, const T *restrict D_hat, T *grad_W,         \
                                          Py_ssize_t C_in_g, const Py_ssize_t K, const Py_ssize_t S, \
                                          Py_ssize_t out_per_group, Py_ssize_t o0, Py_ssize_t o1) { \
        for (Py_ssize_t o = o0; o < o1; o++) {                                                    \
            Py_ssize_t base = (o / out_per_group) * C_in_g;                                       \
            for (Py_ssize_t c = 0; c < C_in_g; c++) {                                             \
                const T *g = G + (o * C_in_g + c) * K;                                            \
                const T *restrict d = D_hat + (base + c) * K * S;                                 \
                T acc[S]; /* S is a literal here: a fixed size */                                 \
                for (Py_ssize_t s = 0; s < S; s++) acc[s] = 0;                                    \
                for (Py_ssize_t k = 0; k < K; k++) {                                              \
                    const T gk = g[k];                                                            \
                    const T *restrict dk = d + k * S;                                             \
                    for (Py_ssize_t s = 0; s < S; s++) acc[s] += gk * dk[s];                      \
                }                                                                                 \
                T *y = grad_W + (o * C_in_g + c) * S;                                             \
                for (Py_ssize_t s = 0; s < S; s++) y[s] = acc[s];                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* One channel at a time: with a literal K and S its K x S accumulators live in registers  \
       while the rows o of its group stream by. */                                                \
    INLINE void grad_D_body_regs_##SUFFIX(const T *restrict G, const T *restrict W, T *restrict grad_D, \
                                          Py_ssize_t groups, Py_ssize_t C_in_g, const Py_ssize_t K, \
                                          const Py_ssize_t S, Py_ssize_t out_per_group, Py_ssize_t c0, \
                                          Py_ssize_t c1) {                                        \
        for (Py_ssize_t gi = 0; gi < groups; gi++) {                                              \
            for (Py_ssize_t c = c0; c < c1; c++) {                                                \
                T acc[K * S]; /* K and S are literals here: a fixed size */                       \
                for (Py_ssize_t j = 0; j < K * S; j++) acc[j] = 0;                                \
                for (Py_ssize_t o = gi * out_per_group; o < (gi + 1) * out_per_group; o++) {      \
                    const T *restrict g = G + (o * C_in_g + c) * K;                               \
                    const T *restrict w = W + (o * C_in_g + c) * S;                               \
                    for (Py_ssize_t k = 0; k < K; k++) {                                          \
                        const T gk = g[k];                                                        \
                        for (Py_ssize_t s = 0; s < S; s++) acc[k * S + s] += gk * w[s];           \
                    }                                                                             \
                }                                                                                 \
                T *restrict out = grad_D + (gi * C_in_g + c) * K * S;                             \
                for (Py_ssize_t j = 0; j < K * S; j++) out[j] = acc[j];                           \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    INLINE void grad_D_body_##SUFFIX(const T *restrict G, const T *restrict W, T *restrict grad_D, \
                                     Py_ssize_t groups, Py_ssize_t C_in_g, Py_ssize_t K, Py_ssize_t S, \
                                     Py_ssize_t out_per_group, Py_ssize_t c0, Py_ssize_t c1) {    \
        for (Py_ssize_t gi = 0; gi < groups; gi++) {                                              \
            for (Py_ssize_t c = c0; c < c1; c++) {                                                \
                T *restrict out = grad_D + (gi * C_in_g + c) * K * S;                             \
                for (Py_ssize_t j = 0; j < K * S; j++) out[j] = 0;                                \
                for (Py_ssize_t o = gi * out_per_group; o < (gi + 1) * out_per_group; o++) {      \
                    const T *restrict g = G + (o * C_in_g + c) * K;                               \
                    const T *restrict w = W + (o * C_in_g + c) * S;                               \
                    for (Py_ssize_t k = 0; k < K; k++) {                                          \
                        const T gk = g[k];                                                        \
                        T *restrict row = out + k * S;                                            \
                        for (Py_ssize_t s = 0; s < S; s++) row[s] += gk * w[s];                   \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* Dispatch on the common tap counts (3x3, 1x3/3x1, 1x7/7x1, 5x3, 5x5, 7x7), a generic body else. */ \
    MULTIVERSION static void fold_rows_##SUFFIX(const T *W, const T *D_hat_t, T *out,             \
                                                Py_ssize_t C_in_g, Py_ssize_t K, Py_ssize_t S,   \
                                                Py_ssize_t opg, Py_ssize_t o0, Py_ssize_t o1) {  \
        if (S == K) { /* D_mul = K, the default: both loops have a literal bound */               \
            switch (K) {                                                                          \
            case 3: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, 3, 3, opg, o0, o1); return;      \
            case 7: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, 7, 7, opg, o0, o1); return;      \
            case 9: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, 9, 9, opg, o0, o1); return;      \
            case 25: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, 25, 25, opg, o0, o1); return;   \
            }                                                                                     \
        }                                                                                         \
        switch (K) {                                                                              \
        case 9: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, S, 9, opg, o0, o1); break;           \
        case 3: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, S, 3, opg, o0, o1); break;           \
        case 15: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, S, 15, opg, o0, o1); break;         \
        case 25: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, S, 25, opg, o0, o1); break;         \
        case 49: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, S, 49, opg, o0, o1); break;         \
        default: rows_body_##SUFFIX(W, D_hat_t, out, C_in_g, S, K, opg, o0, o1);                 \
        }                                                                                         \
    }                                                                                             \
    MULTIVERSION static void grad_W_rows_##SUFFIX(const T *G, const T *D_hat, T *grad_W,          \
                                                  Py_ssize_t C_in_g, Py_ssize_t K, Py_ssize_t S, \
                                                  Py_ssize_t opg, Py_ssize_t o0, Py_ssize_t o1) { \
        if (S == K) { /* D_mul = K, the default: both loops have a literal bound */               \
            switch (K) {                                                                          \
            case 9: grad_W_body_regs_##SUFFIX(G, D_hat, grad_W, C_in_g, 9, 9, opg, o0, o1); return; \
            case 3: grad_W_body_regs_##SUFFIX(G, D_hat, grad_W, C_in_g, 3, 3, opg, o0, o1); return; \
            case 7: grad_W_body_regs_##SUFFIX(G, D_hat, grad_W, C_in_g, 7, 7, opg, o0, o1); return; \
            case 25: grad_W_body_regs_##SUFFIX(G, D_hat, grad_W, C_in_g, 25, 25, opg, o0, o1); return; \
            }                                                                                     \
        }                                                                                         \
        switch (K) {                                                                              \
        case 9: rows_body_##SUFFIX(G, D_hat, grad_W, C_in_g, 9, S, opg, o0, o1); break;        \
        default: rows_body_##SUFFIX(G, D_hat, grad_W, C_in_g, K, S, opg, o0, o1);              \
        }                                                                                         \
    }                                                                                             \
    MULTIVERSION static void grad_D_channels_##SUFFIX(const T *G, const T *W, T *grad_D,          \
                                                      Py_ssize_t groups, Py_ssize_t C_in_g,      \
                                                      Py_ssize_t K, Py_ssize_t S, Py_ssize_t opg, \
                                                      Py_ssize_t c0, Py_ssize_t c1) {             \
        if (S == K) {                                                                             \
            switch (K) {                                                                          \
            case 9: grad_D_body_regs_##SUFFIX(G, W, grad_D, groups, C_in_g, 9, 9, opg, c0, c1); return; \
            case 3: grad_D_body_regs_##SUFFIX(G, W, grad_D, groups, C_in_g, 3, 3, opg, c0, c1); return; \
            case 7: grad_D_body_regs_##SUFFIX(G, W, grad_D, groups, C_in_g, 7, 7, opg, c0, c1); return; \
            case 25: grad_D_body_regs_##SUFFIX(G, W, grad_D, groups, C_in_g, 25, 25, opg, c0, c1); return; \
            }                                                                                     \
        }                                                                                         \
        grad_D_body_##SUFFIX(G, W, grad_D, groups, C_in_g, K, S, opg, c0, c1);                    \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_9X9 1
/* float32 kernels for 3x3 kernels with D_mul = 9, the default and by far the commonest case, with
 * AVX2 and FMA. The generic bodies above leave the 9-wide rows to the compiler; these keep their
 * sums in registers and share each loaded row of the small matrix between several rows of W or G.
 *
 * A row of 9 = 8 lanes + 1: each product row is one vector for columns 0..7 and a scalar for
 * column 8, computed with scalar FMAs on the low lane of the same broadcasts. */
#define AVX2 __attribute__((target("avx2,fma")))

/* out[o, c, :] = in[o, c, :] @ M[i(o, c)] for R rows o0..o0+R-1 of one group, where M is (C_in, 9, 9)
 * and i(o, c) = base + c. The forward (in = W, M = D_hat with (s, k) order) and grad_W (in = G,
 * M = D_hat with (k, s) order) are both this product. R rows at once share each row of M, loaded once,
 * between R broadcasts; 2R independent sums hide the FMA latency. */
AVX2 INLINE void rows9(const float *restrict in, const float *restrict M, float *restrict out, Py_ssize_t C_in_g,
                       Py_ssize_t base, const int R) {
    for (Py_ssize_t c = 0; c < C_in_g; c++) {
        const float *restrict m = M + (base + c) * 81;
        __m256 acc[4];
        __m128 acc8[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            acc[r] = _mm256_setzero_ps();
            acc8[r] = _mm_setzero_ps();
        }
#pragma GCC unroll 9
        for (int s = 0; s < 9; s++) {
            const __m256 row = _mm256_loadu_ps(m + s * 9);
            const __m128 last = _mm_load_ss(m + s * 9 + 8);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256 x = _mm256_broadcast_ss(in + (r * C_in_g + c) * 9 + s);
                acc[r] = _mm256_fmadd_ps(x, row, acc[r]);
                acc8[r] = _mm_fmadd_ss(_mm256_castps256_ps128(x), last, acc8[r]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            float *y = out + (r * C_in_g + c) * 9;
            _mm256_storeu_ps(y, acc[r]);
            _mm_store_ss(y + 8, acc8[r]);
        }
    }
}

/* Rows [o0, o1) of the product above, four at a time within each group. */
AVX2 static void rows9_avx2(const float *in, const float *M, float *out, Py_ssize_t C_in_g, Py_ssize_t opg,
                            Py_ssize_t o0, Py_ssize_t o1) {
    Py_ssize_t o = o0;
    while (o < o1) {
        const Py_ssize_t group_end = (o / opg + 1) * opg, stop = group_end < o1 ? group_end : o1;
        const Py_ssize_t base = (o / opg) * C_in_g;
        for (; o + 4 <= stop; o += 4)
            rows9(in + o * C_in_g * 9, M, out + o * C_in_g * 9, C_in_g, base, 4);
        for (; o < stop; o++) rows9(in + o * C_in_g * 9, M, out + o * C_in_g * 9, C_in_g, base, 1);
    }
}

/* grad_D[i, k, s] = sum_o G[o, c, k] W[o, c, s] for in-group channels [c0, c1) of every group.
 * One channel's 9x9 sums stay in ten vector registers (rows s = 0..7 of each tap k in a[k], the
 * column s = 8 of taps 0..7 in `last`, the corner as a scalar) while rows o stream by. Rows are
 * taken in chunks of a few rows, all channels of the range per chunk, so that the lines of a chunk's
 * rows are reused from channel to channel instead of fetched again; between chunks the sums wait in
 * `partial`, in register order. Rows lie C_in/g * 36 bytes apart: where that is a multiple of 2 KiB
 * (C_in/g = 512, 1024, ...), all rows of a chunk compete for the same few sets of the L1 cache, and a
 * chunk of 6 rows measured faster than 8 (8 is faster elsewhere; bench on 512- and 256-channel layers). */
AVX2 static void grad_D_avx2(const float *G, const float *W, float *grad_D, Py_ssize_t groups, Py_ssize_t C_in_g,
                             Py_ssize_t opg, Py_ssize_t c0, Py_ssize_t c1, float *partial) {
    const Py_ssize_t CHUNK_ROWS = (C_in_g * 36) % 2048 == 0 ? 6 : 8;
    for (Py_ssize_t gi = 0; gi < groups; gi++) {
        for (Py_ssize_t j = 0; j < (c1 - c0) * 88; j++) partial[j] = 0;
        for (Py_ssize_t ob = gi * opg; ob < (gi + 1) * opg; ob += CHUNK_ROWS) {
            const Py_ssize_t oe = ob + CHUNK_ROWS < (gi + 1) * opg ? ob + CHUNK_ROWS : (gi + 1) * opg;
            for (Py_ssize_t c = c0; c < c1; c++) {
                float *p = partial + (c - c0) * 88;
                __m256 a[9], last = _mm256_loadu_ps(p + 72);
#pragma GCC unroll 9
                for (int k = 0; k < 9; k++) a[k] = _mm256_loadu_ps(p + k * 8);
                float corner = p[80];
                for (Py_ssize_t o = ob; o < oe; o++) {
                    const float *g = G + (o * C_in_g + c) * 9;
                    const float *w = W + (o * C_in_g + c) * 9;
                    const __m256 wv = _mm256_loadu_ps(w);
#pragma GCC unroll 9
                    for (int k = 0; k < 9; k++) a[k] = _mm256_fmadd_ps(_mm256_broadcast_ss(g + k), wv, a[k]);
                    last = _mm256_fmadd_ps(_mm256_loadu_ps(g), _mm256_broadcast_ss(w + 8), last);
                    corner += g[8] * w[8];
                }
#pragma GCC unroll 9
                for (int k = 0; k < 9; k++) _mm256_storeu_ps(p + k * 8, a[k]);
                _mm256_storeu_ps(p + 72, last);
                p[80] = corner;
            }
        }
        for (Py_ssize_t c = c0; c < c1; c++) {
            const float *p = partial + (c - c0) * 88;
            float *out = grad_D + (gi * C_in_g + c) * 81;
            for (int k = 0; k < 9; k++) {
                memcpy(out + k * 9, p + k * 8, 8 * sizeof(float));
                out[k * 9 + 8] = k < 8 ? p[72 + k] : p[80];
            }
        }
    }
}

static int have_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

/* Splitting the work between threads. doconv/torch.py hands over the address of GOMP_parallel from
 * the OpenMP runtime that torch itself uses: its threads are the ones that just ran the convolution
 * and are still spinning, waiting for work. Threads of our own would compete with those spinning
 * threads for the same cores, and on 2 cores that showed in bench_torch's training ratios.
 * Without that address (another torch build, no OpenMP), every part runs in the calling thread and the
 * caller splits the work between threads of its own, one call per part. */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_t gomp_parallel = NULL;
#define MAX_THREADS 1024 /* more parts than this run on this many OpenMP threads */

struct job;
typedef void (*range_t)(const struct job *, Py_ssize_t, Py_ssize_t);
struct job {
    range_t range;
    const void *a, *b;
    void *out;
    Py_ssize_t itemsize, groups, C_in_g, K, S, opg;
    Py_ssize_t n, parts; /* items [0, n) are cut in `parts` pieces */
    Py_ssize_t next, end; /* the next part to take (shared by the threads), one past the last */
};

/* Parts are taken in turn until none is left; part p covers [p*q + min(p, r), ...) with n = q*parts + r,
 * which no product can overflow (p*q <= n). */
static void job_worker(void *arg) {
    struct job *j = arg;
    const Py_ssize_t q = j->n / j->parts, r = j->n % j->parts;
    for (;;) {
        const Py_ssize_t part = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (part >= j->end) return;
        const Py_ssize_t start = part * q + (part < r ? part : r), stop = start + q + (part < r);
        if (start < stop) j->range(j, start, stop); /* more parts than items leaves some empty */
    }
}

/* True where the AVX2 kernels apply: float32, 3x3 (K = 9) with D_mul = 9, a CPU with AVX2 and FMA. */
static int fast_9x9(const struct job *j) {
#ifdef HAVE_AVX2_9X9
    return j->itemsize == 4 && j->K == 9 && j->S == 9 && have_avx2();
#else
    return 0;
#endif
}

/* fold_rows and grad_W_rows: rows [o0, o1) of one output from two inputs. Both are the same 9x9
 * product on the fast path; the generic bodies differ. */
typedef void (*rows_f32_t)(const float *, const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                           Py_ssize_t, Py_ssize_t);
typedef void (*rows_f64_t)(const double *, const double *, double *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                           Py_ssize_t, Py_ssize_t, Py_ssize_t);

static void rows_range(const struct job *j, Py_ssize_t o0, Py_ssize_t o1, rows_f32_t f32, rows_f64_t f64) {
#ifdef HAVE_AVX2_9X9
    if (fast_9x9(j)) {
        rows9_avx2(j->a, j->b, j->out, j->C_in_g, j->opg, o0, o1);
        return;
    }
#endif
    if (j->itemsize == 4)
        f32(j->a, j->b, j->out, j->C_in_g, j->K, j->S, j->opg, o0, o1);
    else
        f64(j->a, j->b, j->out, j->C_in_g, j->K, j->S, j->opg, o0, o1);
}

static void fold_range(const struct job *j, Py_ssize_t o0, Py_ssize_t o1) {
    rows_range(j, o0, o1, fold_rows_f32, fold_rows_f64);
}

static void grad_W_range(const struct job *j, Py_ssize_t o0, Py_ssize_t o1) {
    rows_range(j, o0, o1, grad_W_rows_f32, grad_W_rows_f64);
}

/* grad_D: in-group channels [c0, c1) of every group. The AVX2 kernel's partial sums (88 floats for
 * each channel of the range, about what that range of grad_D holds) go on the heap; without that
 * memory the generic body, which needs none, does the work. */
static void grad_D_range(const struct job *j, Py_ssize_t c0, Py_ssize_t c1) {
#ifdef HAVE_AVX2_9X9
    if (fast_9x9(j)) {
        float *partial = malloc((size_t)(c1 - c0) * 88 * sizeof(float));
        if (partial != NULL) {
            grad_D_avx2(j->a, j->b, j->out, j->groups, j->C_in_g, j->opg, c0, c1, partial);
            free(partial);
            return;
        }
    }
#endif
    if (j->itemsize == 4)
        grad_D_channels_f32(j->a, j->b, j->out, j->groups, j->C_in_g, j->K, j->S, j->opg, c0, c1);
    else
        grad_D_channels_f64(j->a, j->b, j->out, j->groups, j->C_in_g, j->K, j->S, j->opg, c0, c1);
}

/* -- the checked entry points ---------------------------------------------------------------------
 *
 * Each kernel reads two arrays and writes a third, all 3-D, C-contiguous, of one float dtype. Their
 * shapes are spelled in five sizes; the first array fixes C_out, C_in/g and one of K, D_mul, `groups`
 * fixes C_in, the others must agree (and fix what is still open). Nothing is read or written before
 * every check has passed, and the arrays' buffers are held (so neither can be freed or resized) until
 * the kernel is done. */
enum size { C_OUT, C_IN_G, C_IN, TAPS, DMUL, N_SIZES };
static const char *const size_names[N_SIZES] = {"C_out", "C_in/g", "C_in", "K", "D_mul"};

struct kernel {
    const char *name;
    range_t range;
    enum size split;           /* the size whose items are cut between threads */
    const char *arg[3];        /* the arrays' names in messages */
    const char *note[3];       /* what each array holds, for messages */
    enum size shape[3][3];     /* each array's shape */
};

static const struct kernel FOLD_ROWS = {
    "fold_rows", fold_range, C_OUT,
    {"W", "D", "out"},
    {"", " = D + I transposed", " = the folded kernel"},
    {{C_OUT, C_IN_G, DMUL}, {C_IN, DMUL, TAPS}, {C_OUT, C_IN_G, TAPS}},
};
static const struct kernel GRAD_W_ROWS = {
    "grad_W_rows", grad_W_range, C_OUT,
    {"grad", "D", "grad_W"},
    {" = the gradient of the folded kernel", " = D + I", ""},
    {{C_OUT, C_IN_G, TAPS}, {C_IN, TAPS, DMUL}, {C_OUT, C_IN_G, DMUL}},
};
static const struct kernel GRAD_D_CHANNELS = {
    "grad_D_channels", grad_D_range, C_IN_G,
    {"grad", "W", "grad_D"},
    {" = the gradient of the folded kernel", "", ""},
    {{C_OUT, C_IN_G, TAPS}, {C_OUT, C_IN_G, DMUL}, {C_IN, TAPS, DMUL}},
};

static PyObject *shape_tuple(const Py_ssize_t *shape, int ndim) {
    PyObject *tuple = PyTuple_New(ndim);
    for (int d = 0; tuple != NULL && d < ndim; d++) {
        PyObject *size = PyLong_FromSsize_t(shape[d]);
        if (size == NULL)
            Py_CLEAR(tuple);
        else
            PyTuple_SET_ITEM(tuple, d, size);
    }
    return tuple;
}

/* "(C_out, C_in/g, K) = the folded kernel": array i of `k`, for messages. */
static PyObject *layout(const struct kernel *k, int i) {
    return PyUnicode_FromFormat("(%s, %s, %s)%s", size_names[k->shape[i][0]], size_names[k->shape[i][1]],
                                size_names[k->shape[i][2]], k->note[i]);
}

/* ValueError "<kernel>: <arg>, <layout>, <problem>; received shape (...)<detail>". */
static void array_error(const struct kernel *k, int i, const char *problem, const Py_buffer *view, const char *detail) {
    PyObject *where = layout(k, i), *shape = shape_tuple(view->shape, view->ndim);
    if (where != NULL && shape != NULL)
        PyErr_Format(PyExc_ValueError, "%s: %s, %U, %s; received shape %R%s", k->name, k->arg[i], where, problem, shape,
                     detail);
    Py_XDECREF(where);
    Py_XDECREF(shape);
}

/* 'f' or 'd' in native byte order (as NumPy exports float32 and float64), else 0. */
static char float_format(const Py_buffer *view) {
    const char *f = view->format;
    if (f == NULL) return 0;
    if (*f == '@' || *f == '=' || *f == (PY_LITTLE_ENDIAN ? '<' : '>')) f++;
    if (f[0] == 'f' && f[1] == '\0' && view->itemsize == 4) return 'f';
    if (f[0] == 'd' && f[1] == '\0' && view->itemsize == 8) return 'd';
    return 0;
}

static const char *dtype_name(char format) { return format == 'f' ? "float32" : "float64"; }

/* The buffer of array i, checked on its own: 3-D, float32 or float64, C-contiguous, as long as its
 * shape says, and writable for the output. On failure: an exception set, nothing held. */
static int get_array(const struct kernel *k, int i, PyObject *obj, Py_buffer *view) {
    const int output = i == 2;
    if (PyObject_GetBuffer(obj, view, output ? PyBUF_RECORDS : PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        if (output && PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO) == 0) { /* readable, not writable */
            array_error(k, i, "must be writable (the result is written into it)", view, "");
            PyBuffer_Release(view);
            return -1;
        }
        PyErr_Clear();
        PyObject *where = layout(k, i);
        if (where != NULL) {
            PyErr_Format(PyExc_TypeError, "%s: %s, %U, must be a NumPy array; received %.200s", k->name, k->arg[i], where,
                         Py_TYPE(obj)->tp_name);
            Py_DECREF(where);
        }
        return -1;
    }
    Py_ssize_t bytes = view->itemsize;
    int sized = view->ndim == 3;
    for (int d = 0; sized && d < 3; d++)
        sized = view->shape[d] >= 0 && !__builtin_mul_overflow(bytes, view->shape[d], &bytes);
    if (view->ndim != 3)
        array_error(k, i, "must be 3-D", view, "");
    else if (float_format(view) == 0) {
        char detail[64];
        snprintf(detail, sizeof detail, " and buffer format '%.20s'", view->format == NULL ? "?" : view->format);
        array_error(k, i, "must be float32 or float64", view, detail);
    } else if (!PyBuffer_IsContiguous(view, 'C'))
        array_error(k, i, "must be C-contiguous (np.ascontiguousarray; .contiguous() in torch)", view, "");
    else if (output && view->readonly)
        array_error(k, i, "must be writable (the result is written into it)", view, "");
    else if (!sized || bytes != view->len)
        array_error(k, i, "must have a buffer as long as its shape says", view, "");
    else
        return 0;
    PyBuffer_Release(view);
    return -1;
}

static int overlap(const Py_buffer *x, const Py_buffer *y) {
    const char *a = x->buf, *b = y->buf;
    return x->len > 0 && y->len > 0 && a < b + y->len && b < a + x->len;
}

/* Checks the three arrays against each other and `groups` and fills `j`'s pointers and sizes. */
static int check(const struct kernel *k, Py_buffer view[3], Py_ssize_t groups, struct job *j) {
    Py_ssize_t size[N_SIZES];
    int known[N_SIZES] = {0};
    const Py_buffer *first = &view[0];
    for (int d = 0; d < 3; d++) size[k->shape[0][d]] = first->shape[d], known[k->shape[0][d]] = 1;
    if (groups < 1 || size[C_OUT] % groups != 0) {
        PyObject *shape = shape_tuple(first->shape, 3);
        if (shape != NULL)
            PyErr_Format(PyExc_ValueError, "%s: groups must be >= 1 and divide C_out = %zd (%s of shape %R); received groups=%zd",
                         k->name, size[C_OUT], k->arg[0], shape, groups);
        Py_XDECREF(shape);
        return -1;
    }
    if (__builtin_mul_overflow(groups, size[C_IN_G], &size[C_IN])) {
        PyErr_Format(PyExc_ValueError, "%s: groups * C_in/g overflows; received groups=%zd, C_in/g=%zd", k->name, groups,
                     size[C_IN_G]);
        return -1;
    }
    known[C_IN] = 1;
    const char first_format = float_format(first);
    for (int i = 1; i < 3; i++) {
        if (float_format(&view[i]) != first_format) {
            PyErr_Format(PyExc_ValueError, "%s: %s has dtype %s; expected %s, the dtype of %s", k->name, k->arg[i],
                         dtype_name(float_format(&view[i])), dtype_name(first_format), k->arg[0]);
            return -1;
        }
        Py_ssize_t expected[3];
        int agrees = 1;
        for (int d = 0; d < 3; d++) {
            const enum size s = k->shape[i][d];
            if (!known[s]) size[s] = view[i].shape[d], known[s] = 1; /* this array fixes it */
            expected[d] = size[s];
            agrees &= expected[d] == view[i].shape[d];
        }
        if (!agrees) {
            PyObject *want = shape_tuple(expected, 3), *got = shape_tuple(view[i].shape, 3), *where = layout(k, i);
            PyObject *before = shape_tuple(first->shape, 3), *second = shape_tuple(view[1].shape, 3);
            if (want != NULL && got != NULL && where != NULL && before != NULL && second != NULL) {
                if (i == 1)
                    PyErr_Format(PyExc_ValueError,
                                 "%s: %s must have shape %R, i.e. %U, for %s of shape %R and groups=%zd; received shape %R",
                                 k->name, k->arg[i], want, where, k->arg[0], before, groups, got);
                else
                    PyErr_Format(PyExc_ValueError,
                                 "%s: %s must have shape %R, i.e. %U, for %s of shape %R, %s of shape %R and groups=%zd; "
                                 "received shape %R",
                                 k->name, k->arg[i], want, where, k->arg[0], before, k->arg[1], second, groups, got);
            }
            Py_XDECREF(want);
            Py_XDECREF(got);
            Py_XDECREF(where);
            Py_XDECREF(before);
            Py_XDECREF(second);
            return -1;
        }
    }
    for (int i = 0; i < 2; i++) {
        if (overlap(&view[2], &view[i])) {
            PyErr_Format(PyExc_ValueError, "%s: %s must not share memory with %s (the kernel reads %s while writing %s)",
                         k->name, k->arg[2], k->arg[i], k->arg[i], k->arg[2]);
            return -1;
        }
    }
    j->a = view[0].buf;
    j->b = view[1].buf;
    j->out = view[2].buf;
    j->itemsize = view[0].itemsize;
    j->groups = groups;
    j->C_in_g = size[C_IN_G];
    j->K = size[TAPS];
    j->S = size[DMUL];
    j->opg = size[C_OUT] / groups;
    j->n = size[k->split];
    return 0;
}

/* kernel(a, b, out, groups, parts=1, part=-1): the whole product in `parts` pieces (on the OpenMP
 * runtime given to use_gomp_parallel where there is one, else one after another), or only piece
 * `part` of them (the caller runs the others, on threads of its own). Every call checks its arrays
 * once, before any thread starts: a few comparisons, nothing that grows with the arrays. */
static PyObject *run(const struct kernel *k, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"a", "b", "out", "groups", "parts", "part", NULL};
    PyObject *arrays[3];
    Py_ssize_t groups, parts = 1, part = -1;
    char format[40];
    snprintf(format, sizeof format, "OOOn|nn:%s", k->name); /* PyArg's own messages name the kernel */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, keywords, &arrays[0], &arrays[1], &arrays[2], &groups,
                                     &parts, &part))
        return NULL;
    if (parts < 1 || part < -1 || part >= parts) {
        PyErr_Format(PyExc_ValueError,
                     "%s: parts must be >= 1, and part -1 (all parts) or in [0, parts); received parts=%zd, part=%zd",
                     k->name, parts, part);
        return NULL;
    }
    Py_buffer view[3];
    int held = 0, ok = 0;
    while (held < 3 && get_array(k, held, arrays[held], &view[held]) == 0) held++;
    struct job j = {.range = k->range, .parts = parts};
    if (held == 3 && check(k, view, groups, &j) == 0) {
        ok = 1;
        /* With more parts than items, part p < n is item p and the others are empty: the same pieces
         * as n parts, so count only those, never walk the empty ones (parts = 2**62 would take
         * forever, with the GIL released); a `part` among the empty ones has nothing to do. */
        const int empty_part = part >= j.n;
        if (j.parts > j.n) j.parts = j.n > 0 ? j.n : 1;
        j.next = part < 0 ? 0 : part;
        j.end = part < 0 ? j.parts : part + 1;
        const Py_ssize_t most = j.n < MAX_THREADS ? j.n : MAX_THREADS, threads = j.parts < most ? j.parts : most;
        if (view[2].len > 0 && !empty_part) { /* else there is nothing to write (and n may be 0) */
            Py_BEGIN_ALLOW_THREADS
            if (gomp_parallel != NULL && part < 0 && threads > 1)
                gomp_parallel(job_worker, &j, (unsigned)threads, 0);
            else
                job_worker(&j);
            Py_END_ALLOW_THREADS
        }
    }
    for (int i = 0; i < held; i++) PyBuffer_Release(&view[i]);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *fold_rows(PyObject *self, PyObject *args, PyObject *kwargs) { return run(&FOLD_ROWS, args, kwargs); }
static PyObject *grad_W_rows(PyObject *self, PyObject *args, PyObject *kwargs) {
    return run(&GRAD_W_ROWS, args, kwargs);
}
static PyObject *grad_D_channels(PyObject *self, PyObject *args, PyObject *kwargs) {
    return run(&GRAD_D_CHANNELS, args, kwargs);
}

#if defined(RTLD_NOLOAD)
/* True where `address` is what the loaded library around it gives for "GOMP_parallel" (dladdr only
 * compares the address with the loaded libraries' ranges: any number is safe to ask about). */
static int is_gomp_parallel(void *address) {
    Dl_info info;
    if (dladdr(address, &info) == 0 || info.dli_fname == NULL) return 0;
    void *library = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD); /* the loaded copy, never a new one */
    if (library == NULL) return 0;
    const int found = dlsym(library, "GOMP_parallel") == address;
    dlclose(library);
    return found;
}
#else
static int is_gomp_parallel(void *address) { return 0; }
#endif

/* The address comes from _fold_cpu.openmp_parallel_address (ctypes); it is called only once it is
 * known to be GOMP_parallel in a library of this process, so no number given here can crash a kernel. */
static PyObject *use_gomp_parallel(PyObject *self, PyObject *args) {
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address)) return NULL;
    void *function = (void *)(uintptr_t)address;
    if (function != NULL && !is_gomp_parallel(function)) {
        PyErr_Format(PyExc_ValueError,
                     "use_gomp_parallel: address must be 0 or GOMP_parallel's in a loaded OpenMP runtime; received %p",
                     function);
        return NULL;
    }
    gomp_parallel = (gomp_parallel_t)(uintptr_t)address;
    return PyBool_FromLong(gomp_parallel != NULL);
}

#define KERNEL_DOC(name, a, b, out, split)                                                                  \
    name "(" a ", " b ", " out ", groups, parts=1, part=-1)\n--\n\n" out " from " a " and " b                \
         " (3-D C-contiguous arrays of one float dtype, shapes checked against each other and groups), "   \
         "in `parts` pieces split by " split "; part >= 0: only that piece. ValueError on any mismatch."

static PyMethodDef methods[] = {
    {"fold_rows", (PyCFunction)(void (*)(void))fold_rows, METH_VARARGS | METH_KEYWORDS,
     KERNEL_DOC("fold_rows", "W", "D_hat_t", "out", "C_out")},
    {"grad_W_rows", (PyCFunction)(void (*)(void))grad_W_rows, METH_VARARGS | METH_KEYWORDS,
     KERNEL_DOC("grad_W_rows", "grad", "D_hat", "grad_W", "C_out")},
    {"grad_D_channels", (PyCFunction)(void (*)(void))grad_D_channels, METH_VARARGS | METH_KEYWORDS,
     KERNEL_DOC("grad_D_channels", "grad", "W", "grad_D", "C_in/g")},
    {"use_gomp_parallel", use_gomp_parallel, METH_VARARGS,
     "split work with the GOMP_parallel at this address (0: none); ValueError if it is not one"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_foldkernel",
                                    "DO-Conv's kernel composition and its gradients, one pass each.", -1, methods};

PyMODINIT_FUNC PyInit__foldkernel(void) { return PyModule_Create(&module); }
