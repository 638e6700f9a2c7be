"""Plumbing shared by the `xentlib` subcommands: optional-package checks, the Rich console, whole tables,
one-line error text."""

from __future__ import annotations

from xentlib.cli import CLIError

PIP_NAMES = {"sklearn": "scikit-learn"}  # import name -> distribution name, where they differ


def require_packages(*names: str, install: str | None = None) -> None:
    """Raise a CLIError naming the modules that are not importable and what to pip install (`install`, or
    their distributions)."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        wanted = install or " ".join(PIP_NAMES.get(name, name) for name in missing)
        raise CLIError(f"this needs {', '.join(missing)}: pip install {wanted}")


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


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
