"""`xentlib bench`: xentlib against torch eager, torch.compile, torch's chunked linear_cross_entropy (and
Liger Kernel / Cut Cross-Entropy on GPU when installed) in one run: time, peak memory, machine limits, CSV
and plots.

The command line lives here; the measurements live in `xentlib.bench` (part of the installed package; the
plots need the `bench` extra). See docs/benchmarks.md.
"""

from __future__ import annotations

from xentlib.bench.config import PRESETS
from xentlib.cli._shared import add_command_parser

DESCRIPTION = """\
Benchmark xentlib's cross_entropy and linear_cross_entropy against torch eager, torch.compile (compile time
reported apart), torch's own chunked F.linear_cross_entropy, and on GPU Liger Kernel / Cut Cross-Entropy when
they are installed. Each (implementation, shape, dtype) runs in a fresh process: forward, backward and
forward+backward times (median, min-max over --repeats after --warmup), and peak extra memory (CPU:
resident-set high-water mark; GPU: torch.cuda.max_memory_allocated). Machine limits (matmul GFLOP/s, memory
bandwidth, exp throughput) are measured first and every result is also shown as a fraction of its limit.

Results go to --out as results.csv, machine.json, ce.png and linear.png (plots: pip install 'xentlib[bench]')."""


def _preset_lines() -> str:
    lines = []
    for name, preset in PRESETS.items():
        lines.append(f"  {name} = {','.join(preset.shapes)}")
        lines.append(f"      {preset.what}")
    return "\n".join(lines)


EPILOG = f"""\
shapes: ce:NxV (logits N x V), linear:NxDxV (input N x D, weight V x D), logprobs:NxDxV (per-token log p and
  entropy of input @ weight.T, a policy-gradient loss) and distill:NxDxV (GKD's divergence, beta 0.5, of a student
  and a constant teacher of these sizes), comma-separated.
presets (default: default):
{_preset_lines()}
implementations: xentlib, xentlib-inplace (ce), xentlib-tiled (linear, GPU), torch-eager, torch-compile,
  torch-chunked (linear), liger, cce (GPU peers: run when importable, skipped with a note otherwise),
  3-matmuls (linear, logprobs: x@W.T, dZ@W, dZ.T@x, the floor of any linear cross-entropy),
  4-matmuls (distill: the same and the teacher's x_t@W_t.T).
examples:
  xentlib bench
  xentlib bench --preset tiny
  xentlib bench --preset llm-vocab --dtypes bf16
  xentlib bench --device cuda --preset gpu-large --warmup 3 --repeats 10
  xentlib bench --shapes ce:4096x32000 --impls xentlib,torch-eager --thp both
  xentlib bench --preset tiny --targets prob --label-smoothing 0.1 --out /tmp/bench"""


def register(subparsers) -> None:
    parser = add_command_parser(
        subparsers,
        "bench",
        help="benchmark xentlib against torch and other libraries (time, memory, plots)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--shapes", metavar="LIST", help="comma-separated ce:NxV / linear:NxDxV / logprobs:NxDxV / distill:NxDxV"
    )
    what.add_argument("--preset", choices=tuple(PRESETS), help="a named run, see below (default: default)")
    what.add_argument(
        "--problems", metavar="LIST", help="problems to keep: ce, linear, logprobs, distill (default: all)"
    )
    what.add_argument("--dtypes", metavar="LIST", help="fp32, bf16, fp16 (default: the preset's, fp32,bf16 for most)")
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


def run(args) -> int:
    from xentlib.bench import config as config_module
    from xentlib.bench import runner
    from xentlib.bench.impls import IMPL_NAMES
    from xentlib.cli import CLIError

    try:
        config = config_module.config_from_args(args, IMPL_NAMES)
        return runner.run(config)
    except config_module.BenchConfigError as error:
        raise CLIError(str(error)) from None
