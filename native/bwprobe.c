/*
 * cputune._bwprobe: the timed memory kernels, and nothing else.
 *
 * Each kernel runs on OpenMP threads pinned one per given CPU. Every thread maps its own
 * arrays, binds them to a NUMA node (or leaves them to first touch), first-touches them,
 * and then runs the kernel `ntimes` times between barriers. The module returns raw
 * per-trial seconds and a checksum; Python computes GB/s, statistics and findings.
 *
 * Kernels are chosen at import time by __builtin_cpu_supports, so one installed build runs
 * AVX-512 code where the CPU has it and AVX2 or scalar code elsewhere (no -march=native).
 * A kernel is registered as a module function only when both the compiler and the CPU
 * support it: Python checks hasattr(_bwprobe, "read_avx512").
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BW_X86 1
#endif

#ifdef HAVE_NUMAIF_H
#include <numaif.h>
#else
#define MPOL_BIND 2
#endif

#define MAX_THREADS 4096

typedef double (*kernel_fn)(double *a, double *b, double *c, size_t n);

/* ---- kernels: a = first array, b/c = others; n doubles each ------------------------- */

/* read: the LLM-decode pattern, streaming loads reduced to a sum. Eight independent
 * accumulators, or the compiler keeps one serial add chain (hardware.md, compiler traps). */
static double read_scalar(double *a, double *b, double *c, size_t n) {
    (void)b; (void)c;
    double s[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k];
    for (; i < n; i++) s[0] += a[i];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

/* copy b = a. Written as a loop the compiler may turn into memcpy (hardware.md): the SIMD
 * versions use explicit non-temporal stores, so counted bytes equal bus bytes. */
static double copy_scalar(double *a, double *b, double *c, size_t n) {
    (void)c;
    volatile double *vb = b;
    for (size_t i = 0; i < n; i++) vb[i] = a[i];
    return 0.0;
}

/* triad a = b + q*c, STREAM's kernel 4. */
static double triad_scalar(double *a, double *b, double *c, size_t n) {
    const double q = 3.0;
    volatile double *va = a;
    for (size_t i = 0; i < n; i++) va[i] = b[i] + q * c[i];
    return 0.0;
}

#ifdef BW_X86
__attribute__((target("avx2")))
static double read_avx2(double *a, double *b, double *c, size_t n) {
    (void)b; (void)c;
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_add_pd(s0, _mm256_load_pd(a + i));
        s1 = _mm256_add_pd(s1, _mm256_load_pd(a + i + 4));
        s2 = _mm256_add_pd(s2, _mm256_load_pd(a + i + 8));
        s3 = _mm256_add_pd(s3, _mm256_load_pd(a + i + 12));
        s4 = _mm256_add_pd(s4, _mm256_load_pd(a + i + 16));
        s5 = _mm256_add_pd(s5, _mm256_load_pd(a + i + 20));
        s6 = _mm256_add_pd(s6, _mm256_load_pd(a + i + 24));
        s7 = _mm256_add_pd(s7, _mm256_load_pd(a + i + 28));
    }
    s0 = _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)),
                       _mm256_add_pd(_mm256_add_pd(s4, s5), _mm256_add_pd(s6, s7)));
    double t[4];
    _mm256_storeu_pd(t, s0);
    double r = t[0] + t[1] + t[2] + t[3];
    for (; i < n; i++) r += a[i];
    return r;
}

__attribute__((target("avx2")))
static double copy_avx2(double *a, double *b, double *c, size_t n) {
    (void)c;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256d x0 = _mm256_load_pd(a + i), x1 = _mm256_load_pd(a + i + 4);
        __m256d x2 = _mm256_load_pd(a + i + 8), x3 = _mm256_load_pd(a + i + 12);
        _mm256_stream_pd(b + i, x0);
        _mm256_stream_pd(b + i + 4, x1);
        _mm256_stream_pd(b + i + 8, x2);
        _mm256_stream_pd(b + i + 12, x3);
    }
    for (; i < n; i++) b[i] = a[i];
    _mm_sfence();
    return 0.0;
}

