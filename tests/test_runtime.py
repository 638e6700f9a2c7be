"""xentlib inside the PyTorch runtime: torch.compile, torch ops, torch.func, forward-mode AD, autocast, AMP.

Truths: torch's own functions (values and gradients), and torch._dynamo.explain's graph and break counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import xentlib
import xentlib.nn as XN
from xentlib import functional as X

N, C = 6, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (N,), generator=g)
    t[2] = -100
    q = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    return x, t, q


def _cases():
    """(name, fn(x, t, q) -> scalar loss): every public function with its options."""
    w = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    cases = {
        "ce": lambda x, t, q: X.cross_entropy(x, t),
        "ce_weight_smoothing": lambda x, t, q: X.cross_entropy(x, t, weight=w, label_smoothing=0.1),
        "ce_prob": lambda x, t, q: X.cross_entropy(x, q),
        "ce_prob_weight_smoothing": lambda x, t, q: X.cross_entropy(x, q, weight=w, label_smoothing=0.2),
        "ce_kdim": lambda x, t, q: X.cross_entropy(x.reshape(2, 3, C).transpose(1, 2), t.reshape(2, 3).clamp(0)),
        "ce_none": lambda x, t, q: X.cross_entropy(x, t, reduction="none").sum(),
        "ce_extensions": lambda x, t, q: X.cross_entropy(x, t, reduction="sum", z_loss=1e-2, softcap=3.0, normalizer=4),
        "ce_stats": lambda x, t, q: X.cross_entropy(x, t, return_stats=True)[1].entropy.sum(),
        "nll": lambda x, t, q: X.nll_loss(F.log_softmax(x, 1), t, weight=w),
        "log_softmax": lambda x, t, q: X.log_softmax(x, 1).sum(),
        "softmax": lambda x, t, q: (X.softmax(x, 1) * q).sum(),
        "bce": lambda x, t, q: X.binary_cross_entropy(torch.sigmoid(x), q),
        "bce_with_logits": lambda x, t, q: X.binary_cross_entropy_with_logits(x, q, pos_weight=w),
        "linear": lambda x, t, q: X.linear_cross_entropy(x[:, :4], x.T[:, :4].contiguous(), t[:C] if N >= C else t),
    }
    return cases


def _torch_version(name):
    """The same call through torch.nn.functional (the truth)."""
    ours = _cases()[name]

    def theirs(x, t, q):
        saved = {f: getattr(X, f) for f in ("cross_entropy", "nll_loss", "log_softmax", "softmax",
                                             "binary_cross_entropy", "binary_cross_entropy_with_logits")}  # fmt: skip
        return ours(x, t, q) if name in ("ce_extensions", "ce_stats", "linear") else _with_torch(ours, saved)(x, t, q)

    return theirs


def _with_torch(fn, saved):
    def run(*args):
        for name in saved:
            setattr(X, name, getattr(F, name))
        try:
            return fn(*args)
        finally:
            for name, value in saved.items():
                setattr(X, name, value)

    return run


CASES = list(_cases())
TORCH_COMPARABLE = [c for c in CASES if c not in ("ce_extensions", "ce_stats", "linear")]


@pytest.mark.parametrize("name", CASES)
def test_one_graph_no_break(name):
    x, t, q = _inputs()
    x.requires_grad_()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_cases()[name])(x, t, q)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("name", ["ce", "ce_weight_smoothing", "ce_prob", "ce_none", "ce_extensions", "linear", "bce"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_equals_eager(name, dynamic):
    """fullgraph=True with the default Inductor backend: the same loss and gradient as eager."""
    fn = _cases()[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for seed in (0, 1):  # a second call exercises the guards (and, with dynamic=True, the symbolic shapes)
        x, t, q = _inputs(seed)
        x.requires_grad_()
        eager = fn(x, t, q)
        (eager_grad,) = torch.autograd.grad(eager, x)
        got = compiled(x, t, q)
        (got_grad,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(got_grad, eager_grad)


def test_compiled_training_step_of_a_model_with_the_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
    loss_fn = XN.CrossEntropyLoss(label_smoothing=0.1)
    x, t = torch.randn(N, 8), torch.randint(0, C, (N,))

    def forward(x, t):  # the compiled part of a step; AOT autograd compiles its backward
        return loss_fn(model(x), t)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(x, t)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model.zero_grad()
    eager = forward(x, t)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(forward, fullgraph=True)(x, t)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_opcheck():
    x, t, q = _inputs()
    x.requires_grad_()
    w = torch.rand(C, dtype=torch.float64)
    scalars = (0.0, -100, "mean", 0.1, 1e-3, None, torch.float64, True, True, "auto", 0)
    torch.library.opcheck(torch.ops.xentlib.cross_entropy, (x.unsqueeze(2), t.clamp(0).unsqueeze(1), w, None, *scalars))
    torch.library.opcheck(torch.ops.xentlib.cross_entropy, (x.unsqueeze(2), q.unsqueeze(2), None, None, *scalars))
    torch.library.opcheck(torch.ops.xentlib.class_indices, (t, -100, C))
    h = torch.randn(N, 4, dtype=torch.float64, requires_grad=True)
    head = torch.randn(C, 4, dtype=torch.float64, requires_grad=True)
    linear_scalars = (0.0, -100, "mean", 0.0, 0.0, None, torch.float64, True, True, False, False, "auto", 0)
    torch.library.opcheck(
        torch.ops.xentlib.linear_cross_entropy, (h, head, None, t.unsqueeze(1), None, None, None, None, *linear_scalars)
    )


def test_cpu_bounds_error_is_torchs_index_error():
    x, t, _ = _inputs()
    t[0] = C
    with pytest.raises(IndexError, match=f"Target {C} is out of bounds"):
        X.cross_entropy(x, t)
    with pytest.raises(IndexError, match=f"Target {C} is out of bounds"):
        torch.compile(lambda x, t: X.cross_entropy(x, t), fullgraph=True)(x, t)


@pytest.mark.parametrize("name", TORCH_COMPARABLE)
def test_torch_func_grad_vmap_jacrev(name):
    ours, theirs = _cases()[name], _torch_version(name)
    x, t, q = _inputs()
    for transform in (
        lambda f: torch.func.grad(f)(x, t, q),
        lambda f: torch.func.jacrev(f)(x, t, q),
        lambda f: torch.func.vmap(torch.func.grad(f), in_dims=(0, None, None))(torch.stack([x, 2 * x]), t, q),
    ):
        torch.testing.assert_close(transform(ours), transform(theirs))


@pytest.mark.parametrize("name", TORCH_COMPARABLE)
def test_forward_mode_ad(name):
    ours, theirs = _cases()[name], _torch_version(name)
    x, t, q = _inputs()
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        got = torch.autograd.forward_ad.unpack_dual(ours(torch.autograd.forward_ad.make_dual(x, tangent), t, q))
        want = torch.autograd.forward_ad.unpack_dual(theirs(torch.autograd.forward_ad.make_dual(x, tangent), t, q))
    torch.testing.assert_close(got.primal, want.primal)
    torch.testing.assert_close(got.tangent, want.tangent)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ours(x, t, q), (x,), check_forward_ad=True)


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", "log_softmax"])
def test_autocast_dtypes_follow_torch(name):
    x = torch.randn(N, C)
    t = torch.randint(0, C, (N,))
    y = torch.rand(N, C)
    calls = {
        "cross_entropy": lambda f, x: f.cross_entropy(x, t),
        "nll_loss": lambda f, x: f.nll_loss(x, t),
        "binary_cross_entropy_with_logits": lambda f, x: f.binary_cross_entropy_with_logits(x, y),
        "log_softmax": lambda f, x: f.log_softmax(x, 1),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ torch.eye(C)  # a bfloat16 activation, as a model's head gives under autocast
        ours, theirs = calls[name](X, h), calls[name](F, h)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)


def test_autocast_sum_over_many_rows_does_not_overflow():
    """fp16 autocast: torch runs cross_entropy in float32, so a large 'sum' stays finite."""
    torch.manual_seed(0)
    x, t = torch.randn(20_000, 10) * 3, torch.randint(0, 10, (20_000,))
    with torch.autocast("cpu", dtype=torch.float16):
        h = x @ torch.eye(10)
        ours, theirs = X.cross_entropy(h, t, reduction="sum"), F.cross_entropy(h, t, reduction="sum")
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-2)


def test_fp16_amp_step_with_grad_scaler_matches_torch():
    def run(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        x, t = torch.randn(64, 16), torch.randint(0, 10, (64,))
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model(x), t)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return scaler.get_scale(), model.weight.detach()

    (our_scale, our_weight), (their_scale, their_weight) = run(X.cross_entropy), run(F.cross_entropy)
    assert our_scale == their_scale
    torch.testing.assert_close(our_weight, their_weight, rtol=1e-3, atol=1e-3)


def test_linear_cross_entropy_under_autocast_returns_float32():
    h, w = torch.randn(N, 4), torch.randn(C, 4)
    t = torch.randint(0, C, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = xentlib.linear_cross_entropy(h, w, t)
        theirs = F.cross_entropy(F.linear(h, w), t)
    assert ours.dtype == theirs.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_on_cuda():
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    h = torch.randn(64, 32, device="cuda", requires_grad=True)
    w = torch.randn(1000, 32, device="cuda", requires_grad=True)
    X.cross_entropy(x, t).backward()  # warm-up: kernel compilation may synchronise
    xentlib.linear_cross_entropy(h, w, t).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        X.cross_entropy(x, t).backward()
        xentlib.linear_cross_entropy(h, w, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_captured_in_a_cuda_graph():
    model = torch.nn.Linear(32, 1000).cuda()
    x, t = torch.randn(64, 32, device="cuda"), torch.randint(0, 1000, (64,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            X.cross_entropy(model(x), t).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = X.cross_entropy(model(x), t)
        loss.backward()
    graph.replay()
    torch.testing.assert_close(loss, F.cross_entropy(model(x), t))


def test_linear_cross_entropy_under_torch_func_and_forward_ad():
    """The transforms differentiate the composite (which holds the logits): equal to torch's composition."""
    x, t, _ = _inputs()
    w = torch.randn(5, C, dtype=torch.float64)  # 5 classes from C features
    t = torch.where(t >= 0, t % 5, t)
    ours = lambda x: xentlib.linear_cross_entropy(x, w, t, label_smoothing=0.1)  # noqa: E731
    theirs = lambda x: F.cross_entropy(x @ w.T, t, label_smoothing=0.1)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(ours)(x), torch.func.grad(theirs)(x))
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        got = torch.autograd.forward_ad.unpack_dual(ours(torch.autograd.forward_ad.make_dual(x, tangent))).tangent
        want = torch.autograd.forward_ad.unpack_dual(theirs(torch.autograd.forward_ad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, t: xentlib.log_probs(x, t).sum(),
        lambda x, t: xentlib.distillation_loss(x, 2 * x.detach()),
    ],
    ids=["log_probs", "distillation_loss"],
)
def test_ops_without_transform_rules_refuse_rather_than_drop_the_tangent(call):
    x, t, _ = _inputs()
    t = t.clamp(0)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: call(x, t))(x)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        call(torch.autograd.forward_ad.make_dual(x, torch.randn_like(x)), t)


