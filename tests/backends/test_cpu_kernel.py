"""The compiled CPU row kernel (src/xentlib/backends/cpu_rows.c) against the PyTorch ops it replaces and float64.

The rest of the suite already runs through the kernel wherever it applies (2-D float32/bfloat16 logits with class
indices or float32/bfloat16 class probabilities, on CPU); these tests pin what is specific to it: that it is really
built and used, vector tails (classes not a multiple of 16), strided rows, non-finite rows, every option and
statistic against the PyTorch-ops path of the same backend, bfloat16 rounding, its exp approximation, and the
fallback when no compiler works.
"""

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xentlib.functional as X
from xentlib import reference
from xentlib.backends import cpu_build, cpu_kernel


@pytest.fixture
def ops_path(monkeypatch):
    """A context in which the PyTorch ops run instead of the kernel."""

    def disable():
        monkeypatch.setitem(cpu_kernel._state, "fn", None)

    return disable


def make_case(rows, classes, dtype, seed=0, scale=3.0, ignore_index=-100):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=generator) * scale).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=generator)
    if rows > 2:
        target[1] = ignore_index
    weight = (torch.rand(classes, generator=generator) + 0.5).to(dtype)
    return x, target, weight


def make_probs(rows, classes, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, classes, generator=generator) * 2, 1).to(dtype)


def with_weight(options, weight):
    return {k: (weight if v == "w" else v) for k, v in options.items()}


