"""Compiled row kernels for CPU tensors: the fast path of the common cross-entropy call, and of the post-training
losses' rows.

Why they exist: the chunked PyTorch path makes about seven passes over each float32 chunk (convert, log_softmax,
exp, scale, scatter, convert back), each one a separate torch op. On a CPU that is memory-bound work, and for
bfloat16 it cannot beat torch's own fused kernels by much. `cpu_rows.c` does the same maths in one sweep per
row: the logits are read once and the gradient written once, in float32 arithmetic rounded once;
`cpu_post_training.c` does the same for per-token log-probabilities and the distillation divergence; both share
the toolkit in `cpu_rows.h` and are linked into one library.

How it is built, cached and loaded: backends/cpu_build.py.

The binding is declared once per entry point: a list of `name:code` fields (the C files' notation) makes the
ctypes structure passed to the kernel, and its layout is compared at load with the string the C side builds
from its own declaration (`XENT_ARGUMENTS`, `XENT_COMMON_CALL`, `XENT_LOG_PROBS`, `XENT_DISTILLATION`): a library
whose argument list differs is refused, and a rows call must name every field (a missing or unknown name
raises). Four entry points: the rows (`xent_cross_entropy_rows`, every backend call), the common call
(`xent_common_call`, see backends/common_call.py), which checks, masks and counts the targets itself and then
runs the same rows, and the post-training rows (`xent_log_probs` for rl.py, `xent_distillation` for distill.py).

Threads: a call splits its rows over torch's thread count, on torch's own OpenMP team where the library is built
with OpenMP (cpu_build.py says where), else on pthreads it starts and joins. Either way every part has finished
when the call returns, so no worker outlives the call and the tensors it writes (interrupt safety). ctypes
releases the GIL during the call; a Ctrl-C meanwhile is raised as KeyboardInterrupt when the call has returned.

What it covers: rows whose classes are contiguous (2-D input, or any input with a single position per sample),
float32 and bfloat16, class-index targets or float32/bfloat16 class probabilities, class weights, ignore_index,
label smoothing, z-loss, statistics and the in-place gradient. Everything else (soft-capping, N-d inputs, float16,
float64) takes the PyTorch ops. The rules (validation, weights, denominators) come from the semantic core as for
every backend.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import NamedTuple

import torch

from xentlib._semantics import CrossEntropyProblem
from xentlib.backends import cpu_build
from xentlib.backends.base import ChunkPolicy

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
LANES = 16  # floats per vector in cpu_rows.c; the scratch row is padded to a multiple
# Below this many logits a call runs on one thread: starting a thread costs more than it saves
PARALLEL_MIN_ELEMENTS = 1 << 16
# linear_cross_entropy's chunks: the kernel turns a chunk into its gradient in place; a float32 weight gradient
# for bfloat16 weights would cost as much as the chunk (docs/numerics.md section 9)
CHUNK_POLICY = ChunkPolicy(rows_in_place=True, float32_weight_grad=False)
ENTRY_POINT = "xent_cross_entropy_rows"

_TYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int, "f32": ctypes.c_float}


def _structure(name: str, fields: str) -> type[ctypes.Structure]:
    """A ctypes structure from `name:code` fields, in cpu_rows.c's notation and order; its `layout` is the string
    the C side builds from its own declaration (compared at load)."""
    pairs = [field.split(":") for field in fields.split()]
    structure = type(name, (ctypes.Structure,), {"_fields_": [(field, _TYPES[code]) for field, code in pairs]})
    structure.layout = "".join(f"{field}:{code}," for field, code in pairs)
    return structure


# The rows kernel's arguments: `struct xent_arguments` in cpu_rows.c.
Arguments = _structure(
    "Arguments",
    """logits:ptr logits_row_stride:i64 dtype:i32 rows:i64 classes:i64 target:ptr target_weight:ptr valid:ptr
    class_weight:ptr probs:ptr probs_row_stride:i64 probs_dtype:i32 class_weight_sum:f32 smoothing:f32 z_loss:f32
    scale:f32 loss:ptr lse:ptr argmax:ptr entropy:ptr grad:ptr grad_row_stride:i64 scratch:ptr
    scratch_row_stride:i64 threads:i32""",
)
ARGUMENTS, LAYOUT = Arguments._fields_, Arguments.layout
_NAMES = frozenset(name for name, _ in ARGUMENTS)

# The common call's arguments (backends/common_call.py): `struct xent_common_call` in cpu_rows.c.
COMMON_ENTRY_POINT = "xent_common_call"
CommonCallArguments = _structure(
    "CommonCallArguments",
    """logits:ptr rows:i64 classes:i64 target:ptr ignore_index:i64 mean:i32 loss:ptr grad:ptr threads:i32 count:i64
    bad_row:i64 status:i32""",
)
COMMON_ARGUMENTS, COMMON_LAYOUT = CommonCallArguments._fields_, CommonCallArguments.layout

# The per-token log-probabilities' arguments (rl.py, policy.py): `struct xent_log_probs` in cpu_post_training.c.
LOG_PROBS_ENTRY_POINT = "xent_log_probs"
LogProbsArguments = _structure(
    "LogProbsArguments",
    """logits:ptr logits_row_stride:i64 dtype:i32 rows:i64 classes:i64 target:ptr valid:ptr temperature:f32
    log_prob:ptr lse:ptr entropy:ptr grad_log_prob:ptr grad_entropy:ptr grad:ptr grad_row_stride:i64
    scratch:ptr scratch_row_stride:i64 threads:i32 advantages:ptr old_log_probs:ptr ref_log_probs:ptr factor:ptr
    epsilon_low:f32 epsilon_high:f32 kl_coef:f32 entropy_coef:f32""",
)

# The distillation divergence's arguments (distill.py): `struct xent_distillation` in cpu_post_training.c.
DISTILLATION_ENTRY_POINT = "xent_distillation"
DistillationArguments = _structure(
    "DistillationArguments",
    """student:ptr student_row_stride:i64 student_dtype:i32 teacher:ptr teacher_row_stride:i64 teacher_dtype:i32
    rows:i64 classes:i64 beta:f32 temperature:f32 scale:ptr loss:ptr grad:ptr grad_row_stride:i64 scratch:ptr
    scratch_row_stride:i64 threads:i32""",
)


def entry_points() -> list[tuple[str, str, str, type[ctypes.Structure]]]:
    """(function, structure, layout, ctypes structure) of each entry point, in the order `_load` reads them."""
    return [
        (ENTRY_POINT, "xent_arguments", LAYOUT, Arguments),
        (COMMON_ENTRY_POINT, "xent_common_call", COMMON_LAYOUT, CommonCallArguments),
        (LOG_PROBS_ENTRY_POINT, "xent_log_probs", LogProbsArguments.layout, LogProbsArguments),
        (DISTILLATION_ENTRY_POINT, "xent_distillation", DistillationArguments.layout, DistillationArguments),
    ]


def arguments(**values) -> Arguments:
    """The kernel's argument structure, every field named (a missing or unknown name raises TypeError)."""
    if values.keys() != _NAMES:
        missing, unknown = sorted(_NAMES - values.keys()), sorted(values.keys() - _NAMES)
        raise TypeError(f"cpu_rows arguments: missing {missing}, unknown {unknown}")
    return Arguments(**values)


