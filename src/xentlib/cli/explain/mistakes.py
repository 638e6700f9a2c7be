"""The built-in examples list, and the common mistakes: the wrong code and its fix, run for real."""

from __future__ import annotations

from typing import Any

from xentlib.cli._examples import MISTAKES, POST_TRAINING, WORKED, Mistake
from xentlib.cli._shared import one_line, print_table


def print_example_list(console) -> None:
    from rich.table import Table

    table = Table(title="xentlib explain --example NAME", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("op")
    table.add_column("what it shows")
    for example in WORKED:
        table.add_row(example.name, example.op, example.summary)
    for example in POST_TRAINING:
        table.add_row(example.name, example.op, example.summary)
    for mistake in MISTAKES:
        table.add_row(mistake.name, "mistake", mistake.summary)
    print_table(console, table)


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
