"""`torch.ops.xentlib.triton_cross_entropy`: the fused cross-entropy registered with `torch.library.triton_op`.

It is the same implementation and autograd formula as `torch.ops.xentlib.cross_entropy` (backends/ops.py),
registered so that compilers see inside it: AOTAutograd traces its body (the few torch ops of the semantic core
and the `wrap_triton` launches of backends/triton/ops.py), and Inductor launches the Triton kernels itself, beside
the model's own kernels, instead of calling back into Python for an opaque op. A traced call on an accelerator
records this op (`backends.ops.traced_op`); CPU calls keep the custom op, whose C kernel no tracer can follow.

Importing this module imports triton and registers the op; `traced_op` imports it on first use (torch.compile's
tracer follows the import).
"""

from __future__ import annotations

from torch.library import triton_op

from xentlib.backends import ops

triton_cross_entropy = triton_op("xentlib::triton_cross_entropy", mutates_args=())(ops.cross_entropy_impl)
triton_cross_entropy.register_autograd(ops.backward, setup_context=ops.setup_context)
