"""GPU benchmark of xentlib's Triton backend: cross_entropy and linear_cross_entropy, forward + backward.

Compared side by side in one run (each only when importable): torch eager, torch.compile, Liger Kernel, Cut
Cross-Entropy, and xentlib (public API with backend='triton'; for linear_cross_entropy the Triton chunked op
directly when the public function is not there). For every case it prints and writes to CSV the median
and min-max forward+backward time, the peak extra GPU memory (torch.cuda.max_memory_allocated above what the
inputs hold), and the distance to the machine's limits: cross_entropy moves at least 2 x N x V x bytes (read
the logits, write the gradient), linear_cross_entropy does 6 x N x D x V FLOPs (three matmuls).

    PYTHONPATH=src python benchmarks/gpu_triton.py --csv triton_bench.csv          # full sizes
    PYTHONPATH=src python benchmarks/gpu_triton.py --quick                           # small sizes, smoke run

Needs a CUDA/ROCm GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/gpu_triton.py`: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CE_SHAPES = [(4096, 32_000), (8192, 128_256), (16_384, 256_000)]  # (N tokens, V classes)
LINEAR_SHAPES = [(16_384, 4096, 128_256), (8192, 2304, 256_000)]  # (N, D hidden, V): issue 4's two shapes
QUICK_CE_SHAPES = [(1024, 32_000)]
QUICK_LINEAR_SHAPES = [(1024, 1024, 32_000)]


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------


def measure(step: Callable[[], None], warmup: int, repeats: int) -> dict:
    """Median / min / max milliseconds of `step` (CUDA events) and its peak extra memory in MiB."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "peak_mib": peak,
    }


# ----------------------------------------------------------------------------------------------------------
# implementations: each returns a zero-argument step running forward + backward, or None when unavailable
# ----------------------------------------------------------------------------------------------------------


def ce_impls(logits, target) -> dict[str, Callable | None]:
    import torch
    import torch.nn.functional as F

    buffer = torch.empty_like(logits)  # the in-place variant overwrites its logits: refill them each step

    def backward_of(loss_fn, inplace=False):
        def step():
            if inplace:
                buffer.copy_(logits)
            x = buffer if inplace else logits
            x.requires_grad_(True)
            loss_fn(x, target).backward()
            x.grad = None
            x.requires_grad_(False)

        return step

    impls = {
        "torch eager": backward_of(F.cross_entropy),
        "torch.compile": backward_of(torch.compile(F.cross_entropy)),
        # what the in-place variant spends refilling its logits: subtract it from that row
        "(logits copy only)": lambda: buffer.copy_(logits),
    }
    try:
        import xentlib.functional as xf

        impls["xentlib triton"] = backward_of(lambda x, t: xf.cross_entropy(x, t, backend="triton"))
        impls["xentlib triton inplace"] = backward_of(
            lambda x, t: xf.cross_entropy(x, t, backend="triton", inplace_backward=True), inplace=True
        )
    except ImportError as err:
        print(f"  xentlib public API not importable ({err}); skipped", file=sys.stderr)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        impls["liger"] = backward_of(LigerCrossEntropyLoss())
    except ImportError:
        impls["liger"] = None
    return impls


def three_matmuls(x, weight) -> Callable[[], None]:
    """The physical floor of linear_cross_entropy (6NDV FLOPs): `xentlib bench`'s own 3-matmuls step."""
    from benchmarks.config import Shape
    from benchmarks.impls import Case, build_three_matmuls

    shape = Shape("linear", x.shape[0], weight.shape[0], x.shape[1])
    case = Case(shape, "", x.device, "index", 0.0, tensors={"x": x, "weight": weight})
    step = build_three_matmuls(case)

    def run():
        step.backward(step.forward())
        x.grad = weight.grad = None

    return run


