"""A compiled row kernel for CPU tensors: the PyTorch backend's fast path for the common cross-entropy call.

Why it exists: the chunked PyTorch path makes about seven passes over each float32 chunk (convert, log_softmax,
exp, scale, scatter, convert back), each one a separate torch op. On a CPU that is memory-bound work, and for
bfloat16 it cannot beat torch's own fused kernels by much. `cpu_rows.c` does the same maths in one sweep per
row: the logits are read once and the gradient written once, in float32 arithmetic rounded once.

How it is built: at first use, with the C compiler on the machine (`cc`, or `$CC`), `-O3 -march=native`, into a
cache folder (`$XENTLIB_CACHE_DIR`, else `~/.cache/xentlib`) keyed by the source, the compiler and the CPU, and
loaded with ctypes (no torch headers, well under a second to build). Where no compiler works the PyTorch ops run
instead; `XENTLIB_CPU_KERNEL=0` turns the kernel off. `status()` says which and why.

What it covers: rows whose classes are contiguous (2-D input, or any input with a single position per sample),
float32 and bfloat16, class-index targets or float32/bfloat16 class probabilities, class weights, ignore_index,
label smoothing, z-loss, statistics and the in-place gradient. Everything else (soft-capping, N-d inputs, float16,
float64) takes the PyTorch ops. The rules (validation, weights, denominators) come from the semantic core as for
every backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from xentlib._semantics import CrossEntropyProblem

SOURCE = Path(__file__).with_name("cpu_rows.c")
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-std=gnu11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
LANES = 16  # floats per vector in cpu_rows.c; the scratch row is padded to a multiple
# Below this many logits a call runs on one thread: a thread hand-off costs more than it saves
PARALLEL_MIN_ELEMENTS = 1 << 16

_lock = threading.Lock()
_state: dict = {}


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's worker threads: it makes its own pool when it needs one."""
    global _lock
    _lock = threading.Lock()
    _state.pop("pool", None)


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _cpu_signature() -> str:
    """What -march=native depends on: a cached library built for another CPU must not be loaded here."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    root = os.environ.get("XENTLIB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "xentlib")
    return Path(root)


def _build() -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (set CC or install gcc); the PyTorch ops run instead"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"the C compiler {compiler!r} does not run ({error}); the PyTorch ops run instead"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()]))
    target = _cache_dir() / f"cpu_rows-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                command = [compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"]
                result = subprocess.run(command, capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    return None, f"building {SOURCE.name} failed: {result.stderr.strip()[:500]}"
                os.replace(built, target)  # atomic: concurrent processes never load a half-written file
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"building {SOURCE.name} failed: {error}"
    library = ctypes.CDLL(str(target))
    fn = library.xent_cross_entropy_rows
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    fn.argtypes = [ptr, i64, ctypes.c_int, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int,
                   f32, f32, f32, f32, ptr, ptr, ptr, ptr, ptr, i64, ptr]  # fmt: skip
    fn.restype = None
    return fn, f"compiled C row kernel ({target})"


def _load():
    with _lock:
        if "fn" not in _state:
            if os.environ.get("XENTLIB_CPU_KERNEL", "1") == "0":
                _state["fn"], _state["why"] = None, "XENTLIB_CPU_KERNEL=0: the PyTorch ops run instead"
            else:
                _state["fn"], _state["why"] = _build()
        return _state["fn"]


def status() -> tuple[bool, str]:
    """(available, reason): whether CPU calls of the supported kind run the compiled kernel, and why (not)."""
    fn = _load()
    return fn is not None, _state["why"]


def supports_call(device: torch.device, dtype: torch.dtype, problem: CrossEntropyProblem) -> bool:
    """Whether the kernel computes this call's rows, given contiguous (R, C) rows: CPU, float32 or bfloat16
    logits, class indices or float32/bfloat16 class probabilities, float32 arithmetic (no float64 anywhere), no
    soft-capping, and the kernel built."""
    targets_ok = problem.kind == "index" or problem.target.dtype in DTYPES
    ok = device.type == "cpu" and dtype in DTYPES and problem.acc_dtype == torch.float32 and targets_ok
    return ok and problem.softcap is None and _load() is not None


def _classes_contiguous(t: torch.Tensor, classes: int) -> bool:
    return t.stride(1) == 1 or classes == 1


def supports(problem: CrossEntropyProblem, grad_out: torch.Tensor | None) -> bool:
    """`supports_call`, and the logits (gradient, class probabilities) laid out as rows with contiguous classes."""
    x = problem.logits
    classes = x.shape[1]
    rows_ok = x.shape[2] == 1 and classes > 0 and _classes_contiguous(x, classes)
    grad_ok = grad_out is None or (grad_out.dtype == x.dtype and _classes_contiguous(grad_out, classes))
    probs_ok = problem.kind == "index" or _classes_contiguous(problem.target, classes)
    return rows_ok and grad_ok and probs_ok and supports_call(x.device, x.dtype, problem)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _executor(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _state.get("pool")
        if pool is None or pool._max_workers != workers:
            pool = _state["pool"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xentlib-cpu")
        return pool


def cross_entropy_rows(problem: CrossEntropyProblem, grad_out: torch.Tensor | None, result) -> None:
    """Fill `result` (a torch_chunked.RowResult with float32 tensors of shape (B, 1)) and `grad_out`."""
    fn = _load()
    x = problem.logits
    batch, classes, _ = x.shape
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731  (B, 1) tensors: already are
    index = problem.kind == "index"
    target = contiguous(problem.target) if index else None
    target_weight = contiguous(problem.target_weight) if index else None
    probs = None if index else problem.target
    valid = contiguous(problem.valid)
    weight = contiguous(problem.class_weight)
    weight_sum = float(classes) if weight is None else float(weight.sum())
    workers = max(1, min(torch.get_num_threads(), batch))
    if batch * classes < PARALLEL_MIN_ELEMENTS:
        workers = 1
    padded = -(-classes // LANES) * LANES
    scratch = torch.empty(workers, padded, dtype=torch.float32)
    # The C signature in order, around each part's [first, last) rows and its scratch row.
    logits_args = (x.data_ptr(), x.stride(0), DTYPES[x.dtype])
    probs_args = (None, 0, 0) if probs is None else (probs.data_ptr(), probs.stride(0), DTYPES[probs.dtype])
    rest_args = (
        classes, _pointer(target), _pointer(target_weight), valid.data_ptr(), _pointer(weight), *probs_args,
        weight_sum, problem.smoothing, problem.z_loss, float(problem.grad_scale),
        *(_pointer(t) for t in (result.loss, result.lse, result.argmax, result.entropy)),
        _pointer(grad_out), 0 if grad_out is None else grad_out.stride(0),
    )  # fmt: skip

    def run(part: int) -> None:
        first, last = batch * part // workers, batch * (part + 1) // workers
        fn(*logits_args, first, last, *rest_args, scratch[part].data_ptr())

    if workers == 1:
        run(0)
    else:  # ctypes releases the GIL during the call, so the parts run in parallel
        list(_executor(workers).map(run, range(workers)))
    if grad_out is not None:  # written through a raw pointer: tell autograd, as an in-place torch op would
        torch.autograd.graph.increment_version(grad_out)


def supports_layout(problem: CrossEntropyProblem) -> bool:
    """Whether the kernel computes this problem's rows, with a gradient buffer made like its logits."""
    return supports(problem, None)


def coverage() -> str:
    return (
        "CPU, float32/bfloat16 logits with contiguous classes, one position per sample, class indices or "
        "float32/bfloat16 probabilities, no soft-capping"
    )


def rows(problem: CrossEntropyProblem, grad_out: torch.Tensor | None, want_stats: bool):
    """The "cpu" backend's `cross_entropy_rows` (backends/base.py): the compiled kernel, or the PyTorch ops for
    a call it does not cover (a gradient buffer laid out otherwise, an empty problem)."""
    from xentlib.backends import torch_chunked
    from xentlib.backends.base import RowResult

    x = problem.logits
    if x.numel() == 0 or not supports(problem, grad_out):
        return torch_chunked.cross_entropy_rows(problem, grad_out, want_stats)
    batch = x.shape[0]
    empty = lambda dtype=torch.float32: torch.empty(batch, 1, dtype=dtype)  # noqa: E731
    result = RowResult(
        loss=empty(),
        lse=empty() if want_stats or problem.z_loss else None,
        argmax=empty(torch.long) if want_stats else None,
        entropy=empty() if want_stats else None,
    )
    cross_entropy_rows(problem, grad_out, result)
    return result
