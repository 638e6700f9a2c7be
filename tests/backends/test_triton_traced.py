"""`torch.ops.xentlib.triton_cross_entropy`: on an accelerator, a traced cross_entropy is a `triton_op`, so that
AOTAutograd traces into it and Inductor launches the Triton kernels itself.

Three views: (1) without a GPU, on fake CUDA tensors in a process without the interpreter (where the kernels are
real `JITFunction`s): Dynamo records the op in one graph, AOTAutograd's trace holds our kernels as graph nodes
and reads no data (fake tensors have none), CPU calls still record the opaque custom op, and torch.export records
the custom op too (the one a process that loads the program registers by importing xentlib); (2) in the interpreter,
the triton_op called eagerly equals the custom op, values and gradients; (3) on a GPU, `torch.compile`'s code
launches our kernels and its results equal eager.
"""

import os
import subprocess
import sys

import pytest
from _triton_setup import DEVICE, MARKS, gpu, torch

from xentlib import functional as X

pytestmark = MARKS

TRACE_SCRIPT = """
import torch
from xentlib import functional as X
import xentlib._semantics.cross_entropy as semantics
import xentlib.backends.triton as triton_backend
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode

# No GPU here: say Triton runs on CUDA, so that the real dispatch picks it for the fake CUDA tensors below.
available = triton_backend.is_available
triton_backend.is_available = lambda device=None: (
    (True, "pretended") if str(device).startswith("cuda") else available(device))
# A CPU-only torch cannot evaluate the device-side bounds check's .any() on fake CUDA tensors (a CUDA build
# records it as an assertion node); the check has its own GPU test, so it is left out of this trace.
semantics.checked_class_indices = lambda index, ignore_index, classes: semantics._safe_class_indices(
    index, index != ignore_index)

class Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
    def forward(self, *inputs):
        return tuple(self.fn(*inputs))

def launched(fn, device, *shapes_and_dtypes):
    mode = FakeTensorMode()
    with mode:
        inputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes_and_dtypes]
        graph, _ = aot_export_module(Call(fn), inputs, trace_joint=False)
    kernels = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
               for node in graph.graph.nodes if "triton_kernel_wrapper" in str(node.target)]
    ops = sorted({str(node.target) for node in graph.graph.nodes if "xentlib" in str(node.target)})
    return kernels, ops

# first, before anything imports the op's module: Dynamo follows that import and records the op, in one graph
with FakeTensorMode():
    logits, target = torch.empty(8, 1000, device="cuda"), torch.zeros(8, dtype=torch.long, device="cuda")
    explained = torch._dynamo.explain(lambda x, t: X.cross_entropy(x, t))(logits, target)
print((explained.graph_count, explained.graph_break_count,
       [str(node.target) for graph in explained.graphs for node in graph.graph.nodes if "xentlib" in str(node.target)]))

index = ((8, 1000), torch.bfloat16), ((8,), torch.long)
small = ((8, 100), torch.float32), ((8,), torch.long)
prob = ((4, 300, 3), torch.float16), ((4, 300, 3), torch.float16)
print(launched(lambda x, t: [X.cross_entropy(x, t, label_smoothing=0.1)], "cuda", *index))
print(launched(lambda x, t: [X.cross_entropy(x, t, reduction="none", z_loss=1e-4, softcap=30.0)], "cuda", *small))
print(launched(lambda x, q: [X.cross_entropy(x, q, return_stats=True)[1].lse], "cuda", *prob))
# the gradient made in the same sweep: the op asked for it, as the forward of a training step does
print(launched(lambda x, t: torch.ops.xentlib.triton_cross_entropy(
    x, t.reshape(8, 1), None, None, 0.0, -100, "mean", 0.0, 0.0, None, torch.float32, True, False, "auto", 0)[:2],
    "cuda", ((8, 1000, 1), torch.float32), index[1]))
print(launched(lambda x, t: [X.cross_entropy(x, t)], "cpu", *index))

# torch.export keeps custom ops as they are: the exported program names the op that `import xentlib` registers
class Loss(torch.nn.Module):
    def forward(self, x, t):
        return X.cross_entropy(x, t)

with FakeTensorMode(allow_non_fake_inputs=True):
    logits, target = torch.empty(8, 1000, device="cuda"), torch.zeros(8, dtype=torch.long, device="cuda")
    exported = torch.export.export(Loss(), (logits, target))
print([str(node.target) for node in exported.graph.nodes if "xentlib" in str(node.target)])
"""


