"""xentlib.linear_cross_entropy against float64 oracles: torch's `cross_entropy(x @ W.T + b)`, the reference.

Every case goes through `check_linear`, which runs xentlib on fresh copies of the inputs, then
  (a) torch in float64: `F.cross_entropy` on the materialized logits, the extensions written out beside it
      (softcap before everything, z_loss * lse^2 on every counted row, normalizer dividing the sum), and
  (b) `xentlib.reference.linear_cross_entropy(_backward)` (+ `cross_entropy_stats` for return_stats),
and compares the loss and the gradient of every leaf that requires grad under a random grad_output
(lse and entropy get random gradients of their own when return_stats=True).
`shift=True` is checked against slicing `x[..., :-1, :]` and `t[..., 1:]` in the oracles.
Also here: chunk sizes agree, errors, the nn module against torch's, double backward, bfloat16 accuracy
against torch's own bfloat16 error, and a dispatch-mode check that no (N, V)-sized buffer is ever allocated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_error, random_like
from torch.utils._python_dispatch import TorchDispatchMode

import xentlib
import xentlib.nn
from xentlib import reference

# (rtol, atol) of our result against the float64 oracles, by our dtype.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 2e-6)}
REDUCTIONS = ("none", "mean", "sum")


# ------------------------------------------------------------------------------------------------------------
# cases and oracles
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    x: torch.Tensor  # (*lead, D)
    weight: torch.Tensor  # (V, D)
    target: torch.Tensor  # lead (indices) or (*lead, V) (probabilities)
    bias: torch.Tensor | None
    class_weight: torch.Tensor | None

    def tensors(self):
        return self.x, self.weight, self.target, self.bias, self.class_weight


def make_case(
    lead=(10,),
    hidden=5,
    vocab=11,
    kind="index",
    dtype=torch.float64,
    bias=True,
    class_weight=False,
    ignore_every=0,
    ignore_index=-100,
    grad_target=False,
    scale=1.0,
    seed=0,
) -> Case:
    """Random leaves: x, weight, bias require grad; probability target and class weight when `grad_target`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    x = (randn(*lead, hidden) * scale).to(dtype).requires_grad_()
    w = (randn(vocab, hidden) * scale).to(dtype).requires_grad_()
    b = randn(vocab).to(dtype).requires_grad_() if bias else None
    if kind == "index":
        t = torch.randint(0, vocab, lead, generator=g)
        if ignore_every:
            t.view(-1)[::ignore_every] = ignore_index
    else:
        t = torch.rand(*lead, vocab, generator=g, dtype=torch.float64)
        t = (t / t.sum(-1, keepdim=True)).to(dtype).requires_grad_(grad_target)
    cw = None
    if class_weight:
        cw = (torch.rand(vocab, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        cw.requires_grad_(grad_target and kind == "prob")
    return Case(x, w, t, b, cw)


def fresh(t, dtype=None):
    """An independent leaf with the same values and requires_grad (optionally cast: floating tensors only)."""
    if t is None:
        return None
    out = t.detach().clone()
    if dtype is not None and out.is_floating_point():
        out = out.to(dtype)
    return out.requires_grad_(t.requires_grad)


def shifted(x, t, shift):
    """The oracles' view of shift=True: input positions :-1 predict target positions 1:."""
    if not shift:
        return x, t
    return x[..., :-1, :], (t[..., 1:, :] if t.is_floating_point() else t[..., 1:])


def torch_oracle(x, w, t, b, cw, opts):
    """float64 torch: F.cross_entropy on the logits, extensions written out. Returns (loss, lse, entropy)."""
    ignore_index, reduction = opts.get("ignore_index", -100), opts.get("reduction", "mean")
    smoothing, z_loss = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0)
    softcap, normalizer = opts.get("softcap"), opts.get("normalizer")
    x, t = shifted(x, t, opts.get("shift", False))
    vocab = w.shape[0]
    logits = x @ w.T if b is None else x @ w.T + b
    lead = logits.shape[:-1]
    y = logits.reshape(-1, vocab)
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)  # the cap comes before everything
    prob = t.is_floating_point()
    rows_t = t.reshape(-1, vocab) if prob else t.reshape(-1)
    kwargs = dict(weight=cw, ignore_index=ignore_index, label_smoothing=smoothing)
    lse = torch.logsumexp(y, 1)
    entropy = -(y.softmax(1) * y.log_softmax(1)).sum(1)
    counted = torch.ones_like(lse, dtype=torch.bool) if prob else rows_t != ignore_index
    z_rows = z_loss * torch.where(counted, lse**2, 0.0)  # z_loss * lse^2 on every counted row, unweighted
    if reduction == "none":
        loss = (F.cross_entropy(y, rows_t, reduction="none", **kwargs) + z_rows).reshape(lead)
    elif reduction == "sum":
        loss = F.cross_entropy(y, rows_t, reduction="sum", **kwargs) + z_rows.sum()
        loss = loss if normalizer is None else loss / normalizer
    else:  # 'mean': the z-loss shares the loss's own denominator (weighted count; rows for probabilities)
        if prob:
            denominator = torch.tensor(float(rows_t.shape[0]), dtype=lse.dtype)
        else:
            per_class = torch.ones(vocab, dtype=lse.dtype) if cw is None else cw
            denominator = torch.where(counted, per_class[rows_t.clamp(0, vocab - 1)], 0.0).sum()
        loss = F.cross_entropy(y, rows_t, reduction="mean", **kwargs) + z_rows.sum() / denominator
    return loss, lse.reshape(lead), entropy.reshape(lead)


