"""`xentlib explain`: a loss computed step by step in float64, then checked against torch.

For a handful of logits and targets it prints every intermediate of the computation (row max, exp, sum,
log-sum-exp, log_softmax, the picked target log-probability, class weights, label smoothing, ignored rows,
the reduction and its denominator), the entropy / cross-entropy / KL split of each row, and the same loss
from torch (and from xentlib's own implementations when they are importable) to show that they agree.

The arithmetic here is plain numpy float64, one line per formula, so that it reads like the maths.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xentlib.cli import CLIError
from xentlib.cli._examples import EXAMPLES, MISTAKES, WORKED, Mistake, Worked

OPS = ("cross_entropy", "nll_loss", "bce", "bce_with_logits", "linear")
REDUCTIONS = ("mean", "sum", "none")
MAX_DETAILED_ROWS = 4  # rows shown class by class
MAX_DETAILED_CLASSES = 12
MAX_LISTED_ROWS = 12  # rows shown in the summary tables
AGREEMENT_TOLERANCE = 1e-9  # float64 against float64: only rounding differences are expected

EPILOG = """examples:
  xentlib explain --example textbook
  xentlib explain --logits '[[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]]' --target '[0, 2]'
  xentlib explain --logits '[[2, 0.5, -1]]' --target '[[0.8, 0.2, 0]]'          (probability target)
  xentlib explain --example textbook --label-smoothing 0.1 --weight '[1, 2, 3]' --plot ce.png
  xentlib explain --op linear --input '[[0.5, -1]]' --linear-weight '[[0.3, -0.2], [-0.6, 0.1]]' \\
                  --target '[1]'
  xentlib explain --example mistake-btc          (common mistakes: see --list-examples)"""


# ----------------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show a loss computed step by step and checked against torch",
        description="Show cross_entropy (or nll_loss, bce, bce_with_logits, linear_cross_entropy) computed\n"
        "step by step for small inputs, then the same number from torch and xentlib.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("what to explain (one of)")
    source.add_argument(
        "--logits",
        "--input",
        dest="logits",
        metavar="JSON",
        help="logits as a JSON list, e.g. '[[1, 2, 0.5]]' (inf/-inf/nan allowed); for --op bce "
        "the probabilities, for --op nll_loss the log-probabilities, for --op linear the (N, D) "
        "input",
    )
    source.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="a .json object with 'logits' (or 'input'), 'target' and any option below by name; "
        "or a .npy array of logits (target from --target); or a .npz with the same names",
    )
    source.add_argument("--example", metavar="NAME", help="a built-in example (see --list-examples)")
    source.add_argument("--list-examples", action="store_true", help="list the built-in examples and exit")
    loss = parser.add_argument_group("the loss (options override those of --file/--example)")
    loss.add_argument(
        "--target",
        metavar="JSON",
        help="class indices '[0, 2]', or class probabilities with the logits' shape",
    )
    loss.add_argument("--op", choices=OPS, help="which loss (default cross_entropy)")
    loss.add_argument("--weight", metavar="JSON", help="class weights (C values); for bce: element weights")
    loss.add_argument("--label-smoothing", type=float, metavar="EPS", help="label smoothing in [0, 1]")
    loss.add_argument("--ignore-index", type=int, metavar="INT", help="target value to skip (default -100)")
    loss.add_argument("--reduction", choices=REDUCTIONS, help="default mean")
    loss.add_argument("--pos-weight", metavar="JSON", help="bce_with_logits: weight of the positive term")
    loss.add_argument("--linear-weight", metavar="JSON", help="linear: the (C, D) weight of the output layer")
    loss.add_argument("--bias", metavar="JSON", help="linear: the (C,) bias of the output layer")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="write the loss and its gradient as a function of one input value",
    )
    output.add_argument(
        "--plot-at", metavar="ROW,COL", help="which value --plot sweeps (default: row 0, its target class)"
    )
    output.add_argument("--decimals", type=int, default=4, help="decimals shown (default 4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.decimals <= 15:
        raise CLIError(f"--decimals must be between 0 and 15, got {args.decimals}")
    if args.plot_at is not None and args.plot is None:
        raise CLIError("--plot-at chooses what --plot sweeps: give --plot PNG too")
    require_packages("rich", *(["matplotlib"] if args.plot is not None else []))
    console = make_console()
    if args.list_examples:
        print_example_list(console)
        return 0
    example = find_example(args.example)
    if isinstance(example, Mistake):
        if args.logits is not None or args.file is not None or args.target is not None:
            raise CLIError(f"--example {example.name} runs fixed code; it takes no --logits/--file/--target")
        explain_mistake(console, example)
        return 0
    problem = build_problem(args, example)
    explanation = explain(problem)
    if args.plot is not None:  # check the plot's arguments before printing anything
        index = plot_index(problem, explanation, args.plot_at)
        if not args.plot.parent.is_dir():
            raise CLIError(f"cannot write {args.plot}: no directory {args.plot.parent}")
    render(console, problem, explanation, args.decimals)
    if args.plot is not None:
        write_plot(problem, index, args.plot)
        console.print(f"\nwrote {args.plot}: the loss and its gradient as {index_name(problem, index)} varies")
    return 0


def require_packages(*names: str) -> None:
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(f"this needs {', '.join(missing)}: pip install 'xentlib[demo]'")


def make_console():
    from rich.console import Console

    console = Console(highlight=False, markup=False)  # brackets like p[t] are text, not style tags
    if not console.is_terminal:  # pipes and tests: wide enough that the tables never wrap a number
        console = Console(highlight=False, markup=False, width=120)
    return console


def print_table(console, table) -> None:
    """Print a table whole: into a pipe or a file it may be wider than the console, never cut."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table)
    finally:
        console.width = width


