"""Plumbing shared by the `xentlib` subcommands: their parsers, optional-package checks, the Rich console, whole
tables, one-line error text, --plot files."""

from __future__ import annotations

import argparse
from pathlib import Path

from xentlib.cli import CLIError

PIP_NAMES = {"sklearn": "scikit-learn"}  # import name -> distribution name, where they differ


def add_command_parser(subparsers, name: str, *, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of one subcommand; `--help` prints its description and epilog (the examples) as written."""
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


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


def check_plot_directory(path: Path) -> None:
    """Refuse a --plot path whose directory does not exist, before any work is done."""
    if not path.parent.is_dir():
        raise CLIError(f"cannot write {path}: no directory {path.parent}")


def save_figure(figure, path: Path) -> None:
    """Lay out a matplotlib figure, write it as a PNG and close it; a CLIError when the file cannot be written."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {one_line(error)}") from None
    finally:
        plt.close(figure)
