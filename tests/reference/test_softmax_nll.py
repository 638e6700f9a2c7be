"""Reference log_softmax / softmax / nll_loss against torch 2.13 in float64, forward and backward."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from _oracle import IGNORES, SHAPES, assert_close, index_case, run_torch  # noqa: E402

import xentlib.reference as ref  # noqa: E402

INF, NAN = np.inf, np.nan
SPECIAL_ROWS = {
    "huge": [1e4, 0.0, -1e4],
    "partial_minus_inf": [0.5, -INF, 1.5],
    "all_minus_inf": [-INF, -INF, -INF],
    "plus_inf": [0.0, INF, 1.0],
    "nan": [0.0, NAN, 1.0],
}
SOFTMAXES = [
    (ref.log_softmax, ref.log_softmax_backward, F.log_softmax),
    (ref.softmax, ref.softmax_backward, F.softmax),
]


def _check_softmax(x, dim, ours, ours_backward, theirs):
    out, g, grads = run_torch(lambda x: theirs(x, dim), {"x": x}, grad=("x",))
    ours_out = ours(x, dim)
    assert_close(ours_out, out, "forward")
    assert_close(ours_backward(g, ours_out, dim), grads["x"], "backward")


@pytest.mark.parametrize("ours, ours_backward, theirs", SOFTMAXES, ids=["log_softmax", "softmax"])
@pytest.mark.parametrize(
    "shape, dim",
    [((), 0), ((), -1), ((5,), 0), ((3, 4), 0), ((3, 4), 1), ((3, 4), -1), ((2, 3, 4), 1), ((2, 3, 4), -1)],
)
def test_softmax_random(ours, ours_backward, theirs, shape, dim):
    x = np.random.default_rng(0).normal(size=shape) * 3
    _check_softmax(x, dim, ours, ours_backward, theirs)


@pytest.mark.parametrize("ours, ours_backward, theirs", SOFTMAXES, ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("row", list(SPECIAL_ROWS.values()), ids=list(SPECIAL_ROWS))
def test_softmax_non_finite(ours, ours_backward, theirs, row):
    x = np.array([row, [0.1, 0.2, 0.3]])  # the second row must stay finite
    _check_softmax(x, 1, ours, ours_backward, theirs)


@pytest.mark.parametrize("ours, ours_backward, theirs", SOFTMAXES, ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("shape, dim", [((0, 3), 1), ((3, 0), 1), ((0,), 0)])
def test_softmax_empty(ours, ours_backward, theirs, shape, dim):
    _check_softmax(np.zeros(shape), dim, ours, ours_backward, theirs)


@pytest.mark.parametrize("ours, ours_backward, theirs", SOFTMAXES, ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_softmax_implicit_dim(ours, ours_backward, theirs, shape):
    x = np.random.default_rng(1).normal(size=shape)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        expected = theirs(torch.from_numpy(x))
    assert_close(ours(x), expected, "dim=None")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ignore", IGNORES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_loss(shape, ignore, weighted, reduction):
    x, t, w, ignore_index = index_case(shape, ignore, weighted, np.random.default_rng(2))
    opts = dict(weight=w, ignore_index=ignore_index, reduction=reduction)
    out, g, grads = run_torch(lambda x, t, w: F.nll_loss(x, t, **{**opts, "weight": w}), dict(x=x, t=t, w=w), ("x",))
    assert_close(ref.nll_loss(x, t, **opts), out, "loss")
    assert_close(ref.nll_loss_backward(g, x, t, **opts), grads["x"], "grad input")


@pytest.mark.parametrize(
    "weight, target",
    [([0.0, 0.0, 1.0], [0, 1, 0, 1]), ([1.0, -1.5, 2.0], [0, 1, 1, 2])],
    ids=["selected_weights_zero", "weights_cancel"],
)
def test_nll_loss_degenerate_weights(weight, target):
    """Weighted count 0: the 'mean' is 0/0 = NaN or x/0 = +-inf, the gradient non-finite at the targets."""
    x, t, w = np.random.default_rng(3).normal(size=(4, 3)), np.array(target), np.array(weight)
    out, g, grads = run_torch(lambda x, t, w: F.nll_loss(x, t, w), dict(x=x, t=t, w=w), ("x",))
    assert_close(ref.nll_loss(x, t, w), out, "loss")
    assert_close(ref.nll_loss_backward(g, x, t, w), grads["x"], "grad input")
