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
 * Arrays are C-contiguous float32 or float64, passed as addresses by doconv/_fold_cpu.py for
 * doconv/torch.py and doconv/gluon.py, which check shapes, dtypes and contiguity before calling.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

#define DEFINE_KERNELS(T, SUFFIX)                                                                 \
    INLINE void fold_body_##SUFFIX(const T *restrict W, const T *restrict D_hat_t, T *restrict out, \
                                   Py_ssize_t C_in_g, const Py_ssize_t K, Py_ssize_t S,          \
                                   Py_ssize_t out_per_group, Py_ssize_t o0, Py_ssize_t o1) {      \
        for (Py_ssize_t o = o0; o < o1; o++) {                                                    \
            Py_ssize_t base = (o / out_per_group) * C_in_g;                                       \
            for (Py_ssize_t c = 0; c < C_in_g; c++) {                                             \
                const T *restrict w = W + (o * C_in_g + c) * S;                                   \
                const T *restrict d = D_hat_t + (base + c) * S * K;                               \
                T *restrict y = out + (o * C_in_g + c) * K;                                       \
                for (Py_ssize_t k = 0; k < K; k++) y[k] = 0;                                      \
                for (Py_ssize_t s = 0; s < S; s++) {                                              \
                    const T ws = w[s];                                                            \
                    const T *restrict ds = d + s * K;                                             \
                    for (Py_ssize_t k = 0; k < K; k++) y[k] += ws * ds[k];                        \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* Each row is summed in registers (a literal S: no stores in the inner loop), then written. */ \
    INLINE void grad_W_body_##SUFFIX(const T *G, const T *restrict D_hat, T *grad_W,              \
                                     Py_ssize_t C_in_g, const Py_ssize_t K, const Py_ssize_t S,  \
                                     Py_ssize_t out_per_group, Py_ssize_t o0, Py_ssize_t o1) {    \
        for (Py_ssize_t o = o0; o < o1; o++) {                                                    \
            Py_ssize_t base = (o / out_per_group) * C_in_g;                                       \
            for (Py_ssize_t c = 0; c < C_in_g; c++) {                                             \
                const T *g = G + (o * C_in_g + c) * K;                                            \
                const T *restrict d = D_hat + (base + c) * K * S;                                 \
                T acc[S];                                                                         \
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
    INLINE void grad_D_body_##SUFFIX(const T *restrict G, const T *restrict W, T *restrict grad_D, \
                                     Py_ssize_t groups, Py_ssize_t C_in_g, const Py_ssize_t K,   \
                                     Py_ssize_t S, Py_ssize_t out_per_group, Py_ssize_t c0,      \
                                     Py_ssize_t c1) {                                             \
        /* One channel at a time: with a literal K and S its K x S accumulators live in        \
           registers while the rows o of its group stream by. */                                 \
        for (Py_ssize_t gi = 0; gi < groups; gi++) {                                              \
            for (Py_ssize_t c = c0; c < c1; c++) {                                                \
                T acc[K * S];                                                                     \
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
    /* Dispatch on the common tap counts (3x3, 1x3/3x1, 5x3, 5x5, 7x7), a generic body else. */   \
    MULTIVERSION static void fold_rows_##SUFFIX(const T *W, const T *D_hat_t, T *out,             \
                                                Py_ssize_t C_in_g, Py_ssize_t K, Py_ssize_t S,   \
                                                Py_ssize_t opg, Py_ssize_t o0, Py_ssize_t o1) {  \
        switch (K) {                                                                              \
        case 9: fold_body_##SUFFIX(W, D_hat_t, out, C_in_g, 9, S, opg, o0, o1); break;           \
        case 3: fold_body_##SUFFIX(W, D_hat_t, out, C_in_g, 3, S, opg, o0, o1); break;           \
        case 15: fold_body_##SUFFIX(W, D_hat_t, out, C_in_g, 15, S, opg, o0, o1); break;         \
        case 25: fold_body_##SUFFIX(W, D_hat_t, out, C_in_g, 25, S, opg, o0, o1); break;         \
        case 49: fold_body_##SUFFIX(W, D_hat_t, out, C_in_g, 49, S, opg, o0, o1); break;         \
        default: fold_body_##SUFFIX(W, D_hat_t, out, C_in_g, K, S, opg, o0, o1);                 \
        }                                                                                         \
    }                                                                                             \
    MULTIVERSION static void grad_W_rows_##SUFFIX(const T *G, const T *D_hat, T *grad_W,          \
                                                  Py_ssize_t C_in_g, Py_ssize_t K, Py_ssize_t S, \
                                                  Py_ssize_t opg, Py_ssize_t o0, Py_ssize_t o1) { \
        if (S == K) { /* D_mul = K, the default: both loops have a literal bound */               \
            switch (K) {                                                                          \
            case 9: grad_W_body_##SUFFIX(G, D_hat, grad_W, C_in_g, 9, 9, opg, o0, o1); return;   \
            case 3: grad_W_body_##SUFFIX(G, D_hat, grad_W, C_in_g, 3, 3, opg, o0, o1); return;   \
            case 25: grad_W_body_##SUFFIX(G, D_hat, grad_W, C_in_g, 25, 25, opg, o0, o1); return; \
            }                                                                                     \
        }                                                                                         \
        switch (K) {                                                                              \
        case 9: grad_W_body_##SUFFIX(G, D_hat, grad_W, C_in_g, 9, S, opg, o0, o1); break;        \
        default: grad_W_body_##SUFFIX(G, D_hat, grad_W, C_in_g, K, S, opg, o0, o1);              \
        }                                                                                         \
    }                                                                                             \
    MULTIVERSION static void grad_D_channels_##SUFFIX(const T *G, const T *W, T *grad_D,          \
                                                      Py_ssize_t groups, Py_ssize_t C_in_g,      \
                                                      Py_ssize_t K, Py_ssize_t S, Py_ssize_t opg, \
                                                      Py_ssize_t c0, Py_ssize_t c1) {             \
        if (S == K) {                                                                             \
            switch (K) {                                                                          \
            case 9: grad_D_body_##SUFFIX(G, W, grad_D, groups, C_in_g, 9, 9, opg, c0, c1); return; \
            case 3: grad_D_body_##SUFFIX(G, W, grad_D, groups, C_in_g, 3, 3, opg, c0, c1); return; \
            case 25: grad_D_body_##SUFFIX(G, W, grad_D, groups, C_in_g, 25, 25, opg, c0, c1); return; \
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
 * caller splits the work between threads of its own. */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_t gomp_parallel = NULL;

struct job;
typedef void (*range_t)(const struct job *, Py_ssize_t, Py_ssize_t);
struct job {
    range_t range;
    const void *a, *b;
    void *out;
    Py_ssize_t itemsize, groups, C_in_g, K, S, opg, start, stop, parts;
    Py_ssize_t next; /* the next part to take, shared by the threads */
};

static void job_worker(void *arg) {
    struct job *j = arg;
    const Py_ssize_t n = j->stop - j->start;
    for (;;) {
        const Py_ssize_t part = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (part >= j->parts) return;
        j->range(j, j->start + part * n / j->parts, j->start + (part + 1) * n / j->parts);
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

/* grad_D: in-group channels [c0, c1) of every group. */
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

/* Arguments of all three: (a, b, out) addresses, itemsize (4 or 8), groups, C_in/g, K, D_mul,
 * C_out/g, then the range [start, stop) to compute, cut in `parts` pieces. */
static PyObject *run(PyObject *args, range_t range) {
    unsigned long long a, b, out;
    struct job j = {.range = range, .next = 0};
    if (!PyArg_ParseTuple(args, "KKKnnnnnnnnn", &a, &b, &out, &j.itemsize, &j.groups, &j.C_in_g, &j.K, &j.S, &j.opg,
                          &j.start, &j.stop, &j.parts))
        return NULL;
    j.a = (const void *)(uintptr_t)a;
    j.b = (const void *)(uintptr_t)b;
    j.out = (void *)(uintptr_t)out;
    if (j.parts < 1) j.parts = 1;
    Py_BEGIN_ALLOW_THREADS
    if (gomp_parallel != NULL && j.parts > 1)
        gomp_parallel(job_worker, &j, (unsigned)j.parts, 0);
    else
        job_worker(&j);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *fold_rows(PyObject *self, PyObject *args) { return run(args, fold_range); }
static PyObject *grad_W_rows(PyObject *self, PyObject *args) { return run(args, grad_W_range); }
static PyObject *grad_D_channels(PyObject *self, PyObject *args) { return run(args, grad_D_range); }

static PyObject *use_gomp_parallel(PyObject *self, PyObject *args) {
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address)) return NULL;
    gomp_parallel = (gomp_parallel_t)(uintptr_t)address;
    return PyBool_FromLong(gomp_parallel != NULL);
}

static PyMethodDef methods[] = {
    {"fold_rows", fold_rows, METH_VARARGS, "folded kernel rows [o0, o1)"},
    {"grad_W_rows", grad_W_rows, METH_VARARGS, "grad_W rows [o0, o1)"},
    {"grad_D_channels", grad_D_channels, METH_VARARGS, "grad_D for in-group channels [c0, c1)"},
    {"use_gomp_parallel", use_gomp_parallel, METH_VARARGS, "split work with this GOMP_parallel (0: none)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_foldkernel",
                                    "DO-Conv's kernel composition and its gradients, one pass each.", -1, methods};

PyMODINIT_FUNC PyInit__foldkernel(void) { return PyModule_Create(&module); }
