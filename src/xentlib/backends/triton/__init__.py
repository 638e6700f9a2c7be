"""xentlib's Triton backend: fused row-wise cross-entropy kernels.

Importing this package imports neither triton nor torch; ``cross_entropy_rows`` and the other names of
``ops`` load triton on first access.

Triton runs on CUDA/ROCm tensors, or on CPU tensors under Triton's interpreter, which must be switched on
with ``TRITON_INTERPRET=1`` in the environment *before* ``xentlib.backends.triton.kernels`` is first
imported (triton decides between interpreter and compiler when it decorates a kernel).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from xentlib.backends.base import ChunkPolicy

_LAZY_OPS = {"cross_entropy_rows", "scale_unless_one_", "choose_block_size"}
# linear_cross_entropy's chunks: the kernels turn a chunk into its gradient in place; on a GPU the float32 weight
# gradient of half-precision weights fits beside the chunks and is rounded once
CHUNK_POLICY = ChunkPolicy(rows_in_place=True, float32_weight_grad=True)

__all__ = ["CHUNK_POLICY", "installed", "is_available", "require", "supports_problem", *sorted(_LAZY_OPS)]


def _interpreter_on() -> bool:
    """Triton picks interpreter or compiler when a kernel is decorated, i.e. when ``kernels`` is imported;
    once it is, its choice wins over the current environment."""
    kernels = sys.modules.get("xentlib.backends.triton.kernels")
    if kernels is not None:
        return type(kernels.index_target_rows_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def installed() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def is_available(device=None) -> tuple[bool, str]:
    """Whether the Triton backend can run, and why (not).

    ``device``: a ``torch.device`` or string; None asks "on some device of this machine". GPU tensors need
    a CUDA/ROCm device; CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before the kernels are
    first imported).
    """
    if not installed():
        return False, "triton is not installed (pip install 'xentlib[triton]')"
    device_type = None if device is None else str(device).split(":")[0]
    if device_type == "cpu" or (device_type is None and _interpreter_on()):
        if _interpreter_on():
            return True, "triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, (
            "CPU tensors need triton's interpreter: set TRITON_INTERPRET=1 before xentlib's triton "
            "kernels are first imported"
        )
    if device_type not in (None, "cuda"):
        return False, f"triton runs on CUDA/ROCm devices, not on {device_type!r}"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA/ROCm device is available to triton"
    return True, "triton on " + ("ROCm" if torch.version.hip else "CUDA")


def require(device=None) -> None:
    """Raise a RuntimeError explaining why backend='triton' cannot run on ``device``."""
    ok, reason = is_available(device)
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {reason}")


def supports_problem(problem) -> tuple[bool, str]:
    """Whether the kernels take this ``CrossEntropyProblem``: they compute in float32, so float32/float16/
    bfloat16 logits with a float32 accumulation dtype (a float64 input, target or weight asks for float64
    arithmetic, which the PyTorch backend provides)."""
    import torch

    dtype = problem.logits.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"the Triton kernels take float32/float16/bfloat16 logits, not {dtype}"
    if getattr(problem, "acc_dtype", torch.float32) == torch.float64:
        return (
            False,
            "the Triton kernels accumulate in float32; float64 targets or weights need backend='torch'",
        )
    return True, "float32 accumulation"


def __getattr__(name: str):
    if name in _LAZY_OPS:
        from xentlib.backends.triton import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
