/* xentlib's C kernels for post-training: per-token log-probabilities and entropy, and the distillation divergence,
 * each a sweep per row over float32/bfloat16 rows (the toolkit in cpu_rows.h; built with cpu_rows.c by
 * cpu_build.py, bound by cpu_kernel.py). Like cpu_rows.c, a copy on purpose of maths that exists as torch ops
 * (rl.py, distill.py), for one sweep per row; tests/test_log_probs.py and tests/test_distillation.py hold both to
 * the float64 reference. */
#include <float.h>

#include "cpu_rows.h"

/* Per-token log-probabilities and entropy (xentlib.log_probs, rl.py; derivation in docs/numerics.md) of rows
 * u = z / T, with m = max_v u_v, s = sum_v exp(u_v - m) and log p_v = (u_v - m) - log s:
 *   forward:   log p_t,  lse = m + log s,  H = log s + sum_v p_v (m - u_v)    (0, 0, 0 on ignored rows)
 *   backward:  dL/dz_v = ([v = t] g - p_v (g + h (log p_v + H))) / T            (0 on ignored rows)
 * for the upstream gradients g (of log p_t) and h (of H; NULL: none). Each of these is a sum of terms of one sign
 * (log s >= 0, m - u_v >= 0), never lse - u_t, which would cancel. The backward recomputes m and s from the row
 * (one more exp per element, the cost of gradients that arrive after the forward) and takes H from the forward;
 * `grad` may be the logits themselves (a row is read into scratch before it is written). A row whose max is not
 * finite has no finite softmax: NaN outputs and gradient, as torch's log_softmax gives. A class whose p_v is 0
 * (u_v = -inf) gets the gradient 0 from the entropy term (the limit of p log p), not 0 * inf.
 *
 * The policy loss (policy.py, `advantages` not NULL, with `grad`): forward and backward in one sweep per row, since
 * its upstream gradients are known as soon as the row's log p_t is: the forward's outputs, then g and h per token as
 * `policy_upstream` says, then the gradient from the exponentials the forward left in scratch (p = e / s: no second
 * read of the row into scratch, no second exponential). */
#define XENT_LOG_PROBS(X)                                                                                         \
    X(const void *, logits, ptr) X(int64_t, logits_row_stride, i64) X(int, dtype, i32) X(int64_t, rows, i64)      \
    X(int64_t, classes, i64) X(const int64_t *, target, ptr) X(const uint8_t *, valid, ptr)                       \
    X(float, temperature, f32) X(float *, log_prob, ptr) X(float *, lse, ptr) X(float *, entropy, ptr)            \
    X(const float *, grad_log_prob, ptr) X(const float *, grad_entropy, ptr)                                      \
    X(void *, grad, ptr) X(int64_t, grad_row_stride, i64) X(float *, scratch, ptr)                                \
    X(int64_t, scratch_row_stride, i64) X(int, threads, i32) X(const float *, advantages, ptr)                    \
    X(const float *, old_log_probs, ptr) X(const float *, ref_log_probs, ptr) X(const float *, factor, ptr)       \
    X(float, epsilon_low, f32) X(float, epsilon_high, f32) X(float, kl_coef, f32) X(float, entropy_coef, f32)

XENT_DECLARE(xent_log_probs, XENT_LOG_PROBS)

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
                                    float log_s, float g, float h, float entropy, float inv_t, struct next_row next) {
    for (int64_t c = 0; c < classes; c += LANES) {
        prefetch_line(next, c / LANES);
        store_lanes(grad_row, dtype, c, classes, log_prob_gradient_lanes(scratch, c, m, log_s, g, h, entropy, inv_t));
    }
}

/* dL/dz_t at the target: (g - p_t (g + h (log p_t + H))) / T, with 0 for the term where p_t = 0. */
static inline float target_gradient(float log_p_t, float g, float h, float entropy, float inv_t) {
    float p_t = expf(log_p_t);
    return (g - (p_t > 0.0f ? p_t * (g + h * (log_p_t + entropy)) : 0.0f)) * inv_t;
}

/* The policy loss's upstream gradients of token r, g = w/D dloss/dl and h = w/D dloss/dH, from l = log p_t:
 *   ratio = exp(l - old) (1 on-policy, old = NULL), clipped to [1 - epsilon_low, 1 + epsilon_high];
 *   dloss/dl = -A ratio where ratio A <= clipped A, else 0;  + kl_coef (1 - exp(ref - l));  dloss/dH = -entropy_coef.
 * A copy on purpose of `policy.token_terms`' derivatives (the semantic source, which also gives the loss): the
 * tests hold the fused loss's gradients to autograd through token_terms. */
static void policy_upstream(const struct xent_log_probs *a, int64_t r, float l, float *g, float *h) {
    float advantage = a->advantages[r];
    float ratio = a->old_log_probs ? expf(l - a->old_log_probs[r]) : 1.0f;
    float clipped = ratio < 1.0f - a->epsilon_low ? 1.0f - a->epsilon_low
                    : ratio > 1.0f + a->epsilon_high ? 1.0f + a->epsilon_high : ratio;
    float d = ratio * advantage <= clipped * advantage ? -advantage * ratio : 0.0f;
    if (a->kl_coef != 0.0f) d += a->kl_coef * (1.0f - expf(a->ref_log_probs[r] - l));
    *g = a->factor[r] * d;
    *h = a->factor[r] * -a->entropy_coef;
}