def linear_impls(x, weight, target, chunk_sizes=()) -> dict[str, Callable | None]:
    import torch
    import torch.nn.functional as F

    def eager_step(fn):
        def step():
            fn(x, weight, target).backward()
            x.grad = weight.grad = None

        return step

    eager = lambda x, w, t: F.cross_entropy(x @ w.T, t)  # noqa: E731
    impls = {
        "3 matmuls": three_matmuls(x, weight),
        "torch eager": eager_step(eager),
        "torch.compile": eager_step(torch.compile(eager)),
    }
    if hasattr(F, "linear_cross_entropy"):  # torch's own chunked version (recent torch)
        impls["torch F.linear_cross_entropy"] = eager_step(lambda x, w, t: F.linear_cross_entropy(x, w, t))
    try:
        import xentlib.functional as xf

        impls["xentlib triton"] = eager_step(lambda x, w, t: xf.linear_cross_entropy(x, w, t, backend="triton"))
        for chunk in chunk_sizes:
            impls[f"xentlib triton chunk={chunk}"] = eager_step(
                lambda x, w, t, chunk=chunk: xf.linear_cross_entropy(x, w, t, backend="triton", chunk_size=chunk)
            )
        impls["xentlib triton-tiled"] = eager_step(
            lambda x, w, t: xf.linear_cross_entropy(x, w, t, backend="triton-tiled")
        )
    except ImportError as err:
        print(f"  xentlib not importable ({err}); skipped", file=sys.stderr)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger fused linear"] = eager_step(lambda x, w, t: liger(w, x, t))
    except ImportError:
        impls["liger fused linear"] = None
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cut cross-entropy"] = eager_step(lambda x, w, t: cce(x, w, t))
    except ImportError:
        impls["cut cross-entropy"] = None
    return impls


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def machine_limits() -> tuple[float, float]:
    """This GPU's dense bf16 matmul TFLOP/s (8192^3) and device copy GB/s (1 GiB, bytes read + written), measured
    by `xentlib bench`'s own probes: the denominators of the fractions printed below."""
    import torch

    from benchmarks.machine import copy_bandwidth_gbs, matmul_gflops

    gpu = torch.device("cuda")  # a torch.device: the probes synchronize only on one whose type is cuda
    return matmul_gflops(gpu, "bf16", 8192) / 1000, copy_bandwidth_gbs(gpu, 2**28, fresh=False)


def run_case(op: str, shape: tuple, impls: dict, limit: Callable[[float], str], args) -> list[dict]:
    rows = []
    for name, step in impls.items():
        row = {"op": op, "shape": "x".join(map(str, shape)), "impl": name, "dtype": args.dtype}
        if step is None:
            print(f"  {op:<22} {row['shape']:<22} {name:<28} not installed")
            continue
        try:
            row.update(measure(step, args.warmup, args.repeats))
        except Exception as err:  # one failing implementation (OOM, unsupported shape) must not stop the run
            print(f"  {op:<22} {row['shape']:<22} {name:<28} failed: {type(err).__name__}: {err}")
            continue
        row["vs_limit"] = limit(row["median_ms"])
        print(
            f"  {op:<22} {row['shape']:<22} {name:<28} {row['median_ms']:9.3f} ms "
            f"[{row['min_ms']:.3f}-{row['max_ms']:.3f}]  peak +{row['peak_mib']:9.1f} MiB  {row['vs_limit']}"
        )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", choices=["ce", "linear"], help="run one operation's shapes")
    parser.add_argument(
        "--chunk-sizes", default="", help="comma-separated extra chunk sizes for xentlib's linear rows, e.g. 1024,4096"
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_triton.py needs a CUDA/ROCm GPU; none is available.", file=sys.stderr)
        return 1
    import triton

    dtype = getattr(torch, args.dtype)
    element = torch.finfo(dtype).bits // 8
    device = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__} | triton {triton.__version__} | python {platform.python_version()}"
    print(f"{device} | {versions}")
    peak_tflops, copy_gbs = machine_limits()
    print(f"limits: bf16 matmul {peak_tflops:.0f} TFLOP/s (8192^3), device copy {copy_gbs:.0f} GB/s (read + write)")
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    results = []

    ce_shapes = QUICK_CE_SHAPES if args.quick else CE_SHAPES
    linear_shapes = QUICK_LINEAR_SHAPES if args.quick else LINEAR_SHAPES
    for n, v in ce_shapes if args.only != "linear" else []:
        logits = torch.randn(n, v, device="cuda", dtype=dtype)
        target = torch.randint(0, v, (n,), device="cuda")
        bytes_moved = 2 * n * v * element  # read the logits once, write the gradient once

        def bandwidth(ms, bytes_moved=bytes_moved):
            rate = bytes_moved / (ms * 1e-3) / 1e9
            return f"{rate:7.1f} GB/s effective (2 x N x V x bytes), {rate / copy_gbs:4.0%} of copy"

        results += run_case("cross_entropy", (n, v), ce_impls(logits, target), bandwidth, args)
        del logits, target

    for n, d, v in linear_shapes if args.only != "ce" else []:
        x = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
        weight = (torch.randn(v, d, device="cuda", dtype=dtype) / d**0.5).requires_grad_(True)
        target = torch.randint(0, v, (n,), device="cuda")
        flops = 6 * n * d * v

        def throughput(ms, flops=flops):
            rate = flops / (ms * 1e-3) / 1e12
            return f"{rate:7.1f} TFLOP/s (6 x N x D x V), {rate / peak_tflops:4.0%} of matmul"

        results += run_case(
            "linear_cross_entropy", (n, d, v), linear_impls(x, weight, target, chunk_sizes), throughput, args
        )
        del x, weight, target

    if args.csv:
        fields = ["op", "shape", "impl", "dtype", "median_ms", "min_ms", "max_ms", "peak_mib", "vs_limit"]
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields + ["device", "torch", "triton"])
            writer.writeheader()
            for row in results:
                writer.writerow({**row, "device": device, "torch": torch.__version__, "triton": triton.__version__})
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
