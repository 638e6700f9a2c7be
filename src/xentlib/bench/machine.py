"""The machine: what it is (CPU, versions, environment) and what it can do at best (the limits results are
compared against).

Limits, each the best of several runs of one large operation (the best, because other work on the machine only
ever slows a run down):
- matmul GFLOP/s per dtype: one square matmul into a reused output, 2*n^3 FLOPs;
- memory bandwidth: a large copy into a reused buffer and into freshly allocated memory (clone), counting
  bytes read plus bytes written; on Linux fresh memory is zero-filled by the kernel on first touch, which is
  why it is the slower one;
- exp throughput: float32 exp into a reused buffer, in elements per second.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from xentlib.bench.config import DTYPES

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../xentlib


def source_checkout() -> Path | None:
    """The repository root when this xentlib runs from a source checkout (src/xentlib), None when installed."""
    root = PACKAGE_DIR.parents[1]
    if PACKAGE_DIR.parent.name == "src" and (root / "pyproject.toml").is_file() and (root / ".git").exists():
        return root
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the checkout xentlib runs from, with '+dirty' when files differ from it; 'installed' for a wheel."""
    root = source_checkout()
    if root is None:
        return "installed"
    git = lambda *args: subprocess.run(  # noqa: E731
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def transparent_hugepages() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "n/a"


def machine_info(device_name: str, threads: int) -> dict:
    """Facts about this machine and software, one CSV column each; imports torch (and xentlib if present)."""
    import torch

    try:
        import xentlib

        xentlib_version = getattr(xentlib, "__version__", "unknown")
    except ImportError:
        xentlib_version = "not importable"
    gpu = torch.cuda.get_device_name(0) if device_name == "cuda" else ""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xentlib": xentlib_version,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "sys_thp": transparent_hugepages(),
    }


# ---------------------------------------------------------------------------------------------- limits


def _best_seconds(fn, device, runs: int) -> float:
    from xentlib.bench.measure import synchronize

    fn()  # warm-up: first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(device, dtype_name: str, size: int, runs: int = 6) -> float:
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.matmul(a, b, out=out), device, runs)
    return 2 * size**3 / seconds / 1e9


def copy_bandwidth_gbs(device, elements: int, fresh: bool, runs: int = 10) -> float:
    """GB/s of a float32 copy (bytes read + bytes written); `fresh` copies into newly allocated memory."""
    import torch

    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    copy = (lambda: source.clone()) if fresh else (lambda: target.copy_(source))
    seconds = _best_seconds(copy, device, runs)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def exp_gelems(device, elements: int, runs: int = 10) -> float:
    import torch

    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: torch.exp(source, out=target), device, runs)
    return elements / seconds / 1e9


def measure_limits(device, dtypes: tuple[str, ...]) -> dict:
    on_gpu = getattr(device, "type", "cpu") == "cuda"
    matmul_size = 8192 if on_gpu else 2048
    elements = (256 if on_gpu else 32) * 2**20  # 1 GiB on GPU, 128 MiB on CPU (beyond every cache)
    limits = {f"matmul_gflops_{name}": matmul_gflops(device, name, matmul_size) for name in dtypes}
    limits["bw_reused_gbs"] = copy_bandwidth_gbs(device, elements, fresh=False)
    limits["bw_fresh_gbs"] = copy_bandwidth_gbs(device, elements, fresh=True)
    limits["exp_gelem_s"] = exp_gelems(device, elements)
    return limits


def limit_seconds(problem: str, n: int, d: int | None, v: int, dtype_name: str, element_size: int, limits):
    """(what bounds it, seconds at that bound) for one forward+backward.

    ce: the logits are read once and the gradient written once, 2*N*V*bytes at the reused-memory bandwidth,
    and every logit goes through one exp, N*V at the exp rate; the slower of the two bounds the time (on a
    small CPU they are close, on a GPU the bandwidth wins).
    linear, logprobs: three matmuls of 2*N*D*V FLOPs each (logits, dX, dW) at the measured matmul rate.
    distill: four (the student's logits, dX, dW, and the teacher's logits).
    """
    if problem == "ce":
        bandwidth_s = 2 * n * v * element_size / (limits["bw_reused_gbs"] * 1e9)
        exp_s = n * v / (limits["exp_gelem_s"] * 1e9)
        return ("bandwidth", bandwidth_s) if bandwidth_s >= exp_s else ("exp", exp_s)
    rate = limits.get(f"matmul_gflops_{dtype_name}")
    matmuls = 4 if problem == "distill" else 3
    return "matmul", (matmuls * 2 * n * d * v / (rate * 1e9)) if rate else float("nan")
