"""Printing an explanation: the header, one table per row, the reduction, the entropy / KL split and the
cross-checks (Rich)."""

from __future__ import annotations

import numpy as np

from xentlib.cli._shared import print_table
from xentlib.cli.explain.checks import FUNCTION_NAMES, agrees, cross_checks, max_difference
from xentlib.cli.explain.problem import Problem
from xentlib.cli.explain.steps import Explanation, information

MAX_DETAILED_ROWS = 4  # rows shown class by class


MAX_DETAILED_CLASSES = 12


MAX_LISTED_ROWS = 12  # rows shown in the summary tables


def bold(text: str, style: str = "bold"):
    from rich.text import Text

    return Text(text, style=style)


def number(value: float, decimals: int) -> str:
    import math

    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        value = 0.0  # no "-0.0000"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 0.5 * 10**-decimals):
        return f"{value:.{decimals}g}"
    return f"{value:.{decimals}f}"


def numbers(values, decimals: int) -> str:
    flat = np.asarray(values, dtype=np.float64).ravel()
    return "[" + ", ".join(number(v, decimals) for v in flat) + "]"


def render(console, problem: Problem, result: Explanation, decimals: int) -> None:
    from rich.rule import Rule

    fmt = lambda v: number(v, decimals)
    title, details = describe(problem)
    console.print(Rule(f"xentlib explain: {title}"))
    console.print(details)
    if problem.note:
        console.print(problem.note)
    if problem.op == "linear":
        render_linear_logits(console, problem, result, fmt)
    if problem.op in ("bce", "bce_with_logits"):
        render_binary(console, problem, result, fmt)
    else:
        render_class_rows(console, problem, result, fmt)
    render_reduction(console, problem, result, decimals)
    render_information(console, problem, result, fmt)
    render_cross_checks(console, problem, result, decimals)


def describe(problem: Problem) -> tuple[str, str]:
    """(title, one line of details) for the header."""
    shape = "x".join(str(n) for n in problem.scores_shape)
    name = FUNCTION_NAMES[problem.op]
    if problem.op in ("bce", "bce_with_logits"):
        kind = "probabilities" if problem.op == "bce" else "logits"
        return name, f"{shape} {kind} with targets in [0, 1], reduction='{problem.reduction}'"
    kind = "probability targets" if problem.probability_target else "class-index targets"
    details = [f"{shape} logits", kind, f"reduction='{problem.reduction}'"]
    if problem.op == "linear":
        details[0] = (
            f"input {'x'.join(map(str, problem.logits.shape))} and weight "
            + f"{'x'.join(map(str, problem.linear_weight.shape))} -> {shape} logits"
        )
    if problem.weight is not None:
        details.append(f"class weights {numbers(problem.weight, 4)}")
    if problem.label_smoothing > 0:
        details.append(f"label_smoothing={problem.label_smoothing:g}")
    if not problem.probability_target:
        details.append(f"ignore_index={problem.ignore_index}")
    return name, ", ".join(details)


def render_linear_logits(console, problem: Problem, result: Explanation, fmt) -> None:
    from rich.table import Table

    bias = " + bias" if problem.bias is not None else ""
    console.print(
        f"logits = input @ weight.T{bias}: ({problem.logits.shape[0]}, {problem.logits.shape[1]}) @ "
        f"({problem.linear_weight.shape[1]}, {problem.linear_weight.shape[0]})"
    )
    table = Table()
    table.add_column("row")
    for c in range(result.scores.shape[1]):
        table.add_column(f"class {c}", justify="right")
    for n, row in enumerate(result.scores[:MAX_LISTED_ROWS]):
        table.add_row(str(n), *(fmt(v) for v in row))
    print_table(console, table)
    console.print(
        "linear_cross_entropy gives the same loss as cross_entropy on these logits; xentlib computes it "
        "in row chunks so the full (N, C) logits never exist at once."
    )


