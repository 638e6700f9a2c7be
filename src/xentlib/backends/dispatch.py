"""Which backend runs a call, and why.

An explicit `backend="torch"` or `backend="triton"` is obeyed or fails with a clear error, never silently replaced;
`backend="auto"` picks Triton for CUDA/ROCm tensors when it can run there, and otherwise the PyTorch backend, with
one warning per reason when a GPU tensor falls back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "torch", "triton")
_warned: set[str] = set()


def select_backend(device: torch.device, backend: str = "auto", problem=None) -> tuple[str, str]:
    """(name, reason) of the backend that runs on `device` for the requested `backend` (and `problem`, when
    given: the Triton kernels accumulate in float32, so float64 work stays on the PyTorch backend)."""
    from xentlib.backends import triton as triton_backend

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch", "backend='torch' was requested"
    if backend == "triton":
        triton_backend.require(device)
        if problem is not None:
            ok, why = triton_backend.supports_problem(problem)
            if not ok:
                raise RuntimeError(f"backend='triton' cannot run this call: {why}")
        return "triton", "backend='triton' was requested: " + triton_backend.is_available(device)[1]
    if device.type != "cuda":
        return "torch", (
            f"{device.type} tensors use the PyTorch chunked backend (Triton runs on CPU tensors only in its "
            "interpreter, with TRITON_INTERPRET=1 and backend='triton')"
        )
    ok, reason = triton_backend.is_available(device)
    if ok and problem is not None:
        ok, why = triton_backend.supports_problem(problem)
        if not ok:
            return "torch", f"PyTorch backend: {why}"
    if ok:
        return "triton", f"CUDA/ROCm tensor: {reason}"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"xentlib: falling back to the PyTorch backend: {reason}", RuntimeWarning, stacklevel=4)
    return "torch", f"fell back to the PyTorch backend: {reason}"


def rows_function(name: str) -> Callable:
    """The backend's `cross_entropy_rows(problem, grad_out, want_stats)`."""
    if name == "triton":
        from xentlib.backends.triton import ops

        return ops.cross_entropy_rows
    from xentlib.backends import torch_chunked

    return torch_chunked.cross_entropy_rows


def explain_dispatch(tensor_or_device, backend: str = "auto") -> str:
    """One line saying which backend a call on this tensor (or device) would use, and why."""
    device = tensor_or_device.device if isinstance(tensor_or_device, torch.Tensor) else torch.device(tensor_or_device)
    name, reason = select_backend(device, backend)
    return f"{name}: {reason}"