__attribute__((target("avx2,fma")))
static double triad_avx2(double *a, double *b, double *c, size_t n) {
    const __m256d q = _mm256_set1_pd(3.0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256d r0 = _mm256_fmadd_pd(q, _mm256_load_pd(c + i), _mm256_load_pd(b + i));
        __m256d r1 = _mm256_fmadd_pd(q, _mm256_load_pd(c + i + 4), _mm256_load_pd(b + i + 4));
        _mm256_stream_pd(a + i, r0);
        _mm256_stream_pd(a + i + 4, r1);
    }
    for (; i < n; i++) a[i] = b[i] + 3.0 * c[i];
    _mm_sfence();
    return 0.0;
}

#if defined(__GNUC__) && (__GNUC__ >= 5)
#define BW_HAVE_AVX512 1
__attribute__((target("avx512f")))
static double read_avx512(double *a, double *b, double *c, size_t n) {
    (void)b; (void)c;
    __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_add_pd(s0, _mm512_load_pd(a + i));
        s1 = _mm512_add_pd(s1, _mm512_load_pd(a + i + 8));
        s2 = _mm512_add_pd(s2, _mm512_load_pd(a + i + 16));
        s3 = _mm512_add_pd(s3, _mm512_load_pd(a + i + 24));
        s4 = _mm512_add_pd(s4, _mm512_load_pd(a + i + 32));
        s5 = _mm512_add_pd(s5, _mm512_load_pd(a + i + 40));
        s6 = _mm512_add_pd(s6, _mm512_load_pd(a + i + 48));
        s7 = _mm512_add_pd(s7, _mm512_load_pd(a + i + 56));
    }
    s0 = _mm512_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)),
                       _mm512_add_pd(_mm512_add_pd(s4, s5), _mm512_add_pd(s6, s7)));
    double r = _mm512_reduce_add_pd(s0);
    for (; i < n; i++) r += a[i];
    return r;
}

__attribute__((target("avx512f")))
static double copy_avx512(double *a, double *b, double *c, size_t n) {
    (void)c;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512d x0 = _mm512_load_pd(a + i), x1 = _mm512_load_pd(a + i + 8);
        __m512d x2 = _mm512_load_pd(a + i + 16), x3 = _mm512_load_pd(a + i + 24);
        _mm512_stream_pd(b + i, x0);
        _mm512_stream_pd(b + i + 8, x1);
        _mm512_stream_pd(b + i + 16, x2);
        _mm512_stream_pd(b + i + 24, x3);
    }
    for (; i < n; i++) b[i] = a[i];
    _mm_sfence();
    return 0.0;
}

__attribute__((target("avx512f")))
static double triad_avx512(double *a, double *b, double *c, size_t n) {
    const __m512d q = _mm512_set1_pd(3.0);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d r0 = _mm512_fmadd_pd(q, _mm512_load_pd(c + i), _mm512_load_pd(b + i));
        __m512d r1 = _mm512_fmadd_pd(q, _mm512_load_pd(c + i + 8), _mm512_load_pd(b + i + 8));
        _mm512_stream_pd(a + i, r0);
        _mm512_stream_pd(a + i + 8, r1);
    }
    for (; i < n; i++) a[i] = b[i] + 3.0 * c[i];
    _mm_sfence();
    return 0.0;
}
#endif
#endif

/* ---- runner ---------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long bind_to_node(void *p, size_t len, int node) {
    unsigned long mask[64];
    memset(mask, 0, sizeof mask);
    if (node < 0 || node >= (int)(sizeof mask * 8)) { errno = EINVAL; return -1; }
    mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
#ifdef HAVE_NUMAIF_H
    return mbind(p, len, MPOL_BIND, mask, sizeof mask * 8, 0);
#else
    return syscall(SYS_mbind, p, len, MPOL_BIND, mask, sizeof mask * 8, 0);
#endif
}

typedef struct {
    kernel_fn fn;
    int narrays;        /* arrays the kernel touches: read 1, copy 2, triad 3 */
    int checksum_array; /* which array holds the result to validate */
} kernel_desc;

/* Args: cpus (sequence of int), nodes (sequence of int, -1 = first touch only),
 * bytes_per_array (per thread), ntimes. Returns (per-trial seconds, checksum, elements per
 * array per thread): Python derives bytes from the element count, never from its request. */
