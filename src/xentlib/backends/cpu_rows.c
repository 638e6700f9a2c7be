/* xentlib's CPU row kernel: cross-entropy loss, statistics and gradient of rows in one sweep.
 *
 * Built at first use by cpu_build.py (cc -O3 -march=native) and called through ctypes; the Python side checks
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
 * memory once and the gradient written once; during pass (2) the thread's next row is prefetched into the L2 cache
 * (`prefetch_line`), so that its read from memory overlaps this row's arithmetic. A row whose max is not finite (a
 * NaN, a +inf, or all -inf) has no finite softmax: its loss, lse, entropy and gradient are NaN, as torch's
 * log_softmax gives.
 *
 * A copy on purpose: this is the row maths of backends/torch_chunked.py and backends/triton/rowmath.py again, in C
 * for one sweep per row. What pins the copies together: tests/backends/test_cpu_kernel.py (against the PyTorch ops,
 * float64 and the NumPy reference, xentlib/reference/cross_entropy.py) and tests/test_accuracy.py (error against
 * float64 no larger than torch's, the "cpu-kernel" cases).
 */
#include "cpu_rows.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static int64_t first_index_of(const float *scratch, int64_t classes, float value) {
    for (int64_t c = 0; c < classes; c++)
        if (scratch[c] == value || (value != value && scratch[c] != scratch[c])) return c;
    return 0;
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
        struct next_row next = next_row_of(row, logits_row_stride, elem, classes, r + 1 == last);
        struct row_sums sums =
            probs != NULL
                ? exponentiate(scratch, classes, m, class_weight, want_weighted_gap, want_expected_gap, prob, next)
                : exponentiate(scratch, classes, m, class_weight, want_weighted_gap, want_expected_gap, NO_PROB, next);
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

#ifdef _OPENMP
const int xent_openmp = 1; /* read by cpu_build.py: which threads run_rows uses */
#else
const int xent_openmp = 0;

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
#endif

/* All `rows`, on `threads` threads, each with its scratch row (`scratch_row_stride` floats apart), part k of the
 * rows on thread k. Where the library is built with -fopenmp (cpu_build.py does so only where torch's GNU OpenMP
 * runtime is loaded, which the library's libgomp.so.1 then resolves to), the parts run on torch's own OpenMP team:
 * the threads that ran the matmuls before the call, woken from their wait, with nothing competing for the cores.
 * Elsewhere the call starts pthreads and joins them. Either way every part has finished when the call returns (the
 * parallel region ends in a barrier), so no thread outlives the call or the buffers the caller passed. A signal
 * meanwhile does not end the call: Python's handler only sets a flag, and KeyboardInterrupt is raised after the
 * call returns. A pthread that cannot be started has its part run by the caller. */
void run_rows(rows_fn run, const void *arguments, int64_t rows, int threads, float *scratch,
              int64_t scratch_row_stride) {
    threads = threads < 1 ? 1 : threads > 256 ? 256 : threads;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    if (threads == 1) {
        run(arguments, 0, rows, scratch);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    { /* the team may be smaller than asked (inside another parallel region: one thread); parts follow its size */
        int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        run(arguments, rows * k / n, rows * (k + 1) / n, scratch + (size_t)k * (size_t)scratch_row_stride);
    }
#else
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
#endif
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