def reference_options(opts):
    keys = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap")
    out = {k: opts[k] for k in keys if k in opts}
    if opts.get("normalizer") is not None:
        out["normalizer"] = float(opts["normalizer"])
    return out


def numpy(t):
    return None if t is None else t.detach().double().numpy() if t.is_floating_point() else t.numpy()


def reference_oracle(case: Case, opts, grad_output):
    """NumPy float64: (loss, grads by name, stats), the shifted rows put back in place."""
    x, t = shifted(case.x, case.target, opts.get("shift", False))
    args = (numpy(x), numpy(case.weight), numpy(t), numpy(case.bias))
    kwargs = dict(class_weight=numpy(case.class_weight), **reference_options(opts))
    loss = reference.linear_cross_entropy(*args, **kwargs)
    grads = reference.linear_cross_entropy_backward(numpy(grad_output), *args, **kwargs)
    grad_x, grad_t = grads.input, grads.target
    if opts.get("shift", False):
        grad_x = np.zeros(case.x.shape)
        grad_x[..., :-1, :] = grads.input
        if grads.target is not None:
            grad_t = np.zeros(case.target.shape)
            grad_t[..., 1:, :] = grads.target
    by_name = dict(x=grad_x, weight=grads.weight, bias=grads.bias, target=grad_t, class_weight=grads.class_weight)
    logits = args[0] @ args[1].T + (0.0 if args[3] is None else args[3])
    rows_t = args[2].reshape(-1, logits.shape[-1]) if t.is_floating_point() else args[2].reshape(-1)
    stats = reference.cross_entropy_stats(logits.reshape(-1, logits.shape[-1]), rows_t, **kwargs_for_stats(kwargs))
    lead = logits.shape[:-1]
    return loss, by_name, type(stats)(*(s.reshape(lead) for s in stats))


def kwargs_for_stats(kwargs):
    out = dict(kwargs)
    out["weight"] = out.pop("class_weight")
    return out


def assert_close(actual, expected, what, tol):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {expected.shape}"
    rtol, atol = tol
    torch.testing.assert_close(
        actual.detach().double(), expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def check_linear(case: Case, *, seed=0, tol=None, **opts):
    """Run xentlib on `case` with `opts`; compare loss, stats and every gradient with both oracles."""
    names = ("x", "weight", "target", "bias", "class_weight")
    ours_in = [fresh(t) for t in case.tensors()]
    x, w, t, b, cw = ours_in
    out = xentlib.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **opts)
    loss, stats = out if opts.get("return_stats") else (out, None)
    tol = tol or TOL[case.x.dtype]
    assert loss.dtype == case.x.dtype, f"loss dtype {loss.dtype}"

    theirs_in = [fresh(t, torch.float64) for t in case.tensors()]
    t_loss, t_lse, t_entropy = torch_oracle(*theirs_in, opts)
    assert_close(loss, t_loss, "loss vs torch", tol)

    grad_output = random_like(t_loss, seed)
    ref_loss, ref_grads, ref_stats = reference_oracle(case, opts, grad_output)
    assert_close(loss, ref_loss, "loss vs reference", tol)

    ours_total, theirs_total = [(loss.double() * grad_output).sum()], [(t_loss * grad_output).sum()]
    if stats is not None:
        check_stats(stats, ref_stats, case, tol)
        g_lse, g_entropy = random_like(t_lse, seed + 1), random_like(t_entropy, seed + 2)
        ours_total += [(stats.lse.double() * g_lse).sum(), (stats.entropy.double() * g_entropy).sum()]
        theirs_total += [(t_lse * g_lse).sum(), (t_entropy * g_entropy).sum()]
    leaves = [i for i, t in enumerate(ours_in) if t is not None and t.requires_grad]
    if not leaves:
        return out
    ours_grads = torch.autograd.grad(sum(ours_total), [ours_in[i] for i in leaves], allow_unused=True)
    theirs_grads = torch.autograd.grad(sum(theirs_total), [theirs_in[i] for i in leaves], allow_unused=True)
    for i, ours_g, theirs_g in zip(leaves, ours_grads, theirs_grads, strict=True):
        name = names[i]
        assert ours_g is not None, f"no gradient for {name}"
        assert ours_g.dtype == case.tensors()[i].dtype, f"grad {name} dtype {ours_g.dtype}"
        theirs_g = torch.zeros_like(theirs_in[i]) if theirs_g is None else theirs_g
        assert_close(ours_g, theirs_g, f"grad {name} vs torch", tol)
        if stats is None:  # the reference's backward covers the loss alone
            assert_close(ours_g, ref_grads[name], f"grad {name} vs reference", tol)
    return out


def check_stats(stats, ref_stats, case: Case, tol):
    """Values against the reference; dtypes as `xentlib.functional.cross_entropy(..., return_stats=True)`."""
    float_dtype = torch.float64 if case.x.dtype == torch.float64 else torch.float32
    expected_dtypes = dict(lse=float_dtype, loss=case.x.dtype, argmax=torch.int64, correct=torch.bool)
    expected_dtypes["entropy"] = float_dtype
    for name, value in stats._asdict().items():
        assert value.dtype == expected_dtypes[name], f"stats.{name} dtype {value.dtype}"
        expected = getattr(ref_stats, name)
        if name in ("argmax", "correct"):
            assert value.tolist() == np.asarray(expected).tolist(), f"stats.{name}"
        else:
            assert_close(value, expected, f"stats.{name}", tol)
    assert not stats.loss.requires_grad and not stats.argmax.requires_grad


