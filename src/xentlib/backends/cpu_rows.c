/* xentlib's CPU row kernel: cross-entropy loss, statistics and gradient of rows in one sweep.
 *
 * Built at first use by cpu_kernel.py (cc -O3 -march=native) and called through ctypes; the Python side checks
 * every input, so this file only computes. Rows are float32 or bfloat16, contiguous along the classes; the
 * arithmetic is float32 and every result is rounded once to its dtype.
 *
 * For one row y (C logits), target t, target weight w_t (0 on ignored rows), class weights w_c (1 without),
 * smoothing eps, z-loss z and the reduction's scale (derivation in docs/numerics.md):
 *   m = max_c y_c,  e_c = exp(y_c - m),  s = sum_c e_c,  lse = m + log s,  p_c = e_c / s
 *   loss = (1 - eps) w_t (log s - (y_t - m)) + eps / C (W log s - sum_c w_c (y_c - m)) + z lse^2,  W = sum_c w_c
 * Every loss term is a sum of non-negative parts (log s >= 0, m - y_c >= 0): never lse - y_t, which rounds lse to
 * the logits' magnitude first and cancels (a row [1e4, 1e4, 0] would lose all but three bits of ln 2).
 *   dloss/dy_c = scale [((1 - eps) w_t + eps W / C + 2 z lse) p_c - eps / C w_c - (1 - eps) w_t [c == t]]
 *   entropy = -sum_c p_c log p_c = log s - sum_c p_c (y_c - m)
 * With class probabilities q instead of a class index, q'_c = w_c ((1 - eps) q_c + eps / C) and Q = sum_c q'_c:
 *   loss = -sum_c q'_c log p_c + z lse^2 = Q log s - sum_c q'_c (y_c - m) + z lse^2
 *   dloss/dy_c = scale [(Q + 2 z lse) p_c - q'_c]
 * Three passes over the row, which stays in the core's cache: (1) read and convert into a float32 scratch row
 * while taking the max, (2) exponentiate in place and sum, (3) write the gradient. The logits are read from
 * memory once and the gradient written once. A row whose max is not finite (a NaN, a +inf, or all -inf) has no
 * finite softmax: its loss, lse, entropy and gradient are NaN, as torch's log_softmax gives.
 *
 * A copy on purpose: this is the row maths of backends/torch_chunked.py and backends/triton/rowmath.py again, in C
 * for one sweep per row. What pins the copies together: tests/backends/test_cpu_kernel.py (against the PyTorch ops,
 * float64 and the NumPy reference, xentlib/reference/cross_entropy.py) and tests/test_accuracy.py (error against
 * float64 no larger than torch's, the "cpu-kernel" cases).
 */
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