/* The gradient of a row from its exponentials e (scratch) and the row itself (for log p where h != 0):
 * -p_v (g + h (log p_v + H)) / T with p_v = e_v / s, log p_v = (u_v - m) - log s; the target's slot is the
 * caller's. Reads lane c of the row before writing lane c of grad_row, so grad_row may be the row. */
static void write_policy_gradient(void *grad_row, const void *row, int dtype, const float *scratch, int64_t classes,
                                  float m, float s, float g, float h, float entropy, float temperature) {
    float log_s = logf(s), inv_s = 1.0f / s, inv_t = 1.0f / temperature;
    for (int64_t c = 0; c < classes; c += LANES) {
        vf e;
        memcpy(&e, scratch + c, sizeof e);
        vf p = e * splat(inv_s), coef = splat(g);
        if (h != 0.0f) {
            vf u = load_lanes(row, dtype, c, classes);
            if (temperature != 1.0f) u /= splat(temperature);
            coef += splat(h) * (((u - splat(m)) - splat(log_s)) + splat(entropy));
        }
        store_lanes(grad_row, dtype, c, classes, blend(p > (vf){}, -p * coef * splat(inv_t), (vf){}));
    }
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
        int outputs = !backward || a->advantages; /* a forward, or the policy loss's sweep */
        if (!a->valid[r]) {
            if (backward) memset(grad_row, 0, (size_t)classes * elem);
            if (outputs) {
                a->log_prob[r] = 0.0f, a->lse[r] = 0.0f;
                if (a->entropy) a->entropy[r] = 0.0f;
            }
            continue;
        }
        float m = load_row(row, dtype, classes, scratch) / temperature;
        int64_t t = a->target[r];
        if (!isfinite(m)) {
            if (backward) fill_row(grad_row, dtype, classes, NAN);
            if (outputs) {
                a->log_prob[r] = NAN, a->lse[r] = NAN;
                if (a->entropy) a->entropy[r] = NAN;
            }
            continue;
        }
        divide_row(scratch, classes, temperature);
        float gap_t = scratch[t] - m;
        struct next_row next = next_row_of(row, a->logits_row_stride, elem, classes, r + 1 == last);
        if (a->advantages && backward) { /* the policy loss: forward and backward in one sweep */
            struct row_sums sums = exponentiate(scratch, classes, m, NULL, 0, 1, NO_PROB, next);
            float log_s = logf(sums.exp_sum), log_p_t = gap_t - log_s;
            float entropy = log_s - sums.expected_gap / sums.exp_sum, g, h;
            a->log_prob[r] = log_p_t, a->lse[r] = m + log_s;
            if (a->entropy) a->entropy[r] = entropy;
            policy_upstream(a, r, log_p_t, &g, &h);
            write_policy_gradient(grad_row, row, dtype, scratch, classes, m, sums.exp_sum, g, h, entropy,
                                  temperature);
            store_scalar(grad_row, dtype, t, target_gradient(log_p_t, g, h, entropy, inv_t));
            continue;
        }
        if (backward) {
            float log_s = logf(exp_sum(scratch, NULL, classes, m));
            float g = a->grad_log_prob[r], h = a->grad_entropy ? a->grad_entropy[r] : 0.0f;
            float entropy = a->grad_entropy ? a->entropy[r] : 0.0f;
            write_log_prob_gradient(grad_row, dtype, scratch, classes, m, log_s, g, h, entropy, inv_t, next);
            store_scalar(grad_row, dtype, t, target_gradient(gap_t - log_s, g, h, entropy, inv_t));
            continue;
        }
        struct row_sums sums = exponentiate(scratch, classes, m, NULL, 0, a->entropy != NULL, NO_PROB, next);
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

/* The generalized Jensen-Shannon divergence of GKD (xentlib.distillation_loss, distill.py; docs/numerics.md) per
 * row, with p = softmax(z_s / T) (student), q = softmax(z_t / T) (teacher), m = beta q + (1 - beta) p:
 *   beta = 0:      D = KL(q || p),                               dD/dz_s = (p - q) / T
 *   beta = 1:      D = KL(p || q),                               dD/dz_s = p (r - KL(p || q)) / T,  r = log p - log q
 *   otherwise:     D = beta KL(q || m) + (1 - beta) KL(p || m),  dD/dz_s = (1 - beta) p (r - KL(p || m)) / T,
 *                  r = log p - log m,  log m = logaddexp(log q + log beta, log p + log(1 - beta))
 * with log p = (u_s - m_s) - log s_s (and log q alike), never u - lse. A term whose probability is 0 is 0 (not
 * 0 * inf). `loss` receives D per row; with `grad` (which may be the student's logits: a row is read into scratch
 * first) the gradient times `scale[r]` (1 when NULL). Four scratch rows per thread (each model's u = z / T and
 * its exponentials), each of classes rounded up to LANES floats: `scratch_row_stride` is four times that. A row
 * whose max is not finite (either model's) gives NaN loss and gradient, as torch's log_softmax gives.
 * Exponentials: one per element and model (e = exp(u - m), kept), so p = e / s and q alike; log m is
 * log(beta q + (1 - beta) p), or where that mixture underflows, the logaddexp of log(beta q) and log((1 - beta) p)
 * (`log_mixture`). */
#define XENT_DISTILLATION(X)                                                                                      \
    X(const void *, student, ptr) X(int64_t, student_row_stride, i64) X(int, student_dtype, i32)                  \
    X(const void *, teacher, ptr) X(int64_t, teacher_row_stride, i64) X(int, teacher_dtype, i32)                  \
    X(int64_t, rows, i64) X(int64_t, classes, i64) X(float, beta, f32) X(float, temperature, f32)                 \
    X(const float *, scale, ptr) X(float *, loss, ptr) X(void *, grad, ptr) X(int64_t, grad_row_stride, i64)      \
    X(float *, scratch, ptr) X(int64_t, scratch_row_stride, i64) X(int, threads, i32)

XENT_DECLARE(xent_distillation, XENT_DISTILLATION)

/* log m for m = x + y, x = beta q and y = (1 - beta) p (both >= 0): log(m) where every lane of m is a normal
 * float, as it is unless a distribution is extremely peaked; else the larger of log x and log y plus log1p of the
 * smaller over the larger (exact where m underflows but the logs do not; -inf where p = q = 0). */
static inline vf log_mixture(vf log_p, vf log_q, vf x, vf y, float log_keep, float log_beta) {
    vf m = x + y;
    vi normal = m >= splat(FLT_MIN);
    uint64_t words[sizeof normal / 8], all = ~(uint64_t)0;
    memcpy(words, &normal, sizeof normal);
    for (size_t w = 0; w < sizeof normal / 8; w++) all &= words[w];
    if (all == ~(uint64_t)0) return log_normal(m);
    vf a = log_q + splat(log_beta), b = log_p + splat(log_keep); /* log x, log y */
    vi a_high = a > b;
    vf high = blend(a_high, a, b), big = blend(a_high, x, y), small = blend(a_high, y, x);
    vi nothing = high == splat(-INFINITY); /* p = q = 0 here: its terms are 0 */
    vf ratio = blend(big > (vf){}, small / big, (vf){}); /* exp(low - high), 0 where both underflow */
    return blend(nothing, high, high + log1p_unit(ratio));
}

/* Pass over a row's classes, from u and e = exp(u - m) of each model: the KL sums, and the scratch rows s_row and
 * t_row become p (student) and, for the gradient, q (beta = 0) or r = log p - log m. */
static void distillation_sums(float *s_row, float *t_row, const float *s_exp, const float *t_exp, int64_t classes,
                              float ms, float ss, float mt, float st, float beta, float *kl_p, float *kl_q,
                              struct next_row next_s, struct next_row next_t) {
    vf sum_p = (vf){}, sum_q = (vf){};
    const vf zero = (vf){};
    float log_ss = logf(ss), log_st = logf(st), inv_ss = 1.0f / ss, inv_st = 1.0f / st;
    float keep = 1.0f - beta, log_keep = beta > 0.0f && beta < 1.0f ? log1pf(-beta) : 0.0f;
    float log_beta = beta > 0.0f ? logf(beta) : 0.0f;
    for (int64_t c = 0; c < classes; c += LANES) {
        prefetch_line(next_s, c / LANES);
        prefetch_line(next_t, c / LANES);
        vf us, ut, es, et;
        memcpy(&us, s_row + c, sizeof us);
        memcpy(&ut, t_row + c, sizeof ut);
        memcpy(&es, s_exp + c, sizeof es);
        memcpy(&et, t_exp + c, sizeof et);
        vf log_p = (us - splat(ms)) - splat(log_ss), log_q = (ut - splat(mt)) - splat(log_st);
        vf p = es * splat(inv_ss), q = et * splat(inv_st), second;
        if (beta == 0.0f) { /* KL(q || p) */
            sum_q += blend(q > zero, q * (log_q - log_p), zero);
            second = q;
        } else {
            vf log_m = log_q; /* beta = 1: m = q */
            if (beta < 1.0f) {
                log_m = log_mixture(log_p, log_q, q * splat(beta), p * splat(keep), log_keep, log_beta);
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
    float *s_row = scratch, *t_row = scratch + padded, *s_exp = t_row + padded, *t_exp = s_exp + padded;
    float beta = a->beta, temperature = a->temperature;
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
        float ss = exp_sum(s_row, s_exp, classes, ms), st = exp_sum(t_row, t_exp, classes, mt);
        float kl_p, kl_q;
        struct next_row next_s = next_row_of(zs, a->student_row_stride, s_elem, classes, r + 1 == last);
        struct next_row next_t = next_row_of(zt, a->teacher_row_stride, t_elem, classes, r + 1 == last);
        distillation_sums(s_row, t_row, s_exp, t_exp, classes, ms, ss, mt, st, beta, &kl_p, &kl_q, next_s, next_t);
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