# ------------------------------------------------------------------------------------------------------------
# every option, both target kinds, every reduction
# ------------------------------------------------------------------------------------------------------------
OPTIONS = {
    "plain": {},
    "class_weight": dict(class_weight=True),
    "ignore": dict(ignore_every=3),
    "ignore_index_3": dict(ignore_every=4, ignore_index=3),
    "smoothing": dict(label_smoothing=0.2),
    "weight_smoothing_ignore": dict(class_weight=True, label_smoothing=0.15, ignore_every=4),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.5),
    "everything": dict(class_weight=True, label_smoothing=0.1, ignore_every=3, z_loss=3e-3, softcap=4.0),
}
CASE_KEYS = ("class_weight", "ignore_every", "ignore_index")


def split(option: str, kind: str):
    """(make_case kwargs, linear_cross_entropy kwargs) for a named option set; ignores only for indices."""
    spec = dict(OPTIONS[option])
    case_kwargs = {k: spec.pop(k) for k in CASE_KEYS if k in spec}
    if "ignore_index" in case_kwargs:
        spec["ignore_index"] = case_kwargs["ignore_index"]
    if kind == "prob":  # ignored rows are a class-index notion (torch refuses ignore_index >= 0 here)
        case_kwargs.pop("ignore_every", None)
        spec.pop("ignore_index", None)
    return case_kwargs, spec


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_options_match_torch_and_reference(kind, option, reduction):
    """N = 10 rows in chunks of 3 (the last one short), V = 11, with and without bias."""
    case_kwargs, opts = split(option, kind)
    for seed, bias in enumerate((True, False)):
        case = make_case(kind=kind, bias=bias, seed=seed, scale=1.5, **case_kwargs)
        check_linear(case, reduction=reduction, chunk_size=3, seed=seed, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "class_weight", "everything"])
def test_probability_target_and_class_weight_gradients(option, reduction):
    """Probability targets and class weights that require grad (the rare path) get their gradients too."""
    case_kwargs, opts = split(option, "prob")
    case = make_case(kind="prob", grad_target=True, **case_kwargs)
    check_linear(case, reduction=reduction, chunk_size=4, **opts)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_inputs(kind, dtype):
    case = make_case(lead=(3, 7), hidden=6, vocab=23, kind=kind, dtype=dtype, class_weight=True, seed=5)
    check_linear(case, label_smoothing=0.05, chunk_size=5)
    check_linear(case, reduction="none", z_loss=1e-3, softcap=3.0, chunk_size=5)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch-mm"])
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(shift=True, label_smoothing=0.1), dict(reduction="none", z_loss=1e-3), dict(return_stats=True)],
    ids=["plain", "shift-smoothing", "none-zloss", "stats"],
)
def test_float32_chunk_matmuls_through_onednn_or_torch_mm(onednn, opts, monkeypatch):
    """Float32 on CPU: the two chunk matmuls that read W (Z = X W^T + b, dX = dZ W) go through oneDNN where
    that is faster (not on Intel CPUs: docs/numerics.md section 9), else torch.mm. Both ways match torch and the
    reference, with ignored rows, the shifted (index_select) rows and the backward that sweeps again."""
    from xentlib import linear

    if onednn and not linear._ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(linear, "_PREFER_ONEDNN", onednn)
    case = make_case(lead=(3, 7), hidden=6, vocab=23, dtype=torch.float32, class_weight=True, ignore_every=4, seed=7)
    with AllocationLog() as log:
        check_linear(case, chunk_size=5, **opts)
    assert any("mkldnn._linear_pointwise" in op for op, *_ in log.outputs) == onednn


def test_class_index_target_with_class_weight_requiring_grad_raises_like_torch():
    case = make_case(class_weight=True)
    cw = case.class_weight.detach().requires_grad_()
    logits = case.x @ case.weight.T + case.bias
    assert_same_error(
        lambda: xentlib.linear_cross_entropy(case.x, case.weight, case.target, linear_bias=case.bias, weight=cw),
        lambda: F.cross_entropy(logits, case.target, weight=cw),
    )


def test_public_names_are_the_same_function():
    assert xentlib.linear_cross_entropy is xentlib.functional.linear_cross_entropy


def test_no_legacy_arguments_like_torch():
    """torch 2.13's F.linear_cross_entropy has no size_average/reduce and takes only (input, linear_weight,
    target) positionally: both libraries raise TypeError for the old forms."""
    case = make_case()
    for call in (
        lambda f: f(case.x, case.weight, case.target, reduce=False),
        lambda f: f(case.x, case.weight, case.target, case.bias),
    ):
        with pytest.raises(TypeError):
            call(F.linear_cross_entropy)
        with pytest.raises(TypeError):
            call(xentlib.linear_cross_entropy)


def test_torch_signature_and_options():
    """Keyword for keyword torch's call, including `options`, gives torch's result."""
    case = make_case(class_weight=True, ignore_every=3)
    kwargs = dict(linear_bias=case.bias, weight=case.class_weight, reduction="sum", label_smoothing=0.1)
    expected = F.linear_cross_entropy(case.x, case.weight, case.target, **kwargs)
    options = (
        torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)
        if hasattr(torch.nn, "LinearCrossEntropyOptions")
        else None
    )
    for opts in (None, options):
        assert_close(
            xentlib.linear_cross_entropy(case.x, case.weight, case.target, options=opts, **kwargs),
            expected,
            "options",
            TOL[torch.float64],
        )
    with pytest.raises(TypeError, match="shift must be a bool"):
        xentlib.linear_cross_entropy(case.x, case.weight, case.target, shift=2)


