"""`xentlib explain`: a loss computed step by step in float64, then checked against torch.

For a handful of logits and targets it prints every intermediate of the computation (row max, exp, sum,
log-sum-exp, log_softmax, the picked target log-probability, class weights, label smoothing, ignored rows,
the reduction and its denominator), the entropy / cross-entropy / KL split of each row, and the same loss
from torch (and from xentlib's own implementations when they are importable) to show that they agree.

Every number comes from xentlib.reference (float64 NumPy), which computes each loss through the same
intermediates it shows. Layout:

    problem.py   the input: example < file < flags, validated as torch would
    steps.py     the intermediates, read from xentlib.reference, and the entropy / KL split
    checks.py    the same loss from xentlib.reference, torch and xentlib.functional
    render.py    the report (Rich tables)
    plot.py      --plot
    mistakes.py  --list-examples and the common-mistake examples
    post_training.py  the log-probs, policy-loss and distillation examples (steps from the reference, checked against
                 torch and xentlib's fused functions)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xentlib.cli import CLIError
from xentlib.cli._examples import Mistake, PostTraining
from xentlib.cli._shared import add_command_parser, check_plot_directory, make_console, require_packages
from xentlib.cli.explain.mistakes import explain_mistake, print_example_list
from xentlib.cli.explain.plot import index_name, plot_index, write_plot
from xentlib.cli.explain.post_training import explain_post_training
from xentlib.cli.explain.problem import OPS, REDUCTIONS, build_problem, find_example
from xentlib.cli.explain.render import render
from xentlib.cli.explain.steps import explain

EPILOG = """examples:
  xentlib explain --example textbook
  xentlib explain --logits '[[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]]' --target '[0, 2]'
  xentlib explain --logits '[[2, 0.5, -1]]' --target '[[0.8, 0.2, 0]]'          (probability target)
  xentlib explain --example textbook --label-smoothing 0.1 --weight '[1, 2, 3]' --plot ce.png
  xentlib explain --op linear --input '[[0.5, -1]]' --linear-weight '[[0.3, -0.2], [-0.6, 0.1]]' \\
                  --target '[1]'
  xentlib explain --example mistake-btc          (common mistakes: see --list-examples)
  xentlib explain --example log-probs            (per-token log p(target) and entropy, for RL)
  xentlib explain --example policy-loss          (PPO/GRPO's clipped surrogate on those)
  xentlib explain --example distillation         (GKD's divergence of a student from a teacher)"""


# argparse declarations, one per option (the common part is add_command_parser): alike in shape to train's.
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command_parser(
        subparsers,
        "explain",
        help="show a loss computed step by step and checked against torch",
        description="Show cross_entropy (or nll_loss, bce, bce_with_logits, linear_cross_entropy) computed\n"
        "step by step for small inputs, then the same number from torch and xentlib.",
        epilog=EPILOG,
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
    require_packages("rich", *(["matplotlib"] if args.plot is not None else []), install="'xentlib[demo]'")
    console = make_console()
    if args.list_examples:
        print_example_list(console)
        return 0
    example = find_example(args.example)
    if isinstance(example, Mistake | PostTraining):
        if args.logits is not None or args.file is not None or args.target is not None or args.plot is not None:
            raise CLIError(f"--example {example.name} has fixed inputs; it takes no --logits/--file/--target/--plot")
        if isinstance(example, Mistake):
            explain_mistake(console, example)
        else:
            explain_post_training(console, example, args.decimals)
        return 0
    problem = build_problem(args, example)
    explanation = explain(problem)
    if args.plot is not None:  # check the plot's arguments before printing anything
        index = plot_index(problem, explanation, args.plot_at)
        check_plot_directory(args.plot)
    render(console, problem, explanation, args.decimals)
    if args.plot is not None:
        write_plot(problem, index, args.plot)
        console.print(f"\nwrote {args.plot}: the loss and its gradient as {index_name(problem, index)} varies")
    return 0
