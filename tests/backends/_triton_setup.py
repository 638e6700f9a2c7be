"""What every Triton test module starts with: the interpreter on CPU tensors when there is no GPU, and the marks.

TRITON_INTERPRET=1 must be in the environment before xentlib's kernels are first imported (triton picks
interpreter or compiler when it decorates a kernel), so a test module imports this before anything of xentlib.
Without torch or triton the importing module is skipped.
"""

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from xentlib.backends import triton as triton_backend  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRETED else "cuda"
AVAILABLE, WHY = triton_backend.is_available(DEVICE)

MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(not AVAILABLE, reason=WHY),
    # the interpreter evaluates both sides of tl.where in NumPy (e.g. 0 * inf on padding), which warns
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA without the interpreter")
