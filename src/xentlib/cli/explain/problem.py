"""What `xentlib explain` explains: the problem read from a built-in example, a file and the command-line flags
(in that order of precedence), and validated the way torch would validate it."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xentlib.cli import CLIError
from xentlib.cli._examples import EXAMPLES, Mistake, Worked
from xentlib.cli._shared import one_line

OPS = ("cross_entropy", "nll_loss", "bce", "bce_with_logits", "linear")
REDUCTIONS = ("mean", "sum", "none")


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


def find_example(name: str | None) -> Worked | Mistake | None:
    if name is None:
        return None
    if name not in EXAMPLES:
        raise CLIError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    return EXAMPLES[name]
