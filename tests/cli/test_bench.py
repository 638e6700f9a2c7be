"""`xentlib bench` end to end: the real command in a subprocess on tiny shapes, its CSV, plots and errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "src"
TINY_SHAPES = "ce:256x4000,linear:128x64x4000"
TINY_IMPLS = "xentlib,xentlib-inplace,torch-eager,torch-chunked,3-matmuls"
PHASES = ("fwd", "bwd", "fwdbwd")


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "xentlib.cli", "bench", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def xentlib_has(name: str) -> bool:
    try:
        import xentlib.functional as functional
    except ImportError:
        return False
    return hasattr(functional, name)


def torch_has_chunked_linear_ce() -> bool:
    import torch

    return hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = [
        "--shapes",
        TINY_SHAPES,
        "--dtypes",
        "fp32",
        "--impls",
        TINY_IMPLS,
        "--warmup",
        "1",
        "--repeats",
        "2",
    ]
    done = run_bench(*args, "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return done, out, rows


def expected_status(problem: str, impl: str) -> str:
    if impl.startswith("xentlib"):
        return "ok" if xentlib_has("cross_entropy" if problem == "ce" else "linear_cross_entropy") else "skipped"
    if impl == "torch-chunked":
        return "ok" if torch_has_chunked_linear_ce() else "skipped"
    return "ok"


def test_csv_has_one_row_per_configuration(tiny_run):
    _, _, rows = tiny_run
    got = {(row["problem"], row["impl"]): row["status"] for row in rows}
    expected = {
        ("ce", "xentlib"),
        ("ce", "xentlib-inplace"),
        ("ce", "torch-eager"),
        ("linear", "xentlib"),
        ("linear", "torch-eager"),
        ("linear", "torch-chunked"),
        ("linear", "3-matmuls"),
    }
    assert set(got) == expected
    assert len(rows) == len(expected)
    for (problem, impl), status in got.items():
        assert status == expected_status(problem, impl), (problem, impl, status)


def test_csv_records_machine_versions_and_environment(tiny_run):
    _, _, rows = tiny_run
    import torch

    for row in rows:
        assert row["torch"] == torch.__version__
        assert row["threads"] == "2"
        assert int(row["cores"]) >= 1
        assert row["cpu_model"] and row["python"] and row["xentlib"] and row["git_commit"]
        assert "thp_env" in row and row["device"] == "cpu"
        for limit in (
            "limit_matmul_gflops_fp32",
            "limit_bw_reused_gbs",
            "limit_bw_fresh_gbs",
            "limit_exp_gelem_s",
        ):
            assert float(row[limit]) > 0, limit


def test_times_are_positive_and_ordered(tiny_run):
    _, _, rows = tiny_run
    for row in (row for row in rows if row["status"] == "ok"):
        for phase in PHASES:
            low, median, high = (float(row[f"{phase}_{stat}_ms"]) for stat in ("min", "median", "max"))
            assert 0 < low <= median <= high, (row["impl"], phase)
            assert len(row[f"{phase}_samples_ms"].split(";")) == 2
        fwd, bwd, total = (float(row[f"{phase}_median_ms"]) for phase in PHASES)
        assert total <= fwd + bwd + 1e-6 or total == pytest.approx(fwd + bwd, rel=0.5)
        assert float(row["frac_of_limit"]) > 0


def test_ratios_against_baselines(tiny_run):
    _, _, rows = tiny_run
    eager = {row["problem"]: row for row in rows if row["impl"] == "torch-eager"}
    for row in (row for row in rows if row["status"] == "ok"):
        expected = float(eager[row["problem"]]["fwdbwd_median_ms"]) / float(row["fwdbwd_median_ms"])
        assert float(row["speedup_vs_torch-eager"]) == pytest.approx(expected, rel=1e-4)
    assert float(eager["ce"]["speedup_vs_torch-eager"]) == pytest.approx(1.0)


def assert_losses_agree_with_torch_eager(rows: list[dict]) -> None:
    """Every implementation ran on the same inputs, so each reports torch eager's loss (the floor: none)."""
    eager = {row["problem"]: float(row["loss"]) for row in rows if row["impl"] == "torch-eager"}
    checked = 0
    for row in (row for row in rows if row["status"] == "ok" and row["role"] != "floor"):
        assert float(row["loss"]) == pytest.approx(eager[row["problem"]], rel=1e-4), row["impl"]
        checked += 1
    assert checked >= 2