def run(x, target, **options):
    """(loss, grad, stats) of xentlib's cross_entropy on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_()
    loss, stats = X.cross_entropy(leaf, target, return_stats=True, **options)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad, stats


def kernel_is_used(x, target, **options) -> bool:
    calls = []
    original = cpu_kernel.fill_rows
    try:
        cpu_kernel.fill_rows = lambda *a: calls.append(1) or original(*a)
        run(x, target, **options)
    finally:
        cpu_kernel.fill_rows = original
    return bool(calls)


def test_kernel_builds_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    available, why = cpu_kernel.status()
    assert available, why


@pytest.mark.parametrize(
    "case, used",
    [
        (dict(), True),
        (dict(dtype=torch.bfloat16), True),
        (dict(options=dict(label_smoothing=0.1, z_loss=1e-3)), True),
        (dict(dtype=torch.float64), False),
        (dict(dtype=torch.float16), False),
        (dict(options=dict(softcap=5.0)), False),
        (dict(spatial=True), False),
        (dict(probs=torch.float32), True),
        (dict(probs=torch.bfloat16), True),
        (dict(dtype=torch.bfloat16, probs=torch.float32), True),
        (dict(probs=torch.float64), False),  # float64 anywhere: the float64 ops
        (dict(probs=torch.float32, probs_transposed=True), False),  # classes not contiguous in the target
    ],
)
def test_kernel_runs_exactly_the_supported_calls(case, used):
    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    x, target, _ = make_case(6, 20, case.get("dtype", torch.float32))
    if case.get("spatial"):
        x, target = x.view(2, 3, 20).transpose(1, 2), target.clamp_min(0).view(2, 3)
    if "probs" in case:
        target = make_probs(6, 20, case["probs"])
        if case.get("probs_transposed"):
            target = target.t().contiguous().t()
    assert kernel_is_used(x, target, **case.get("options", {})) is used


OPTIONS = [
    {},
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight="w"),
    dict(label_smoothing=0.15),
    dict(weight="w", label_smoothing=0.3, reduction="sum"),
    dict(z_loss=1e-2),
    dict(weight="w", z_loss=1e-3, label_smoothing=0.05, reduction="none"),
    dict(ignore_index=2),
]


@pytest.mark.parametrize("rows, classes", [(1, 1), (3, 2), (5, 15), (7, 16), (9, 17), (33, 100), (12, 1003)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_float32_matches_the_pytorch_ops(ops_path, rows, classes, options):
    x, target, weight = make_case(rows, classes, torch.float32, ignore_index=options.get("ignore_index", -100))
    options = with_weight(options, weight)
    fast = run(x, target, **options)
    ops_path()
    slow = run(x, target, **options)
    assert_results_close(fast, slow, rtol=2e-6, atol=2e-7)


def assert_results_close(fast, slow, rtol, atol):
    (loss, grad, stats), (loss_ref, grad_ref, stats_ref) = fast, slow
    close = dict(rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(loss, loss_ref, **close)
    torch.testing.assert_close(grad, grad_ref, **close)
    for name in ("lse", "loss", "entropy"):
        torch.testing.assert_close(getattr(stats, name).detach(), getattr(stats_ref, name).detach(), **close)
    torch.testing.assert_close(stats.argmax, stats_ref.argmax)
    torch.testing.assert_close(stats.correct, stats_ref.correct)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_bfloat16_is_float64_rounded_once(options):
    """Gradient within one bfloat16 rounding of the float64 gradient of the same bfloat16 logits."""
    x, target, weight = make_case(24, 515, torch.bfloat16, ignore_index=options.get("ignore_index", -100))
    options = with_weight(options, weight)
    _, grad, stats = run(x, target, **options)
    exact_options = {k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items()}
    _, grad64, stats64 = run(x.double(), target, **exact_options)
    assert grad.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(grad.double(), grad64, rtol=ulp, atol=1e-30)
    torch.testing.assert_close(stats.lse.double(), stats64.lse, rtol=1e-6, atol=1e-6)


PROB_OPTIONS = [option for option in OPTIONS if "ignore_index" not in option]


@pytest.mark.parametrize("rows, classes", [(1, 1), (3, 2), (5, 15), (7, 16), (9, 17), (33, 100), (12, 1003)])
@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", PROB_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_probabilities_match_the_pytorch_ops(ops_path, rows, classes, probs_dtype, options):
    x, _, weight = make_case(rows, classes, torch.float32)
    probs = make_probs(rows, classes, probs_dtype)
    options = with_weight(options, weight)
    fast = run(x, probs, **options)
    ops_path()
    slow = run(x, probs, **options)
    assert_results_close(fast, slow, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("options", PROB_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_bfloat16_probabilities_are_float64_rounded_once(options):
    """bfloat16 logits and probabilities: the gradient within one bfloat16 rounding of the float64 gradient."""
    x, _, weight = make_case(24, 515, torch.bfloat16)
    probs = make_probs(24, 515, torch.bfloat16)
    options = with_weight(options, weight)
    _, grad, stats = run(x, probs, **options)
    exact_options = {k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items()}
    _, grad64, stats64 = run(x.double(), probs.double(), **exact_options)
    assert grad.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(grad.double(), grad64, rtol=ulp, atol=1e-30)
    assert stats.loss.dtype == torch.bfloat16  # the row losses in the output dtype: one rounding too
    torch.testing.assert_close(stats.loss.double(), stats64.loss, rtol=ulp, atol=1e-30)


def test_probabilities_with_non_finite_logits_match_the_pytorch_ops(ops_path):
    """Including a zero probability on a -inf logit: 0 * log 0 is NaN without smoothing (as in torch), and with
    smoothing that class has a positive probability and the loss is +inf."""
    x, _, _ = make_case(6, 40, torch.float32)
    probs = make_probs(6, 40, torch.float32)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2] = float("-inf")
    x[3, 5] = float("-inf")
    probs[3, 5] = 0.0
    x[4] = x[4] * 1e4
    cases = []
    for options in (dict(reduction="none"), dict(label_smoothing=0.1, reduction="none")):
        cases.append((options, run(x, probs, **options)))
    ops_path()
    for options, fast in cases:
        assert_results_close(fast, run(x, probs, **options), rtol=2e-6, atol=2e-7)
    assert torch.isnan(cases[0][1][0][3]) and cases[1][1][0][3] == float("inf")


def test_strided_probability_rows(ops_path):
    """Probability rows that are not adjacent in memory (a column slice of a wider tensor) are read in place."""
    x, _, _ = make_case(10, 70, torch.float32)
    wide = torch.rand(10, 90)
    wide[:, :70] = make_probs(10, 70, torch.float32)
    probs = wide[:, :70]
    assert not probs.is_contiguous() and kernel_is_used(x, probs)
    fast = run(x, probs, label_smoothing=0.1)
    ops_path()
    assert_results_close(fast, run(x, probs.contiguous(), label_smoothing=0.1), rtol=2e-6, atol=2e-7)


def test_strided_rows_and_a_sliced_gradient(ops_path):
    """Rows that are not adjacent in memory (a column slice) are read in place, without a copy."""
    x, target, _ = make_case(10, 70, torch.float32)
    wide = torch.randn(10, 90)
    wide[:, :70] = x
    sliced = wide[:, :70]
    assert not sliced.is_contiguous()
    fast = run(sliced, target)
    ops_path()
    assert_results_close(fast, run(x, target), rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows_match_the_pytorch_ops(ops_path, dtype):
    x, target, _ = make_case(8, 40, dtype)
    target[1] = 5  # every row valid
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2] = float("-inf")
    x[3, :39] = float("-inf")  # one finite logit
    x[4, target[4]] = float("-inf")  # the target itself impossible: infinite loss
    x[5] = x[5] * 1e4  # large logits
    target[6] = -100
    x[6, 0] = float("nan")  # ignored row: no NaN may leak into loss or gradient
    for options in ({}, dict(reduction="none"), dict(label_smoothing=0.1, reduction="none")):
        fast = run(x, target, **options)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(cpu_kernel._state, "fn", None)
            slow = run(x, target, **options)
        assert_results_close(fast, slow, rtol=2e-6, atol=2e-7)


def test_inplace_gradient_equals_the_out_of_place_one():
    x, target, _ = make_case(16, 333, torch.bfloat16)
    expected = run(x, target)[1]
    logits = x.detach().clone().requires_grad_()
    X.cross_entropy(logits * 1, target, inplace_backward=True).backward()
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=0)


def test_many_rows_split_over_threads_equal_one_thread(monkeypatch):
    x, target, _ = make_case(301, 517, torch.float32)
    parallel = run(x, target, reduction="none")
    monkeypatch.setattr(cpu_kernel, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    serial = run(x, target, reduction="none")
    assert_results_close(parallel, serial, rtol=0, atol=0)


def test_exp_accuracy_over_the_whole_range():
    """The kernel's exp (a polynomial on [-ln2/2, ln2/2] and an exponent shift) against float64, through p = e / s:
    with one logit at 0 and the other at y, p_other = exp(y) / (1 + exp(y)). Its error may not exceed torch's
    float32 softmax by more than a quarter."""
    y = torch.linspace(-86.9, 0.0, 400_001, dtype=torch.float64)
    x = torch.stack([torch.zeros_like(y), y], 1).float()
    target = torch.zeros(len(y), dtype=torch.long)
    _, grad, _ = run(x, target, reduction="sum")
    exact = torch.exp(x[:, 1].double()) / (1 + torch.exp(x[:, 1].double()))
    ours = ((grad[:, 1].double() - exact) / exact).abs().max()
    torchs = ((torch.softmax(x, 1)[:, 1].double() - exact) / exact).abs().max()
    assert ours <= 1.25 * torchs, (ours, torchs)


def test_loss_against_torch_on_a_large_vocabulary():
    x, target, weight = make_case(64, 32000, torch.float32)
    leaf, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    X.cross_entropy(leaf, target, weight=weight, label_smoothing=0.1).backward()
    F.cross_entropy(ref, target, weight=weight, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-8)


def test_without_a_compiler_the_pytorch_ops_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XENTLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        available, why = cpu_kernel.status()
    assert not available and "no-such-compiler" in why
    x, target, _ = make_case(5, 9, torch.float32)
    leaf, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    X.cross_entropy(leaf, target).backward()
    F.cross_entropy(ref, target).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("XENTLIB_CPU_KERNEL", "0")
    monkeypatch.setattr(cpu_kernel, "_state", {})
    assert cpu_kernel.status() == (False, "XENTLIB_CPU_KERNEL=0: the PyTorch ops run instead")
    x, target, _ = make_case(5, 9, torch.float32)
    assert not kernel_is_used(x, target)


def _compiler_and_version():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    return compiler, subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


ONE_OPENMP_RUNTIME = """
import re, torch
import xentlib.functional as X
from xentlib.backends import cpu_kernel
x = torch.randn(301, 517, requires_grad=True)
X.cross_entropy(x, torch.randint(0, 517, (301,))).backward()  # a threaded call
with open("/proc/self/maps") as maps:
    print(sorted({line.split()[-1] for line in maps if re.search(r"lib(g|i|)omp[^/]*\\.so", line)}))