/* Pass 1: scratch[0:C] = float32(row), scratch[C:padded] = -inf; returns max (NaN if any element is NaN). */
static float load_row(const void *row, int dtype, int64_t classes, float *scratch) {
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

static int64_t first_index_of(const float *scratch, int64_t classes, float value) {
    for (int64_t c = 0; c < classes; c++)
        if (scratch[c] == value || (value != value && scratch[c] != scratch[c])) return c;
    return 0;
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

/* Pass 2: scratch becomes e = exp(y - m) (0 in the padding). */
static inline __attribute__((always_inline)) struct row_sums exponentiate(
    float *scratch, int64_t classes, float m, const float *class_weight, int want_weighted_gap,
    int want_expected_gap, struct prob_row prob) {
    vf sum = (vf){}, weighted = (vf){}, expected = (vf){}, q_sum = (vf){}, q_gap = (vf){};
    vi lane_index;
    for (int lane = 0; lane < LANES; lane++) lane_index[lane] = lane;
    for (int64_t c = 0; c < classes; c += LANES) {
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

/* Pass 3, LANES classes from c: g = e * coef - smooth * w - q_scale * w * q (a class index: no q; its target slot
 * is fixed after). The scratch row is padded to whole vectors; the loads of w and q stop at the row's end. */
static inline __attribute__((always_inline)) vf gradient_lanes(
    const float *scratch, int64_t c, int64_t classes, float coef, float smooth, const float *class_weight,
    struct prob_row prob, float q_scale) {
    vf e;
    memcpy(&e, scratch + c, sizeof e);
    vf w = class_weight != NULL ? load_lanes(class_weight, XENT_FLOAT32, c, classes) : splat(1.0f);
    vf g = e * splat(coef) - splat(smooth) * w;
    if (prob.q != NULL) g -= splat(q_scale) * w * load_lanes(prob.q, prob.dtype, c, classes);
    return g;
}

static inline __attribute__((always_inline)) void write_gradient(
    void *grad_row, int dtype, const float *scratch, int64_t classes, float coef, float smooth,
    const float *class_weight, struct prob_row prob, float q_scale) {
    for (int64_t c = 0; c < classes; c += LANES)
        store_lanes(grad_row, dtype, c, classes,
                    gradient_lanes(scratch, c, classes, coef, smooth, class_weight, prob, q_scale));
}

static void fill_row(void *grad_row, int dtype, int64_t classes, float value) {
    for (int64_t c = 0; c < classes; c++) store_scalar(grad_row, dtype, c, value);
}

/* The rows call's arguments, declared once (XENT_DECLARE below makes the struct and the layout string cpu_kernel.py
 * compares with its own before the first call: a mismatch refuses to load; it cannot go unnoticed).
 * Outputs that are NULL are not computed. `scratch` holds `threads` rows of classes rounded up to LANES floats,
 * `scratch_row_stride` floats apart. Class probabilities (`probs` not NULL, rows `probs_row_stride` elements
 * apart, of dtype `probs_dtype`) replace the class index: then `target` and `target_weight` are not read and
 * every row is valid. Codes: ptr (a pointer), i64 (int64_t), i32 (int), f32 (float). */
#define XENT_ARGUMENTS(X)                                                                                         \
    X(const void *, logits, ptr) X(int64_t, logits_row_stride, i64) X(int, dtype, i32) X(int64_t, rows, i64)    \
    X(int64_t, classes, i64) X(const int64_t *, target, ptr) X(const float *, target_weight, ptr)                \
    X(const uint8_t *, valid, ptr) X(const float *, class_weight, ptr) X(const void *, probs, ptr)                \
    X(int64_t, probs_row_stride, i64) X(int, probs_dtype, i32) X(float, class_weight_sum, f32)                   \
    X(float, smoothing, f32) X(float, z_loss, f32) X(float, scale, f32) X(float *, loss, ptr)                    \
    X(float *, lse, ptr) X(int64_t *, argmax, ptr) X(float *, entropy, ptr) X(void *, grad, ptr)                 \
    X(int64_t, grad_row_stride, i64) X(float *, scratch, ptr) X(int64_t, scratch_row_stride, i64)                \
    X(int, threads, i32)

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

XENT_DECLARE(xent_arguments, XENT_ARGUMENTS)

/* Rows [first, last) of the call, with one scratch row. */
static void rows_range(const struct xent_arguments *a, int64_t first, int64_t last, float *scratch) {
    const void *logits = a->logits, *probs = a->probs;
    int64_t logits_row_stride = a->logits_row_stride, classes = a->classes, probs_row_stride = a->probs_row_stride;
    int64_t grad_row_stride = a->grad_row_stride;
    int dtype = a->dtype, probs_dtype = a->probs_dtype;
    const int64_t *target = a->target;
    const float *target_weight = a->target_weight, *class_weight = a->class_weight;
    const uint8_t *valid = a->valid;
    float class_weight_sum = a->class_weight_sum, smoothing = a->smoothing, z_loss = a->z_loss, scale = a->scale;
    float *loss = a->loss, *lse_out = a->lse, *entropy_out = a->entropy;
    int64_t *argmax_out = a->argmax;
    void *grad = a->grad;
    size_t elem = dtype == XENT_FLOAT32 ? 4 : 2;
    size_t probs_elem = probs_dtype == XENT_FLOAT32 ? 4 : 2;
    for (int64_t r = first; r < last; r++) {
        const void *row = (const char *)logits + (size_t)(r * logits_row_stride) * elem;
        void *grad_row = grad ? (char *)grad + (size_t)(r * grad_row_stride) * elem : NULL;
        int row_valid = valid[r] != 0;
        loss[r] = 0.0f;
        if (!row_valid && lse_out == NULL && argmax_out == NULL && entropy_out == NULL) {
            if (grad_row) memset(grad_row, 0, (size_t)classes * elem);
            continue;
        }
        float m = load_row(row, dtype, classes, scratch);
        if (argmax_out) argmax_out[r] = first_index_of(scratch, classes, m);
        if (!isfinite(m)) { /* no finite softmax: NaN everywhere, as log_softmax gives */
            if (lse_out) lse_out[r] = NAN;
            if (entropy_out) entropy_out[r] = NAN;
            if (row_valid) loss[r] = NAN;
            if (grad_row) fill_row(grad_row, dtype, classes, row_valid ? NAN : 0.0f);
            continue;
        }
        struct prob_row prob = {NULL, probs_dtype, 1.0f - smoothing, smoothing / (float)classes};
        if (probs != NULL) prob.q = (const char *)probs + (size_t)(r * probs_row_stride) * probs_elem;
        int want_weighted_gap = row_valid && smoothing > 0.0f && probs == NULL;
        int want_expected_gap = entropy_out != NULL;
        struct row_sums sums =
            probs != NULL
                ? exponentiate(scratch, classes, m, class_weight, want_weighted_gap, want_expected_gap, prob)
                : exponentiate(scratch, classes, m, class_weight, want_weighted_gap, want_expected_gap, NO_PROB);
        float log_s = logf(sums.exp_sum);
        float lse = m + log_s;
        if (lse_out) lse_out[r] = lse;
        if (entropy_out) entropy_out[r] = log_s - sums.expected_gap / sums.exp_sum;
        if (!row_valid) {
            if (grad_row) memset(grad_row, 0, (size_t)classes * elem);
            continue;
        }
        /* Q (the targets' total weight) and the loss before the z-loss, per kind of target */
        float q_sum, row_loss;
        int64_t t = 0;
        if (probs != NULL) {
            q_sum = sums.q_sum;
            row_loss = q_sum * log_s - sums.q_gap;
        } else {
            t = target[r];
            float w_t = target_weight[r];
            q_sum = prob.keep * w_t + prob.spread * class_weight_sum;
            row_loss = prob.keep * w_t * (log_s - (load_scalar(row, dtype, t) - m));
            if (smoothing > 0.0f) row_loss += prob.spread * (class_weight_sum * log_s - sums.weighted_gap);
        }
        if (z_loss != 0.0f) {
            row_loss += z_loss * lse * lse;
            q_sum += 2.0f * z_loss * lse;
        }
        loss[r] = row_loss;
        if (!grad_row) continue;
        float coef = q_sum * scale / sums.exp_sum, smooth = scale * prob.spread;
        if (probs != NULL) {
            write_gradient(grad_row, dtype, scratch, classes, coef, smooth, class_weight, prob, scale * prob.keep);
        } else {  /* every class gets p_c coef - smooth w_c; the target slot also - scale (1 - eps) w_t */
            write_gradient(grad_row, dtype, scratch, classes, coef, smooth, class_weight, NO_PROB, 0.0f);
            float w_target = class_weight ? class_weight[t] : 1.0f;
            float g_t = scratch[t] * coef - smooth * w_target - scale * prob.keep * target_weight[r];
            store_scalar(grad_row, dtype, t, g_t);
        }
    }
}

/* Rows [first, last) of a call, with one scratch row: each entry point's own loop. */
typedef void (*rows_fn)(const void *arguments, int64_t first, int64_t last, float *scratch);

struct part {
    rows_fn run;
    const void *arguments;
    int64_t first, last;
    float *scratch;
};

static void *run_part(void *p) {
    const struct part *part = p;
    part->run(part->arguments, part->first, part->last, part->scratch);
    return NULL;
}

/* All `rows`, on `threads` threads, each with its scratch row (`scratch_row_stride` floats apart): the caller
 * takes the first part and joins every other before returning, so no thread outlives the call (nor the buffers
 * the caller passed). A signal meanwhile does not end the call: Python's handler only sets a flag, and
 * KeyboardInterrupt is raised after the call returns. A thread that cannot be started has its part run by the
 * caller. */
static void run_rows(rows_fn run, const void *arguments, int64_t rows, int threads, float *scratch,
                     int64_t scratch_row_stride) {
    threads = threads < 1 ? 1 : threads > 256 ? 256 : threads;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    if (threads == 1) {
        run(arguments, 0, rows, scratch);
        return;
    }
    struct part parts[256];
    pthread_t ids[256];
    int started[256];
    for (int k = 0; k < threads; k++)
        parts[k] = (struct part){run, arguments, rows * k / threads, rows * (k + 1) / threads,
                                 scratch + (size_t)k * (size_t)scratch_row_stride};
    for (int k = 1; k < threads; k++) started[k] = pthread_create(&ids[k], NULL, run_part, &parts[k]) == 0;
    run_part(&parts[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(ids[k], NULL);
        else
            run_part(&parts[k]);
    }
}

static void cross_entropy_range(const void *arguments, int64_t first, int64_t last, float *scratch) {
    rows_range(arguments, first, last, scratch);
}

void xent_cross_entropy_rows(const struct xent_arguments *a) {
    run_rows(cross_entropy_range, a, a->rows, a->threads, a->scratch, a->scratch_row_stride);
}

/* The common call, whole: float32 rows with int64 class indices and nothing else (no class weights, smoothing,
 * z-loss or statistics). The call's data-dependent rules are applied here, where the data is read, so that the
 * Python side (backends/common_call.py) only checks shapes and dtypes:
 *   - bounds: a target outside [0, classes) that is not ignore_index stops the call before anything is computed
 *     and `bad_row` receives its row (the caller raises the family's IndexError);
 *   - the ignore mask: an ignored row has loss 0 and gradient 0;
 *   - 'mean' (`mean` != 0): the denominator is the number of rows not ignored (`count` receives it), and the
 *     gradient's scale is its reciprocal rounded to float32 once, as 1 / denominator is in the general path.
 * `loss` receives every row's loss (the caller reduces them). `status` is 0 when done, 1 for a target out of
 * range, 2 when nothing was computed (no memory for the row masks, or an empty problem). */
#define XENT_COMMON_CALL(X)                                                                                       \
    X(const float *, logits, ptr) X(int64_t, rows, i64) X(int64_t, classes, i64) X(const int64_t *, target, ptr) \
    X(int64_t, ignore_index, i64) X(int, mean, i32) X(float *, loss, ptr) X(float *, grad, ptr)                  \
    X(int, threads, i32) X(int64_t, count, i64) X(int64_t, bad_row, i64) X(int, status, i32)

XENT_DECLARE(xent_common_call, XENT_COMMON_CALL)

void xent_common_call(struct xent_common_call *c) {
    int64_t rows = c->rows, classes = c->classes, ignore_index = c->ignore_index, count = 0;
    if (rows <= 0 || classes <= 0) { /* the caller sends only non-empty problems */
        c->status = 2;
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t t = c->target[r];
        if (t == ignore_index) continue;
        if (t < 0 || t >= classes) {
            c->bad_row = r, c->status = 1;
            return;
        }
        count++;
    }
    c->count = count;
    int threads = c->threads < 1 ? 1 : c->threads;
    int64_t padded = (classes + LANES - 1) / LANES * LANES;
    uint8_t *valid = malloc((size_t)rows);
    float *target_weight = malloc((size_t)rows * sizeof(float));
    float *scratch = malloc((size_t)threads * (size_t)padded * sizeof(float));
    if (valid == NULL || target_weight == NULL || scratch == NULL) {
        free(valid), free(target_weight), free(scratch);
        c->status = 2;
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        valid[r] = c->target[r] != ignore_index;
        target_weight[r] = valid[r] ? 1.0f : 0.0f;
    }
    struct xent_arguments a = {
        .logits = c->logits, .logits_row_stride = classes, .dtype = XENT_FLOAT32, .rows = rows, .classes = classes,
        .target = c->target, .target_weight = target_weight, .valid = valid, .class_weight_sum = (float)classes,
        .scale = c->mean ? 1.0f / (float)count : 1.0f, .loss = c->loss, .grad = c->grad, .grad_row_stride = classes,
        .scratch = scratch, .scratch_row_stride = padded, .threads = threads,
    };
    xent_cross_entropy_rows(&a); /* an ignored row's target is never read */
    free(valid), free(target_weight), free(scratch);
    c->status = 0;
}

/* Per-token log-probabilities and entropy (xentlib.log_probs, rl.py; derivation in docs/numerics.md) of rows
 * u = z / T, with m = max_v u_v, s = sum_v exp(u_v - m) and log p_v = (u_v - m) - log s:
 *   forward:   log p_t,  lse = m + log s,  H = log s + sum_v p_v (m - u_v)    (0, 0, 0 on ignored rows)
 *   backward:  dL/dz_v = ([v = t] g - p_v (g + h (log p_v + H))) / T            (0 on ignored rows)
 * for the upstream gradients g (of log p_t) and h (of H; NULL: none). Each of these is a sum of terms of one sign
 * (log s >= 0, m - u_v >= 0), never lse - u_t, which would cancel. The backward recomputes m and s from the row
 * (one more exp per element, the cost of gradients that arrive after the forward) and takes H from the forward;
 * `grad` may be the logits themselves (a row is read into scratch before it is written). A row whose max is not
 * finite has no finite softmax: NaN outputs and gradient, as torch's log_softmax gives. A class whose p_v is 0
 * (u_v = -inf) gets the gradient 0 from the entropy term (the limit of p log p), not 0 * inf. */
#define XENT_LOG_PROBS(X)                                                                                         \
    X(const void *, logits, ptr) X(int64_t, logits_row_stride, i64) X(int, dtype, i32) X(int64_t, rows, i64)    \
    X(int64_t, classes, i64) X(const int64_t *, target, ptr) X(const uint8_t *, valid, ptr)                      \
    X(float, temperature, f32) X(float *, log_prob, ptr) X(float *, lse, ptr) X(float *, entropy, ptr)       \
    X(const float *, grad_log_prob, ptr) X(const float *, grad_entropy, ptr) X(void *, grad, ptr)                \
    X(int64_t, grad_row_stride, i64) X(float *, scratch, ptr) X(int64_t, scratch_row_stride, i64)                \
    X(int, threads, i32)

XENT_DECLARE(xent_log_probs, XENT_LOG_PROBS)

/* u = z / T over scratch[0:padded], a division (one rounding, as z / T is in torch; the padding's -inf stays) */
static void divide_row(float *scratch, int64_t classes, float temperature) {
    if (temperature == 1.0f) return;
    for (int64_t c = 0; c < classes; c += LANES) {
        vf v;
        memcpy(&v, scratch + c, sizeof v);
        v /= splat(temperature);
        memcpy(scratch + c, &v, sizeof v);
    }
}

/* sum_v exp(u_v - m), scratch (u) left as it is */
static float exp_sum(const float *scratch, int64_t classes, float m) {
    vf sum = (vf){};
    for (int64_t c = 0; c < classes; c += LANES) {
        vf u;
        memcpy(&u, scratch + c, sizeof u);
        sum += exp_nonpositive(u - splat(m));
    }
    return horizontal_sum(sum);
}

/* LANES classes from c of -p_v (g + h (log p_v + H)) / T, with log p_v = (u_v - m) - log s. */
static inline vf log_prob_gradient_lanes(const float *scratch, int64_t c, float m, float log_s, float g, float h,
                                         float entropy, float inv_t) {
    vf u;
    memcpy(&u, scratch + c, sizeof u);
    vf log_p = (u - splat(m)) - splat(log_s);
    vf p = exp_nonpositive(log_p);
    vf coef = splat(g);
    if (h != 0.0f) coef += splat(h) * (log_p + splat(entropy));
    return blend(p > (vf){}, -p * coef * splat(inv_t), (vf){});
}

static void write_log_prob_gradient(void *grad_row, int dtype, const float *scratch, int64_t classes, float m,
                                    float log_s, float g, float h, float entropy, float inv_t) {
    for (int64_t c = 0; c < classes; c += LANES)
        store_lanes(grad_row, dtype, c, classes, log_prob_gradient_lanes(scratch, c, m, log_s, g, h, entropy, inv_t));
}

static void log_probs_range(const void *arguments, int64_t first, int64_t last, float *scratch) {
    const struct xent_log_probs *a = arguments;
    int64_t classes = a->classes;
    int dtype = a->dtype, backward = a->grad != NULL;
    size_t elem = dtype == XENT_FLOAT32 ? 4 : 2;
    float temperature = a->temperature, inv_t = 1.0f / temperature;
    for (int64_t r = first; r < last; r++) {
        const void *row = (const char *)a->logits + (size_t)(r * a->logits_row_stride) * elem;
        void *grad_row = backward ? (char *)a->grad + (size_t)(r * a->grad_row_stride) * elem : NULL;
        if (!a->valid[r]) {
            if (backward) {
                memset(grad_row, 0, (size_t)classes * elem);
            } else {
                a->log_prob[r] = 0.0f, a->lse[r] = 0.0f;
                if (a->entropy) a->entropy[r] = 0.0f;
            }
            continue;
        }
        float m = load_row(row, dtype, classes, scratch) / temperature;
        int64_t t = a->target[r];
        if (!isfinite(m)) {
            if (backward) {
                fill_row(grad_row, dtype, classes, NAN);
            } else {
                a->log_prob[r] = NAN, a->lse[r] = NAN;
                if (a->entropy) a->entropy[r] = NAN;
            }
            continue;
        }
        divide_row(scratch, classes, temperature);
        float gap_t = scratch[t] - m;
        if (backward) {
            float log_s = logf(exp_sum(scratch, classes, m));
            float g = a->grad_log_prob[r], h = a->grad_entropy ? a->grad_entropy[r] : 0.0f;
            float entropy = a->grad_entropy ? a->entropy[r] : 0.0f;
            write_log_prob_gradient(grad_row, dtype, scratch, classes, m, log_s, g, h, entropy, inv_t);
            float log_p_t = gap_t - log_s, p_t = expf(log_p_t);
            float d_t = (g - (p_t > 0.0f ? p_t * (g + h * (log_p_t + entropy)) : 0.0f)) * inv_t;
            store_scalar(grad_row, dtype, t, d_t);
            continue;
        }
        struct row_sums sums = exponentiate(scratch, classes, m, NULL, 0, a->entropy != NULL, NO_PROB);
        float log_s = logf(sums.exp_sum);
        a->log_prob[r] = gap_t - log_s;
        a->lse[r] = m + log_s;
        if (a->entropy) a->entropy[r] = log_s - sums.expected_gap / sums.exp_sum;
    }
}

/* Forward (grad NULL: log_prob, lse and entropy when not NULL) or backward (grad: the gradient for the upstream
 * gradients grad_log_prob and grad_entropy, which may be NULL; entropy is then the forward's, read). */
void xent_log_probs(const struct xent_log_probs *a) {
    run_rows(log_probs_range, a, a->rows, a->threads, a->scratch, a->scratch_row_stride);
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

/* The generalized Jensen-Shannon divergence of GKD (xentlib.distillation_loss, distill.py; docs/numerics.md) per
 * row, with p = softmax(z_s / T) (student), q = softmax(z_t / T) (teacher), m = beta q + (1 - beta) p:
 *   beta = 0:      D = KL(q || p),                               dD/dz_s = (p - q) / T
 *   beta = 1:      D = KL(p || q),                               dD/dz_s = p (r - KL(p || q)) / T,  r = log p - log q
 *   otherwise:     D = beta KL(q || m) + (1 - beta) KL(p || m),  dD/dz_s = (1 - beta) p (r - KL(p || m)) / T,
 *                  r = log p - log m,  log m = logaddexp(log q + log beta, log p + log(1 - beta))
 * with log p = (u_s - m_s) - log s_s (and log q alike), never u - lse. A term whose probability is 0 is 0 (not
 * 0 * inf). `loss` receives D per row; with `grad` (which may be the student's logits: a row is read into scratch
 * first) the gradient times `scale[r]` (1 when NULL). Two scratch rows per thread (student, teacher), each of
 * classes rounded up to LANES floats: `scratch_row_stride` is twice that. A row whose max is not finite (either
 * model's) gives NaN loss and gradient, as torch's log_softmax gives. */
#define XENT_DISTILLATION(X)                                                                                      \
    X(const void *, student, ptr) X(int64_t, student_row_stride, i64) X(int, student_dtype, i32)                  \
    X(const void *, teacher, ptr) X(int64_t, teacher_row_stride, i64) X(int, teacher_dtype, i32)                  \
    X(int64_t, rows, i64) X(int64_t, classes, i64) X(float, beta, f32) X(float, temperature, f32)             \
    X(const float *, scale, ptr) X(float *, loss, ptr) X(void *, grad, ptr) X(int64_t, grad_row_stride, i64)     \
    X(float *, scratch, ptr) X(int64_t, scratch_row_stride, i64) X(int, threads, i32)

XENT_DECLARE(xent_distillation, XENT_DISTILLATION)

/* Pass over a row's classes: the KL sums, and the scratch rows become p (student) and, for the gradient, q
 * (beta = 0) or r = log p - log m. */
static void distillation_sums(float *s_row, float *t_row, int64_t classes, float ms, float log_ss, float mt,
                              float log_st, float beta, float *kl_p, float *kl_q) {
    vf sum_p = (vf){}, sum_q = (vf){};
    const vf zero = (vf){};
    float log_keep = beta > 0.0f && beta < 1.0f ? log1pf(-beta) : 0.0f, log_beta = beta > 0.0f ? logf(beta) : 0.0f;
    for (int64_t c = 0; c < classes; c += LANES) {
        vf us, ut;
        memcpy(&us, s_row + c, sizeof us);
        memcpy(&ut, t_row + c, sizeof ut);
        vf log_p = (us - splat(ms)) - splat(log_ss), log_q = (ut - splat(mt)) - splat(log_st);
        vf p = exp_nonpositive(log_p), q = exp_nonpositive(log_q), second;
        if (beta == 0.0f) { /* KL(q || p) */
            sum_q += blend(q > zero, q * (log_q - log_p), zero);
            second = q;
        } else {
            vf log_m = log_q; /* beta = 1: m = q */
            if (beta < 1.0f) {
                vf a = log_q + splat(log_beta), b = log_p + splat(log_keep);
                vf high = blend(a > b, a, b), low = blend(a > b, b, a);
                vi nothing = high == splat(-INFINITY); /* p = q = 0 here: its terms are 0 below */
                log_m = blend(nothing, high, high + log1p_unit(exp_nonpositive(blend(nothing, zero, low - high))));
                sum_q += blend(q > zero, q * (log_q - log_m), zero);
            }
            second = log_p - log_m;
            sum_p += blend(p > zero, p * second, zero);
        }
        memcpy(s_row + c, &p, sizeof p);
        memcpy(t_row + c, &second, sizeof second);
    }
    *kl_p = horizontal_sum(sum_p), *kl_q = horizontal_sum(sum_q);
}

/* LANES classes from c of the gradient: (p - q) coef (beta = 0) or p (r - kl_p) coef, 0 where p = 0. */
static inline vf distillation_gradient_lanes(const float *s_row, const float *t_row, int64_t c, float beta,
                                             float kl_p, float coef) {
    vf p, second;
    memcpy(&p, s_row + c, sizeof p);
    memcpy(&second, t_row + c, sizeof second);
    if (beta == 0.0f) return (p - second) * splat(coef);
    return blend(p > (vf){}, p * (second - splat(kl_p)) * splat(coef), (vf){});
}

static void distillation_range(const void *arguments, int64_t first, int64_t last, float *scratch) {
    const struct xent_distillation *a = arguments;
    int64_t classes = a->classes, padded = (classes + LANES - 1) / LANES * LANES;
    float *s_row = scratch, *t_row = scratch + padded, beta = a->beta, temperature = a->temperature;
    size_t s_elem = a->student_dtype == XENT_FLOAT32 ? 4 : 2, t_elem = a->teacher_dtype == XENT_FLOAT32 ? 4 : 2;
    for (int64_t r = first; r < last; r++) {
        const void *zs = (const char *)a->student + (size_t)(r * a->student_row_stride) * s_elem;
        const void *zt = (const char *)a->teacher + (size_t)(r * a->teacher_row_stride) * t_elem;
        void *grad_row = a->grad ? (char *)a->grad + (size_t)(r * a->grad_row_stride) * s_elem : NULL;
        float ms = load_row(zs, a->student_dtype, classes, s_row) / temperature;
        float mt = load_row(zt, a->teacher_dtype, classes, t_row) / temperature;
        if (!isfinite(ms) || !isfinite(mt)) {
            a->loss[r] = NAN;
            if (grad_row) fill_row(grad_row, a->student_dtype, classes, NAN);
            continue;
        }
        divide_row(s_row, classes, temperature);
        divide_row(t_row, classes, temperature);
        float log_ss = logf(exp_sum(s_row, classes, ms)), log_st = logf(exp_sum(t_row, classes, mt));
        float kl_p, kl_q;
        distillation_sums(s_row, t_row, classes, ms, log_ss, mt, log_st, beta, &kl_p, &kl_q);
        int general = beta > 0.0f && beta < 1.0f;
        a->loss[r] = beta == 0.0f ? kl_q : general ? beta * kl_q + (1.0f - beta) * kl_p : kl_p;
        if (!grad_row) continue;
        float coef = (a->scale ? a->scale[r] : 1.0f) * (general ? 1.0f - beta : 1.0f) / temperature;
        for (int64_t c = 0; c < classes; c += LANES)
            store_lanes(grad_row, a->student_dtype, c, classes,
                        distillation_gradient_lanes(s_row, t_row, c, beta, kl_p, coef));
    }
}

void xent_distillation(const struct xent_distillation *a) {
    run_rows(distillation_range, a, a->rows, a->threads, a->scratch, a->scratch_row_stride);
}