_lock = threading.Lock()
_state: dict = {}


def _new_lock_in_child() -> None:
    """A forked child must not inherit a lock that another thread of the parent held at the fork."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _load():
    """The rows entry point, or None where the kernel is not used (building or loading it at the first call)."""
    state = _state
    if "fn" in state:
        return state["fn"]
    with _lock:
        if "fn" not in state:
            if os.environ.get("XENTLIB_CPU_KERNEL", "1") == "0":
                functions, why = None, "XENTLIB_CPU_KERNEL=0: the PyTorch ops run instead"
            else:
                functions, why = cpu_build.build(entry_points())
                if functions is None:
                    warnings.warn(f"xentlib's compiled CPU kernel is not used: {why}", RuntimeWarning, stacklevel=2)
            state["why"] = why
            state["common"] = None if functions is None else functions[1]
            state["log_probs"] = None if functions is None else functions[2]
            state["distillation"] = None if functions is None else functions[3]
            state["fn"] = None if functions is None else functions[0]
        return state["fn"]


def common_call_function():
    """The common call's entry point (`xent_common_call`), or None where the kernel is not used."""
    return None if _load() is None else _state["common"]


def status() -> tuple[bool, str]:
    """(available, reason): whether CPU calls of the supported kind run the compiled kernel, and why (not)."""
    fn = _load()
    return fn is not None, _state["why"]


