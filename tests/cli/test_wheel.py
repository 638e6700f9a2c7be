"""The installed product: build the wheel, install it into a fresh virtual environment, and run every
`xentlib` command from a directory outside the source tree, so nothing can come from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTBOOK_NUMBERS = ("1.5210", "0.6247", "1.0729")


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["XENTLIB_CACHE_DIR"] = str(cwd / "xentlib-cache")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(bin folder of a fresh venv holding torch and the wheel with its demo/bench extras, a work folder)."""
    root = tmp_path_factory.mktemp("wheel")
    check(run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "-q", "-w", "dist"], root))
    (wheel,) = (root / "dist").glob("xentlib-*.whl")
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch_install = run([*pip, f"torch=={torch.__version__.split('+')[0]}"], root, timeout=600)
    if torch_install.returncode != 0:
        pytest.skip(f"cannot install torch into a fresh venv here: {torch_install.stderr.strip()[-300:]}")
    check(run([*pip, f"{wheel}[demo,bench]"], root, timeout=600))
    work = root / "elsewhere"
    work.mkdir()
    return bin_dir, work


@pytest.mark.slow
def test_the_wheel_runs_bench_explain_and_train_outside_the_source_tree(installed):
    bin_dir, work = installed
    where = check(run([str(bin_dir / "python"), "-c", "import xentlib; print(xentlib.__file__)"], work))
    assert str(bin_dir.parent) in where and str(REPO_ROOT) not in where

    bench = check(run([str(bin_dir / "xentlib"), "bench", "--preset", "tiny", "--repeats", "2", "--out", "b"], work))
    assert "done in" in bench and (work / "b" / "results.csv").is_file() and (work / "b" / "ce.png").is_file()
    rows = (work / "b" / "results.csv").read_text().splitlines()
    assert len(rows) > 1 and all(",error," not in row for row in rows), rows

    explain = check(run([str(bin_dir / "xentlib"), "explain", "--example", "textbook"], work))
    assert all(number in explain for number in TEXTBOOK_NUMBERS)

    train = check(run([str(bin_dir / "xentlib"), "train", "--model", "mlp", "--epochs", "1", "--limit", "300"], work))
    assert "held-out accuracy" in train
