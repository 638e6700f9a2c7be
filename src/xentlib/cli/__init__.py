"""`xentlib` console script: `xentlib explain | train | bench`.

Each subcommand lives in `xentlib/cli/<name>.py` and defines `register(subparsers)`, which adds its parser and sets
`func=run`. Subcommand modules import torch, rich and matplotlib inside `run`, so `xentlib --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("explain", "train", "bench")


class CLIError(Exception):
    """Bad user input: printed as one line `xentlib <command>: error: <message>`, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xentlib", description="Cross-entropy done right for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    subparsers.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"xentlib.cli.{name}")
        except ModuleNotFoundError as error:  # a subcommand whose module is not written yet
            if error.name != f"xentlib.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


RUNTIME_BENCHES = ("overhead", "step")  # `xentlib bench overhead|step ...`: xentlib.bench.runtime
HF_MEMORY_BENCH = "hf-memory"  # `xentlib bench hf-memory ...`: xentlib.bench.hf_memory


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in RUNTIME_BENCHES:
        from xentlib.bench import runtime

        return runtime.main(argv[1:])
    if argv[:2] == ["bench", HF_MEMORY_BENCH]:
        from xentlib.bench import hf_memory

        return hf_memory.main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as error:
        print(f"xentlib {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xentlib {args.command}: interrupted", file=sys.stderr)
        return 130