def render_class_rows(console, problem: Problem, result: Explanation, fmt) -> None:
    from rich.table import Table

    if problem.logits.ndim > 2 and problem.op != "linear":
        console.print(
            f"(N, C, d1, ...) logits: the classes are dim 1; each position is a row of its own, "
            f"{result.scores.shape[0]} rows of {result.scores.shape[1]} classes."
        )
    if problem.op == "nll_loss":
        console.print(
            "nll_loss takes log-probabilities: it only picks -input[n, t_n] and weights it; "
            "it never normalizes. Feed it log_softmax(logits); cross_entropy(logits) does both in one "
            "call and is the same number."
        )
        if not_log_probabilities(result.log_probs):
            console.print(
                bold("warning:", "bold red"),
                "these rows are not log-probabilities (their logsumexp is "
                "not 0): the result is -input[t], not a cross-entropy. Apply log_softmax first.",
            )
    num_rows, num_classes = result.scores.shape
    for n in range(min(num_rows, MAX_DETAILED_ROWS)):
        if num_classes <= MAX_DETAILED_CLASSES:
            print_table(console, row_table(problem, result, n, fmt))
        else:
            console.print(f"row {n}" + ("" if problem.probability_target else f", target {result.target[n]}"))
        console.print(row_formula(problem, result, n, fmt))
    if num_classes <= MAX_DETAILED_CLASSES:
        console.print(gradient_note(problem, result, fmt))
    if num_rows > MAX_DETAILED_ROWS or num_classes > MAX_DETAILED_CLASSES:
        console.print(f"(class-by-class detail for the first {min(num_rows, MAX_DETAILED_ROWS)} rows only)")
    summary = Table(title="per-row loss ('none' output)", title_justify="left")
    columns = ["row", "target"] if not problem.probability_target else ["row", "sum of q"]
    if problem.op != "nll_loss":
        columns += ["max", "sum exp(x-max)", "lse"]
    columns += ["log p[t]", "w[t]", "loss"] if not problem.probability_target else ["loss"]
    for name in columns:
        summary.add_column(name, justify="right")
    for n in range(min(num_rows, MAX_LISTED_ROWS)):
        cells = [str(n)]
        cells.append(fmt(result.class_weights[n].sum()) if problem.probability_target else str(result.target[n]))
        if problem.op != "nll_loss":
            cells += [fmt(result.row_max[n]), fmt(result.exp_sum[n]), fmt(result.lse[n])]
        if not problem.probability_target:
            ignored = result.ignored[n]
            cells += ["ignored" if ignored else fmt(result.picked[n]), fmt(result.picked_weight[n])]
        cells.append(fmt(result.row_loss[n]))
        summary.add_row(*cells)
    if num_rows > MAX_LISTED_ROWS:
        summary.add_row("...", *([""] * (len(columns) - 1)))
    print_table(console, summary)


def not_log_probabilities(log_probs) -> bool:
    with np.errstate(all="ignore"):
        return bool(np.any(np.abs(np.log(np.exp(log_probs).sum(axis=1))) > 1e-3))


def gradient_note(problem: Problem, result: Explanation, fmt) -> str:
    """One line on the q and gradient columns: softmax minus target, scaled by the reduction."""
    formula = "-q" if problem.op == "nll_loss" else "(sum_c q_c) * p - q"
    if problem.reduction == "mean":
        scale = f", divided by the mean's denominator {fmt(result.denominator)}"
    elif problem.reduction == "none":
        scale = " (of each row's own loss)"
    else:
        scale = ""
    return f"q = how much each -log p counts in the row's loss;  d loss / d x = {formula}{scale}"


