/* The vector toolkit and the row passes that xentlib's C kernels share (cpu_rows.c: cross-entropy rows and the
 * common call; cpu_post_training.c: per-token log-probabilities and the distillation divergence). Rows are
 * float32 or bfloat16 with contiguous classes, read into a float32 scratch row; the arithmetic is float32 and
 * every result is rounded once to its dtype. Everything here is static inline except run_rows (cpu_rows.c). */
#ifndef XENT_CPU_ROWS_H
#define XENT_CPU_ROWS_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

enum { XENT_FLOAT32 = 0, XENT_BFLOAT16 = 1 };

static inline vf splat(float a) { return (vf){} + a; }
static inline vf blend(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7 polynomial (Taylor, with the last
 * coefficients slightly adjusted; max relative error ~2e-7 on [-ln2/2, ln2/2]), then 2^n added to the exponent
 * bits. Below -87 (where 2^n would leave the normal range) the result is 0; the true value is < 2e-38. */
static inline vf exp_nonpositive(vf x) {
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    vi tiny = x < splat(-87.0f);
    x = blend(tiny, splat(-87.0f), x);
    vf shifted = x * splat(1.44269504088896341f) + magic;
    vf n = shifted - magic;
    vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f); /* ln 2 in two parts: exact n * hi */
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    vi scaled = (vi)p + (((vi)shifted - (vi)magic) << 23);
    return (vf)(scaled & ~tiny);
}

