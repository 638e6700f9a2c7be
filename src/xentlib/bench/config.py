"""What one `xentlib bench` run measures: shapes, dtypes, implementations and timing options.

Nothing here imports torch, so a bad argument is reported in milliseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PROBLEMS = ("ce", "linear", "logprobs", "distill")
# problems with input (n, d) and weight (v, d): NxDxV on the command line (distill: the student's, and a teacher of
# the same sizes)
LINEAR_PROBLEMS = ("linear", "logprobs", "distill")

# name on the command line -> attribute of the torch module
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Preset:
    """A named run: its shapes, and the dtypes / implementations used unless --dtypes / --impls are given."""

    shapes: tuple[str, ...]
    what: str  # one line for --help
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    skip_impls: tuple[str, ...] = ()  # left out unless named in --impls


PRESETS = {
    "tiny": Preset(
        ("ce:256x4000", "linear:128x64x4000"),
        "a smoke run in seconds: small shapes, fp32, no torch.compile",
        dtypes=("fp32",),
        skip_impls=("torch-compile",),
    ),
    "default": Preset(
        ("ce:2048x32000", "linear:1024x512x32000"),
        "one 32k-vocabulary shape per problem, a few minutes on 2 CPU cores",
    ),
    "llm-vocab": Preset(
        (
            "ce:4096x32000",
            "ce:8192x50257",
            "ce:4096x128256",
            "linear:2048x1024x32000",
            "linear:4096x2048x50257",
            "linear:2048x2048x128256",
        ),
        "the Llama-2 / GPT-2 / Llama-3 vocabularies (32000, 50257, 128256) at CPU-sized batches",
    ),
    "gpu-large": Preset(
        (
            "ce:4096x32000",
            "ce:8192x128256",
            "ce:16384x256000",
            "linear:16384x4096x128256",
            "linear:8192x2304x256000",
        ),
        "GPU-sized batches over 32k-256k vocabularies (Llama-3 8B and Gemma-2 2B output layers), bf16",
        dtypes=("bf16",),
    ),
}

TARGET_KINDS = ("index", "prob")
DEVICES = ("auto", "cpu", "cuda")
THP_MODES = ("inherit", "on", "off", "both")


class BenchConfigError(ValueError):
    """A bad command-line value; the CLI shows it as a one-line error."""


@dataclass(frozen=True)
class Shape:
    """One problem size: `ce` has logits (n, v); `linear`, `logprobs` (per-token log-probabilities and entropy
    of the logits input @ weight.T) and `distill` (the GKD divergence between a student and a teacher, each with
    input (n, d) and weight (v, d)) have input (n, d) and weight (v, d)."""

    problem: str
    n: int
    v: int
    d: int | None = None

    @property
    def label(self) -> str:
        return f"{self.n}x{self.d}x{self.v}" if self.problem in LINEAR_PROBLEMS else f"{self.n}x{self.v}"

    @property
    def spec(self) -> str:
        return f"{self.problem}:{self.label}"


@dataclass
class BenchConfig:
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    impls: tuple[str, ...] | None = None  # None: every implementation that applies
    device: str = "auto"
    threads: int = 2
    warmup: int = 2
    repeats: int = 5
    targets: str = "index"
    label_smoothing: float = 0.0
    xentlib_backend: str = "auto"
    chunk_size: int | None = None  # rows per chunk for xentlib's linear_cross_entropy (None: its default)
    memory: bool = True
    plots: bool = True
    out: Path = field(default_factory=lambda: Path("bench-results"))
    timeout: float = 600.0
    thp: str = "inherit"
    seed: int = 0


_SHAPE_PATTERN = re.compile(r"^(ce|linear|logprobs|distill):(\d+(?:x\d+)*)$")


def parse_shape(text: str) -> Shape:
    """`ce:NxV`, `linear:NxDxV`, `logprobs:NxDxV` or `distill:NxDxV` -> Shape."""
    match = _SHAPE_PATTERN.match(text.strip().lower())
    if not match:
        raise BenchConfigError(
            f"bad shape {text!r}: expected ce:NxV, linear:NxDxV, logprobs:NxDxV or distill:NxDxV (e.g. ce:2048x32000)"
        )
    problem, dims_text = match.groups()
    dims = [int(part) for part in dims_text.split("x")]
    expected = 3 if problem in LINEAR_PROBLEMS else 2
    if len(dims) != expected:
        layout = "NxDxV" if problem in LINEAR_PROBLEMS else "NxV"
        raise BenchConfigError(f"bad shape {text!r}: {problem} takes {expected} sizes ({problem}:{layout})")
    if min(dims) < 1:
        raise BenchConfigError(f"bad shape {text!r}: every size must be >= 1")
    if problem in LINEAR_PROBLEMS:
        n, d, v = dims
        return Shape(problem, n=n, v=v, d=d)
    n, v = dims
    return Shape(problem, n=n, v=v)


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """Comma-separated shapes, e.g. `ce:2048x32000,linear:1024x512x32000`."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise BenchConfigError("--shapes is empty: give e.g. ce:2048x32000,linear:1024x512x32000")
    return tuple(parse_shape(part) for part in parts)


def parse_choices(text: str, allowed, what: str) -> tuple[str, ...]:
    """Comma-separated names that must each be in `allowed`; duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise BenchConfigError(f"--{what} is empty: choose from {', '.join(allowed)}")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise BenchConfigError(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return names


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchConfigError(message)


def config_from_args(args, impl_names) -> BenchConfig:
    """Validate the parsed `xentlib bench` arguments; `impl_names` lists the known implementations."""
    _require(not (args.shapes and args.preset), "give either --shapes or --preset, not both")
    preset = PRESETS[args.preset or "default"]
    shapes = parse_shapes(args.shapes) if args.shapes else tuple(parse_shape(s) for s in preset.shapes)
    if args.problems:
        problems = parse_choices(args.problems, PROBLEMS, "problems")
        shapes = tuple(shape for shape in shapes if shape.problem in problems)
        _require(bool(shapes), f"no shape left for --problems {args.problems}")
    if args.impls:
        impls = parse_choices(args.impls, impl_names, "impls")
    elif args.shapes is None and preset.skip_impls:
        impls = tuple(name for name in impl_names if name not in preset.skip_impls)
    else:
        impls = None  # every implementation that applies
    dtypes = parse_choices(args.dtypes, DTYPES, "dtypes") if args.dtypes else preset.dtypes
    _require(args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
    _require(args.warmup >= 1, f"--warmup must be >= 1 (the first call is never timed), got {args.warmup}")
    _require(args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}")
    _require(0.0 <= args.label_smoothing <= 1.0, f"--label-smoothing must be in [0, 1], got {args.label_smoothing}")
    _require(args.timeout > 0, f"--timeout must be > 0 seconds, got {args.timeout}")
    _require(args.chunk_size is None or args.chunk_size >= 1, f"--chunk-size must be >= 1 rows, got {args.chunk_size}")
    return BenchConfig(
        shapes=shapes,
        dtypes=dtypes,
        impls=impls,
        device=args.device,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        targets=args.targets,
        label_smoothing=args.label_smoothing,
        xentlib_backend=args.xentlib_backend,
        chunk_size=args.chunk_size,
        memory=not args.no_memory,
        plots=not args.no_plots,
        out=Path(args.out),
        timeout=args.timeout,
        thp=args.thp,
        seed=args.seed,
    )