def row_table(problem: Problem, result: Explanation, n: int, fmt):
    from rich.table import Table

    target_text = "" if problem.probability_target else f", target {result.target[n]}"
    if not problem.probability_target and result.ignored[n]:
        target_text += " = ignore_index: loss 0, no gradient"
    table = Table(title=f"row {n}{target_text}", title_justify="left")
    if problem.op == "nll_loss":
        headers = ["class", "log p (given)", "q", "d loss / d input"]
    else:
        headers = ["class", "x", "x - max", "exp(x - max)", "p = exp / sum", "log p = x - lse", "q"]
        headers.append("d loss / d x")
    for header in headers:
        table.add_column(header, justify="right")
    for c in range(result.scores.shape[1]):
        is_target = not problem.probability_target and c == result.target[n] and not result.ignored[n]
        cells = [f"{c} <- target" if is_target else str(c)]
        if problem.op != "nll_loss":
            x = result.scores[n, c]
            cells += [
                fmt(x),
                fmt(x - result.row_max[n]),
                fmt(result.exp_shifted[n, c]),
                fmt(result.exp_shifted[n, c] / result.exp_sum[n]),
            ]
        cells += [fmt(result.log_probs[n, c]), fmt(result.class_weights[n, c]), fmt(result.gradient[n, c])]
        table.add_row(*cells, style="bold" if is_target else None)
    return table


def row_formula(problem: Problem, result: Explanation, n: int, fmt) -> str:
    if not problem.probability_target and result.ignored[n]:
        return f"  row {n} is ignored: loss 0 and it is left out of the mean's denominator"
    lines = []
    if problem.op != "nll_loss":
        lines.append(
            f"  max = {fmt(result.row_max[n])}   sum exp(x - max) = {fmt(result.exp_sum[n])}   "
            f"lse = max + log(sum) = {fmt(result.lse[n])}"
        )
    loss = fmt(result.row_loss[n])
    if problem.probability_target:
        lines.append(f"  loss = sum_c q_c * (-log p_c) = {loss}")
        return "\n".join(lines)
    t, w, eps = result.target[n], result.picked_weight[n], problem.label_smoothing
    minus_picked = fmt(-result.picked[n])
    lines.append(f"  log p[{t}] = {fmt(result.picked[n])}")
    if eps > 0:
        num_classes = result.log_probs.shape[1]
        smooth_sum = result.row_loss[n] - (1 - eps) * w * -result.picked[n]
        lines.append("  loss = (1 - eps) * w[t] * (-log p[t]) + eps/C * sum_c w_c * (-log p_c)")
        lines.append(
            f"       = {1 - eps:g} * {fmt(w)} * {minus_picked} + {eps:g}/{num_classes} * "
            f"{fmt(smooth_sum * num_classes / eps)} = {loss}"
        )
    elif problem.weight is not None:
        lines.append(f"  loss = w[t] * (-log p[t]) = {fmt(w)} * {minus_picked} = {loss}")
    else:
        lines.append(f"  loss = -log p[t] = {loss}")
    return "\n".join(lines)


def render_binary(console, problem: Problem, result: Explanation, fmt) -> None:
    import math

    from rich.table import Table

    if problem.op == "bce":
        console.print(
            "bce takes probabilities x in [0, 1]; each log is clamped at -100 so x = 0 or 1 "
            "gives a finite loss. On raw scores use bce_with_logits: it is stable and one op."
        )
        headers = ["x (prob)", "y", "log x", "log(1 - x)", "loss", "d loss / d x"]
    else:
        console.print(
            "bce_with_logits: p = sigmoid(x); -log p = softplus(-x) and -log(1 - p) = softplus(x), "
            "computed without overflow as max(z, 0) + log1p(exp(-|z|))."
        )
        headers = ["x (logit)", "y", "sigmoid(x)", "log p", "log(1 - p)", "loss", "d loss / d x"]
    log_p, log_not_p = result.log_probs
    losses = result.row_loss.reshape(result.scores.shape)
    for n in range(min(result.scores.shape[0], MAX_DETAILED_ROWS)):
        table = Table(title=f"row {n}", title_justify="left")
        table.add_column("element", justify="right")
        for header in headers:
            table.add_column(header, justify="right")
        for k in range(min(result.scores.shape[1], MAX_DETAILED_CLASSES)):
            x = result.scores[n, k]
            cells = [str(k), fmt(x), fmt(result.target[n, k])]
            if problem.op == "bce_with_logits":
                cells.append(fmt(math.exp(log_p[n, k])))
            cells += [fmt(log_p[n, k]), fmt(log_not_p[n, k]), fmt(losses[n, k]), fmt(result.gradient[n, k])]
            table.add_row(*cells)
        print_table(console, table)
    weights = []
    if problem.weight is not None:
        weights.append(f"weight {numbers(problem.weight, 4)}")
    if problem.pos_weight is not None:
        weights.append(f"pos_weight {numbers(problem.pos_weight, 4)} (multiplies the y * -log p term)")
    formula = (
        "-w (y log x + (1 - y) log(1 - x))"
        if problem.op == "bce"
        else "w (pos_weight y (-log p) + (1 - y) (-log(1 - p)))"
    )
    console.print(f"  loss = {formula}" + ("; " + ", ".join(weights) if weights else ""))


