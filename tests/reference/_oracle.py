"""Torch as the oracle for the NumPy reference: the comparison helper, float64 torch runners, test data."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import xentlib.reference as ref  # noqa: E402

# Both sides compute in float64 with the same formulas up to reordering: agreement is to ~1e-15 relative.
RTOL, ATOL = 1e-10, 1e-12


def assert_close(ours, theirs, what: str = "", rtol: float = RTOL, atol: float = ATOL) -> None:
    """The reference value `ours` equals torch's `theirs`: same shape, same NaN and +-inf positions,
    finite values within rtol/atol (exactly equal for integer and boolean results). None only equals None."""
    if ours is None or theirs is None:
        assert ours is None and theirs is None, f"{what}: reference gives {ours!r}, torch gives {theirs!r}"
        return
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach().numpy()
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != torch's {theirs.shape}"
    if ours.dtype.kind in "biu" or theirs.dtype.kind in "biu":
        np.testing.assert_array_equal(ours, theirs, err_msg=what)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def to_torch(a, requires_grad: bool = False):
    """NumPy -> torch: integer arrays stay int64 (class indices), everything else becomes float64."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return torch.from_numpy(a.astype(np.int64))
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def run_torch(fn, args: dict, grad: tuple = (), seed: int = 0):
    """Evaluate `fn(**args)` with float64 tensors and backpropagate a random grad_output.

    Returns (output, grad_output, {name: gradient}) as NumPy arrays; grad_output is what the reference's
    backward receives, drawn away from 1 so that the scaling by the incoming gradient is tested too.
    """
    tensors = {name: to_torch(a, requires_grad=name in grad) for name, a in args.items()}
    out = fn(**tensors)
    grad_output = torch.from_numpy(np.random.default_rng(seed).uniform(0.5, 1.5, tuple(out.shape)))
    grads = {}
    if grad:
        leaves = [tensors[name] for name in grad]
        found = torch.autograd.grad(out, leaves, grad_output, allow_unused=True)
        grads = {name: None if g is None else g.numpy() for name, g in zip(grad, found, strict=True)}
    return out.detach().numpy(), grad_output.numpy(), grads


def index_case(shape, ignore, weighted, rng):
    """(input, target, weight, ignore_index) for nll_loss and class-index cross_entropy tests.

    ignore: 'none' (default -100, nothing ignored), 'negative' (-1 on ~1/3 of the rows), 'equal_C'
    (ignore_index = C on ~1/3 of the rows), 'class_value' (ignore_index = 2, a real class) or 'all'.
    """
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    row_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = rng.integers(0, num_classes, size=row_shape)
    ignore_index = {"negative": -1, "equal_C": num_classes, "class_value": 2}.get(ignore, -100)
    if ignore in ("negative", "equal_C"):
        target = np.where(rng.random(row_shape) < 0.35, ignore_index, target)
    if ignore == "all":
        target = np.full(row_shape, ignore_index)
    weight = rng.uniform(0.2, 2.0, num_classes) if weighted else None
    return rng.normal(size=shape) * 2, np.asarray(target, dtype=np.int64), weight, ignore_index


SHAPES = [(13,), (1, 13), (7, 1), (7, 13), (7, 13, 5, 3), (0, 13)]
IGNORES = ["none", "negative", "equal_C", "class_value", "all"]
SMOOTHINGS = [0.0, 0.1, 1.0]
NO_SMOOTHING = [-0.5, float("nan")]  # negative or NaN label_smoothing silently means none


def probability_case(shape, weighted, rng):
    """Random logits, unnormalized (even negative) probability targets and class weights."""
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    weight = rng.uniform(0.2, 2.0, num_classes) if weighted else None
    return rng.normal(size=shape) * 2, rng.uniform(-0.2, 1.0, size=shape), weight


def torch_cross_entropy(x, t, w, ignore_index=-100, reduction="mean", label_smoothing=0.0, **extensions):
    """torch's cross_entropy, plus the extensions composed by hand from their definitions:
    y = softcap tanh(x / softcap); row loss + z_loss lse(y)^2 on counted rows; 'mean' divides by the weighted
    count (class indices) or the row count (probabilities); 'sum' / normalizer."""
    z_loss, softcap, normalizer = (extensions.get(k) for k in ("z_loss", "softcap", "normalizer"))
    if not (z_loss or softcap or normalizer is not None):
        return F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    y = x if softcap is None else softcap * torch.tanh(x / softcap)
    rows = F.cross_entropy(y, t, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    probabilities = t.shape == x.shape
    counted = torch.ones(rows.shape, dtype=torch.bool) if probabilities else t != ignore_index
    if z_loss:
        rows = rows + torch.where(counted, z_loss * torch.logsumexp(y, dim=0 if x.ndim == 1 else 1) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum() if normalizer is None else rows.sum() / float(normalizer)
    if probabilities:
        return rows.sum() / rows.numel()
    class_weight = torch.ones(x.shape[0 if x.ndim == 1 else 1], dtype=x.dtype) if w is None else w
    return rows.sum() / torch.where(counted, class_weight[torch.where(counted, t, 0)], 0.0).sum()


def check_cross_entropy(x, t, w=None, **opts):
    """Forward and every gradient of the reference against torch (target/weight grads for probabilities)."""
    probabilities = np.shape(t) == np.shape(x)
    grad = (("x", "t") + (("w",) if w is not None else ())) if probabilities else ("x",)
    out, g, grads = run_torch(lambda x, t, w: torch_cross_entropy(x, t, w, **opts), dict(x=x, t=t, w=w), grad)
    assert_close(ref.cross_entropy(x, t, w, **opts), out, "loss")
    ours = ref.cross_entropy_backward(g, x, t, w, **opts)
    assert_close(ours.input, grads["x"], "grad input")
    assert_close(ours.target, grads.get("t"), "grad target")
    assert_close(ours.weight, grads.get("w"), "grad weight")