def test_every_implementation_computes_the_same_loss(tiny_run):
    assert_losses_agree_with_torch_eager(tiny_run[2])


def test_probability_targets_and_label_smoothing(tmp_path):
    args = ["--shapes", "ce:128x1000", "--dtypes", "fp32", "--impls", "xentlib,torch-eager", "--repeats", "1"]
    options = ["--targets", "prob", "--label-smoothing", "0.1", "--no-memory", "--no-plots"]
    done = run_bench(*args, *options, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["targets"] for row in rows} == {"prob"}
    assert {float(row["label_smoothing"]) for row in rows} == {0.1}
    assert all(row["peak_extra_bytes"] == "" for row in rows)
    assert not list(tmp_path.glob("*.png"))
    assert_losses_agree_with_torch_eager(rows)


def test_memory_of_torch_eager_is_a_few_logits(tiny_run):
    """torch eager keeps about three logits-sized buffers (log-softmax, its gradient, the logits gradient)."""
    _, _, rows = tiny_run
    for row in (row for row in rows if row["status"] == "ok"):
        assert int(row["peak_bytes"]) >= 0
        assert float(row["peak_extra_vs_logits"]) == pytest.approx(
            int(row["peak_extra_bytes"]) / int(row["logits_bytes"])
        )
    eager_ce = next(row for row in rows if row["problem"] == "ce" and row["impl"] == "torch-eager")
    assert 1.5 <= float(eager_ce["peak_extra_vs_logits"]) <= 4.5


