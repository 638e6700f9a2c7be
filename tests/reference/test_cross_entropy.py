"""Reference cross_entropy (+ extensions, statistics, linear_cross_entropy) against torch 2.13 in float64.

Plain options are compared with `F.cross_entropy`; the extensions (z_loss, softcap, normalizer) with a
torch formula composed by hand from their pinned definitions (`_oracle.torch_cross_entropy`). Every gradient
comes from torch.autograd.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
from _oracle import (  # noqa: E402
    IGNORES,
    NO_SMOOTHING,
    SHAPES,
    SMOOTHINGS,
    assert_close,
    check_cross_entropy,
    index_case,
    probability_case,
    run_torch,
    torch_cross_entropy,
)

import xentlib.reference as ref  # noqa: E402


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ignore", IGNORES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", SMOOTHINGS, ids=lambda s: f"eps={s}")
def test_class_indices(shape, ignore, weighted, reduction, smoothing):
    x, t, w, ignore_index = index_case(shape, ignore, weighted, np.random.default_rng(0))
    check_cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", SMOOTHINGS, ids=lambda s: f"eps={s}")
def test_probabilities(shape, ignore_index, weighted, reduction, smoothing):
    x, t, w = probability_case(shape, weighted, np.random.default_rng(1))
    check_cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", NO_SMOOTHING, ids=str)
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shape", [(13,), (7, 13, 2)], ids=str)
def test_negative_or_nan_smoothing_means_none(smoothing, probabilities, reduction, shape):
    rng = np.random.default_rng(8)
    if probabilities:
        x, t, w = probability_case(shape, True, rng)
    else:
        x, t, w, _ = index_case(shape, "none", True, rng)
    check_cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)
    unsmoothed = ref.cross_entropy(x, t, w, reduction=reduction)
    assert_close(ref.cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing), unsmoothed)


def _edge_logits(kind, x, t_index):
    """Large logits (1e4 scale), a -inf on a non-target class, or a -inf on the target (row 0)."""
    x = x.copy()
    if kind == "large":
        return x * 1e4
    other = (t_index + 1) % x.shape[1]
    rows = np.arange(x.shape[0])
    if kind == "minus_inf_other":
        x[rows, other] = -np.inf
    if kind == "minus_inf_target":
        x[0, t_index[0]] = -np.inf
    return x


@pytest.mark.parametrize("kind", ["large", "minus_inf_other", "minus_inf_target"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extreme_logits(kind, probabilities, weighted, reduction, smoothing):
    rng = np.random.default_rng(2)
    x, t, w, _ = index_case((6, 5), "none", weighted, rng)
    x = _edge_logits(kind, x, t)
    if probabilities:
        t = np.eye(5)[t] * 0.8 + 0.04  # a dense distribution: a -inf logit meets q > 0 (NaN loss, as torch)
    check_cross_entropy(x, t, w, reduction=reduction, label_smoothing=smoothing)


def test_ignored_row_with_nan_logits_stays_clean():
    """NaN logits in an ignored row: torch's loss stays finite; the reference's gradient there is 0."""
    x, t, w, _ = index_case((5, 4), "none", True, np.random.default_rng(3))
    x[1], t[1] = np.nan, -100
    expected = run_torch(lambda x, t, w: F.cross_entropy(x, t, w), dict(x=x, t=t, w=w))[0]
    assert_close(ref.cross_entropy(x, t, w), expected, "loss")
    grad = ref.cross_entropy_backward(1.0, x, t, w).input
    assert np.all(grad[1] == 0.0) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
def test_any_input_dtype_is_computed_in_float64(dtype):
    """Lower-precision (or integer) logits are converted first: same result as their float64 values."""
    x, t, w, _ = index_case((6, 5), "none", True, np.random.default_rng(9))
    low = (x * 4).astype(dtype)
    loss = ref.cross_entropy(low, t, w, label_smoothing=0.1)
    assert loss.dtype == np.float64
    exact = low.astype(np.float64)  # every float16/float32/int64 value is exact in float64
    assert_close(loss, ref.cross_entropy(exact, t, w, label_smoothing=0.1), rtol=0, atol=0)
    expected, _, _ = run_torch(lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1), dict(x=exact, t=t))
    assert_close(ref.cross_entropy(low, t, label_smoothing=0.1), expected, "loss")


EXTENSIONS = [
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(z_loss=0.5, softcap=2.0),
]


@pytest.mark.parametrize("extension", EXTENSIONS, ids=str)
@pytest.mark.parametrize("shape", [(13,), (7, 13), (4, 6, 3), (0, 13)], ids=str)
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extensions(extension, shape, probabilities, weighted, reduction, smoothing):
    rng = np.random.default_rng(4)
    if probabilities:
        x, t, w = probability_case(shape, weighted, rng)
        ignore_index = -100
    else:
        x, t, w, ignore_index = index_case(shape, "negative", weighted, rng)
    x = x * 3  # so that the soft cap bends the logits
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing, **extension)
    check_cross_entropy(x, t, w, **opts)


@pytest.mark.parametrize("normalizer", [7.0, np.array(0.25)], ids=["float", "0-d array"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_normalizer(normalizer, probabilities):
    rng = np.random.default_rng(5)
    x, t, w = probability_case((6, 4), True, rng)
    if not probabilities:
        x, t, w, _ = index_case((6, 4), "negative", True, rng)
    check_cross_entropy(x, t, w, ignore_index=-1, reduction="sum", z_loss=0.1, normalizer=normalizer)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_normalizer_requires_sum(reduction):
    with pytest.raises(ValueError, match="normalizer"):
        ref.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), reduction=reduction, normalizer=2.0)


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("shape", [(6,), (9, 6), (3, 6, 2, 2)], ids=str)
def test_stats(softcap, probabilities, shape):
    rng = np.random.default_rng(6)
    x, t, w, ignore_index = index_case(shape, "negative", True, rng)
    if probabilities:
        x, t, w = probability_case(shape, True, rng)
        ignore_index = -100
    x = x * 2
    x.reshape(-1)[:3] = x.reshape(-1)[0]  # ties: argmax picks the first maximum, as torch
    opts = dict(ignore_index=ignore_index, label_smoothing=0.1, z_loss=0.01, softcap=softcap)
    stats = ref.cross_entropy_stats(x, t, w, **opts)

    class_dim = 0 if x.ndim == 1 else 1
    xt, tt, wt = torch.tensor(x, requires_grad=True), torch.from_numpy(t), torch.from_numpy(w)
    y = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    lse, log_p = torch.logsumexp(y, class_dim), F.log_softmax(y, class_dim)
    entropy = -(log_p.exp() * log_p).sum(class_dim)
    argmax = y.argmax(class_dim)
    correct = argmax == tt.argmax(class_dim) if probabilities else (argmax == tt) & (tt != ignore_index)
    assert_close(stats.lse, lse, "lse")
    assert_close(stats.loss, torch_cross_entropy(xt, tt, wt, reduction="none", **opts), "loss")
    assert_close(stats.argmax, argmax, "argmax")
    assert_close(stats.correct, correct, "correct")
    assert_close(stats.entropy, entropy, "entropy")

    g_lse, g_entropy = rng.normal(size=lse.shape), rng.normal(size=lse.shape)
    objective = (lse * torch.from_numpy(g_lse)).sum() + (entropy * torch.from_numpy(g_entropy)).sum()
    (expected,) = torch.autograd.grad(objective, xt, retain_graph=True)
    assert_close(ref.cross_entropy_stats_backward(g_lse, g_entropy, x, softcap), expected, "grad lse+entropy")
    assert_close(ref.cross_entropy_stats_backward(g_lse, None, x, softcap), torch.autograd.grad(
        (lse * torch.from_numpy(g_lse)).sum(), xt)[0], "grad lse alone")  # fmt: skip


@pytest.mark.parametrize("lead", [(), (6,), (2, 3), (0,)], ids=str)
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("extension", [{}, dict(z_loss=0.05, softcap=4.0)], ids=["plain", "zloss+softcap"])
def test_linear_cross_entropy(lead, probabilities, with_bias, reduction, extension):
    """linear_cross_entropy == cross_entropy(x @ W.T + b) with the rows flattened, every gradient too."""
    rng = np.random.default_rng(7)
    dim, vocab = 5, 7
    x, W = rng.normal(size=(*lead, dim)), rng.normal(size=(vocab, dim))
    b = rng.normal(size=vocab) if with_bias else None
    class_weight = rng.uniform(0.5, 1.5, vocab)
    if probabilities:
        t = rng.uniform(0.0, 1.0, size=(*lead, vocab))
    else:
        t = np.where(rng.random(lead) < 0.3, -100, rng.integers(0, vocab, size=lead))
    opts = dict(reduction=reduction, label_smoothing=0.1, **extension)

    def torch_linear_ce(x, W, t, b, cw):
        logits = x @ W.T + (0 if b is None else b)
        flat_t = t.reshape(-1, vocab) if probabilities else t.reshape(-1)
        loss = torch_cross_entropy(logits.reshape(-1, vocab) if lead else logits, flat_t if lead else t, cw, **opts)
        return loss.reshape(lead) if reduction == "none" else loss

    grad = ("x", "W") + (("b",) if with_bias else ()) + (("t", "cw") if probabilities else ())
    out, g, grads = run_torch(torch_linear_ce, dict(x=x, W=W, t=t, b=b, cw=class_weight), grad)
    kwargs = dict(bias=b, class_weight=class_weight, **opts)
    assert_close(ref.linear_cross_entropy(x, W, t, **kwargs), out, "loss")
    ours = ref.linear_cross_entropy_backward(g, x, W, t, **kwargs)
    assert_close(ours.input, grads["x"], "grad input")
    assert_close(ours.weight, grads["W"], "grad weight")
    assert_close(ours.bias, grads.get("b"), "grad bias")
    assert_close(ours.target, grads.get("t"), "grad target")
    assert_close(ours.class_weight, grads.get("cw"), "grad class weight")


def test_textbook_examples():
    """Published worked examples, and one computed here from the definition -log(e^{x_t} / sum_c e^{x_c})."""
    logits = np.array([[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]])
    targets = np.array([0, 2])
    np.testing.assert_allclose(ref.cross_entropy(logits, targets, reduction="none"), [1.5210, 0.6247], atol=5e-5)
    assert round(float(ref.cross_entropy(logits, targets)), 3) == 1.073
    three = ref.cross_entropy(np.array([[0.1234, 0.5555, 0.3211]] * 3), np.array([0, 1, 2]))
    assert round(float(three), 4) == 1.1142

    rows, targets = [[2.0, 0.5, 0.3], [0.2, 2.0, 0.5]], [0, 1]
    by_hand = [-math.log(math.exp(r[t]) / sum(math.exp(v) for v in r)) for r, t in zip(rows, targets, strict=True)]
    assert math.isclose(float(ref.cross_entropy(np.array(rows), np.array(targets))), sum(by_hand) / 2, rel_tol=1e-14)
