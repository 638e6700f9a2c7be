"""Named-mutation runner: does the test suite catch the bugs it claims to catch?

Each mutant is one exact text replacement in a file under src/xentlib/, applied to a temporary copy of src/
(the working tree is never touched), with the tests that should catch it. The tests run from this checkout's
tests/ with PYTHONPATH pointing at the mutated copy, and XENTLIB_CACHE_DIR at a cache private to this run (the
C kernel's cache name is a hash of its source, so a mutated cpu_rows.c is rebuilt and an unmutated one is built
once and shared by every mutant). A mutant is killed when at least one selected test fails (or errors) on it
that passes on an unmutated copy (each selection is run once unmutated; --no-baseline skips that).

    python tools/mutation/run.py                    # every mutant, then a Markdown table
    python tools/mutation/run.py --list             # names and tests
    python tools/mutation/run.py --check            # every mutant's text is found (after the code moved)
    python tools/mutation/run.py NAME [NAME ...]    # a few mutants
    python tools/mutation/run.py --baseline NAME    # the same tests on the unmutated copy (must all pass)
    python tools/mutation/run.py --json out.json    # also write the results

See tools/mutation/README.md for the method and the latest table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "xentlib"


@dataclass
class Outcome:
    name: str
    tests: int  # tests run (not skipped)
    failed: int  # tests that fail on the mutant and pass on the unmutated copy
    seconds: float
    note: str = ""

    @property
    def killed(self) -> bool:
        return self.failed > 0


@dataclass
class TestRun:
    ran: int
    failing: set[str]  # node ids of the failed or errored tests
    note: str = ""


def locate(mutant: Mutant, package: Path) -> Path:
    """The file holding the mutant's text: `mutant.file`, or, when the code has moved, the one other file of the
    package (the reference oracle excluded: it is what the tests compare against) that holds it as often."""
    expected = mutant.count
    first = package / mutant.file
    if first.exists() and _occurs(first.read_text(), mutant.old, expected):
        return first
    moved = [
        path
        for path in sorted(package.rglob("*"))
        if path.suffix in (".py", ".c") and "reference" not in path.relative_to(package).parts
        and _occurs(path.read_text(), mutant.old, expected)
    ]  # fmt: skip
    if len(moved) != 1:
        where = ", ".join(str(p.relative_to(package)) for p in moved) or "no file"
        raise SystemExit(
            f"{mutant.name}: the old text is not in {mutant.file} ({expected or 'one or more'} time(s)) and is in "
            f"{where}: the source moved, update tools/mutation/mutants.py"
        )
    print(f"{mutant.name}: {mutant.file} moved to {moved[0].relative_to(package)}", file=sys.stderr)
    return moved[0]


def _occurs(text: str, old: str, expected: int | None) -> bool:
    found = text.count(old)
    return found > 0 and (expected is None or found == expected)


def mutated_copy(mutant: Mutant | None, into: Path) -> Path:
    """Copy src/ into `into` and apply the mutant's replacement there; returns the copy's src directory."""
    src = into / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if mutant is None:
        return src
    path = locate(mutant, src / "xentlib")
    mutated = path.read_text().replace(mutant.old, mutant.new)
    if path.suffix == ".py":  # a mutant that does not compile would be "killed" by any test: refuse it
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError as error:
            raise SystemExit(f"{mutant.name}: the mutated {mutant.file} does not compile: {error}") from None
    path.write_text(mutated)
    return src


def run_tests(src: Path, tests: list[str], cache: Path, report: Path, timeout: float) -> TestRun:
    """pytest on `tests` with `src` first on the path: how many ran and which failed (or errored)."""
    env = dict(os.environ, PYTHONPATH=str(src), XENTLIB_CACHE_DIR=str(cache), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               f"--junitxml={report}", *tests]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return TestRun(0, {"<timeout>"}, f"timed out after {timeout:.0f} s (counted as killed)")
    if not report.exists():
        tail = (done.stdout + done.stderr)[-400:]
        return TestRun(0, {"<no report>"}, f"pytest exit {done.returncode} without a report: {tail}")
    ran, failing, skipped = 0, set(), 0
    for case in ET.parse(report).getroot().iter("testcase"):
        node = f"{case.get('classname')}::{case.get('name')}"
        if case.find("skipped") is not None:
            skipped += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            failing.add(node)
            ran += 1
        else:
            ran += 1
    if ran == 0:
        return TestRun(0, {"<nothing collected>"}, f"no test collected (pytest exit {done.returncode})")
    return TestRun(ran, failing, f"{skipped} skipped" if skipped else "")


def check_imports_the_copy(src: Path, cache: Path, needs_kernel: bool) -> None:
    """The tests must import the copy; a mutated C kernel must build (else the PyTorch ops would run instead and
    the mutant would be neither killed nor survived, only skipped)."""
    env = dict(os.environ, PYTHONPATH=str(src), XENTLIB_CACHE_DIR=str(cache))
    probe = (
        "import xentlib; from xentlib.backends import cpu_kernel; print(xentlib.__file__); print(cpu_kernel.status())"
    )
    lines = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    where, kernel = lines.stdout.strip().splitlines()[:2]
    if not where.startswith(str(src)):
        raise SystemExit(f"the mutated copy is not imported: xentlib comes from {where}")
    if needs_kernel and not kernel.startswith("(True"):
        raise SystemExit(f"the mutated C kernel does not build: {kernel}")


def run_mutant(mutant: Mutant | None, tests: list[str], cache: Path, timeout: float) -> TestRun:
    with tempfile.TemporaryDirectory(prefix="xentlib-mutant-") as tmp:
        src = mutated_copy(mutant, Path(tmp))
        check_imports_the_copy(src, cache, needs_kernel=mutant is not None and mutant.file.endswith(".c"))
        return run_tests(src, tests, cache, Path(tmp) / "report.xml", timeout)


def outcome(mutant: Mutant, cache: Path, timeout: float, baselines: dict | None) -> Outcome:
    """The mutant's run; with `baselines` (a cache per selection), tests that fail unmutated do not count."""
    start = time.perf_counter()
    run = run_mutant(mutant, mutant.tests, cache, timeout)
    seconds = time.perf_counter() - start
    note = [run.note] if run.note else []
    failing = run.failing
    if baselines is not None:
        key = tuple(mutant.tests)
        if key not in baselines:
            baselines[key] = run_mutant(None, mutant.tests, cache, timeout)
        broken = baselines[key].failing
        if broken:
            note.append(f"{len(broken)} failing unmutated, not counted")
            failing = failing - broken
    return Outcome(mutant.name, run.ran, len(failing), seconds, "; ".join(note))