static inline vf load_bf16(const uint16_t *src) {
    vh h;
    memcpy(&h, src, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* float32 -> bfloat16, round to nearest even; NaN stays a quiet NaN */
static inline vh to_bf16(vf v) {
    vu u = (vu)v;
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vi nan = v != v;
    rounded = (rounded & (vu)~nan) | ((vu)nan & 0x7fc0u);
    return __builtin_convertvector(rounded, vh);
}

static inline uint16_t to_bf16_scalar(float v) {
    vh h = to_bf16(splat(v));
    return h[0];
}

static inline float load_scalar(const void *row, int dtype, int64_t c) {
    if (dtype == XENT_FLOAT32) return ((const float *)row)[c];
    uint32_t bits = (uint32_t)((const uint16_t *)row)[c] << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline void store_scalar(void *row, int dtype, int64_t c, float v) {
    if (dtype == XENT_FLOAT32)
        ((float *)row)[c] = v;
    else
        ((uint16_t *)row)[c] = to_bf16_scalar(v);
}

/* LANES elements of a float32/bfloat16 row from class c, zeros past the row's end (no read beyond it). */
static inline vf load_lanes(const void *row, int dtype, int64_t c, int64_t classes) {
    if (c + LANES <= classes) {
        if (dtype == XENT_BFLOAT16) return load_bf16((const uint16_t *)row + c);
        vf v;
        memcpy(&v, (const float *)row + c, sizeof v);
        return v;
    }
    vf v = (vf){};
    for (int64_t k = c; k < classes; k++) v[k - c] = load_scalar(row, dtype, k);
    return v;
}

/* LANES values from class c into a float32/bfloat16 row, each rounded once; a partial last vector stops at the
 * row's end (no write beyond it). */
static inline void store_lanes(void *row, int dtype, int64_t c, int64_t classes, vf v) {
    if (c + LANES > classes) {
        for (int64_t k = c; k < classes; k++) store_scalar(row, dtype, k, v[k - c]);
    } else if (dtype == XENT_FLOAT32) {
        memcpy((float *)row + c, &v, sizeof v);
    } else {
        vh half = to_bf16(v);
        memcpy((uint16_t *)row + c, &half, sizeof half);
    }
}

/* The next row a thread will read (NULL: none), brought into the L2 cache line by line during a compute pass over
 * the current row: one prefetch per vector of the pass (`prefetch_line(next, c / LANES)`), so the row streams in
 * from memory while the core computes instead of when it is loaded. */
struct next_row {
    const void *row;
    size_t bytes;
};

/* The row after `row` (`row_stride` elements of `elem` bytes on), or none where `row` is its thread's last. */
static inline struct next_row next_row_of(const void *row, int64_t row_stride, size_t elem, int64_t classes,
                                          int is_last) {
    return (struct next_row){is_last ? NULL : (const char *)row + (size_t)row_stride * elem, (size_t)classes * elem};
}

static inline void prefetch_line(struct next_row next, int64_t line) {
    size_t offset = (size_t)line * 64;
    if (next.row && offset < next.bytes) __builtin_prefetch((const char *)next.row + offset, 0, 2);
}

/* Pass 1: scratch[0:C] = float32(row), scratch[C:padded] = -inf; returns max (NaN if any element is NaN). */
static inline float load_row(const void *row, int dtype, int64_t classes, float *scratch) {
    int64_t full = classes - classes % LANES, c = 0;
    vf best = splat(-INFINITY);
    vi nan = (vi){};
    for (; c < full; c += LANES) {
        vf v;
        if (dtype == XENT_FLOAT32)
            memcpy(&v, (const float *)row + c, sizeof v);
        else
            v = load_bf16((const uint16_t *)row + c);
        memcpy(scratch + c, &v, sizeof v);
        best = blend(v > best, v, best);
        nan |= v != v;
    }
    float m = -INFINITY;
    int any_nan = 0;
    for (int lane = 0; lane < LANES; lane++) {
        m = best[lane] > m ? best[lane] : m;
        any_nan |= nan[lane];
    }
    for (; c < classes; c++) {
        float v = load_scalar(row, dtype, c);
        scratch[c] = v;
        m = v > m ? v : m;
        any_nan |= v != v;
    }
    for (int64_t pad = classes; pad < full + (classes > full ? LANES : 0); pad++) scratch[pad] = -INFINITY;
    return any_nan ? NAN : m;
}

/* The sum of a vector's lanes as a tree (halves added, then quarters, ...): each lane passes through log2(LANES)
 * additions, not up to LANES - 1 as in a running sum, where the small terms of a row [1e4, 1e4, 0, ...] would each
 * be rounded against the large partial sum. */
static inline float horizontal_sum(vf v) {
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int lane = 0; lane < width; lane++) v[lane] += v[lane + width];
    return v[0];
}

struct row_sums {
    float exp_sum;       /* s = sum e_c */
    float weighted_gap;  /* sum_c w_c (y_c - m), for smoothing with a class index */
    float expected_gap;  /* sum_c e_c (y_c - m), for the entropy */
    float q_sum;         /* Q = sum_c q'_c, with class probabilities */
    float q_gap;         /* sum_c q'_c (y_c - m), with class probabilities */
};

/* Where the row's class probabilities are (NULL for a class index) and how q' is made of them. */
struct prob_row {
    const void *q;
    int dtype;
    float keep;   /* 1 - eps */
    float spread; /* eps / C */
};

/* A class index: no probabilities. Passed as a constant, so the inlined passes lose their probability branches. */
#define NO_PROB ((struct prob_row){NULL, XENT_FLOAT32, 1.0f, 0.0f})

/* Pass 2: scratch becomes e = exp(y - m) (0 in the padding), while the `next` row streams in. */
static inline __attribute__((always_inline)) struct row_sums exponentiate(
    float *scratch, int64_t classes, float m, const float *class_weight, int want_weighted_gap,
    int want_expected_gap, struct prob_row prob, struct next_row next) {
    vf sum = (vf){}, weighted = (vf){}, expected = (vf){}, q_sum = (vf){}, q_gap = (vf){};
    vi lane_index;
    for (int lane = 0; lane < LANES; lane++) lane_index[lane] = lane;
    for (int64_t c = 0; c < classes; c += LANES) {
        prefetch_line(next, c / LANES);
        vf gap;
        memcpy(&gap, scratch + c, sizeof gap);
        gap -= splat(m);
        vf e = exp_nonpositive(gap);
        memcpy(scratch + c, &e, sizeof e);
        sum += e;
        if (want_weighted_gap || prob.q != NULL) {
            vi inside = lane_index < (vi){} + (int32_t)(classes - c);
            vf w = class_weight != NULL ? load_lanes(class_weight, XENT_FLOAT32, c, classes) : splat(1.0f);
            if (want_weighted_gap) weighted += blend(inside, w * gap, (vf){});
            if (prob.q != NULL) {
                vf q = w * (load_lanes(prob.q, prob.dtype, c, classes) * splat(prob.keep) + splat(prob.spread));
                q_sum += blend(inside, q, (vf){});
                q_gap += blend(inside, q * gap, (vf){});
            }
        }
        if (want_expected_gap) expected += blend(e > (vf){}, e * gap, (vf){});
    }
    return (struct row_sums){
        horizontal_sum(sum), horizontal_sum(weighted), horizontal_sum(expected), horizontal_sum(q_sum),
        horizontal_sum(q_gap)};
}

static inline void fill_row(void *grad_row, int dtype, int64_t classes, float value) {
    for (int64_t c = 0; c < classes; c++) store_scalar(grad_row, dtype, c, value);
}

/* u = z / T over scratch[0:padded], a division (one rounding, as z / T is in torch; the padding's -inf stays) */
static inline void divide_row(float *scratch, int64_t classes, float temperature) {
    if (temperature == 1.0f) return;
    for (int64_t c = 0; c < classes; c += LANES) {
        vf v;
        memcpy(&v, scratch + c, sizeof v);
        v /= splat(temperature);
        memcpy(scratch + c, &v, sizeof v);
    }
}

/* sum_v exp(u_v - m) over scratch (u, left as it is); with `e` (not NULL), each exponential also written there (0
 * in the padding) */
static inline float exp_sum(const float *scratch, float *e, int64_t classes, float m) {
    vf sum = (vf){};
    for (int64_t c = 0; c < classes; c += LANES) {
        vf u;
        memcpy(&u, scratch + c, sizeof u);
        vf value = exp_nonpositive(u - splat(m));
        if (e) memcpy(e + c, &value, sizeof value);
        sum += value;
    }
    return horizontal_sum(sum);
}

/* log(x) for normal x > 0: x = 2^e f with f in [sqrt(1/2), sqrt(2)), log f by a degree-8 polynomial in f - 1
 * (Cephes' logf coefficients; relative error about 1e-7), plus e ln 2 in two parts. */
static inline vf log_normal(vf x) {
    vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 127; /* x = 2^e f, f in [1, 2) */
    vf f = (vf)((bits & 0x007fffff) | 0x3f800000);
    vi big = f > splat(1.41421356f);
    f = blend(big, f * splat(0.5f), f);
    e -= big; /* a true comparison is -1 */
    vf y = f - splat(1.0f), z = y * y;
    vf p = splat(7.0376836292e-2f);
    p = p * y + splat(-1.1514610310e-1f);
    p = p * y + splat(1.1676998740e-1f);
    p = p * y + splat(-1.2420140846e-1f);
    p = p * y + splat(1.4249322787e-1f);
    p = p * y + splat(-1.6668057665e-1f);
    p = p * y + splat(2.0000714765e-1f);
    p = p * y + splat(-2.4999993993e-1f);
    p = p * y + splat(3.3333331174e-1f);
    vf n = __builtin_convertvector(e, vf);
    vf r = y * z * p + n * splat(-2.12194440e-4f) - splat(0.5f) * z;
    return y + r + n * splat(0.693359375f);
}

/* log(1 + t) for t in [0, 1], accurate for small t: log(u) t / (u - 1) with u = 1 + t rounded (the rounding of u
 * cancels in the ratio; Goldberg's method), t itself where u rounds to 1. */
static inline vf log1p_unit(vf t) {
    vf u = splat(1.0f) + t;
    vi one = u == splat(1.0f);
    vf d = blend(one, splat(1.0f), u - splat(1.0f));
    return blend(one, t, log_normal(u) * (t / d));
}

/* A structure passed from Python, declared once: `struct tag`, and `tag_layout` and `tag_size`, which cpu_kernel.py
 * compares with its own table before the first call. */
#define XENT_FIELD(type, name, code) type name;
#define XENT_LAYOUT(type, name, code) #name ":" #code ","
#define XENT_DECLARE(tag, FIELDS)                                                                                 \
    struct tag {                                                                                                  \
        FIELDS(XENT_FIELD)                                                                                        \
    };                                                                                                            \
    const char tag##_layout[] = FIELDS(XENT_LAYOUT);                                                              \
    const int64_t tag##_size = sizeof(struct tag);

/* Rows [first, last) of a call, with one scratch row: each entry point's own loop. */
typedef void (*rows_fn)(const void *arguments, int64_t first, int64_t last, float *scratch);

/* All `rows` on `threads` threads (defined in cpu_rows.c, which says how). */
void run_rows(rows_fn run, const void *arguments, int64_t rows, int threads, float *scratch,
              int64_t scratch_row_stride);

#endif
