"""Which backend runs a call, and why.

Backends, each computing the rows of a validated problem through the contract of `backends/base.py`:
  "cpu"     the compiled C row kernel (backends/cpu_kernel.py): CPU, float32/bfloat16, rows with contiguous
            classes, no soft-capping
  "torch"   chunked PyTorch ops (backends/torch_chunked.py): any device, dtype and option
  "triton"  Triton row kernels (backends/triton/): CUDA/ROCm, or CPU tensors in the Triton interpreter
`backend="auto"` picks triton on a GPU where it can run, cpu where the compiled kernel covers the call, and torch
otherwise. An explicit name is obeyed or fails with a clear error, never silently replaced; "cpu" falls back to
the PyTorch ops only for the calls the kernel does not cover (and says so in `explain_dispatch`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "cpu", "torch", "triton")
_warned: set[str] = set()


def traced() -> bool:
    """Whether something records this call instead of (or besides) running it: torch.compile's tracer, a
    dispatch mode (make_fx, torch.export's non-strict tracing, FakeTensorMode, FlopCounterMode), a
    TorchFunctionMode, or torch.jit.trace. There a loss runs as its torch op, one node they see, and nothing
    reads data on the host: the C kernel's ctypes call and the eager paths' host reads are invisible to them
    (make_fx would record a graph without the computation)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._len_torch_function_stack() > 0
        or torch._C._get_tracing_state() is not None
    )


def select_backend(device: torch.device, backend: str = "auto", problem=None, rows_contiguous=False) -> tuple[str, str]:
    """(name, reason) of the backend that runs on `device` for the requested `backend` (and `problem`, when
    given: its dtype, layout and options decide between the compiled CPU kernel and the PyTorch ops, and the
    Triton kernels accumulate in float32, so float64 work stays on the PyTorch backend). `rows_contiguous`: the
    rows will be laid out by the caller (linear_cross_entropy's chunks of logits), so only dtype and options
    count."""
    from xentlib.backends import cpu_kernel
    from xentlib.backends import triton as triton_backend

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch", "backend='torch' was requested: chunked PyTorch ops"
    if backend == "triton":
        triton_backend.require(device)
        if problem is not None:
            ok, why = triton_backend.supports_problem(problem)
            if not ok:
                raise RuntimeError(f"backend='triton' cannot run this call: {why}")
        return "triton", "backend='triton' was requested: " + triton_backend.is_available(device)[1]
    if device.type == "cpu" or backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' runs on CPU tensors, not on {device.type!r} tensors")
        ok, why = cpu_kernel.status()
        if ok and problem is not None and not _kernel_covers(problem, device, rows_contiguous):
            ok, why = False, "the compiled kernel does not cover this call (" + cpu_kernel.coverage() + ")"
        if ok:
            return "cpu", why
        return "torch", f"chunked PyTorch ops: {why}"
    ok, reason = triton_backend.is_available(device)
    if ok and problem is not None:
        ok, why = triton_backend.supports_problem(problem)
        if not ok:
            return "torch", f"chunked PyTorch ops: {why}"
    if ok:
        return "triton", f"CUDA/ROCm tensor: {reason}"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"xentlib: falling back to the PyTorch backend: {reason}", RuntimeWarning, stacklevel=4)
    return "torch", f"fell back to chunked PyTorch ops: {reason}"


def _kernel_covers(problem, device: torch.device, rows_contiguous: bool) -> bool:
    from xentlib.backends import cpu_kernel

    if rows_contiguous:
        return cpu_kernel.supports_call(device, problem.logits.dtype, problem)
    return cpu_kernel.supports_layout(problem)


def rows_function(name: str, chunk_size: int | None = None) -> Callable:
    """The backend's rows function, `(problem, grad_out, want_stats) -> RowResult` (the contract of
    backends/base.py): `triton.ops.cross_entropy_rows`, `cpu_kernel.rows` or `torch_chunked.cross_entropy_rows`
    (with `chunk_size` rows per chunk when given; the kernels have no chunks and ignore it)."""
    if name == "triton":
        from xentlib.backends.triton import ops

        return ops.cross_entropy_rows
    from xentlib.backends import cpu_kernel, torch_chunked

    if name == "cpu":
        return cpu_kernel.rows
    if chunk_size is not None:
        return functools.partial(torch_chunked.cross_entropy_rows, chunk_size=chunk_size)
    return torch_chunked.cross_entropy_rows


def chunk_policy(name: str):
    """How backend `name` takes linear_cross_entropy's chunks of logits (`backends/base.py`, `ChunkPolicy`)."""
    from xentlib.backends import cpu_kernel, torch_chunked
    from xentlib.backends import triton as triton_backend

    return {"cpu": cpu_kernel, "torch": torch_chunked, "triton": triton_backend}[name].CHUNK_POLICY


def explain_dispatch(tensor_or_device, backend: str = "auto") -> str:
    """One line saying which backend a call on this tensor (or device) would use, and why. For a tensor of
    logits (rows along dim 0, classes along dim 1) the answer accounts for its dtype and layout."""
    if isinstance(tensor_or_device, torch.Tensor):
        problem = _probe_problem(tensor_or_device)
        name, reason = select_backend(tensor_or_device.device, backend, problem)
    else:
        name, reason = select_backend(torch.device(tensor_or_device), backend)
    return f"{name}: {reason}"


def _probe_problem(logits: torch.Tensor):
    """The problem of a plain class-index call on these logits, built without reading them."""
    from xentlib import _semantics as sem

    if logits.dim() == 0 or not logits.is_floating_point():
        return None
    rows = sem.as_rows(logits)
    target = torch.zeros(rows.shape[0], rows.shape[2], dtype=torch.long, device=logits.device)
    return sem.problem_tensors(rows, target, None, None, -100, "mean", 0.0, 0.0, None, logits.dtype)