class PolicySweep(NamedTuple):
    """The policy loss's per-token float32 (R,) contiguous tensors (None where not given) and coefficients, for
    `log_probs_rows`: `factor` is w/D per token (0 on ignored ones)."""

    advantages: torch.Tensor | None
    old_log_probs: torch.Tensor | None
    ref_log_probs: torch.Tensor | None
    factor: torch.Tensor | None
    epsilon_low: float
    epsilon_high: float
    kl_coef: float
    entropy_coef: float


_NO_POLICY = PolicySweep(None, None, None, None, 0.0, 0.0, 0.0, 0.0)


def log_probs_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    grad: torch.Tensor | None = None,
    upstream: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
    policy: PolicySweep | None = None,
) -> None:
    """`xent_log_probs` over (R, V) float32/bfloat16 CPU logits with contiguous classes: the forward fills `out`
    = (log p_t, lse, entropy or None), float32 (R,); the backward writes into `grad` (like the logits, may be
    them) for `upstream` = (g, h or None, the forward's entropy or None), float32 (R,). `target` (int64, ignored
    rows any valid index) and `valid` (bool) are contiguous (R,). With `policy`, `out` and `grad`:
    the policy loss's sweep, the forward's outputs and the gradient for the upstream gradients the policy's
    per-token terms give. Callers check `log_probs_covers` first."""
    rows, classes = logits.shape
    work = _work(rows, classes)
    log_prob, lse, entropy = out if out is not None else (None, None, None)
    g, h, saved_entropy = upstream if upstream is not None else (None, None, None)
    policy = policy or _NO_POLICY
    call = LogProbsArguments(
        **_logits_fields(logits),
        target=target.data_ptr(),
        valid=valid.data_ptr(),
        temperature=temperature,
        log_prob=_pointer(log_prob),
        lse=_pointer(lse),
        entropy=_pointer(entropy if upstream is None else saved_entropy),  # written, or read by a backward
        grad_log_prob=_pointer(g),
        grad_entropy=_pointer(h),
        **work.fields(grad),
        advantages=_pointer(policy.advantages),
        old_log_probs=_pointer(policy.old_log_probs),
        ref_log_probs=_pointer(policy.ref_log_probs),
        factor=_pointer(policy.factor),
        epsilon_low=policy.epsilon_low,
        epsilon_high=policy.epsilon_high,
        kl_coef=policy.kl_coef,
        entropy_coef=policy.entropy_coef,
    )
    _run(_state["log_probs"], call, grad)


def distillation_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    beta: float,
    temperature: float,
    scale: torch.Tensor | None,
    loss: torch.Tensor,
    grad: torch.Tensor | None,
) -> None:
    """`xent_distillation` over (R, V) float32/bfloat16 CPU student and teacher logits with contiguous classes:
    `loss` (float32 (R,)) receives each row's divergence, `grad` (like the student, may be it) the student's
    gradient times `scale` (float32 (R,), or None for 1). Callers check `supports_distillation` first."""
    rows, classes = student.shape
    work = _work(rows, classes, scratch_rows=4)  # each model's u and exponentials
    call = DistillationArguments(
        student=student.data_ptr(),
        student_row_stride=student.stride(0),
        student_dtype=DTYPES[student.dtype],
        teacher=teacher.data_ptr(),
        teacher_row_stride=teacher.stride(0),
        teacher_dtype=DTYPES[teacher.dtype],
        rows=rows,
        classes=classes,
        beta=beta,
        temperature=temperature,
        scale=_pointer(scale),
        loss=loss.data_ptr(),
        **work.fields(grad),
    )
    _run(_state["distillation"], call, grad)


