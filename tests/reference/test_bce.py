"""Reference binary_cross_entropy (on probabilities and on logits) against torch 2.13 in float64."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from _oracle import assert_close, run_torch  # noqa: E402

import xentlib.reference as ref  # noqa: E402

SHAPE = (4, 3)
# Weights broadcast right-aligned to the input's shape (4, 3): per class, per row, scalar, full.
WEIGHT_SHAPES = {"none": None, "per_class": (3,), "per_row": (4, 1), "scalar": (), "full": SHAPE}


def _weight(kind, rng):
    shape = WEIGHT_SHAPES[kind]
    return None if shape is None else rng.uniform(0.2, 2.0, size=shape)


def check_bce(x, y, ours, ours_backward, theirs, **opts):
    """Forward, input and target gradients of a BCE variant against torch (weights are not differentiable)."""
    out, g, grads = run_torch(lambda x, y: theirs(x, y, **opts), dict(x=x, y=y), grad=("x", "y"))
    ref_opts = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    assert_close(ours(x, y, **ref_opts), out, "loss")
    back = ours_backward(g, x, y, **ref_opts)
    assert_close(back.input, grads["x"], "grad input")
    assert_close(back.target, grads["y"], "grad target")


def _tensor(a):
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))


@pytest.mark.parametrize("weight", list(WEIGHT_SHAPES), ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [SHAPE, (0, 3)], ids=str)
def test_binary_cross_entropy(weight, reduction, shape):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.01, 0.99, size=shape), rng.uniform(0.0, 1.0, size=shape)
    w = _weight(weight, rng) if shape == SHAPE else None
    check_bce(
        x, y, ref.binary_cross_entropy, ref.binary_cross_entropy_backward, F.binary_cross_entropy,
        weight=_tensor(w), reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_cross_entropy_edges(reduction):
    """x at exactly 0 and 1 against y = 0, 0.5, 1: logs clamped at -100, gradient eps float32(1e-12),
    target gradient unclamped (+-inf); also a tiny x where log(1 - x) must not round to 0."""
    x = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1e-8, 1.0 - 1e-8])
    y = np.array([0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    check_bce(
        x, y, ref.binary_cross_entropy, ref.binary_cross_entropy_backward, F.binary_cross_entropy,
        reduction=reduction,
    )  # fmt: skip


POS_WEIGHT_CASES = {
    "none": (SHAPE, None),
    "per_class": (SHAPE, (3,)),
    "per_row": (SHAPE, (4, 1)),
    "scalar": (SHAPE, ()),
    "full": (SHAPE, SHAPE),
    "nchw_channels": ((2, 3, 4, 5), (3, 1, 1)),  # pos_weight over C of an NCHW input
    "nchw_last_dim": ((2, 3, 4, 5), (5,)),  # (C,)-style vector broadcasting over W instead
}


@pytest.mark.parametrize("case", list(POS_WEIGHT_CASES), ids=str)
@pytest.mark.parametrize("weight", ["none", "per_class"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_cross_entropy_with_logits(case, weight, reduction):
    rng = np.random.default_rng(1)
    shape, pos_shape = POS_WEIGHT_CASES[case]
    x, y = rng.normal(size=shape) * 3, rng.uniform(0.0, 1.0, size=shape)
    w = None if weight == "none" else rng.uniform(0.2, 2.0, size=shape[-1])
    pos_weight = None if pos_shape is None else rng.uniform(0.0, 3.0, size=pos_shape)
    check_bce(
        x, y, ref.binary_cross_entropy_with_logits, ref.binary_cross_entropy_with_logits_backward,
        F.binary_cross_entropy_with_logits,
        weight=_tensor(w), reduction=reduction, pos_weight=_tensor(pos_weight),
    )  # fmt: skip


@pytest.mark.parametrize("pos_weight", [None, 1.0, 2.5, -0.5])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_binary_cross_entropy_with_logits_extremes(pos_weight, reduction):
    """Huge and infinite logits: stable where torch is stable, NaN exactly where torch's formula gives
    0 * inf; targets outside [0, 1] and an empty input are accepted."""
    x = np.array([-1e4, 1e4, 30.0, -30.0, np.inf, -np.inf, np.inf, -np.inf, 0.5, 0.5])
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 2.0, -1.0])
    pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float64)
    for xs, ys in ((x, y), (np.zeros(0), np.zeros(0))):
        check_bce(
            xs, ys, ref.binary_cross_entropy_with_logits, ref.binary_cross_entropy_with_logits_backward,
            F.binary_cross_entropy_with_logits, reduction=reduction, pos_weight=pw,
        )  # fmt: skip
