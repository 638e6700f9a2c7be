"""`xentlib bench`: xentlib against torch eager, torch.compile, torch's chunked linear_cross_entropy (and
Liger Kernel / Cut Cross-Entropy on GPU when installed) in one run: time, peak memory, machine limits, CSV
and plots.

The benchmark code lives in the repository's `benchmarks/` folder (not in the installed package); this module
finds it next to `src/` or in the current directory. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DESCRIPTION = """\
Benchmark xentlib's cross_entropy and linear_cross_entropy against torch eager, torch.compile (compile time
reported apart), torch's own chunked F.linear_cross_entropy, and on GPU Liger Kernel / Cut Cross-Entropy when
they are installed. Each (implementation, shape, dtype) runs in a fresh process: forward, backward and
forward+backward times (median, min-max over --repeats after --warmup), and peak extra memory (CPU:
resident-set high-water mark; GPU: torch.cuda.max_memory_allocated). Machine limits (matmul GFLOP/s, memory
bandwidth, exp throughput) are measured first and every result is also shown as a fraction of its limit.

Needs a source checkout (the benchmarks/ folder); results go to --out as results.csv, machine.json, ce.png and
linear.png."""

EPILOG = """\
shapes: ce:NxV (logits N x V) and linear:NxDxV (input N x D, weight V x D), comma-separated.
presets: default = ce:2048x32000,linear:1024x512x32000 (a few minutes on 2 CPU cores);
         issue = ce:4096x32000,ce:8192x50257,ce:4096x128256,
                 linear:2048x1024x32000,linear:4096x2048x50257,linear:2048x2048x128256;
         tiny = ce:256x4000,linear:128x64x4000 (seconds).
implementations: xentlib, xentlib-inplace (ce), torch-eager, torch-compile, torch-chunked (linear), liger, cce
         (GPU only), 3-matmuls (linear: x@W.T, dZ@W, dZ.T@x, the floor of any linear cross-entropy).
examples:
  xentlib bench
  xentlib bench --preset issue --dtypes bf16
  xentlib bench --shapes ce:4096x32000 --impls xentlib,torch-eager --thp both
  xentlib bench --preset tiny --targets prob --label-smoothing 0.1 --out /tmp/bench"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark xentlib against torch and other libraries (time, memory, plots)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to run")
    what.add_argument("--shapes", metavar="LIST", help="comma-separated ce:NxV / linear:NxDxV (replaces --preset)")
    what.add_argument("--preset", choices=("default", "issue", "tiny"), help="a named set of shapes (default: default)")
    what.add_argument("--problems", metavar="LIST", help="keep only these problems: ce, linear (default: both)")
    what.add_argument("--dtypes", metavar="LIST", default="fp32,bf16", help="fp32, bf16, fp16 (default: fp32,bf16)")
    what.add_argument("--impls", metavar="LIST", help="keep only these implementations (default: all that apply)")
    what.add_argument(
        "--targets", choices=("index", "prob"), default="index", help="class indices or class probabilities"
    )
    what.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS", help="in [0, 1] (default: 0)")
    what.add_argument(
        "--xentlib-backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="backend= for the xentlib rows (default: auto, Triton on GPU when available)",
    )
    what.add_argument(
        "--chunk-size",
        type=int,
        metavar="ROWS",
        help="chunk_size= for xentlib's linear_cross_entropy (default: its automatic choice)",
    )
    how = parser.add_argument_group("how to measure")
    how.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if present")
    how.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default: 2)")
    how.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default: 1)")
    how.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (default: 5)")
    how.add_argument(
        "--thp",
        choices=("inherit", "on", "off", "both"),
        default="inherit",
        help="THP_MEM_ALLOC_ENABLE for the workers: leave as is, 1, 0, or run everything under both",
    )
    how.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    how.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds per configuration")
    how.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default: bench-results)")
    output.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.set_defaults(func=run)


def find_benchmarks_root() -> Path | None:
    """The folder holding `benchmarks/`: this source checkout (src/xentlib/cli/ -> repo root) or the cwd."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file() and (root / "benchmarks" / "runner.py").is_file():
            return root
    return None


def import_benchmarks(root: Path):
    """Imports `benchmarks.config` and `benchmarks.runner` from `root`, ahead of any other `benchmarks`."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != root / "benchmarks":
        for name in [name for name in sys.modules if name == "benchmarks" or name.startswith("benchmarks.")]:
            del sys.modules[name]
    return importlib.import_module("benchmarks.config"), importlib.import_module("benchmarks.impls")


def run(args) -> int:
    from xentlib.cli import CLIError

    if args.preset is None and args.shapes is None:
        args.preset = "default"
    root = find_benchmarks_root()
    if root is None:
        raise CLIError("benchmarks/ not found: run from a source checkout of xentlib (git clone, then xentlib bench)")
    config_module, impls_module = import_benchmarks(root)
    try:
        config = config_module.config_from_args(args, impls_module.IMPL_NAMES)
    except config_module.BenchConfigError as error:
        raise CLIError(str(error)) from None
    runner = importlib.import_module("benchmarks.runner")
    try:
        return runner.run(config)
    except config_module.BenchConfigError as error:
        raise CLIError(str(error)) from None