def find_example(name: str | None) -> Worked | Mistake | None:
    if name is None:
        return None
    if name not in EXAMPLES:
        raise CLIError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    return EXAMPLES[name]


def print_example_list(console) -> None:
    from rich.table import Table

    table = Table(title="xentlib explain --example NAME", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("op")
    table.add_column("what it shows")
    for example in WORKED:
        table.add_row(example.name, example.op, example.summary)
    for mistake in MISTAKES:
        table.add_row(mistake.name, "mistake", mistake.summary)
    print_table(console, table)


# ----------------------------------------------------------------------------------------------------
# Reading the problem: example < file < command-line flags


@dataclass
class Problem:
    op: str
    logits: Any  # np.ndarray float64; for op 'linear' the (N, D) input
    target: Any
    weight: Any = None
    pos_weight: Any = None
    linear_weight: Any = None
    bias: Any = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    note: str = ""

    @property
    def probability_target(self) -> bool:
        """torch's rule: the target holds probabilities exactly when it has the logits' shape."""
        return self.op in ("cross_entropy", "linear") and self.target.shape == self.scores_shape

    @property
    def scores_shape(self) -> tuple[int, ...]:
        if self.op == "linear":
            return (self.logits.shape[0], self.linear_weight.shape[0])
        return self.logits.shape


ARRAY_FIELDS = ("logits", "target", "weight", "pos_weight", "linear_weight", "bias")
OPTION_FIELDS = ("op", "label_smoothing", "ignore_index", "reduction")


def build_problem(args: argparse.Namespace, example: Worked | None) -> Problem:
    given = [
        flag
        for flag, value in (("--example", example), ("--file", args.file), ("--logits", args.logits))
        if value is not None
    ]
    if not given:
        raise CLIError("give --logits and --target, --file PATH, or --example NAME (see --list-examples)")
    if len(given) > 1:
        raise CLIError(f"{' and '.join(given)} both give the logits: use one")
    raw: dict[str, Any] = {"op": "cross_entropy"}
    if example is not None:
        raw.update(op=example.op, logits=example.logits, target=example.target, note=example.note)
        raw.update(example.options)
    if args.file is not None:
        raw.update(read_problem_file(args.file))
    for name in ARRAY_FIELDS + OPTION_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            raw[name] = value
    if "target" not in raw:
        raise CLIError("missing --target (class indices like '[0, 2]' or probabilities with the logits' shape)")
    unknown = set(raw) - set(ARRAY_FIELDS) - set(OPTION_FIELDS) - {"note"}
    if unknown:
        raise CLIError(f"unknown field(s) {', '.join(sorted(unknown))} in {args.file}")
    arrays = {name: to_array(raw[name], name) for name in ARRAY_FIELDS if raw.get(name) is not None}
    problem = Problem(
        op=str(raw["op"]),
        label_smoothing=to_float(raw.get("label_smoothing", 0.0), "label_smoothing"),
        ignore_index=to_int(raw.get("ignore_index", -100), "ignore_index"),
        reduction=str(raw.get("reduction", "mean")),
        note=str(raw.get("note", "")),
        **arrays,
    )
    validate(problem)
    return problem


def read_problem_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            content = json.loads(path.read_text())
            if not isinstance(content, dict):
                raise CLIError(f'{path}: expected a JSON object like {{"logits": [[...]], "target": [...]}}')
            if "input" in content:
                content["logits"] = content.pop("input")
            return content
        if suffix == ".npy":
            return {"logits": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                content = {name: archive[name] for name in archive.files}
            if "input" in content:
                content["logits"] = content.pop("input")
            return content
    except (ValueError, OSError) as error:
        raise CLIError(f"cannot read {path}: {one_line(error)}") from None
    raise CLIError(f"{path}: expected a .json, .npy or .npz file")


NON_FINITE_WORDS = re.compile(r"(?<![A-Za-z])(-?)(inf(?:inity)?|nan)(?![A-Za-z])", re.IGNORECASE)


def to_array(value: Any, name: str):
    """A JSON string, nested list or array -> float64 array (inf, -inf and nan are accepted in JSON text)."""
    if isinstance(value, str):
        text = NON_FINITE_WORDS.sub(
            lambda m: m.group(1) + ("NaN" if m.group(2).lower() == "nan" else "Infinity"), value
        )
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise CLIError(
                f"--{name.replace('_', '-')} is not valid JSON ({error.msg} at column {error.colno})"
            ) from None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as error:
        why = "rows of equal length" if "inhomogeneous" in str(error) else one_line(error)
        raise CLIError(f"--{name.replace('_', '-')} must be a rectangular array of numbers ({why})") from None
    return array


def to_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CLIError(f"{name} must be a number, got {value!r}") from None


def to_int(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CLIError(f"{name} must be an integer, got {value!r}")
    return value


def validate(problem: Problem) -> None:
    """Reject what torch would reject, with a message that says what to change."""
    if problem.op not in OPS:
        raise CLIError(f"unknown op {problem.op!r}; choose one of: {', '.join(OPS)}")
    if problem.reduction not in REDUCTIONS:
        raise CLIError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {problem.reduction!r}")
    if problem.logits.ndim == 0 or problem.logits.size == 0:
        raise CLIError("the logits need at least one dimension and one value")
    if problem.op == "linear":
        validate_linear(problem)
    if problem.op in ("bce", "bce_with_logits"):
        validate_binary(problem)
    else:
        validate_classes(problem)


def validate_linear(problem: Problem) -> None:
    x, w = problem.logits, problem.linear_weight
    if w is None:
        raise CLIError("--op linear needs --linear-weight, the (C, D) weight of the output layer")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise CLIError(f"--op linear needs input (N, D) and --linear-weight (C, D); got {x.shape} and {w.shape}")
    if problem.bias is not None and problem.bias.shape != (w.shape[0],):
        raise CLIError(f"--bias must have shape ({w.shape[0]},) to match --linear-weight, got {problem.bias.shape}")


def validate_classes(problem: Problem) -> None:
    shape, target = problem.scores_shape, problem.target
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    eps = problem.label_smoothing
    if not 0.0 <= eps <= 1.0:
        raise CLIError(f"label smoothing must be between 0 and 1, got {eps}")
    if problem.weight is not None and problem.weight.shape != (num_classes,):
        raise CLIError(f"--weight needs one value per class ({num_classes}), got shape {problem.weight.shape}")
    if problem.probability_target:
        if problem.ignore_index >= 0:
            raise CLIError("--ignore-index applies to class-index targets; probability targets cannot ignore")
        return
    if problem.op == "nll_loss" and eps > 0:
        raise CLIError("nll_loss has no label smoothing (use --op cross_entropy)")
    expected = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if target.shape != expected and not (len(shape) == 1 and target.shape == (1,)):
        rows = f"{expected} (one class index per row)" if expected else "a single class index"
        prob = " or the logits' shape (class probabilities)" if problem.op != "nll_loss" else ""
        raise CLIError(f"target shape {target.shape} does not fit logits shape {shape}: expected {rows}{prob}")
    if not all(float(v).is_integer() for v in target.ravel()):
        raise CLIError("class-index targets must be whole numbers (for class probabilities give the logits' shape)")
    for value in target.ravel():
        if value != problem.ignore_index and not 0 <= value < num_classes:
            raise CLIError(
                f"target {int(value)} is out of range for {num_classes} classes (0..{num_classes - 1});"
                f" use --ignore-index {int(value)} to skip such rows"
            )


def validate_binary(problem: Problem) -> None:
    x, y = problem.logits, problem.target
    if x.shape != y.shape:
        raise CLIError(f"{problem.op} needs a target of the input's shape {x.shape}, got {y.shape}")
    for name, extra in (("weight", problem.weight), ("pos_weight", problem.pos_weight)):
        if extra is not None:
            try:
                if np.broadcast_shapes(extra.shape, x.shape) != x.shape:
                    raise ValueError
            except ValueError:
                raise CLIError(
                    f"--{name.replace('_', '-')} of shape {extra.shape} does not broadcast to {x.shape}"
                ) from None
    if problem.op == "bce":
        if not np.all((x >= 0) & (x <= 1)):
            raise CLIError("bce takes probabilities: every input value must be in [0, 1] (use bce_with_logits)")
        if not np.all((y >= 0) & (y <= 1)):
            raise CLIError("bce targets must be in [0, 1]")
    if problem.pos_weight is not None and problem.op != "bce_with_logits":
        raise CLIError("--pos-weight belongs to --op bce_with_logits")


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------
# The arithmetic, in numpy float64


@dataclass
class Explanation:
    """Every intermediate the report shows. Arrays are per row: (N,) or (N, C) after flattening."""

    scores: Any  # (N, C) logits (computed from input @ W.T + b for 'linear'); (N, K) values for binary ops
    target: Any  # (N,) class indices or (N, C) probabilities / binary targets
    row_max: Any = None
    exp_shifted: Any = None  # exp(x - max)
    exp_sum: Any = None
    lse: Any = None
    log_probs: Any = None
    class_weights: Any = None  # q[n, c]: how much -log p[n, c] counts in row n's loss
    picked: Any = None  # log p[n, t_n] for class-index targets
    picked_weight: Any = None  # w[t_n], 0 for ignored rows
    ignored: Any = None
    row_loss: Any = None  # (N,) ('none' output, flattened)
    denominator: float = 1.0
    denominator_text: str = ""
    loss: Any = None  # the reduced value (a float, or the 'none' array in the target's shape)
    output_shape: tuple[int, ...] = ()
    gradient: Any = None  # d loss / d scores, like `scores` ('none': each row's own loss)


def explain(problem: Problem) -> Explanation:
    with np.errstate(all="ignore"):
        if problem.op in ("bce", "bce_with_logits"):
            result = binary_steps(problem)
        elif problem.probability_target:
            result = probability_target_steps(problem)
        else:
            result = class_index_steps(problem)
        result.loss = reduce(result.row_loss.reshape(result.output_shape), result.denominator, problem.reduction)
        if problem.reduction == "mean" and result.denominator != 0:
            result.gradient = result.gradient / result.denominator  # 'mean' divides every row's gradient
    return result


def rows_and_classes(problem: Problem):
    """(N, C, d1, ...) -> (N*d1*..., C) rows with the classes last; (C,) -> one row."""

    scores = problem.logits
    if problem.op == "linear":  # logits = input @ W.T + b
        scores = problem.logits @ problem.linear_weight.T
        if problem.bias is not None:
            scores = scores + problem.bias
    return classes_last(scores)


def classes_last(array):
    """(C,) -> (1, C); (N, C) as is; (N, C, d1, ...) -> (N*d1*..., C)."""
    if array.ndim == 1:
        return array[None, :]
    return np.moveaxis(array, 1, -1).reshape(-1, array.shape[1])


def softmax_steps(scores) -> Explanation:
    """log_softmax the stable way: lse = m + log(sum(exp(x - m))), m the row max, so exp never overflows."""
    row_max = scores.max(axis=1)
    exp_shifted = np.exp(scores - row_max[:, None])
    exp_sum = exp_shifted.sum(axis=1)
    lse = row_max + np.log(exp_sum)
    return Explanation(
        scores=scores,
        target=None,
        row_max=row_max,
        exp_shifted=exp_shifted,
        exp_sum=exp_sum,
        lse=lse,
        log_probs=scores - lse[:, None],
    )


def class_index_steps(problem: Problem) -> Explanation:
    """l_n = (1-eps) w[t_n] (-log p[n, t_n]) + (eps/C) sum_c w_c (-log p[n, c]); 0 for ignored rows.

    The target term is a gather of one log-probability, never a dot product with a one-hot row, so a -inf
    logit on another class stays harmless. 'mean' divides by the summed w[t_n] of the rows not ignored.
    """
    scores = rows_and_classes(problem)
    num_rows, num_classes = scores.shape
    target = problem.target.reshape(-1).astype(np.int64)
    if problem.op == "nll_loss":  # the input already holds log-probabilities: nothing to normalize
        result = Explanation(scores=scores, target=None, log_probs=scores)
    else:
        result = softmax_steps(scores)
    result.target = target
    ignored = target == problem.ignore_index
    safe_target = np.where(ignored, 0, target)
    w = np.ones(num_classes) if problem.weight is None else problem.weight
    eps = problem.label_smoothing
    picked = result.log_probs[np.arange(num_rows), safe_target]
    picked_weight = np.where(ignored, 0.0, w[safe_target])
    loss = (1 - eps) * picked_weight * -picked
    if eps > 0:
        loss = loss + eps / num_classes * (w * -result.log_probs).sum(axis=1)
    one_hot = np.eye(num_classes)[safe_target]
    class_weights = (1 - eps) * picked_weight[:, None] * one_hot + eps / num_classes * w
    result.class_weights = np.where(ignored[:, None], 0.0, class_weights)
    result.picked, result.picked_weight, result.ignored = picked, picked_weight, ignored
    result.gradient = np.where(ignored[:, None], 0.0, row_gradient(problem, result))
    result.row_loss = np.where(ignored, 0.0, loss)
    result.denominator = float(picked_weight.sum())
    counted = "weighted count sum_n w[t_n]" if problem.weight is not None else "number of rows"
    result.denominator_text = counted + (" (ignored rows excluded)" if ignored.any() else "")
    result.output_shape = problem.target.shape if problem.logits.ndim > 1 else ()
    return result


def probability_target_steps(problem: Problem) -> Explanation:
    """q[n, c] = w_c ((1-eps) t[n, c] + eps/C);  l_n = sum_c q[n, c] (-log p[n, c]);  'mean' divides by N."""
    scores = rows_and_classes(problem)
    num_rows, num_classes = scores.shape
    target = classes_last(problem.target)
    result = softmax_steps(scores)
    result.target = target
    w = np.ones(num_classes) if problem.weight is None else problem.weight
    eps = problem.label_smoothing
    result.class_weights = w * ((1 - eps) * target + eps / num_classes)
    result.row_loss = (result.class_weights * -result.log_probs).sum(axis=1)
    result.ignored = np.zeros(num_rows, dtype=bool)
    result.gradient = row_gradient(problem, result)
    result.denominator = float(num_rows)
    result.denominator_text = "number of rows N (probability targets are never divided by the weights)"
    result.output_shape = problem.logits.shape[:1] + problem.logits.shape[2:] if problem.logits.ndim > 1 else ()
    return result


def row_gradient(problem: Problem, result: Explanation):
    """d l_n / d x[n, j] before the reduction, from l_n = sum_c q_c (lse_n - x[n, c]):

    d lse / d x_j = p_j, so d l / d x_j = (sum_c q_c) p_j - q_j: softmax minus the target weights.
    nll_loss has no lse (its input is already log p): l = -sum_c q_c x_c, so d l / d x_j = -q_j.
    """
    q = result.class_weights
    if problem.op == "nll_loss":
        return -q
    return q.sum(axis=1, keepdims=True) * np.exp(result.log_probs) - q


def binary_steps(problem: Problem) -> Explanation:
    """Each element is its own yes/no question; 'mean' divides by the number of elements.

    bce:             l = -w (y max(log x, -100) + (1-y) max(log(1-x), -100))   (x a probability)
                     dl/dx = w (x - y) / max(x (1-x), 1e-12)
    bce_with_logits: l = w (pw y softplus(-x) + (1-y) softplus(x)),  since -log sigmoid(x) = softplus(-x)
                     dl/dx = w ((pw y + 1 - y) sigmoid(x) - pw y)
    """
    x, y = problem.logits, problem.target
    w = 1.0 if problem.weight is None else problem.weight
    if problem.op == "bce":
        log_p = np.maximum(np.log(x), -100.0)  # torch clamps each log at -100, so 0 * log(0) is 0, not NaN
        log_not_p = np.maximum(np.log1p(-x), -100.0)
        loss = -w * (y * log_p + (1 - y) * log_not_p)
        grad = w * (x - y) / np.maximum(x * (1 - x), np.float32(1e-12))  # torch's float32 epsilon
    else:
        pos_weight = 1.0 if problem.pos_weight is None else problem.pos_weight
        softplus = lambda z: np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))  # log(1 + e^z) without overflow
        log_p, log_not_p = -softplus(-x), -softplus(x)
        loss = w * (pos_weight * y * -log_p + (1 - y) * -log_not_p)
        grad = w * ((pos_weight * y + 1 - y) * np.exp(log_p) - pos_weight * y)
    as_rows = lambda a: np.broadcast_to(a, x.shape).reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    result = Explanation(scores=as_rows(x), target=as_rows(y))
    result.log_probs = np.stack([as_rows(log_p), as_rows(log_not_p)])  # log p(yes), log p(no) per element
    result.row_loss = as_rows(loss).reshape(-1)
    result.gradient = as_rows(grad)
    result.ignored = np.zeros(result.row_loss.shape, dtype=bool)
    result.denominator = float(x.size)
    result.denominator_text = "number of elements"
    result.output_shape = x.shape
    return result


def reduce(per_element, denominator: float, reduction: str):
    if reduction == "none":
        return per_element
    total = float(np.sum(per_element))
    if reduction == "sum":
        return total
    return total / denominator if denominator != 0 else float("nan")  # torch: 0/0 -> NaN (all rows ignored)


def information(problem: Problem, result: Explanation):
    """Per row (unweighted): entropy H(t), cross-entropy H(t, p) and KL(t || p) = H(t, p) - H(t).

    t is the target distribution (one-hot, smoothed, or the given probabilities renormalized), p the
    prediction.
    Binary ops treat each element as a Bernoulli(y) target against Bernoulli(p) and add them up per row.
    Returns (rows, entropy, cross_entropy, kl) or None when the inputs are not distributions.
    """
    xlogy = lambda a, b: np.where(a > 0, a * b, 0.0)  # 0 log 0 = 0, also when b = -inf
    with np.errstate(all="ignore"):
        if problem.op in ("bce", "bce_with_logits"):
            y = result.target
            log_p, log_not_p = result.log_probs
            entropy = -(xlogy(y, np.log(y)) + xlogy(1 - y, np.log1p(-y))).sum(axis=1)
            cross = -(xlogy(y, log_p) + xlogy(1 - y, log_not_p)).sum(axis=1)
            return np.arange(len(y)), entropy, cross, cross - entropy
        if problem.op == "nll_loss" and np.any(np.abs(np.log(np.exp(result.log_probs).sum(axis=1))) > 1e-3):
            return None  # inputs that are not log-probabilities: no distribution to compare
        num_classes = result.log_probs.shape[1]
        eps = problem.label_smoothing
        if problem.probability_target:
            t = (1 - eps) * result.target + eps / num_classes
            totals = t.sum(axis=1, keepdims=True)
            if np.any(t < 0) or np.any(totals <= 0):
                return None
            t = t / totals
        else:
            t = (1 - eps) * np.eye(num_classes)[np.where(result.ignored, 0, result.target)] + eps / num_classes
        rows = np.flatnonzero(~result.ignored)
        t, log_p = t[rows], result.log_probs[rows]
        entropy = -xlogy(t, np.log(t)).sum(axis=1)
        cross = -xlogy(t, log_p).sum(axis=1)
        return rows, entropy, cross, cross - entropy


# ----------------------------------------------------------------------------------------------------
# The same number from torch, xentlib.reference and xentlib.functional


def torch_loss(problem: Problem, x=None):
    """The loss from torch in float64 (x replaces the first argument, for the --plot sweep)."""
    import torch
    import torch.nn.functional as F

    tensor = lambda a: None if a is None else torch.from_numpy(a)
    x = tensor(problem.logits) if x is None else x
    weight, reduction = tensor(problem.weight), problem.reduction
    if problem.op in ("bce", "bce_with_logits"):
        y = tensor(problem.target)
        if problem.op == "bce":
            return F.binary_cross_entropy(x, y, weight=weight, reduction=reduction)
        return F.binary_cross_entropy_with_logits(
            x, y, weight=weight, reduction=reduction, pos_weight=tensor(problem.pos_weight)
        )
    target = tensor(problem.target) if problem.probability_target else tensor(problem.target).long()
    options = dict(weight=weight, ignore_index=problem.ignore_index, reduction=reduction)
    if problem.op == "nll_loss":
        return F.nll_loss(x, target, **options)
    if problem.op == "linear":
        logits = F.linear(x, tensor(problem.linear_weight), tensor(problem.bias))
        return F.cross_entropy(logits, target, label_smoothing=problem.label_smoothing, **options)
    return F.cross_entropy(x, target, label_smoothing=problem.label_smoothing, **options)


def torch_fused_linear_loss(problem: Problem):
    import torch
    import torch.nn.functional as F

    tensor = lambda a: None if a is None else torch.from_numpy(a)
    return F.linear_cross_entropy(
        tensor(problem.logits),
        tensor(problem.linear_weight),
        tensor(problem.target).long() if not problem.probability_target else tensor(problem.target),
        linear_bias=tensor(problem.bias),
        weight=tensor(problem.weight),
        reduction=problem.reduction,
        ignore_index=None if problem.probability_target else problem.ignore_index,  # torch: None only there
        label_smoothing=problem.label_smoothing,
    )


FUNCTION_NAMES = {
    "cross_entropy": "cross_entropy",
    "nll_loss": "nll_loss",
    "bce": "binary_cross_entropy",
    "bce_with_logits": "binary_cross_entropy_with_logits",
    "linear": "linear_cross_entropy",
}


def library_call(problem: Problem, module, as_array):
    """Call `module.<op>` with torch's signature; `as_array` turns numpy inputs into the module's arrays."""
    function = getattr(module, FUNCTION_NAMES[problem.op])
    x, weight = as_array(problem.logits), None if problem.weight is None else as_array(problem.weight)
    target = as_array(problem.target)
    if problem.op in ("bce", "bce_with_logits"):
        options = {"weight": weight, "reduction": problem.reduction}
        if problem.pos_weight is not None:
            options["pos_weight"] = as_array(problem.pos_weight)
        return function(x, target, **options)
    if not problem.probability_target:
        target = as_array(problem.target.astype("int64"))
    options = {"weight": weight, "ignore_index": problem.ignore_index, "reduction": problem.reduction}
    if problem.op != "nll_loss":
        options["label_smoothing"] = problem.label_smoothing
    if problem.op == "linear":  # `weight` is the layer's there; the class weights go by another name
        options.pop("weight")
        if weight is not None:
            options["class_weight"] = weight
        bias = None if problem.bias is None else as_array(problem.bias)
        return function(x, as_array(problem.linear_weight), target, bias=bias, **options)
    return function(x, target, **options)


def cross_checks(problem: Problem):
    """[(source, value or None, note)] from every implementation we can reach."""
    checks = []

    def attempt(source, compute):
        try:
            checks.append((source, to_numpy(compute()), ""))
        except (ImportError, AttributeError, NotImplementedError):
            checks.append((source, None, "not available yet"))
        except Exception as error:  # show, do not hide: a disagreement in how an error is raised is a finding
            checks.append((source, None, f"{type(error).__name__}: {one_line(error)}"))

    def reference():
        from xentlib import reference as module

        return library_call(problem, module, lambda a: np.asarray(a))

    def functional():
        import torch

        from xentlib import functional as module

        return library_call(problem, module, torch.from_numpy)

    name = FUNCTION_NAMES[problem.op]
    attempt(f"xentlib.reference.{name}", reference)
    attempt(
        f"torch (F.{'linear + F.cross_entropy' if problem.op == 'linear' else name})",
        lambda: torch_loss(problem),
    )
    if problem.op == "linear":
        attempt("torch F.linear_cross_entropy", lambda: torch_fused_linear_loss(problem))
    attempt(f"xentlib.functional.{name}", functional)
    return checks


def to_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def max_difference(a, b) -> float:
    """Largest |a - b|, where equal infinities and NaN against NaN count as agreement."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        return float("inf")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(a - b)), initial=0.0))


def agrees(a, b) -> bool:
    if np.shape(a) != np.shape(b):
        return False
    scale = max(1.0, float(np.max(np.abs(np.nan_to_num(np.asarray(a), posinf=0, neginf=0)), initial=0.0)))
    return max_difference(a, b) <= AGREEMENT_TOLERANCE * scale


# ----------------------------------------------------------------------------------------------------
# Rendering


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


# ----------------------------------------------------------------------------------------------------
# Common mistakes: run the wrong code and the fix for real


def explain_mistake(console, mistake: Mistake) -> None:
    from rich.rule import Rule
    from rich.syntax import Syntax

    console.print(Rule(f"xentlib explain: {mistake.summary}"))
    console.print("setup:")
    console.print(Syntax(mistake.setup, "python", theme="ansi_dark", background_color="default"))
    for label, code in (("the mistake", mistake.wrong), ("the fix", mistake.fix)):
        console.print(f"\n{label}:")
        console.print(Syntax(code, "python", theme="ansi_dark", background_color="default"))
        for line in run_snippet(mistake.setup, code):
            console.print(f"  -> {line}", markup=False)
    console.print(f"\nwhy: {mistake.why}")


def run_snippet(setup: str, code: str) -> list[str]:
    """Run setup + code with torch and F in scope; report every new `loss*` variable, or the error raised."""
    import torch
    import torch.nn.functional as F

    namespace: dict[str, Any] = {"torch": torch, "F": F}
    exec(setup, namespace)  # our own constant snippets from _examples.py, shown on screen as they run
    before = set(namespace)
    try:
        exec(code, namespace)
    except Exception as error:
        return [f"{type(error).__name__}: {one_line(error)}"]
    return [
        f"{name} = {float(namespace[name]):.6f}" for name in namespace if name.startswith("loss") and name not in before
    ]


# ----------------------------------------------------------------------------------------------------
# --plot: the loss and its gradient as one input value moves


def index_name(problem: Problem, index: tuple[int, ...]) -> str:
    name = "input" if problem.op in ("linear", "bce", "nll_loss") else "logits"
    return f"{name}[{', '.join(str(i) for i in index)}]"


def write_plot(problem: Problem, index: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    base = torch.from_numpy(problem.logits.copy())
    current = float(base[index])
    if problem.op == "bce":
        values = np.linspace(1e-3, 1 - 1e-3, 400)
    else:
        values = np.linspace(current - 8, current + 8, 401)
    losses, grads = [], []
    for value in values:
        x = base.clone()
        x[index] = value
        x.requires_grad_(True)
        loss = torch_loss(problem, x).sum()
        (grad,) = torch.autograd.grad(loss, x)
        losses.append(loss.item())
        grads.append(float(grad[index]))
    where = index_name(problem, index)
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(values, losses, color="tab:blue")
    top.set_ylabel(f"loss ({problem.reduction})")
    top.set_title(f"{FUNCTION_NAMES[problem.op]} as {where} varies")
    bottom.plot(values, grads, color="tab:orange")
    bottom.axhline(0.0, color="gray", linewidth=0.5)
    bottom.set_ylabel(f"d loss / d {where}")
    bottom.set_xlabel(where)
    for axis in (top, bottom):
        axis.axvline(current, color="gray", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {one_line(error)}") from None
    finally:
        plt.close(figure)


def plot_index(problem: Problem, result: Explanation, plot_at: str | None) -> tuple[int, ...]:
    shape = problem.logits.shape
    if plot_at is None:
        first_target = result.target.reshape(-1)[0] if not problem.probability_target else 0
        use_target = problem.op in ("cross_entropy", "nll_loss") and not problem.probability_target
        column = int(first_target) if use_target and not result.ignored[0] else 0
        index = (0, column) if len(shape) >= 2 else (column,)
        return index + (0,) * (len(shape) - len(index))
    try:
        index = tuple(int(part) for part in plot_at.split(","))
    except ValueError:
        raise CLIError(f"--plot-at takes comma-separated integers like 0,2, got {plot_at!r}") from None
    if len(index) != len(shape) or not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
        raise CLIError(f"--plot-at {plot_at} is not an index into the input of shape {shape}")
    return index