def test_traced_cuda_call_launches_our_kernels_and_reads_no_data():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    dynamo, index, capped, prob, with_grad, on_cpu, exported = [eval(line) for line in done.stdout.splitlines()[-7:]]
    assert dynamo == (1, 0, ["xentlib.triton_cross_entropy"])
    assert exported == ["xentlib.cross_entropy.default"]
    # the op is decomposed: its kernels are nodes, no opaque xentlib op is left (bounds checks aside)
    assert index == (["index_target_rows_kernel"], [])
    assert capped == (["index_target_tile_kernel"], [])  # 100 classes: several rows per program
    assert prob == (["prob_target_rows_kernel"], [])
    assert with_grad == (["index_target_rows_kernel"], [])
    assert on_cpu == ([], ["xentlib.cross_entropy.default"])  # the C kernel stays behind the custom op


CASES = {
    "index": dict(),
    "smoothing_weight": dict(label_smoothing=0.1, weight=torch.linspace(0.5, 2.0, 37)),
    "extensions_sum": dict(reduction="sum", z_loss=1e-3, softcap=5.0),
}


def _triton_op_call(x, t, *, weight=None, label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None):
    from xentlib.backends.triton import registered  # noqa: F401  (registers the op)

    loss = torch.ops.xentlib.triton_cross_entropy(
        x.unsqueeze(2), t.unsqueeze(1), weight, None, 0.0, -100, reduction, label_smoothing, z_loss, softcap,
        x.dtype, x.requires_grad, False, "triton", 0,
    )[0]  # fmt: skip
    return loss


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_op_equals_the_custom_op(case, dtype):
    generator = torch.Generator().manual_seed(7)
    options = {k: v.to(DEVICE, dtype) if isinstance(v, torch.Tensor) else v for k, v in CASES[case].items()}
    x = torch.randn(11, 37, generator=generator).to(DEVICE, dtype).requires_grad_()
    t = torch.randint(0, 37, (11,), generator=generator).to(DEVICE)
    t[3] = -100
    ours = _triton_op_call(x, t, **options)
    (grad,) = torch.autograd.grad(ours, x)
    want = X.cross_entropy(x, t, backend="triton", **options)
    (want_grad,) = torch.autograd.grad(want, x)
    assert torch.equal(ours, want)
    assert torch.equal(grad, want_grad)


@pytest.mark.gpu
@gpu
def test_compiled_cross_entropy_launches_our_kernels_on_cuda():
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    step = lambda x, t: X.cross_entropy(x, t, label_smoothing=0.1)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True)
    loss, code = run_and_get_code(lambda: compiled(x, t))
    assert "index_target_rows_kernel" in "\n".join(code)
    want = step(x, t)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("with_grad", [False, True])
def test_opcheck_of_the_triton_op(with_grad):
    """Schema, fake kernel (the body itself under FakeTensorMode), autograd registration and AOTAutograd's
    decomposition of the op, on CPU tensors: probability targets on the PyTorch backend read no data and launch
    no kernel, so the check runs with or without the interpreter."""
    from xentlib.backends.triton import registered  # noqa: F401  (registers the op)

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, 2, generator=generator, requires_grad=True)
    q = torch.softmax(torch.randn(5, 9, 2, generator=generator), 1)
    arguments = (x, q, None, None, 0.0, -100, "mean", 0.1, 1e-3, None, torch.float32, with_grad, True, "torch", 0)
    torch.library.opcheck(torch.ops.xentlib.triton_cross_entropy.default, arguments)