def test_plots_and_table_are_written(tiny_run):
    done, out, _ = tiny_run
    for name in ("ce.png", "linear.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert (out / "machine.json").is_file()
    assert "machine limits" in done.stdout
    assert "[7/7]" in done.stdout  # one progress line per configuration
    assert "torch-eager" in done.stdout and "fwd+bwd" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "ce:12x"], "bad shape 'ce:12x'"),
        (["--shapes", "linear:8x16"], "linear takes 3 sizes"),
        (["--shapes", "distill:8x16"], "distill takes 3 sizes (distill:NxDxV)"),
        (["--shapes", "ce:0x10"], "every size must be >= 1"),
        (["--dtypes", "fp64"], "unknown dtypes fp64"),
        (["--impls", "nope"], "unknown impls nope"),
        (["--preset", "tiny", "--shapes", "ce:8x8"], "not both"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, message, tmp_path, capsys):
    from xentlib.cli import main

    assert main(["bench", *args, "--out", str(tmp_path / "unused")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("xentlib bench: error: ") and message in lines[0]
    assert not (tmp_path / "unused").exists()


def test_bad_shapes_from_the_command_line_exit_non_zero_without_traceback(tmp_path):
    done = run_bench("--shapes", "ce:2048x", "--out", str(tmp_path / "unused"), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "xentlib bench: error: bad shape 'ce:2048x': expected ce:NxV, linear:NxDxV, logprobs:NxDxV or "
        "distill:NxDxV (e.g. ce:2048x32000)"
    ]
    assert not (tmp_path / "unused").exists()


def test_help_documents_every_flag():
    """Every option of the bench parser has a help text, and `--help` shows it."""
    import argparse

    from xentlib.cli import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    bench_parser = parser._subparsers._group_actions[0].choices["bench"]
    options = [action for action in bench_parser._actions if action.option_strings]
    assert len(options) >= 17
    done = run_bench("--help", timeout=120)
    assert done.returncode == 0
    for action in options:
        assert action.help, action.option_strings
        assert action.option_strings[-1] in done.stdout


@pytest.mark.slow
def test_torch_compile_reports_compile_time_apart(tmp_path):
    args = [
        "--shapes",
        "ce:256x4000",
        "--dtypes",
        "fp32",
        "--impls",
        "torch-eager,torch-compile",
        "--repeats",
        "2",
    ]
    done = run_bench(*args, "--no-plots", "--out", str(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "results.csv", newline="") as handle:
        compiled = next(row for row in csv.DictReader(handle) if row["impl"] == "torch-compile")
    assert compiled["status"] == "ok"
    assert float(compiled["compile_s"]) > float(compiled["fwdbwd_max_ms"]) / 1e3 > 0


def test_plain_table_without_rich(monkeypatch, capsys):
    """Without rich the table is plain text with the same columns and ratios."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    monkeypatch.setitem(sys.modules, "rich", None)
    from xentlib.bench.report import add_ratios, print_table

    def row(impl, fwdbwd_ms, extra_mib):
        times = {f"{phase}_{stat}_ms": fwdbwd_ms / 2 for phase in ("fwd", "bwd") for stat in ("median", "min", "max")}
        totals = {f"fwdbwd_{stat}_ms": fwdbwd_ms for stat in ("median", "min", "max")}
        memory = {"peak_extra_bytes": extra_mib * 2**20, "peak_extra_vs_logits": extra_mib / 4}
        return {
            "thp_env": "",
            "problem": "ce",
            "shape": "8x8",
            "dtype": "fp32",
            "impl": impl,
            "status": "ok",
        } | (times | totals | memory)

    rows = [row("xentlib", 10.0, 4), row("torch-eager", 25.0, 12)]
    rows.append({"thp_env": "", "problem": "ce", "shape": "8x8", "dtype": "fp32", "impl": "torch-compile"})
    rows[-1] |= {"status": "error", "note": "compiler missing"}
    add_ratios(rows)
    print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ce:") and "vs eager" in lines[1] and "peak extra" in lines[1]
    xentlib_line = next(line for line in lines if " xentlib " in line)
    assert "2.50x" in xentlib_line and "4 MiB" in xentlib_line and "1.00x" in xentlib_line
    assert "error: compiler missing" in next(line for line in lines if "torch-compile" in line)


def test_overhead_kind_reports_ratios_to_torch(tmp_path):
    """`xentlib bench overhead` times both libraries on tiny logits and writes the ratios it prints."""
    from xentlib.cli import main

    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--calls", "20", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["shape"] for row in rows] == ["8x10", "128x1000"]
    for row in rows:
        assert row["forward_ratio"] == pytest.approx(row["xentlib_forward_us"] / row["torch_forward_us"])
        assert row["forward_backward_ratio"] > 0


def test_post_training_kinds_run_and_distill_losses_equal_the_reference(tmp_path):
    """`logprobs` and `distill` shapes run every row; each distill row reports the GKD divergence (beta 0.5) of the
    bench's own inputs, which the float64 reference recomputes; the floor there is the four bare matmuls."""
    import torch

    from xentlib import reference
    from xentlib.bench.config import parse_shape
    from xentlib.bench.impls import DISTILL_BETA, make_case

    shapes = "distill:64x32x1000,logprobs:32x16x500"
    args = ["--shapes", shapes, "--dtypes", "fp32", "--impls", "xentlib,torch-eager,3-matmuls,4-matmuls"]
    done = run_bench(*args, "--warmup", "1", "--repeats", "1", "--no-plots", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    got = {(row["problem"], row["impl"]): row for row in rows}
    assert set(got) == {
        ("distill", "xentlib"),
        ("distill", "torch-eager"),
        ("distill", "4-matmuls"),
        ("logprobs", "xentlib"),
        ("logprobs", "torch-eager"),
        ("logprobs", "3-matmuls"),
    }
    assert all(row["status"] == "ok" for row in rows), [(row["impl"], row["note"]) for row in rows]
    case = make_case(parse_shape("distill:64x32x1000"), "fp32", torch.device("cpu"), "index", 0.0, seed=0)
    inputs = [case.tensors[name].detach().numpy() for name in ("x", "weight", "teacher_x", "teacher_weight")]
    expected = float(reference.linear_distillation(*inputs, beta=DISTILL_BETA))
    for impl in ("xentlib", "torch-eager"):
        assert float(got["distill", impl]["loss"]) == pytest.approx(expected, rel=1e-4), impl
        assert float(got["distill", impl]["frac_of_floor"]) > 0
    assert got["distill", "4-matmuls"]["role"] == "floor" and got["distill", "4-matmuls"]["loss"] == ""
    # the limit counts four matmuls of 2*N*D*V FLOPs
    floor = got["distill", "4-matmuls"]
    rate = float(floor["limit_matmul_gflops_fp32"]) * 1e9
    assert float(floor["limit_ms"]) == pytest.approx(8 * 64 * 32 * 1000 / rate * 1e3, rel=1e-4)  # CSV: 6 digits