print(cpu_kernel.status())
"""


def test_the_kernel_runs_on_the_openmp_team_of_torch(tmp_path):
    """Where torch runs on GNU OpenMP and the compiler is GCC, the library is built with -fopenmp and its
    libgomp.so.1 is the one torch loaded: in a process of torch and xentlib alone, one OpenMP runtime, so no second
    team waits beside torch's."""
    _, version = _compiler_and_version()
    gnu = "Free Software Foundation" in version and "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if not (gnu and sys.platform == "linux"):
        pytest.skip("torch does not run on GNU OpenMP here, or the compiler is not GCC: the kernel starts pthreads")
    done = run_python(ONE_OPENMP_RUNTIME, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    runtimes, status = done.stdout.strip().splitlines()
    assert "on the OpenMP threads of torch" in status, status
    assert len(ast.literal_eval(runtimes)) == 1, runtimes


def _fresh_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("XENTLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_state", {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pthreads_build_equals_the_openmp_one(monkeypatch, tmp_path, dtype):
    """Where the OpenMP build is not made (another compiler or runtime), the kernel starts its own threads: the
    same rows, bit for bit, split over threads the same way."""
    x, target, _ = make_case(301, 517, dtype)
    expected = run(x, target, reduction="none")
    _fresh_kernel(monkeypatch, tmp_path)
    monkeypatch.setattr(cpu_build, "_torch_on_gnu_openmp", lambda: False)
    available, why = cpu_kernel.status()
    assert available and why.endswith("on pthreads of its own"), why
    assert_results_close(run(x, target, reduction="none"), expected, rtol=0, atol=0)


def test_a_failed_openmp_build_falls_back_to_pthreads_silently(monkeypatch, tmp_path):
    compiler, version = _compiler_and_version()
    if len(cpu_build._flag_sets(version)) < 2:
        pytest.skip("no OpenMP build is tried here")
    no_openmp, attempts = tmp_path / "cc", tmp_path / "openmp-attempts"
    no_openmp.write_text(
        f'#!/bin/sh\nfor a in "$@"; do\n  if [ "$a" = -fopenmp ]; then\n'
        f'    echo x >> {attempts}; echo "no OpenMP" >&2; exit 1\n  fi\ndone\nexec {compiler} "$@"\n'
    )
    no_openmp.chmod(0o755)
    monkeypatch.setenv("CC", str(no_openmp))
    monkeypatch.setattr(subprocess, "run", _with_version_of(compiler, subprocess.run))
    _fresh_kernel(monkeypatch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        available, why = cpu_kernel.status()
    assert available and why.endswith("on pthreads of its own"), why
    x, target, _ = make_case(301, 517, torch.float32)
    assert kernel_is_used(x, target)
    monkeypatch.setattr(cpu_kernel, "_state", {})  # the next process: the failed OpenMP build is not tried again
    assert cpu_kernel.status()[0]
    assert attempts.read_text().count("x") == 1


def _with_version_of(compiler, run_command):
    """subprocess.run, where `--version` of the wrapper script answers as the compiler it wraps."""

    def patched(command, *args, **kwargs):
        if list(command[1:]) == ["--version"]:
            command = [compiler, "--version"]
        return run_command(command, *args, **kwargs)

    return patched


# --------------------------------------------------------------------------------------------------------------
# Interrupt safety, the verified build cache and the declared binding (each in a fresh process where it matters)
# --------------------------------------------------------------------------------------------------------------

INTERRUPTED_CALL = """
import os, signal, sys, threading, time
import torch
import xentlib.functional as X
from xentlib.backends import cpu_kernel

# Python leaves SIGINT ignored when it starts with SIGINT ignored (a background job, some CI runners)
signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(2)
assert cpu_kernel.status()[0], cpu_kernel.status()
x = torch.randn(2048, 32768).to(torch.bfloat16).requires_grad_()
t = torch.randint(0, 32768, (2048,))
X.cross_entropy(x, t)
threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
interrupted = False
try:
    for _ in range(200):
        X.cross_entropy(x, t)
except KeyboardInterrupt:
    interrupted = True
if interrupted:  # the traceback (and the frames holding the call's tensors) is gone: reuse their memory
    junk = [torch.ones(2048, 32768, dtype=torch.bfloat16) for _ in range(8)]
    time.sleep(1.0)
    print("INTERRUPTED-CLEANLY")
    sys.exit(0)
sys.exit(3)
"""


def run_python(code, cache_dir, **env):
    environment = {**os.environ, "XENTLIB_CACHE_DIR": str(cache_dir), **env}
    environment.pop("XENTLIB_CPU_KERNEL", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


def test_ctrl_c_during_a_threaded_call_does_not_crash(tmp_path):
    """SIGINT while two threads write 128 MiB of gradient: KeyboardInterrupt after the call, never a worker
    writing into freed memory (the thread-pool version died with SIGSEGV here every time)."""
    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    done = run_python(INTERRUPTED_CALL, tmp_path)
    assert done.returncode == 0 and "INTERRUPTED-CLEANLY" in done.stdout, (done.returncode, done.stderr[-2000:])


LOSS_AND_STATUS = """
import warnings, torch
import xentlib.functional as X
from xentlib.backends import cpu_kernel
warnings.simplefilter("error")  # a fallback warning would fail here: the cache must be repaired silently
x = torch.randn(8, 40, requires_grad=True)
X.cross_entropy(x, torch.randint(0, 40, (8,))).backward()
print(cpu_kernel.status())
"""


def cached_library(cache_dir):
    done = run_python(LOSS_AND_STATUS, cache_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    (library,) = cache_dir.glob("cpu_rows-*.so")
    return library


def corrupt_truncated(library):
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


def corrupt_empty(library):
    library.write_bytes(b"")


def corrupt_without_the_entry_point(library):
    """A valid shared library, with a matching checksum, that is not the kernel."""
    source = library.with_name("other.c")
    source.write_text("int not_the_kernel = 1;\n")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    checksum = hashlib.sha256(library.read_bytes()).hexdigest()
    library.with_name(library.name + ".sha256").write_text(checksum + "\n")


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_empty, corrupt_without_the_entry_point])
def test_a_damaged_cached_library_is_rebuilt(tmp_path, corrupt):
    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    library = cached_library(tmp_path)
    corrupt(library)
    done = run_python(LOSS_AND_STATUS, tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "(True, 'compiled C row kernel" in done.stdout


def test_a_failed_build_warns_once_and_the_pytorch_ops_run(monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'no such flag' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("XENTLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    with pytest.warns(RuntimeWarning, match="building cpu_rows.c, cpu_post_training.c failed: no such flag") as caught:
        available, why = cpu_kernel.status()
        x, target, _ = make_case(5, 9, torch.float32)
        leaf = x.clone().requires_grad_()
        X.cross_entropy(leaf, target).backward()
    assert len(caught) == 1
    assert not available and "no such flag" in why
    torch.testing.assert_close(leaf.grad, torch.func.grad(lambda z: F.cross_entropy(z, target))(x))


@pytest.mark.parametrize(
    "table, layout, field",
    [("ARGUMENTS", "LAYOUT", "smoothing:f32"), ("COMMON_ARGUMENTS", "COMMON_LAYOUT", "ignore_index:i64")],
)
def test_the_binding_is_declared_once(table, layout, field):
    """Each ctypes table matches the layout the C source declares (a library declaring other arguments is
    refused at load), and a rows call must name every argument."""
    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    with pytest.raises(TypeError, match="missing"):
        cpu_kernel.arguments(logits=0)
    names = [name for name, _ in getattr(cpu_kernel, table)]
    assert [part.split(":")[0] for part in getattr(cpu_kernel, layout).split(",")[:-1]] == names
    mismatched = getattr(cpu_kernel, layout).replace(field, field.replace(":", "_wide:"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernel, layout, mismatched)
        with pytest.raises(ValueError, match="this module passes"):
            library = Path(re.search(r"\((\S+\.so)\)", cpu_kernel.status()[1]).group(1))
            cpu_build._open(library, cpu_kernel.entry_points())


def target_part(x, target, options) -> torch.Tensor:
    """|dl/dx_c| = |P_c - Q_c|: the target part Q_c = scale_r q_c (weights, smoothing, the reduction's scale, 0 on
    ignored rows), the size of what the float32 arithmetic subtracts before rounding."""
    rows, classes = x.shape
    w = options.get("weight")
    w = torch.ones(classes, dtype=torch.float64) if w is None else w.double()
    eps = options.get("label_smoothing", 0.0)
    if target.is_floating_point():
        q = w * ((1 - eps) * target.double() + eps / classes)
        valid, denominator = torch.ones(rows, dtype=torch.bool), rows
    else:
        valid = target != options.get("ignore_index", -100)
        safe = torch.where(valid, target, 0)
        q = (eps / classes) * w.expand(rows, classes).clone()
        q[torch.arange(rows), safe] += (1 - eps) * w[safe]
        denominator = float(w[safe][valid].sum())
    scale = 1.0 / denominator if options.get("reduction", "mean") == "mean" else 1.0
    return torch.where(valid[:, None], scale * q, 0.0)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_bfloat16_gradient_is_rounded_to_nearest(options, kind):
    """Every bfloat16 gradient element within half a bfloat16 ulp of the float64 gradient (xentlib.reference) of the
    same bfloat16 inputs, plus float32 noise (16 float32 ulps of |grad| + |target part|, the size of the terms
    before rounding): round to nearest. Truncation is off by up to a whole ulp."""
    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    if kind == "probs" and "ignore_index" in options:
        pytest.skip("probability targets have no ignore_index")
    x, target, weight = make_case(24, 515, torch.bfloat16, ignore_index=options.get("ignore_index", -100))
    if kind == "probs":
        target = make_probs(24, 515, torch.bfloat16)
    options = with_weight(options, weight)
    assert kernel_is_used(x, target, **options)
    _, grad, _ = run(x, target, **options)
    exact = {k: (v.double().numpy() if torch.is_tensor(v) else v) for k, v in options.items()}
    ones = 1.0 if options.get("reduction", "mean") != "none" else np.ones(len(x))
    numpy_target = target.double().numpy() if target.is_floating_point() else target.numpy()
    truth = torch.from_numpy(reference.cross_entropy_backward(ones, x.double().numpy(), numpy_target, **exact).input)
    _, exponent = torch.frexp(truth)  # |truth| in [2^(e-1), 2^e): a bfloat16 ulp there is 2^(e-8)
    half_ulp = torch.ldexp(torch.ones_like(truth), exponent - 9)
    float32_noise = 16 * torch.finfo(torch.float32).eps * (truth.abs() + target_part(x, target, options)) + 1e-30
    error = (grad.double() - truth).abs()
    assert bool((error <= half_ulp + float32_noise).all()), float((error / half_ulp).max())