def render_reduction(console, problem: Problem, result: Explanation, decimals: int) -> None:
    fmt = lambda v: number(v, decimals)
    total = float(np.sum(result.row_loss))
    console.print()
    if problem.reduction == "none":
        shown = numbers(result.row_loss[:MAX_LISTED_ROWS], decimals)
        more = f" ... ({result.row_loss.size} in all)" if result.row_loss.size > MAX_LISTED_ROWS else ""
        unit = "element" if problem.op in ("bce", "bce_with_logits") else "row"
        console.print(f"reduction='none': one loss per {unit} {shown}{more}")
        return
    if problem.reduction == "sum":
        console.print("reduction='sum': loss = sum of the row losses =", bold(fmt(result.loss)))
        return
    console.print(f"reduction='mean': loss = sum of the row losses / {result.denominator_text}")
    console.print(f"                  = {fmt(total)} / {fmt(result.denominator)} =", bold(fmt(result.loss)))
    if result.denominator == 0:
        console.print("  (nothing to average over: torch returns NaN here, and zero gradients)")


def render_information(console, problem: Problem, result: Explanation, fmt) -> None:
    from rich.table import Table

    info = information(problem, result)
    console.print()
    if info is None:
        console.print("entropy / cross-entropy / KL: skipped (the inputs or targets are not distributions)")
        return
    rows, entropy, cross, kl = info
    binary = problem.op in ("bce", "bce_with_logits")
    table = Table(
        title="target distribution t vs prediction p (per row, unweighted"
        + (", summed over the row's elements)" if binary else ")"),
        title_justify="left",
    )
    for header in ("row", "entropy H(t)", "cross-entropy H(t, p)", "KL(t || p)"):
        table.add_column(header, justify="right")
    for i, n in enumerate(rows[:MAX_LISTED_ROWS]):
        table.add_row(str(n), fmt(entropy[i]), fmt(cross[i]), fmt(kl[i]))
    note = "cross-entropy = entropy + KL: the entropy is fixed by the target, training can only shrink the KL part" + (
        "; one-hot targets have entropy 0, so the loss is all KL."
        if not binary and not problem.probability_target and problem.label_smoothing == 0
        else "."
    )
    print_table(console, table)
    console.print(note)


def render_cross_checks(console, problem: Problem, result: Explanation, decimals: int) -> None:
    from rich.table import Table

    checks = cross_checks(problem)
    reference = next(
        (
            value
            for source, value, _ in checks
            if source.startswith("xentlib.reference") and value is not None and agrees(value, result.loss)
        ),
        None,
    )
    table = Table(title="the same loss from each implementation (float64)", title_justify="left")
    for header in ("source", "value", "max |diff| vs steps", ""):
        table.add_column(header, justify="left" if header in ("source", "") else "right")
    show = lambda v: numbers(v, max(decimals, 6)) if getattr(v, "ndim", 0) else number(v, max(decimals, 6))
    table.add_row("these steps (numpy float64)", show(result.loss), "", "")
    for source, value, note in checks:
        if value is None:
            table.add_row(source, "-", "", note)
            continue
        verdict = "agrees" if agrees(value, result.loss) else bold("DIFFERS", "bold red")
        table.add_row(source, show(value), f"{max_difference(value, result.loss):.1e}", verdict)
    console.print()
    print_table(console, table)
    final = reference if reference is not None else result.loss
    origin = "xentlib.reference" if reference is not None else "the steps above"
    console.print("loss =", bold(show(final)), f" ({origin})")
