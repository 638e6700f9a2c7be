"""Smoke test of the standalone benchmark src/xentlib/bench/hf_memory.py: its arguments and one tiny step per
mode, in this process (the benchmark itself runs each mode in a fresh subprocess)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

pytestmark = pytest.mark.hf

SCRIPT = Path(__file__).parents[2] / "src" / "xentlib" / "bench" / "hf_memory.py"


@pytest.fixture(scope="module")
def hf_memory():
    spec = importlib.util.spec_from_file_location("hf_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(hf_memory):
    args = hf_memory.parse_args(["--steps", "7", "--model", "gpt2", "--pad-fraction", "0.1"])
    assert (args.steps, args.model, args.pad_fraction, args.accumulation, args.vocab) == (7, "gpt2", 0.1, 4, 32000)
    with pytest.raises(SystemExit):
        hf_memory.parse_args(["--pad-fraction", "0.9"])
    assert hf_memory._strip_options(["--steps", "3", "--json", "x", "--mode=both"], ("--mode", "--json")) == [
        "--steps",
        "3",
    ]


def test_padded_labels_vary_per_sample(hf_memory):
    data = hf_memory.RandomTokens(hf_memory.parse_args(["--steps", "2", "--seq", "64", "--vocab", "50"]))
    padded = {int((data[i]["labels"] == -100).sum()) for i in range(len(data))}
    assert len(data) == 2 * 4 * 4 and len(padded) > 3 and max(padded) < 64


@pytest.mark.parametrize("mode", ["unpatched", "patched"])
def test_one_step(hf_memory, mode):
    argv = ["--steps", "2", "--vocab", "64", "--hidden", "16", "--seq", "8", "--batch", "2", "--accumulation", "2"]
    result = hf_memory.run_one(hf_memory.parse_args(argv), mode)
    assert result["mode"] == mode and result["peak"] >= result["rss_after_first_step"] > 0
    assert result["growth"] == result["peak"] - result["rss_after_first_step"]


def test_report_gives_medians_and_their_ratio(hf_memory):
    args = hf_memory.parse_args(["--steps", "3", "--repeats", "2"])
    mib = hf_memory.MIB

    def run(mode, growth):
        first, peak = 500 * mib, (500 + growth) * mib
        return {
            "mode": mode, "rss_after_first_step": first, "peak": peak, "growth": peak - first,
            "peak_by_step": {3: peak}, "seconds_after_first_step": 1.0, "peak_reset": True,
        }  # fmt: skip

    runs = [run("unpatched", 100), run("patched", 300), run("unpatched", 300), run("patched", 500)]
    text = hf_memory.report(args, runs)
    assert "unpatched  growth median +200 MiB (+100, +300)" in text
    assert "growth ratio patched / unpatched (medians): 2.00" in text
    with pytest.raises(SystemExit):
        hf_memory.parse_args(["--repeats", "0"])
