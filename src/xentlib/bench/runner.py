"""Runs a whole benchmark: machine limits, then every (implementation, shape, dtype) in its own process,
then the table, the CSV and the plots."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from xentlib.bench.config import BenchConfig, BenchConfigError, Shape
from xentlib.bench.impls import Case, Impl, impls_for
from xentlib.bench.machine import limit_seconds, machine_info
from xentlib.bench.report import add_ratios, format_progress, print_limits, print_table, write_csv
from xentlib.bench.worker import RESULT_PREFIX

XENTLIB_PARENT = Path(__file__).resolve().parents[2]  # the folder holding the xentlib package
THP_VALUES = {"inherit": (None,), "on": ("1",), "off": ("0",), "both": ("0", "1")}
ELEMENT_SIZES = {"fp32": 4, "bf16": 2, "fp16": 2}


class WorkerError(RuntimeError):
    pass


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError("--device cuda: no CUDA device is available to this torch")
    return requested


def worker_env(thp: str | None) -> dict[str, str]:
    """The parent's environment, with the xentlib this process runs first on the path (the same one runs in the
    workers, installed or from a checkout); THP set or inherited."""
    env = dict(os.environ)
    paths = [str(XENTLIB_PARENT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = thp
    return env


def run_worker(spec: dict, env: dict[str, str], timeout: float) -> dict:
    command = [sys.executable, "-m", "xentlib.bench.worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise WorkerError(f"timed out after {timeout:g} s") from error
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    stderr_lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    raise WorkerError(stderr_lines[-1][:200] if stderr_lines else f"worker exited with code {done.returncode}")


def planned_configs(config: BenchConfig, device_name: str) -> tuple[list[tuple[Shape, str, Impl]], list[str]]:
    """Every (shape, dtype, impl) to run, and one note per peer library or GPU-only path left out because it
    cannot run here (not importable, no GPU, an option it lacks)."""
    import torch

    plan, skipped = [], {}
    for shape in config.shapes:
        for dtype_name in config.dtypes:
            probe = Case(shape, dtype_name, torch.device(device_name), config.targets, config.label_smoothing)
            for impl in impls_for(shape.problem, config.impls):
                reason = impl.unavailable(probe) if (impl.role == "external" or impl.gpu_only) else None
                if reason:
                    skipped.setdefault(f"{impl.name} ({shape.problem}): {reason}", None)
                    continue
                plan.append((shape, dtype_name, impl))
    return plan, [f"skipped {note}" for note in skipped]


def config_spec(config: BenchConfig, device_name: str, shape: Shape, dtype_name: str, impl: Impl) -> dict:
    return {
        "kind": "config",
        "impl": impl.name,
        "problem": shape.problem,
        "n": shape.n,
        "d": shape.d,
        "v": shape.v,
        "dtype": dtype_name,
        "device": device_name,
        "threads": config.threads,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "targets": config.targets,
        "label_smoothing": config.label_smoothing,
        "xentlib_backend": config.xentlib_backend,
        "chunk_size": config.chunk_size or "",
        "memory": config.memory,
        "seed": config.seed,
    }


def base_row(info: dict, thp: str | None, config: BenchConfig, shape: Shape, dtype_name: str, impl: Impl) -> dict:
    element_size = ELEMENT_SIZES[dtype_name]
    return info | {
        "thp_env": os.environ.get("THP_MEM_ALLOC_ENABLE", "") if thp is None else thp,
        "problem": shape.problem,
        "shape": shape.label,
        "n": shape.n,
        "d": shape.d if shape.d is not None else "",
        "v": shape.v,
        "dtype": dtype_name,
        "targets": config.targets,
        "label_smoothing": config.label_smoothing,
        "xentlib_backend": config.xentlib_backend,
        "chunk_size": config.chunk_size or "",
        "impl": impl.name,
        "role": impl.role,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "logits_bytes": shape.n * shape.v * element_size,
        "load_1m": os.getloadavg()[0],  # other work on the machine distorts the times: recorded, not hidden
    }


def add_limit(row: dict, limits: dict) -> None:
    kind, seconds = limit_seconds(
        row["problem"],
        row["n"],
        row["d"] or None,
        row["v"],
        row["dtype"],
        ELEMENT_SIZES[row["dtype"]],
        limits,
    )
    row["limit_kind"] = kind
    row["limit_ms"] = seconds * 1e3
    if row.get("status") == "ok":
        row["frac_of_limit"] = row["limit_ms"] / row["fwdbwd_median_ms"]


def measure_configs(config: BenchConfig, device_name: str, info: dict, thp, plan, rows: list, echo) -> dict:
    """Limits, then every planned configuration under one THP setting; rows are appended (and saved) as
    they come, so an interrupted run keeps what it measured. Returns the limits."""
    env = worker_env(thp)
    limits_spec = {
        "kind": "limits",
        "device": device_name,
        "threads": config.threads,
        "dtypes": config.dtypes,
    }
    limits = run_worker(limits_spec, env, config.timeout)
    print_limits(limits, env.get("THP_MEM_ALLOC_ENABLE", ""), echo)
    for index, (shape, dtype_name, impl) in enumerate(plan, start=1):
        row = base_row(info, thp, config, shape, dtype_name, impl)
        row |= {f"limit_{key}": value for key, value in limits.items()}
        if sys.stdout.isatty():  # shows what runs now; the result line below overwrites it
            print(
                format_progress(index, len(plan), row | {"status": "running", "note": "..."}),
                end="\r",
                flush=True,
            )
        try:
            row |= run_worker(config_spec(config, device_name, shape, dtype_name, impl), env, config.timeout)
        except WorkerError as error:
            row |= {"status": "error", "note": str(error)}
        add_limit(row, limits)
        rows.append(row)
        add_ratios(rows)
        write_csv(rows, config.out / "results.csv")
        echo(format_progress(index, len(plan), row))
    return limits


def run(config: BenchConfig, echo=print) -> int:
    """Runs the benchmark described by `config`; returns the CLI exit code (1 when no configuration ran)."""
    device_name = resolve_device(config.device)
    config.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(device_name, config.threads) | {"device": device_name}
    plan, skipped = planned_configs(config, device_name)
    if not plan:
        raise BenchConfigError(f"nothing to run on {device_name}: no selected implementation applies here")
    echo(
        f"xentlib bench: {len(plan)} configurations on {device_name} ({info['cpu_model']}, "
        f"{info['threads']} threads), torch {info['torch']}, xentlib {info['xentlib']} @ {info['git_commit']}"
    )
    for note in skipped:
        echo(note)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        echo(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work distorts the timings")
    rows, all_limits = [], {}
    started = time.perf_counter()
    for thp in THP_VALUES[config.thp]:
        try:
            limits = measure_configs(config, device_name, info, thp, plan, rows, echo)
        except WorkerError as error:
            print(f"xentlib bench: measuring the machine limits failed: {error}", file=sys.stderr)
            return 1
        all_limits[thp if thp is not None else os.environ.get("THP_MEM_ALLOC_ENABLE", "")] = limits
    machine_path = config.out / "machine.json"
    machine_path.write_text(json.dumps({"machine": info, "limits": all_limits}, indent=2) + "\n")
    print_table(rows, echo)
    written = [config.out / "results.csv", machine_path]
    if config.plots and importlib.util.find_spec("matplotlib") is None:
        echo("no plots: matplotlib is not installed (pip install 'xentlib[bench]')")
    elif config.plots:
        from xentlib.bench.plots import plot_results

        written += plot_results(rows, config.out)
    echo(f"done in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(path) for path in written))
    return 0 if any(row.get("status") == "ok" for row in rows) else 1