def _torch_options(options: dict) -> dict:
    return {name: value for name, value in options.items() if name != "backend"}


@pytest.mark.parametrize("options", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "backend": "cpu"}])
@pytest.mark.parametrize("tracer", ["make_fx real", "make_fx fake", "jit.trace"])
def test_tracers_record_the_op_and_replay_the_computation(tracer, options):
    """make_fx and torch.jit.trace see the loss as the op (the eager paths' C call would be invisible to them:
    a graph without the computation), and the recorded graph computes the loss of new inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, t = torch.randn(6, 5), torch.tensor([0, 4, 2, -100, 1, 3])
    fn = lambda x, t: xentlib.cross_entropy(x, t, **options)  # noqa: E731
    if tracer == "jit.trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values
            recorded = torch.jit.trace(fn, (x, t))
        assert "xentlib::cross_entropy" in str(recorded.graph)
    else:
        recorded = make_fx(fn, tracing_mode=tracer.split()[1])(x, t)
        assert "xentlib.cross_entropy.default" in {str(node.target) for node in recorded.graph.nodes}
    x2 = torch.randn(6, 5)
    torch.testing.assert_close(recorded(x2, t), F.cross_entropy(x2, t, **_torch_options(options)))


def test_a_device_context_does_not_move_the_kernels_buffers():
    """Under `with torch.device(...)` a factory call without a device allocates there; the C kernels' buffers
    name the CPU (a meta or CUDA buffer handed to C would crash the process)."""
    x, t = torch.randn(6, 5), torch.tensor([0, 4, 2, -100, 1, 3])
    safe = t.clamp(min=0)
    with torch.device("meta"):
        for options in ({}, {"backend": "cpu"}, {"label_smoothing": 0.1}):
            got = xentlib.cross_entropy(x, t, **options)
            torch.testing.assert_close(got, F.cross_entropy(x, t, **_torch_options(options)))
        torch.testing.assert_close(xentlib.log_probs(x, safe), torch.log_softmax(x, 1)[range(6), safe])
        assert xentlib.distillation_loss(x, 2 * x).device.type == "cpu"