def table(outcomes: list[Outcome]) -> str:
    lines = ["| mutant | tests failing / run | verdict | s |", "|---|---|---|---|"]
    for o in outcomes:
        verdict = "killed" if o.killed else "**survived**"
        note = f" ({o.note})" if o.note else ""
        lines.append(f"| {o.name} | {o.failed} / {o.tests}{note} | {verdict} | {o.seconds:.0f} |")
    killed = sum(o.killed for o in outcomes)
    lines.append(f"\nscore: {killed} / {len(outcomes)} killed")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies and compiles")
    parser.add_argument("--baseline", action="store_true", help="run the selected tests on the unmutated copy")
    parser.add_argument(
        "--no-baseline", action="store_true", help="count every failing test, also those failing unmutated"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; --list shows them")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    if args.check:
        for m in chosen:
            with tempfile.TemporaryDirectory(prefix="xentlib-mutant-") as tmp:
                mutated_copy(m, Path(tmp))
        print(f"{len(chosen)} mutants apply to {PACKAGE}")
        return 0
    outcomes = []
    baselines = None if args.no_baseline else {}
    with tempfile.TemporaryDirectory(prefix="xentlib-mutation-cache-") as cache:
        for m in chosen:
            if args.baseline:
                run = run_mutant(None, m.tests, Path(cache), args.timeout)
                result = Outcome(m.name, run.ran, len(run.failing), 0.0, run.note)
            else:
                result = outcome(m, Path(cache), args.timeout, baselines)
            outcomes.append(result)
            verdict = (
                ("FAILING UNMUTATED" if result.killed else "passes")
                if args.baseline
                else ("killed" if result.killed else "SURVIVED")
            )
            print(f"{m.name}: {result.failed}/{result.tests} failing, {verdict} ({result.seconds:.0f} s)"
                  f"{' ' + result.note if result.note else ''}", flush=True)  # fmt: skip
    print()
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    if args.baseline:
        return 1 if any(o.killed for o in outcomes) else 0
    return 0 if all(o.killed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
