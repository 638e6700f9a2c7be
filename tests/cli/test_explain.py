"""`xentlib explain`: the printed steps and final numbers against torch computed here, errors as one line.

Most tests call `xentlib.cli.main([...])` in-process (fast) and parse what it prints; one runs the real
command in a subprocess. Numbers are printed with `--decimals 10` where the test compares them with torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("rich")
np = pytest.importorskip("numpy")

import torch.nn.functional as F  # noqa: E402

from xentlib.cli import main  # noqa: E402
from xentlib.cli._examples import EXAMPLES, MISTAKES, WORKED  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTBOOK_LOGITS = [[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]]


def explain(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["explain", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def final_loss(out: str):
    """The `loss = ...` line that closes every report: a float, or a list for reduction='none'."""
    match = re.search(r"^loss = (\[[^\]]*\]|\S+) ", out, re.MULTILINE)
    assert match, out
    text = match.group(1)
    if text.startswith("["):
        return [float(v) for v in text.strip("[]").split(",")]
    return float(text)


def table_rows(out: str, header: str) -> list[list[str]]:
    """Cells of the rich table whose header line contains `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line and "┃" in line)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("│"):
            break
        rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def gradient_columns(out: str) -> list[list[float]]:
    """The last column ('d loss / d x' or 'd loss / d input') of every per-row table, one list per row."""
    lines = out.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if "┃" in line and "d loss / d" in line:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("│"):
                    break
                rows.append(float(row.strip("│").split("│")[-1]))
            tables.append(rows)
    return tables


def cross_check(out: str, source_prefix: str) -> tuple[str, str]:
    """(value, verdict) of one implementation in the closing comparison table."""
    for cells in table_rows(out, "max |diff| vs steps"):
        if cells[0].startswith(source_prefix):
            return cells[1], cells[3]
    raise AssertionError(f"{source_prefix} missing from:\n{out}")


def assert_close(printed, expected, tol=1e-9):
    printed, expected = np.asarray(printed, dtype=float), np.asarray(expected, dtype=float)
    assert printed.shape == expected.shape
    np.testing.assert_allclose(printed, expected, rtol=tol, atol=tol)


def t64(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The textbook numbers


def test_textbook_example_prints_row_losses_and_mean(capsys):
    code, out, err = explain(capsys, "--example", "textbook")
    assert code == 0 and err == ""
    row_losses = [float(v) for v in re.findall(r"loss = -log p\[t\] = ([-\d.]+)", out)]
    assert row_losses == [1.5210, 0.6247]
    mean = float(re.search(r"= [\d.]+ / [\d.]+ = ([\d.]+)", out).group(1))
    assert round(mean, 3) == 1.073
    expected = F.cross_entropy(t64(TEXTBOOK_LOGITS), torch.tensor([0, 2])).item()
    assert final_loss(out) == pytest.approx(expected, abs=1e-6)
    assert cross_check(out, "torch")[1] == "agrees"


def test_textbook_numbers_as_printed(capsys):
    """The printed 4-decimal numbers of the textbook example, unchanged: rows 1.5210 and 0.6247, mean 1.0729."""
    code, out, _ = explain(capsys, "--example", "textbook")
    assert code == 0
    assert re.findall(r"loss = -log p\[t\] = ([-\d.]+)", out) == ["1.5210", "0.6247"]
    assert re.search(r"= 2\.1457 / 2\.0000 = ([\d.]+)", out).group(1) == "1.0729"


@pytest.mark.parametrize("name", ["textbook", "class-weights", "label-smoothing", "probability-target", "linear"])
def test_the_steps_are_the_references(capsys, name):
    """The steps are read from xentlib.reference, not computed a second way: the reference's row shows no
    difference at all (a separate float64 formulation differed from it in the last bit)."""
    code, out, _ = explain(capsys, "--example", name, "--decimals", "6")
    assert code == 0
    source, value, difference = next(
        re.split(r"\s*│\s*", line.strip("│ "))[:3] for line in out.splitlines() if "xentlib.reference." in line
    )
    assert difference == "0.0e+00", (source, value, difference)


def test_textbook_steps_match_torch_log_softmax(capsys):
    """The per-row table: max, sum exp, lse and log p[t] as torch computes them."""
    code, out, _ = explain(capsys, "--example", "textbook", "--decimals", "10")
    assert code == 0
    x = t64(TEXTBOOK_LOGITS)
    lse = torch.logsumexp(x, dim=1)
    log_p = F.log_softmax(x, dim=1)
    rows = table_rows(out, "sum exp(x-max)")
    assert [int(r[1]) for r in rows] == [0, 2]
    assert_close([float(r[2]) for r in rows], x.max(dim=1).values)
    assert_close([float(r[3]) for r in rows], torch.exp(x - x.max(dim=1, keepdim=True).values).sum(dim=1))
    assert_close([float(r[4]) for r in rows], lse)
    assert_close([float(r[5]) for r in rows], [log_p[0, 0], log_p[1, 2]])
    assert_close([float(r[7]) for r in rows], F.cross_entropy(x, torch.tensor([0, 2]), reduction="none"))


def test_repeated_row_textbook_example(capsys):
    code, out, _ = explain(capsys, "--example", "textbook-same-row", "--decimals", "10")
    assert code == 0
    expected = F.cross_entropy(t64([[0.1234, 0.5555, 0.3211]] * 3), torch.tensor([0, 1, 2])).item()
    assert round(expected, 4) == 1.1142
    assert final_loss(out) == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------------------------------
# Every option against torch computed here

LOGITS = [[1.2, -0.4, 0.3, 2.0], [0.1, 0.2, -1.5, 0.7], [-2.0, 1.1, 0.4, 0.0]]


@pytest.mark.parametrize(
    "options, torch_kwargs, target",
    [
        ({}, {}, [3, 0, 1]),
        ({"--weight": "[1, 2, 0.5, 3]"}, {"weight": [1, 2, 0.5, 3]}, [3, 0, 1]),
        ({"--label-smoothing": "0.2"}, {"label_smoothing": 0.2}, [3, 0, 1]),
        (
            {"--weight": "[1, 2, 0.5, 3]", "--label-smoothing": "0.1", "--ignore-index": "-1"},
            {"weight": [1, 2, 0.5, 3], "label_smoothing": 0.1, "ignore_index": -1},
            [3, -1, 1],
        ),
        (
            {"--reduction": "sum", "--weight": "[1, 2, 0.5, 3]"},
            {"reduction": "sum", "weight": [1, 2, 0.5, 3]},
            [2, 0, 1],
        ),
        (
            {"--reduction": "none", "--label-smoothing": "0.3"},
            {"reduction": "none", "label_smoothing": 0.3},
            [2, 0, 1],
        ),
    ],
    ids=["plain", "weights", "smoothing", "weights-smoothing-ignore", "sum", "none"],
)
def test_class_index_options_agree_with_torch(capsys, options, torch_kwargs, target):
    args = ["--logits", json.dumps(LOGITS), "--target", json.dumps(target), "--decimals", "10"]
    for flag, value in options.items():
        args += [flag, value]
    code, out, _ = explain(capsys, *args)
    assert code == 0
    kwargs = dict(torch_kwargs)
    if "weight" in kwargs:
        kwargs["weight"] = t64(kwargs["weight"])
    expected = F.cross_entropy(t64(LOGITS), torch.tensor(target), **kwargs)
    assert_close(final_loss(out), expected)
    assert cross_check(out, "torch")[1] == "agrees"


def test_probability_target_agrees_with_torch_and_splits_into_entropy_plus_kl(capsys):
    target = [[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]]
    args = ["--logits", json.dumps(LOGITS), "--target", json.dumps(target), "--weight", "[1, 2, 1, 0.5]"]
    code, out, _ = explain(capsys, *args, "--label-smoothing", "0.1", "--decimals", "10")
    assert code == 0 and "probability targets" in out
    x, t, w = t64(LOGITS), t64(target), t64([1, 2, 1, 0.5])
    expected = F.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    assert_close(final_loss(out), expected)
    # entropy, cross-entropy and KL of the (smoothed) target distribution against softmax(x), unweighted
    q = 0.9 * t + 0.1 / 4
    log_p = F.log_softmax(x, dim=1)
    entropy = -torch.special.xlogy(q, q).sum(dim=1)
    cross = -(q * log_p).sum(dim=1)
    kl = F.kl_div(log_p, q, reduction="none").sum(dim=1)
    rows = table_rows(out, "entropy H(t)")
    assert_close([float(r[1]) for r in rows], entropy)
    assert_close([float(r[2]) for r in rows], cross)
    assert_close([float(r[3]) for r in rows], kl)


def test_spatial_logits_use_class_dim_1(capsys):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = [[0, 2, 1, 1], [2, 2, 0, 1]]
    code, out, _ = explain(
        capsys,
        "--logits",
        json.dumps(x.tolist()),
        "--target",
        json.dumps(target),
        "--reduction",
        "none",
        "--decimals",
        "10",
    )
    assert code == 0
    expected = F.cross_entropy(x, torch.tensor(target), reduction="none")
    assert_close(final_loss(out), expected.reshape(-1))


def test_nll_loss_explains_log_probabilities_and_agrees(capsys):
    log_p = F.log_softmax(t64(LOGITS), dim=1)
    code, out, _ = explain(
        capsys,
        "--op",
        "nll_loss",
        "--logits",
        json.dumps(log_p.tolist()),
        "--target",
        "[1, 3, 0]",
        "--weight",
        "[1, 1, 2, 3]",
        "--decimals",
        "10",
    )
    assert code == 0
    assert "log-probabilities" in out and "warning" not in out
    expected = F.nll_loss(log_p, torch.tensor([1, 3, 0]), weight=t64([1, 1, 2, 3]))
    assert_close(final_loss(out), expected)


def test_nll_loss_on_raw_logits_warns_and_still_matches_torch(capsys):
    code, out, _ = explain(capsys, "--op", "nll_loss", "--logits", json.dumps(LOGITS), "--target", "[1, 3, 0]")
    assert code == 0
    assert "not log-probabilities" in out
    assert final_loss(out) == pytest.approx(F.nll_loss(t64(LOGITS), torch.tensor([1, 3, 0])).item(), abs=1e-6)


def test_bce_agrees_with_torch_including_clamped_logs(capsys):
    x = [[0.9, 0.0, 0.6], [0.05, 1.0, 0.5]]
    y = [[1.0, 1.0, 0.3], [0.0, 1.0, 0.0]]
    code, out, _ = explain(
        capsys,
        "--op",
        "bce",
        "--logits",
        json.dumps(x),
        "--target",
        json.dumps(y),
        "--weight",
        "[1, 2, 3]",
        "--reduction",
        "none",
        "--decimals",
        "10",
    )
    assert code == 0
    expected = F.binary_cross_entropy(t64(x), t64(y), weight=t64([1, 2, 3]), reduction="none")
    assert_close(final_loss(out), expected.reshape(-1))


def test_bce_with_logits_and_pos_weight_agree_with_torch(capsys):
    x = [[2.2, -1.4, 0.4], [-30.0, 0.8, 25.0]]
    y = [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    code, out, _ = explain(
        capsys,
        "--op",
        "bce_with_logits",
        "--logits",
        json.dumps(x),
        "--target",
        json.dumps(y),
        "--pos-weight",
        "[1, 2, 0.5]",
        "--decimals",
        "10",
    )
    assert code == 0
    expected = F.binary_cross_entropy_with_logits(t64(x), t64(y), pos_weight=t64([1, 2, 0.5]))
    assert_close(final_loss(out), expected)


def test_linear_agrees_with_torch_linear_then_cross_entropy(capsys):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    code, out, _ = explain(
        capsys,
        "--op",
        "linear",
        "--input",
        json.dumps(x.tolist()),
        "--linear-weight",
        json.dumps(w.tolist()),
        "--bias",
        json.dumps(b.tolist()),
        "--target",
        "[4, 0, 2]",
        "--weight",
        "[1, 2, 3, 4, 5]",
        "--label-smoothing",
        "0.05",
        "--decimals",
        "10",
    )
    assert code == 0
    logits = x @ w.T + b
    rows = table_rows(out, "class 4")  # the logits table
    assert_close([[float(v) for v in r[1:]] for r in rows], logits)
    expected = F.cross_entropy(logits, torch.tensor([4, 0, 2]), weight=t64([1, 2, 3, 4, 5]), label_smoothing=0.05)
    assert_close(final_loss(out), expected)


def torch_gradient(function, x, *args, **kwargs):
    x = x.clone().requires_grad_(True)
    loss = function(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad


@pytest.mark.parametrize(
    "args, function, kwargs",
    [
        (
            ["--target", "[3, -100, 1]", "--weight", "[1, 2, 0.5, 3]", "--label-smoothing", "0.2"],
            F.cross_entropy,
            {"target": torch.tensor([3, -100, 1]), "weight": t64([1, 2, 0.5, 3]), "label_smoothing": 0.2},
        ),
        (
            ["--target", "[[0.5, 0.5, 0, 0], [0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]]", "--reduction", "sum"],
            F.cross_entropy,
            {"target": t64([[0.5, 0.5, 0, 0], [0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]]), "reduction": "sum"},
        ),
        (
            ["--target", "[2, 0, 1]", "--reduction", "none"],
            F.cross_entropy,
            {"target": torch.tensor([2, 0, 1]), "reduction": "none"},
        ),
        (
            ["--op", "nll_loss", "--target", "[2, 0, 1]", "--weight", "[1, 2, 3, 4]"],
            F.nll_loss,
            {"target": torch.tensor([2, 0, 1]), "weight": t64([1, 2, 3, 4])},
        ),
        (
            [
                "--op",
                "bce_with_logits",
                "--target",
                json.dumps([[1, 0, 1, 0.5]] * 3),
                "--pos-weight",
                "[1, 2, 3, 4]",
            ],
            F.binary_cross_entropy_with_logits,
            {"target": t64([[1, 0, 1, 0.5]] * 3), "pos_weight": t64([1, 2, 3, 4])},
        ),
    ],
    ids=["index-weights-smoothing-ignore", "probabilities-sum", "none", "nll-weights", "bce-with-logits"],
)
def test_gradient_column_matches_torch_autograd(capsys, args, function, kwargs):
    code, out, _ = explain(capsys, "--logits", json.dumps(LOGITS), *args, "--decimals", "10")
    assert code == 0
    expected = torch_gradient(function, t64(LOGITS), **kwargs)
    assert_close(gradient_columns(out), expected)


def test_bce_gradient_column_matches_torch(capsys):
    x, y = [[0.9, 0.2, 0.6], [0.05, 0.7, 0.5]], [[1.0, 0.0, 0.3], [0.0, 1.0, 0.0]]
    code, out, _ = explain(
        capsys,
        "--op",
        "bce",
        "--logits",
        json.dumps(x),
        "--target",
        json.dumps(y),
        "--weight",
        "[1, 2, 3]",
        "--decimals",
        "10",
    )
    assert code == 0
    expected = torch_gradient(F.binary_cross_entropy, t64(x), t64(y), weight=t64([1, 2, 3]))
    assert_close(gradient_columns(out), expected)


def test_minus_inf_logit_on_other_class_stays_finite(capsys):
    code, out, _ = explain(capsys, "--logits", "[[1, -inf, 0.5]]", "--target", "[0]", "--decimals", "10")
    assert code == 0
    expected = F.cross_entropy(t64([[1, -math.inf, 0.5]]), torch.tensor([0])).item()
    assert math.isfinite(expected)
    assert final_loss(out) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("name", [example.name for example in WORKED])
def test_every_worked_example_agrees_with_every_implementation(capsys, name):
    code, out, _ = explain(capsys, "--example", name)
    assert code == 0
    assert "DIFFERS" not in out
    value, verdict = cross_check(out, "torch")
    assert verdict == "agrees", out


def test_file_inputs_json_npy_npz(capsys, tmp_path):
    x = np.array(LOGITS)
    (tmp_path / "p.json").write_text(json.dumps({"input": LOGITS, "target": [1, 2, 3], "reduction": "sum"}))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "p.npz", logits=x, target=np.array([0, 0, 2]), weight=np.array([3.0, 1, 1, 1]))
    expected = {
        "p.json": F.cross_entropy(t64(LOGITS), torch.tensor([1, 2, 3]), reduction="sum"),
        "x.npy": F.cross_entropy(t64(LOGITS), torch.tensor([2, 2, 2])),
        "p.npz": F.cross_entropy(t64(LOGITS), torch.tensor([0, 0, 2]), weight=t64([3, 1, 1, 1])),
    }
    for name, value in expected.items():
        extra = ["--target", "[2, 2, 2]"] if name.endswith(".npy") else []
        code, out, _ = explain(capsys, "--file", str(tmp_path / name), *extra, "--decimals", "10")
        assert code == 0, name
        assert_close(final_loss(out), value)


# ----------------------------------------------------------------------------------------------------
# Common mistakes: the wrong code runs for real

MISTAKE_LOGITS = torch.tensor([[4.0, 0.5, -1.0], [0.1, 5.0, 0.2]])
MISTAKE_TARGET = torch.tensor([0, 1])


def arrow_lines(out: str) -> list[str]:
    return [line.strip()[3:] for line in out.splitlines() if line.strip().startswith("-> ")]


def test_mistake_probabilities_shows_the_wrong_and_the_right_number(capsys):
    code, out, _ = explain(capsys, "--example", "mistake-probabilities")
    assert code == 0
    wrong, fixed = arrow_lines(out)
    assert float(wrong.split("=")[1]) == pytest.approx(
        F.cross_entropy(MISTAKE_LOGITS.softmax(dim=1), MISTAKE_TARGET).item(), abs=1e-6
    )
    assert float(fixed.split("=")[1]) == pytest.approx(F.cross_entropy(MISTAKE_LOGITS, MISTAKE_TARGET).item(), abs=1e-6)


@pytest.mark.parametrize(
    "name, wrong_call",
    [
        ("mistake-btc", lambda: F.cross_entropy(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)))),
        ("mistake-float-target", lambda: F.cross_entropy(MISTAKE_LOGITS, MISTAKE_TARGET.float())),
        ("mistake-int32-target", lambda: F.cross_entropy(MISTAKE_LOGITS, MISTAKE_TARGET.int())),
        ("mistake-one-hot-long", lambda: F.cross_entropy(MISTAKE_LOGITS, F.one_hot(MISTAKE_TARGET, 3))),
    ],
)
def test_mistakes_show_torchs_own_error_and_a_working_fix(capsys, name, wrong_call):
    with pytest.raises(Exception) as raised:
        wrong_call()
    code, out, _ = explain(capsys, "--example", name)
    assert code == 0
    results = arrow_lines(out)
    assert results[0] == f"{raised.type.__name__}: {str(raised.value).splitlines()[0]}"
    assert all(re.fullmatch(r"loss\w* = [\d.]+", line) for line in results[1:]) and len(results) >= 2


def test_every_mistake_runs_both_snippets(capsys):
    for mistake in MISTAKES:
        code, out, _ = explain(capsys, "--example", mistake.name)
        assert code == 0
        assert "the mistake:" in out and "the fix:" in out and "why:" in out
        assert len(arrow_lines(out)) >= 2, mistake.name


def test_list_examples_names_them_all(capsys):
    code, out, _ = explain(capsys, "--list-examples")
    assert code == 0
    for name in EXAMPLES:
        assert name in out


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ce.png"
    code, out, _ = explain(capsys, "--example", "textbook", "--plot", str(path), "--plot-at", "1,2")
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert "logits[1, 2]" in out


# ----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback


@pytest.mark.parametrize(
    "args, message",
    [
        (["--logits", "[[1, 2, 3]]", "--target", "[0, 1]"], "does not fit logits shape"),
        (["--example", "no-such-example"], "unknown example"),
        (["--logits", "[[1, 2, 3]", "--target", "[0]"], "not valid JSON"),
        (["--logits", "[[1, 2, 3]]", "--target", "[3]"], "out of range for 3 classes"),
        (["--logits", "[[1, 2, 3], [1]]", "--target", "[0, 1]"], "rectangular"),
        (["--logits", "[[1, 2, 3]]", "--target", "[0.5]"], "whole numbers"),
        (["--logits", "[[1, 2, 3]]", "--target", "[1]", "--weight", "[1, 2]"], "one value per class"),
        (["--logits", "[[1, 2, 3]]", "--target", "[1]", "--label-smoothing", "1.5"], "between 0 and 1"),
        (["--op", "bce", "--logits", "[[1.5]]", "--target", "[[1]]"], "[0, 1]"),
        (["--op", "linear", "--input", "[[1, 2]]", "--target", "[0]"], "--linear-weight"),
        (["--logits", "[[1, 2]]", "--target", "[[0.5, 0.5]]", "--ignore-index", "0"], "class-index targets"),
        (["--logits", "[[1, 2]]"], "missing --target"),
        ([], "give --logits"),
        (["--file", "/no/such/file.json"], "no such file"),
        (["--example", "textbook", "--plot", "/no/such/dir/x.png"], "cannot write"),
        (["--example", "textbook", "--plot-at", "0,1"], "give --plot"),
        (["--example", "textbook", "--decimals", "-1"], "--decimals"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, args, message):
    code, out, err = explain(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("xentlib explain: error: ")
    assert message in err


def test_real_command_in_a_subprocess():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    ok = subprocess.run(
        [sys.executable, "-m", "xentlib.cli", "explain", "--example", "textbook"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "1.5210" in ok.stdout and "0.6247" in ok.stdout and "1.0729" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "xentlib.cli", "explain", "--logits", "[[1,2]]", "--target", "[5]"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_missing_matplotlib_for_plot_is_one_line(capsys, monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    code, out, err = explain(capsys, "--example", "textbook", "--plot", str(tmp_path / "x.png"))
    assert code == 2 and out == ""
    assert err == "xentlib explain: error: this needs matplotlib: pip install 'xentlib[demo]'\n"


def test_linear_with_probability_targets_agrees_everywhere(capsys):
    x, w = [[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    t = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    code, out, _ = explain(
        capsys,
        "--op",
        "linear",
        "--input",
        json.dumps(x),
        "--linear-weight",
        json.dumps(w),
        "--target",
        json.dumps(t),
        "--decimals",
        "10",
    )
    assert code == 0 and "probability targets" in out
    assert_close(final_loss(out), F.cross_entropy(t64(x) @ t64(w).T, t64(t)))
    assert "DIFFERS" not in out


# ----------------------------------------------------------------------------------------------------
# Post-training: per-token log-probabilities and a distillation divergence


def all_tables(out: str, header: str) -> list[list[list[str]]]:
    """Cells of every rich table whose header line contains `header`, one list of rows per table."""
    lines, tables = out.splitlines(), []
    for i, line in enumerate(lines):
        if "┃" in line and header in line:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("│"):
                    break
                rows.append([cell.strip() for cell in row.strip("│").split("│")])
            tables.append(rows)
    return tables


def test_log_probs_example_prints_torchs_log_softmax_target_and_entropy(capsys):
    from xentlib.cli._examples import EXAMPLES

    example = EXAMPLES["log-probs"]
    code, out, _ = explain(capsys, "--example", "log-probs", "--decimals", "10")
    assert code == 0
    temperature = example.options["temperature"]
    log_p = torch.log_softmax(t64(example.logits) / temperature, dim=-1)
    target = torch.tensor(example.target)
    picked = log_p.gather(-1, target[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    tables = all_tables(out, "log p = log_softmax(u)")
    assert len(tables) == len(example.target)
    for n, rows in enumerate(tables):
        assert_close([float(row[2]) for row in rows], (t64(example.logits[n]) / temperature).tolist())
        assert_close([float(row[3]) for row in rows], log_p[n].tolist())
        assert rows[example.target[n]][0].endswith("<- target")
    lines = re.findall(r"log p\[t\] = (\S+)\s+entropy H = -sum p log p = (\S+)", out)
    assert_close([[float(a), float(b)] for a, b in lines], torch.stack([picked, entropy], 1).tolist())
    assert "DIFFERS" not in out
    for source in ("torch", "xentlib.log_probs"):
        assert cross_check(out, source)[1] == "agrees", out


def test_distillation_example_prints_gkds_kls_mixture_and_gradient(capsys):
    from xentlib.cli._examples import EXAMPLES

    example = EXAMPLES["distillation"]
    beta, temperature = example.options["beta"], example.options["temperature"]
    code, out, _ = explain(capsys, "--example", "distillation", "--decimals", "10")
    assert code == 0
    student = t64(example.logits).requires_grad_()
    p = torch.softmax(student / temperature, dim=-1)
    q = torch.softmax(t64(example.options["teacher"]) / temperature, dim=-1)
    m = beta * q + (1 - beta) * p  # the mixture from probabilities: an independent evaluation
    kl_q, kl_p = (q * (q / m).log()).sum(-1), (p * (p / m).log()).sum(-1)
    rows = beta * kl_q + (1 - beta) * kl_p
    (grad,) = torch.autograd.grad(rows.sum(), student)
    tables = all_tables(out, "d D / d z_s")
    assert len(tables) == student.shape[0]
    for n, table in enumerate(tables):
        cells = np.array([[float(cell) for cell in row[1:]] for row in table])
        assert_close(cells[:, 2], p[n].tolist())
        assert_close(cells[:, 3], q[n].tolist())
        assert_close(cells[:, 4], m[n].tolist())
        assert_close(cells[:, 7], grad[n].tolist())
    kls = re.findall(r"KL\(q \|\| m\) = (\S+)\s+KL\(p \|\| m\) = (\S+)", out)
    assert_close([[float(a), float(b)] for a, b in kls], torch.stack([kl_q, kl_p], 1).tolist())
    divergences = re.findall(r"^  D = .* = (\S+)$", out, re.MULTILINE)
    assert_close([float(d) for d in divergences], rows.tolist())
    assert final_loss(out) == pytest.approx(rows.mean().item(), abs=1e-9)
    assert "DIFFERS" not in out
    for source in ("torch", "xentlib.distillation_loss", "xentlib.linear_distillation_loss"):
        assert cross_check(out, source)[1] == "agrees", out


def test_policy_loss_example_prints_trls_ratio_clipping_and_loss(capsys):
    from xentlib.cli._examples import EXAMPLES

    example = EXAMPLES["policy-loss"]
    options = example.options
    code, out, _ = explain(capsys, "--example", "policy-loss", "--decimals", "10")
    assert code == 0
    logits = t64(example.logits).requires_grad_()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(example.target)[:, None])[:, 0]
    a, old, ref = (t64(options[k]) for k in ("advantages", "old_log_probs", "ref_log_probs"))
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - options["epsilon"], 1 + options["epsilon"])
    per_token = -torch.min(ratio * a, clipped * a) + options["kl_coef"] * (torch.exp(ref - logp) - (ref - logp) - 1)
    (d_logp,) = torch.autograd.grad(per_token.sum(), logp, retain_graph=True)
    (rows,) = all_tables(out, "pg = -min(rA, clip(r)A)")
    cells = np.array([[float(cell) for cell in row[1:]] for row in rows])
    for column, expected in ((0, logp), (2, ratio), (3, clipped), (7, per_token), (8, d_logp)):
        assert_close(cells[:, column], expected.tolist())
    assert (clipped != ratio).any() and (cells[:, 3] != cells[:, 2]).any()  # the example shows a clipped ratio
    assert final_loss(out) == pytest.approx(per_token.mean().item(), abs=1e-9)
    assert "DIFFERS" not in out
    for source in ("torch", "xentlib.policy_loss", "xentlib.linear_policy_loss"):
        assert cross_check(out, source)[1] == "agrees", out


@pytest.mark.parametrize("name", ["log-probs", "policy-loss", "distillation"])
def test_post_training_examples_take_no_inputs_and_are_listed(capsys, name):
    code, _, err = explain(capsys, "--example", name, "--target", "[0]")
    assert code == 2 and "has fixed inputs" in err
    code, out, _ = explain(capsys, "--list-examples")
    assert code == 0 and name in out