# ------------------------------------------------------------------------------------------------------------
# normalizer, return_stats, ignored rows
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalizer", [7, 2.5, "tensor"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_normalizer_divides_the_sum(kind, normalizer):
    normalizer = torch.tensor(13.0, dtype=torch.float64) if normalizer == "tensor" else normalizer
    case = make_case(kind=kind, class_weight=True, ignore_every=3 if kind == "index" else 0)
    check_linear(case, reduction="sum", normalizer=normalizer, z_loss=1e-2, chunk_size=4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_normalizer_needs_reduction_sum(reduction):
    case = make_case()
    with pytest.raises(ValueError, match="normalizer"):
        xentlib.linear_cross_entropy(case.x, case.weight, case.target, reduction=reduction, normalizer=4.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "everything"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_return_stats_values_and_gradients(kind, option, reduction):
    """lse / loss / argmax / correct / entropy against the reference; lse, entropy gradients against torch."""
    case_kwargs, opts = split(option, kind)
    case = make_case(lead=(2, 6), kind=kind, seed=3, scale=1.5, **case_kwargs)
    _, stats = check_linear(case, reduction=reduction, return_stats=True, chunk_size=5, **opts)
    assert stats.lse.shape == stats.correct.shape == case.x.shape[:-1]


def test_stats_correct_is_false_on_ignored_rows_and_true_on_hits():
    """Targets set to the predicted class: every counted row is correct, every ignored row is not."""
    case = make_case(lead=(12,), seed=4)
    predicted = (case.x @ case.weight.T + case.bias).argmax(-1)
    target = predicted.clone()
    target[::4] = -100
    _, stats = xentlib.linear_cross_entropy(case.x, case.weight, target, linear_bias=case.bias, return_stats=True)
    assert stats.correct.tolist() == (target != -100).tolist()
    assert stats.argmax.tolist() == predicted.tolist()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    """'mean' of nothing is NaN (0/0, as torch), 'sum' and 'none' are 0; every gradient is exactly 0."""
    case = make_case(class_weight=True)
    case.target.fill_(-100)
    out = check_linear(case, reduction=reduction, chunk_size=3, z_loss=1e-2, label_smoothing=0.1)
    if reduction == "mean":
        assert out.isnan()
    else:
        assert not out.any()
    x, w, b = (fresh(t) for t in (case.x, case.weight, case.bias))
    loss = xentlib.linear_cross_entropy(x, w, case.target, linear_bias=b, reduction=reduction)
    grads = torch.autograd.grad(loss.sum(), [x, w, b])
    assert all(not g.isnan().any() and not g.any() for g in grads), "ignored rows must give exact zeros"
    _, stats = check_linear(case, reduction=reduction, return_stats=True, chunk_size=3)
    assert not stats.correct.any()


# ------------------------------------------------------------------------------------------------------------
# shapes, shift, chunks
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_leading_shapes(lead, kind):
    case = make_case(lead=lead, kind=kind, seed=len(lead), class_weight=True)
    for reduction in REDUCTIONS:
        out = check_linear(case, reduction=reduction, label_smoothing=0.1, chunk_size=2)
        assert out.shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("lead", [(6,), (2, 5), (2, 3, 4)])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_shift_matches_slicing(lead, kind):
    """shift=True == the loss of x[..., :-1, :] against t[..., 1:]; the last position gets a zero gradient."""
    case = make_case(lead=lead, kind=kind, class_weight=True, ignore_every=5, grad_target=kind == "prob")
    for reduction in REDUCTIONS:
        out = check_linear(case, shift=True, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=3)
        assert out.shape == ((*lead[:-1], lead[-1] - 1) if reduction == "none" else ())
    check_linear(case, shift=True, return_stats=True, softcap=3.0, chunk_size=4)


def test_shift_with_a_single_position_gives_an_empty_loss():
    """T = 1: nothing to predict, like slicing gives (torch: 'mean' of no rows is NaN)."""
    case = make_case(lead=(2, 1))
    for reduction in REDUCTIONS:
        check_linear(case, shift=True, reduction=reduction)


@pytest.mark.parametrize(
    ("lead", "hidden", "vocab"),
    [((0,), 4, 9), ((1,), 4, 9), ((13,), 1, 7), ((17,), 3, 1), ((9,), 8, 2), ((33,), 5, 37)],
    ids=["N=0", "N=1", "D=1", "V=1", "V=2", "V=37"],
)
def test_odd_shapes(lead, hidden, vocab):
    for kind in ("index", "prob"):
        case = make_case(lead=lead, hidden=hidden, vocab=vocab, kind=kind, class_weight=True)
        for reduction in REDUCTIONS:
            check_linear(case, reduction=reduction, chunk_size=4, label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_chunk_sizes_agree(kind, option):
    """chunk_size 1, 3 (13 = 4*3 + 1), >= N and the default give the same loss and gradients."""
    case_kwargs, opts = split(option, kind)
    case = make_case(lead=(13,), vocab=19, kind=kind, **case_kwargs)
    results = []
    for chunk_size in (1, 3, 13, 100, None):
        for reduction in ("none", "mean"):
            out = check_linear(case, reduction=reduction, chunk_size=chunk_size, **opts)
            x, w, b = (fresh(t) for t in (case.x, case.weight, case.bias))
            loss = xentlib.linear_cross_entropy(
                x,
                w,
                case.target,
                linear_bias=b,
                chunk_size=chunk_size,
                reduction=reduction,
                weight=case.class_weight,
                **opts,
            )
            results.append((out.detach(), *torch.autograd.grad(loss.sum(), [x, w, b])))
    first = results[:2]
    for i, result in enumerate(results[2:]):
        for a, e in zip(result, first[i % 2], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("ignored", [False, True])
def test_uninitialized_gradient_memory_is_overwritten(monkeypatch, ignored):
    """The first chunk writes the weight gradient over uninitialized memory: poison that memory with NaN so a
    chunk that added to it instead (or a row left unwritten) shows up."""
    real_empty_like = torch.empty_like

    def poisoned_empty_like(*args, **kwargs):
        return real_empty_like(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    case = make_case(lead=(11,), vocab=7, ignore_every=3 if ignored else 0)
    for chunk_size in (1, 4, None):
        check_linear(case, reduction="mean", chunk_size=chunk_size)


def test_non_contiguous_input_and_weight():
    case = make_case(lead=(4, 6))
    x = fresh(case.x.detach().transpose(0, 1).contiguous().transpose(0, 1))
    w = fresh(case.weight.detach().t().contiguous().t())
    assert not x.is_contiguous() and not w.is_contiguous()
    check_linear(dataclasses.replace(case, x=x, weight=w), reduction="none", chunk_size=5)
    check_linear(dataclasses.replace(case, x=x, weight=w), shift=True, chunk_size=5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_with_retain_graph(reduction):
    """The gradients saved in forward are handed out (and scaled in place) once; a second backward through the
    retained graph must still see unscaled values: two different grad_outputs, each against torch."""
    case = make_case(lead=(3, 4), class_weight=True, ignore_every=3)
    opts = dict(reduction=reduction, label_smoothing=0.1, class_weight=case.class_weight)
    results = []
    for fn in (lambda *args: ours(*args, chunk_size=5, **opts), lambda *args: composite(*args, **opts)):
        x, w, b = (fresh(t) for t in (case.x, case.weight, case.bias))
        loss = fn(x, w, case.target, b)
        first = torch.autograd.grad(loss, [x, w, b], random_like(loss, 1), retain_graph=True)
        second = torch.autograd.grad(loss, [x, w, b], random_like(loss, 2), retain_graph=True)
        loss.backward(torch.ones_like(loss), retain_graph=True)
        loss.backward(torch.ones_like(loss))
        results.append((*first, *second, x.grad, w.grad, b.grad))
    for i, (a, e) in enumerate(zip(*results, strict=True)):
        assert_close(a, e, f"gradient {i}", TOL[torch.float64])


def test_no_gradient_needed():
    """Under no_grad and with leaves that do not require grad the loss is the same and carries no graph."""
    case = make_case(class_weight=True, ignore_every=3)
    expected = xentlib.linear_cross_entropy(*case.tensors()[:2], case.target, linear_bias=case.bias)
    with torch.no_grad():
        out = xentlib.linear_cross_entropy(*case.tensors()[:2], case.target, linear_bias=case.bias)
    detached = [t.detach() for t in (case.x, case.weight, case.bias)]
    out2 = xentlib.linear_cross_entropy(detached[0], detached[1], case.target, linear_bias=detached[2])
    assert not out.requires_grad and not out2.requires_grad
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out2, expected.detach(), rtol=0, atol=0)


def test_only_requested_gradients():
    """Only the weight requires grad (frozen input, e.g. a linear probe) and then only the input."""
    case = make_case(lead=(3, 4), class_weight=True)
    for need in ("x", "weight"):
        x, w, b = (fresh(t) for t in (case.x, case.weight, case.bias))
        x.requires_grad_(need == "x")
        w.requires_grad_(need == "weight")
        b.requires_grad_(False)
        check_linear(Case(x, w, case.target, b, case.class_weight), label_smoothing=0.1, chunk_size=5)


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------
def composite(x, w, t, b=None, *, class_weight=None, **kwargs):
    """torch's composite for any leading shape: F.linear, then cross_entropy on the flattened rows."""
    vocab = w.shape[0]
    logits = F.linear(x, w, b).reshape(-1, vocab)
    rows_t = t.reshape(-1, vocab) if t.is_floating_point() else t.reshape(-1)
    loss = F.cross_entropy(logits, rows_t, weight=class_weight, **kwargs)
    return loss.reshape(x.shape[:-1]) if kwargs.get("reduction") == "none" else loss


def ours(x, w, t, b=None, *, class_weight=None, **kwargs):
    return xentlib.linear_cross_entropy(x, w, t, linear_bias=b, weight=class_weight, **kwargs)


@pytest.mark.parametrize(
    "mistake",
    [
        "hidden_mismatch",
        "weight_dtype",
        "bias_dtype",
        "bias_shape",
        "target_rows",
        "target_int_on_2d",
        "prob_with_ignore_index",
    ],
)
def test_errors_like_the_composite(mistake):
    """The same exception type as `cross_entropy(x @ W.T + b)` raises for the same mistake."""
    x, w, b = torch.randn(6, 4), torch.randn(5, 4), torch.randn(5)
    t = torch.randint(0, 5, (6,))
    if mistake == "hidden_mismatch":
        w = torch.randn(5, 3)
    elif mistake == "weight_dtype":
        w = w.double()
    elif mistake == "bias_dtype":
        b = b.double()
    elif mistake == "bias_shape":
        b = torch.randn(4)
    elif mistake == "target_rows":
        t = torch.randint(0, 5, (7,))
    elif mistake == "target_int_on_2d":
        x, t = torch.randn(2, 3, 4), torch.randint(0, 5, (2, 4))
    kwargs = {}
    if mistake == "prob_with_ignore_index":
        t, kwargs = torch.rand(6, 5).softmax(-1), dict(ignore_index=1)
    assert_same_error(lambda: ours(x, w, t, b, **kwargs), lambda: composite(x, w, t, b, **kwargs))


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size(chunk_size):
    case = make_case()
    with pytest.raises(ValueError, match="chunk_size"):
        ours(case.x, case.weight, case.target, chunk_size=chunk_size)


def test_other_errors():
    case = make_case()
    with pytest.raises(RuntimeError):  # weight must be 2-D
        ours(case.x, case.weight[0], case.target)
    with pytest.raises(ValueError):  # shift needs a time dimension
        ours(case.x[0], case.weight, case.target[0], shift=True)
    with pytest.raises(ValueError):  # reduction names as in torch
        ours(case.x, case.weight, case.target, reduction="avg")
    with pytest.raises(RuntimeError):  # integer input
        ours(case.x.detach().long(), case.weight.detach().long(), case.target)


# ------------------------------------------------------------------------------------------------------------
# nn.LinearCrossEntropyLoss
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(bias=True, reduction="sum"),
        dict(bias=True, weight="classes", ignore_index=2, label_smoothing=0.1),
        dict(reduction="none", ignore_index=-100, weight="classes"),
    ],
    ids=["default", "bias-sum", "weight-ignore-smoothing", "none"],
)
def test_module_matches_torch_module_and_state_dict_round_trips(options):
    hidden, vocab = 6, 9
    options = dict(options)
    if options.get("weight") == "classes":
        options["weight"] = torch.rand(vocab, dtype=torch.float64) + 0.5
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(hidden, vocab, dtype=torch.float64, **options)
    mine = xentlib.nn.LinearCrossEntropyLoss(hidden, vocab, dtype=torch.float64, chunk_size=3, **options)
    assert isinstance(mine, torch.nn.LinearCrossEntropyLoss)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(10, hidden, dtype=torch.float64)  # torch's module takes (N, D) or (D,)
    t = torch.randint(0, vocab, (10,))
    t[0] = options.get("ignore_index", -100) or -100
    x_mine, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_mine, out_theirs = mine(x_mine, t), theirs(x_theirs, t)
    assert_close(out_mine, out_theirs, "module output", TOL[torch.float64])
    g = random_like(out_theirs, 1)
    mine_params, theirs_params = list(mine.parameters()), list(theirs.parameters())
    grads_mine = torch.autograd.grad(out_mine, [x_mine, *mine_params], g)
    grads_theirs = torch.autograd.grad(out_theirs, [x_theirs, *theirs_params], g)
    for i, (a, e) in enumerate(zip(grads_mine, grads_theirs, strict=True)):
        assert_close(a, e, f"module grad {i}", TOL[torch.float64])
    # and back: torch's module loads ours
    back = torch.nn.LinearCrossEntropyLoss(hidden, vocab, dtype=torch.float64, **options)
    back.load_state_dict(mine.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


OLD_TORCH_MODULE_CHECK = """
import torch
Real = torch.nn.LinearCrossEntropyLoss
del torch.nn.LinearCrossEntropyLoss  # as on torch < 2.13, which has no such module
import xentlib.nn
assert xentlib.nn.LinearCrossEntropyLoss.__mro__[1].__module__ == "xentlib.nn"
weight = torch.rand(9, dtype=torch.float64) + 0.5
for options in [dict(), dict(bias=True, weight=weight, ignore_index=2, label_smoothing=0.1, reduction="sum")]:
    torch.manual_seed(0)
    theirs = Real(6, 9, dtype=torch.float64, **options)
    torch.manual_seed(0)
    mine = xentlib.nn.LinearCrossEntropyLoss(6, 9, dtype=torch.float64, **options)
    for name in ["reduction", "ignore_index", "label_smoothing", "num_classes", "out_features", "options"]:
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key
    x, t = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 2, 8, 1, 2])
    assert torch.allclose(mine(x, t), theirs(x, t), rtol=1e-12, atol=1e-12)
for bad in [dict(weight=torch.ones(3)), dict(label_smoothing=1.5)]:
    messages = []
    for make in (Real, xentlib.nn.LinearCrossEntropyLoss):
        try:
            make(6, 9, **bad)
        except RuntimeError as err:
            messages.append(str(err))
    assert len(messages) == 2 and messages[0] == messages[1], messages
print("same as torch's module")
"""


def test_module_works_on_torch_without_its_own_module():
    """torch < 2.13 has no nn.LinearCrossEntropyLoss: xentlib's module then builds the same state itself (the
    import of xentlib failed on torch 2.11 before). Run in a fresh interpreter with the class removed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OLD_TORCH_MODULE_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "same as torch's module" in done.stdout, done.stderr[-3000:]


def test_module_extensions_and_normalizer():
    hidden, vocab = 4, 7
    mine = xentlib.nn.LinearCrossEntropyLoss(
        hidden,
        vocab,
        bias=True,
        dtype=torch.float64,
        reduction="sum",
        shift=True,
        z_loss=1e-2,
        softcap=3.0,
        chunk_size=2,
    )
    x = torch.randn(2, 5, hidden, dtype=torch.float64)
    t = torch.randint(0, vocab, (2, 5))
    out = mine(x, t, normalizer=6)
    expected = ours(
        x,
        mine.linear.weight,
        t,
        mine.linear.bias,
        reduction="sum",
        shift=True,
        z_loss=1e-2,
        softcap=3.0,
        normalizer=6,
    )
    assert_close(out, expected, "module with extensions", TOL[torch.float64])


# ------------------------------------------------------------------------------------------------------------
# double backward
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "opts"),
    [
        ("index", dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
        ("index", dict(reduction="none", chunk_size=2)),
        ("prob", dict(reduction="sum", normalizer=3.0)),
    ],
)
def test_gradcheck_and_gradgradcheck(kind, opts):
    case = make_case(lead=(3,), hidden=2, vocab=4, kind=kind, class_weight=True, seed=7)
    target = case.target.detach()
    if kind == "index":
        target[1] = -100

    def fn(x, w, b):
        return xentlib.linear_cross_entropy(x, w, target, linear_bias=b, weight=case.class_weight, **opts)

    inputs = tuple(fresh(t) for t in (case.x, case.weight, case.bias))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_double_backward_through_stats():
    case = make_case(lead=(3,), hidden=2, vocab=4, seed=8)

    def fn(x, w, b):
        loss, stats = xentlib.linear_cross_entropy(x, w, case.target, linear_bias=b, return_stats=True, chunk_size=2)
        return loss, stats.lse, stats.entropy

    inputs = tuple(fresh(t) for t in (case.x, case.weight, case.bias))
    assert torch.autograd.gradgradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------------------------
# bfloat16: at most torch's own error against float64
# ------------------------------------------------------------------------------------------------------------
def relative_error(value, truth):
    return float((value.double() - truth).norm() / truth.norm().clamp_min(1e-300))


def bf16_errors(kind, chunk_size, rows=1024, hidden=64, vocab=1000, smoothing=0.0):
    """Relative (Frobenius) errors against float64 of loss, dx, dW, db: (ours, torch's bf16 composite)."""
    case = make_case(lead=(rows,), hidden=hidden, vocab=vocab, kind=kind, dtype=torch.bfloat16, scale=0.6, seed=11)
    target = case.target.detach()

    def run(fn, dtype):
        x, w, b = (fresh(t, dtype) for t in (case.x, case.weight, case.bias))
        t = target.to(dtype) if kind == "prob" else target
        loss = fn(x, w, t, b)
        return [loss.detach(), *torch.autograd.grad(loss, [x, w, b])]

    def torch_composite(x, w, t, b):
        return F.cross_entropy(x @ w.T + b, t, label_smoothing=smoothing)

    def xentlib_linear(x, w, t, b):
        return xentlib.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=smoothing, chunk_size=chunk_size)

    truth = [v.double() for v in run(torch_composite, torch.float64)]
    mine, theirs = run(xentlib_linear, None), run(torch_composite, None)
    assert [v.dtype for v in mine] == [torch.bfloat16] * 4
    return [(relative_error(m, t), relative_error(e, t)) for m, e, t in zip(mine, theirs, truth, strict=True)]


GRAD_NAMES = ("loss", "grad x", "grad weight", "grad bias")


def assert_within(errors, factors):
    for name, (mine, theirs) in zip(GRAD_NAMES, errors, strict=True):
        factor = factors.get(name, 1.05)
        message = f"{name}: ours {mine:.3e} vs torch {theirs:.3e} ({mine / theirs:.2f}x, allowed {factor}x)"
        assert mine <= factor * theirs + 1e-4, message


@pytest.mark.parametrize("chunk_size", [128, 1024], ids=["8-chunks", "1-chunk"])
@pytest.mark.parametrize(("kind", "smoothing"), [("index", 0.0), ("index", 0.1), ("prob", 0.0)])
def test_bfloat16_error_at_most_torchs(kind, smoothing, chunk_size):
    """bf16 x, W, b (1024 x 64 x 1000): loss and gradients at most torch's bf16 error from float64 (relative
    Frobenius norm, 5% + 1e-4 slack), except the weight gradient in 8 chunks: at most 1.25x, see below."""
    errors = bf16_errors(kind, chunk_size=chunk_size, smoothing=smoothing)
    assert_within(errors, {"grad weight": 1.25} if chunk_size < 1024 else {})


def test_bfloat16_weight_gradient_with_the_default_chunks():
    """With the compiled CPU kernel the default chunk is a fifth of the rows, so the bf16 weight gradient is rounded
    five times (docs/numerics.md section 9): measured 1.04-1.06x torch's error here, not the float32 accumulation
    rounded once (a float32 V x D accumulator would cost more memory than the 0.25x-the-logits budget)."""
    from xentlib.backends import cpu_kernel

    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    assert_within(bf16_errors("index", chunk_size=None, smoothing=0.1), {"grad weight": 1.1})


# ------------------------------------------------------------------------------------------------------------
# memory: no (N, V) buffer, ever
# ------------------------------------------------------------------------------------------------------------
class AllocationLog(TorchDispatchMode):
    """Records (op, shape, storage bytes, storage address) of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        opdef = torch._library.custom_ops._maybe_get_opdef(func)
        if func.namespace == "xentlib" and opdef is not None:  # log the ops inside xentlib's own ops too
            with self:
                out = opdef._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                self.outputs.append((str(func), tuple(value.shape), storage.nbytes(), storage.data_ptr()))
        return out


@pytest.mark.parametrize(
    ("kind", "opts"),
    [
        ("index", dict()),
        ("index", dict(label_smoothing=0.1, class_weight=True, z_loss=1e-3, softcap=5.0)),
        ("index", dict(reduction="none", shift=True)),
        ("index", dict(return_stats=True)),
        ("prob", dict(label_smoothing=0.1)),
        ("prob", dict(reduction="none")),
    ],
)
def test_never_allocates_the_logits(kind, opts):
    """N = 96 rows, V = 40 classes, chunks of 8: no op output (forward or backward) owns N*V elements'
    storage; the largest new buffers are the inputs' gradients (N*D, V*D) and one chunk of logits (8*V)."""
    rows, hidden, vocab, chunk = 96, 16, 40, 8
    opts = dict(opts)
    case = make_case(
        lead=(2, rows // 2),
        hidden=hidden,
        vocab=vocab,
        kind=kind,
        dtype=torch.float32,
        class_weight=opts.pop("class_weight", False),
        ignore_every=5,
    )
    x, w, b = (fresh(t) for t in (case.x, case.weight, case.bias))
    target = case.target.detach()
    with AllocationLog() as log:
        out = ours(x, w, target, b, class_weight=case.class_weight, chunk_size=chunk, **opts)
        loss = out[0] if isinstance(out, tuple) else out
        loss.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    target_storage = target.untyped_storage().data_ptr()  # views of the (N, V) probability target are fine
    limit = rows * vocab * 4 // 2  # half the float32 logits; the biggest legitimate buffer is a quarter of it
    too_big = [entry for entry in log.outputs if entry[2] >= limit and entry[3] != target_storage]
    assert not too_big, f"buffers of logits size: {too_big[:5]}"
    assert max(entry[2] for entry in log.outputs) >= chunk * vocab * 4, "the log missed the chunk's logits"


@pytest.mark.parametrize("element_size", [2, 4, 8])
@pytest.mark.parametrize("in_place_rows", [False, True])
def test_default_chunk_is_a_small_fraction_of_the_rows(element_size, in_place_rows):
    """Between 1 and N rows, at least 128 when N allows; for large N a fifth of the rows where the compiled CPU
    kernel turns the chunk into its gradient in place, else an eighth (a sixteenth in half precision, whose chunks
    also hold float32 working copies), so one chunk's memory stays inside a memory budget of 0.25x the logits;
    and never more than CHUNK_BYTES_CAP of logits, unless that leaves fewer than 128 rows."""
    from xentlib.linear import CHUNK_BYTES_CAP, default_chunk_rows

    fraction = 5 if in_place_rows else 16 if element_size == 2 else 8
    bytes_per_logit = element_size if in_place_rows else max(4, element_size)
    for vocab in (1, 1000, 128256, 10_000_000):
        cap_rows = CHUNK_BYTES_CAP // (vocab * bytes_per_logit)
        for rows in (1, 7, 255, 256, 2049, 8192, 100_000, 2_000_000):
            chunk = default_chunk_rows(rows, vocab, element_size, in_place_rows)
            assert 1 <= chunk <= rows
            assert chunk >= min(rows, 128)
            assert chunk <= max(128, cap_rows), (vocab, rows, chunk)
            if rows >= 128 * fraction and -(-rows // fraction) <= cap_rows:
                assert chunk == -(-rows // fraction), (vocab, rows, chunk)
            if cap_rows >= 128 and -(-rows // fraction) > cap_rows:
                assert chunk == cap_rows, (vocab, rows, chunk)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_autocast_like_linear_then_cross_entropy(kind):
    """Under CPU autocast to bfloat16 torch runs `F.linear` in bf16 and `cross_entropy` in float32 (any float
    class weight): we give the same dtypes (float32 loss, float32 gradients), values within bf16 rounding."""
    case = make_case(lead=(2, 9), hidden=8, vocab=13, kind=kind, dtype=torch.float32, class_weight=True)
    target = case.target.detach()
    results = []
    for fn in (ours, composite):
        x, w, b = (fresh(t) for t in (case.x, case.weight, case.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(x, w, target, b, reduction="none", label_smoothing=0.1, class_weight=case.class_weight)
        results.append((loss, *torch.autograd.grad(loss, [x, w, b], torch.ones_like(loss))))
    for name, a, e in zip(("loss", "grad x", "grad weight", "grad bias"), *results, strict=True):
        assert a.dtype == e.dtype == torch.float32, f"{name}: {a.dtype}, torch {e.dtype}"
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunks_run_the_compiled_kernel(dtype, monkeypatch):
    """Each chunk of logits is a contiguous buffer, so where the compiled CPU kernel is built it computes the
    rows (the PyTorch ops are several passes slower); `explain_dispatch` of such logits says the same."""
    from xentlib.backends import cpu_kernel

    if not cpu_kernel.status()[0]:
        pytest.skip("the compiled kernel is not available here: " + cpu_kernel.status()[1])
    calls = []
    original = cpu_kernel.fill_rows
    monkeypatch.setattr(cpu_kernel, "fill_rows", lambda *a: calls.append(1) or original(*a))
    case = make_case(lead=(40,), hidden=8, vocab=300, dtype=dtype)
    x, w = fresh(case.x), fresh(case.weight)
    xentlib.linear_cross_entropy(x, w, case.target, chunk_size=16).backward()
    assert len(calls) == 3  # ceil(40 / 16) chunks


def test_the_ops_gradient_outputs_are_not_changed_by_backward():
    """Called directly, `torch.ops.xentlib.linear_cross_entropy` returns its gradients (for grad_output = 1) as
    outputs; a backward with another grad_output scales a copy, not the tensors the caller holds (only
    `linear_cross_entropy`, which drops them, lets the backward scale them in place)."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    head = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 7, (5, 1), generator=gen)
    scalars = (0.0, -100, "mean", 0.0, 0.0, None, torch.float64, True, True, False, False, "auto", 0)
    out = torch.ops.xentlib.linear_cross_entropy(h, head, None, t, None, None, None, None, *scalars)
    held = [g.clone() for g in out[1:3]]
    grads = torch.autograd.grad(out[0] * 3.0, (h, head))
    for before, now, grad in zip(held, out[1:3], grads):
        assert torch.equal(before, now)
        torch.testing.assert_close(grad, 3.0 * before, rtol=1e-15, atol=0)