def distillation_covers(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `distillation_rows` (and `log_probs_rows`) compute rows of this device and dtype, laid out as they
    need: CPU float32/bfloat16, and the kernel built."""
    return device.type == "cpu" and dtype in DTYPES and _load() is not None


def supports_distillation(student: torch.Tensor, teacher: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """Whether `distillation_rows` computes these rows: CPU float32/bfloat16 (R, V) logits of both models with
    contiguous classes (at least one; the gradient laid out so too), and the kernel built."""
    tensors = (student, teacher) + (() if grad is None else (grad,))
    laid_out = all(t.dim() == 2 and classes_contiguous(t, t.shape[1]) for t in tensors)
    dtypes_ok = all(distillation_covers(t.device, t.dtype) for t in tensors)
    return laid_out and dtypes_ok and student.shape[1] > 0 and (grad is None or grad.dtype == student.dtype)


def log_probs_covers(device: torch.device, dtype: torch.dtype, softcap: float | None) -> bool:
    """Whether `log_probs_rows` computes rows of this device and dtype (with contiguous classes): CPU
    float32/bfloat16, no soft-capping, and the kernel built."""
    return softcap is None and distillation_covers(device, dtype)


def supports_call(device: torch.device, dtype: torch.dtype, problem: CrossEntropyProblem) -> bool:
    """Whether the kernel computes this call's rows, given contiguous (R, C) rows: CPU, float32 or bfloat16
    logits, class indices or float32/bfloat16 class probabilities, float32 arithmetic (no float64 anywhere), no
    soft-capping, and the kernel built."""
    targets_ok = problem.kind == "index" or problem.target.dtype in DTYPES
    ok = device.type == "cpu" and dtype in DTYPES and problem.acc_dtype == torch.float32 and targets_ok
    return ok and problem.softcap is None and _load() is not None


def classes_contiguous(t: torch.Tensor, classes: int) -> bool:
    """Whether the classes (dim 1) of `t` lie next to each other in memory, as every kernel here reads them."""
    return t.stride(1) == 1 or classes == 1


def _run(entry_point, call: ctypes.Structure, grad: torch.Tensor | None) -> None:
    """Call an entry point with its argument structure. Every thread it starts is joined before it returns; a
    gradient it wrote through a raw pointer is marked modified, as an in-place torch op would mark it."""
    entry_point(ctypes.byref(call))
    if grad is not None:
        torch.autograd.graph.increment_version(grad)


def supports(problem: CrossEntropyProblem, grad_out: torch.Tensor | None) -> bool:
    """`supports_call`, and the logits (gradient, class probabilities) laid out as rows with contiguous classes."""
    x = problem.logits
    classes = x.shape[1]
    rows_ok = x.shape[2] == 1 and classes > 0 and classes_contiguous(x, classes)
    grad_ok = grad_out is None or (grad_out.dtype == x.dtype and classes_contiguous(grad_out, classes))
    probs_ok = problem.kind == "index" or classes_contiguous(problem.target, classes)
    return rows_ok and grad_ok and probs_ok and supports_call(x.device, x.dtype, problem)


def _logits_fields(logits: torch.Tensor) -> dict:
    """The fields every cross-entropy and log-probability argument structure starts with: (R, C, ...) logits with
    contiguous classes, by address, row stride, dtype and shape."""
    rows, classes = logits.shape[:2]
    return dict(
        logits=logits.data_ptr(),
        logits_row_stride=logits.stride(0),
        dtype=DTYPES[logits.dtype],
        rows=rows,
        classes=classes,
    )


class _Work(NamedTuple):
    """The threads of one kernel call and their scratch buffer, held here until the call returns (the argument
    structure keeps only its address)."""

    threads: int
    scratch: torch.Tensor
    scratch_row_stride: int  # floats between two threads' scratch

    def fields(self, grad: torch.Tensor | None) -> dict:
        """The fields every entry point's argument structure ends with: the gradient buffer, then the work."""
        return dict(
            grad=_pointer(grad),
            grad_row_stride=0 if grad is None else grad.stride(0),
            scratch=self.scratch.data_ptr(),
            scratch_row_stride=self.scratch_row_stride,
            threads=self.threads,
        )


def _work(rows: int, classes: int, scratch_rows: int = 1) -> _Work:
    """One thread below PARALLEL_MIN_ELEMENTS logits, else the torch threads (at most one per row); each thread's
    `scratch_rows` rows of classes padded to whole vectors. The buffer names the CPU: under a `torch.device(...)`
    context a factory would allocate elsewhere."""
    threads = 1 if rows * classes < PARALLEL_MIN_ELEMENTS else max(1, min(torch.get_num_threads(), rows))
    stride = scratch_rows * (-(-classes // LANES) * LANES)
    return _Work(threads, torch.empty(threads, stride, dtype=torch.float32, device="cpu"), stride)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def fill_rows(problem: CrossEntropyProblem, grad_out: torch.Tensor | None, result) -> None:
    """Run the compiled kernel: fill `result` (a `backends.base.RowResult` of float32 (B, 1) tensors, allocated by
    `rows`) and `grad_out` in place. `rows` is the backend contract; this is the call into C."""
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
    work = _work(batch, classes)
    call = arguments(
        **_logits_fields(x),
        target=_pointer(target),
        target_weight=_pointer(target_weight),
        valid=valid.data_ptr(),
        class_weight=_pointer(weight),
        probs=_pointer(probs),
        probs_row_stride=0 if probs is None else probs.stride(0),
        probs_dtype=0 if probs is None else DTYPES[probs.dtype],
        class_weight_sum=float(classes) if weight is None else float(weight.sum()),
        smoothing=problem.smoothing,
        z_loss=problem.z_loss,
        scale=float(problem.grad_scale),
        loss=_pointer(result.loss),
        lse=_pointer(result.lse),
        argmax=_pointer(result.argmax),
        entropy=_pointer(result.entropy),
        **work.fields(grad_out),
    )
    _run(fn, call, grad_out)


def supports_layout(problem: CrossEntropyProblem) -> bool:
    """Whether the kernel computes this problem's rows, with a gradient buffer made like its logits."""
    return supports(problem, None)


def coverage() -> str:
    return (
        "CPU, float32/bfloat16 logits with contiguous classes, one position per sample, class indices or "
        "float32/bfloat16 probabilities, no soft-capping"
    )


def rows(problem: CrossEntropyProblem, grad_out: torch.Tensor | None, want_stats: bool):
    """The "cpu" backend's rows function (the contract of backends/base.py, `-> RowResult`): the compiled kernel,
    or the PyTorch ops for a call it does not cover (a gradient buffer laid out otherwise, an empty problem)."""
    from xentlib.backends import torch_chunked
    from xentlib.backends.base import RowResult

    x = problem.logits
    if x.numel() == 0 or not supports(problem, grad_out):
        return torch_chunked.cross_entropy_rows(problem, grad_out, want_stats)
    batch = x.shape[0]
    # the device named: under a `torch.device(...)` context a factory would allocate elsewhere, and C writes here
    empty = lambda dtype=torch.float32: torch.empty(batch, 1, dtype=dtype, device="cpu")  # noqa: E731
    result = RowResult(
        loss=empty(),
        lse=empty() if want_stats or problem.z_loss else None,
        argmax=empty(torch.long) if want_stats else None,
        entropy=empty() if want_stats else None,
    )
    fill_rows(problem, grad_out, result)
    return result