static PyObject *run_kernel(const kernel_desc *kd, PyObject *args) {
    PyObject *cpus_obj, *nodes_obj;
    Py_ssize_t bytes_per_array;
    int ntimes;
    if (!PyArg_ParseTuple(args, "OOni", &cpus_obj, &nodes_obj, &bytes_per_array, &ntimes))
        return NULL;
    PyObject *cpus_seq = PySequence_Fast(cpus_obj, "cpus must be a sequence of ints");
    if (!cpus_seq) return NULL;
    PyObject *nodes_seq = PySequence_Fast(nodes_obj, "nodes must be a sequence of ints");
    if (!nodes_seq) { Py_DECREF(cpus_seq); return NULL; }
    Py_ssize_t nthreads = PySequence_Fast_GET_SIZE(cpus_seq);
    PyObject *result = NULL;
    int *cpus = NULL, *nodes = NULL;
    double *times = NULL, *partial = NULL;

    if (nthreads < 1 || nthreads > MAX_THREADS ||
        PySequence_Fast_GET_SIZE(nodes_seq) != nthreads) {
        PyErr_SetString(PyExc_ValueError, "cpus and nodes must be equally long, 1..4096 entries");
        goto out;
    }
    if (ntimes < 1 || bytes_per_array < 4096) {
        PyErr_SetString(PyExc_ValueError, "need ntimes >= 1 and bytes_per_array >= 4096");
        goto out;
    }
    cpus = PyMem_Calloc(nthreads, sizeof *cpus);
    nodes = PyMem_Calloc(nthreads, sizeof *nodes);
    times = PyMem_Calloc(ntimes, sizeof *times);
    partial = PyMem_Calloc(nthreads, sizeof *partial);
    if (!cpus || !nodes || !times || !partial) { PyErr_NoMemory(); goto out; }
    for (Py_ssize_t i = 0; i < nthreads; i++) {
        cpus[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(cpus_seq, i));
        nodes[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(nodes_seq, i));
        if (PyErr_Occurred()) goto out;
    }

    size_t n = (size_t)bytes_per_array / sizeof(double);
    n -= n % 64; /* whole 512-byte groups: every SIMD path then covers the array exactly */
    size_t len = n * sizeof(double);
    const char *failed_call = NULL;
    int failed_errno = 0;

    cpu_set_t saved;
    CPU_ZERO(&saved);
    int have_saved = sched_getaffinity(0, sizeof saved, &saved) == 0;

    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel num_threads((int)nthreads)
    {
        int t = omp_get_thread_num();
        double *arr[3] = {NULL, NULL, NULL};
        int ok = 1;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[t], &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) {
            #pragma omp critical
            { failed_call = "sched_setaffinity"; failed_errno = errno; }
            ok = 0;
        }
        for (int k = 0; ok && k < kd->narrays; k++) {
            void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                #pragma omp critical
                { failed_call = "mmap"; failed_errno = errno; }
                ok = 0;
                break;
            }
            arr[k] = p;
            /* THP keeps TLB misses out of the measurement, as tuned STREAM runs do. */
            madvise(p, len, MADV_HUGEPAGE);
            if (nodes[t] >= 0 && bind_to_node(p, len, nodes[t]) != 0) {
                #pragma omp critical
                { failed_call = "mbind"; failed_errno = errno; }
                ok = 0;
            }
        }
        if (ok) {
            /* First touch by the thread that will read it: pages land on its node. */
            const double init[3] = {1.0, 2.0, 0.5};
            for (int k = 0; k < kd->narrays; k++)
                for (size_t i = 0; i < n; i++) arr[k][i] = init[k];
        }
        #pragma omp barrier
        int all_ok = failed_call == NULL;
        for (int r = 0; r < ntimes && all_ok; r++) {
            #pragma omp barrier
            #pragma omp master
            times[r] = now_s();
            #pragma omp barrier
            partial[t] = kd->fn(arr[0], arr[1], arr[2], n);
            #pragma omp barrier
            #pragma omp master
            times[r] = now_s() - times[r];
        }
        if (all_ok && kd->narrays > 1) {
            double s = 0.0;
            const double *v = arr[kd->checksum_array];
            for (size_t i = 0; i < n; i++) s += v[i];
            partial[t] = s;
        }
        for (int k = 0; k < kd->narrays; k++)
            if (arr[k]) munmap(arr[k], len);
    }
    /* The calling (Python) thread was OpenMP's master and got pinned: give its mask back. */
    if (have_saved) sched_setaffinity(0, sizeof saved, &saved);
    Py_END_ALLOW_THREADS

    if (failed_call) {
        errno = failed_errno;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, failed_call);
        goto out;
    }
    double checksum = 0.0;
    for (Py_ssize_t i = 0; i < nthreads; i++) checksum += partial[i];
    PyObject *tt = PyTuple_New(ntimes);
    if (!tt) goto out;
    for (int r = 0; r < ntimes; r++) PyTuple_SET_ITEM(tt, r, PyFloat_FromDouble(times[r]));
    result = Py_BuildValue("(Ndn)", tt, checksum, (Py_ssize_t)n);

out:
    PyMem_Free(cpus);
    PyMem_Free(nodes);
    PyMem_Free(times);
    PyMem_Free(partial);
    Py_DECREF(cpus_seq);
    Py_DECREF(nodes_seq);
    return result;
}

#define KERNEL_ENTRY(name, narr, chk)                                                       \
    static const kernel_desc desc_##name = {name, narr, chk};                               \
    static PyObject *py_##name(PyObject *self, PyObject *args) {                            \
        (void)self;                                                                          \
        return run_kernel(&desc_##name, args);                                               \
    }

KERNEL_ENTRY(read_scalar, 1, 0)
KERNEL_ENTRY(copy_scalar, 2, 1)
KERNEL_ENTRY(triad_scalar, 3, 0)
#ifdef BW_X86
KERNEL_ENTRY(read_avx2, 1, 0)
KERNEL_ENTRY(copy_avx2, 2, 1)
KERNEL_ENTRY(triad_avx2, 3, 0)
#ifdef BW_HAVE_AVX512
KERNEL_ENTRY(read_avx512, 1, 0)
KERNEL_ENTRY(copy_avx512, 2, 1)
KERNEL_ENTRY(triad_avx512, 3, 0)
#endif
#endif

#define KDOC "(cpus, nodes, bytes_per_array, ntimes) -> (per-trial seconds, checksum, n)"

static PyMethodDef base_methods[] = {
    {"read_scalar", py_read_scalar, METH_VARARGS, KDOC},
    {"copy_scalar", py_copy_scalar, METH_VARARGS, KDOC},
    {"triad_scalar", py_triad_scalar, METH_VARARGS, KDOC},
    {NULL, NULL, 0, NULL},
};

#ifdef BW_X86
static PyMethodDef avx2_methods[] = {
    {"read_avx2", py_read_avx2, METH_VARARGS, KDOC},
    {"copy_avx2", py_copy_avx2, METH_VARARGS, KDOC},
    {"triad_avx2", py_triad_avx2, METH_VARARGS, KDOC},
    {NULL, NULL, 0, NULL},
};
#ifdef BW_HAVE_AVX512
static PyMethodDef avx512_methods[] = {
    {"read_avx512", py_read_avx512, METH_VARARGS, KDOC},
    {"copy_avx512", py_copy_avx512, METH_VARARGS, KDOC},
    {"triad_avx512", py_triad_avx512, METH_VARARGS, KDOC},
    {NULL, NULL, 0, NULL},
};
#endif
#endif

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_bwprobe",
    "Timed memory-bandwidth kernels (pinned, NUMA-placed); returns raw seconds.", -1,
    base_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bwprobe(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
#ifdef BW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        if (PyModule_AddFunctions(m, avx2_methods) < 0) goto fail;
    }
#ifdef BW_HAVE_AVX512
    if (__builtin_cpu_supports("avx512f")) {
        if (PyModule_AddFunctions(m, avx512_methods) < 0) goto fail;
    }
#endif
#endif
    if (PyModule_AddIntConstant(m, "max_threads", MAX_THREADS) < 0) goto fail;
    if (PyModule_AddIntConstant(m, "omp_procs", omp_get_num_procs()) < 0) goto fail;
#ifdef HAVE_NUMAIF_H
    if (PyModule_AddIntConstant(m, "have_numaif", 1) < 0) goto fail;
#else
    if (PyModule_AddIntConstant(m, "have_numaif", 0) < 0) goto fail;
#endif
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
