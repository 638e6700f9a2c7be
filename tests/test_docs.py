"""Every code example in the documentation runs, and prints what the text says.

* Docstrings: the `>>>` examples of the public modules run under doctest (NORMALIZE_WHITESPACE | ELLIPSIS), with
  `torch.manual_seed(0)` before each docstring. The distributed examples run in a process group of one rank; the
  transformers examples get a tiny random Llama as `model` and a batch of token ids as `input_ids`.
* Markdown (README.md, docs/*.md): the ```python blocks of a file run in order in one namespace, as a reader
  would paste them; a block of `>>>` lines is checked with doctest. A block that cannot run here (it needs a GPU,
  several processes, a dataset or minutes) is preceded by `<!-- not-run: the reason -->`, and the test requires
  that reason for every block it does not run.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

DOCSTRING_MODULES = [
    "xentlib.functional",
    "xentlib.nn",
    "xentlib.linear",
    "xentlib.reference",
    "xentlib.distributed.vocab_parallel",
    "xentlib.distributed.linear",
    "xentlib.distributed.tokens",
    "xentlib.integrations.transformers",
]
# modules whose docstrings must hold at least one example (the others are checked when they have some)
MODULES_WITH_EXAMPLES = {
    "xentlib.functional",
    "xentlib.linear",
    "xentlib.reference",
    "xentlib.distributed.vocab_parallel",
    "xentlib.distributed.tokens",
    "xentlib.integrations.transformers",
}
MARKDOWN_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
NEEDS_TRANSFORMERS = {"xentlib.integrations.transformers", "docs/transformers.md"}


def with_marks(names: list[str]) -> list:
    """The parameters, those that need transformers marked `hf` (and skipped without it)."""
    return [pytest.param(name, marks=pytest.mark.hf) if name in NEEDS_TRANSFORMERS else name for name in names]


# ------------------------------------------------------------------------------------------------------------
# docstrings
# ------------------------------------------------------------------------------------------------------------
def tiny_causal_lm():
    """A random one-layer Llama with a 128-token vocabulary (no download)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def extra_globals(module_name: str) -> dict:
    """Names a docstring may use without defining: what the reader already holds (their model and batch)."""
    if module_name == "xentlib.integrations.transformers":
        torch.manual_seed(0)
        return {"model": tiny_causal_lm(), "input_ids": torch.randint(0, 128, (2, 8))}
    return {}


@pytest.fixture
def one_rank_group(request):
    """A gloo process group of one rank (in memory, no network), for the distributed docstrings."""
    import torch.distributed as dist

    if not request.node.callspec.params["module_name"].startswith("xentlib.distributed"):
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("module_name", with_marks(DOCSTRING_MODULES))
def test_docstring_examples(module_name, one_rank_group):
    if module_name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    attempted = 0
    for test in doctest.DocTestFinder().find(module, module_name):
        if not test.examples:
            continue
        torch.manual_seed(0)
        test.globs.update(extra_globals(module_name))
        failures: list[str] = []
        result = runner.run(test, out=failures.append)
        attempted += result.attempted
        assert result.failed == 0, f"{test.name}:\n" + "".join(failures)
    if module_name in MODULES_WITH_EXAMPLES:
        assert attempted > 0, f"{module_name} has no docstring examples"


# ------------------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")


def markdown_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, not-run reason or None) of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, language = i, opening.group(1)
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        blocks.append((start + 1, language, "\n".join(body) + "\n", _reason_before(lines, start)))
    return blocks


def _reason_before(lines: list[str], start: int) -> str | None:
    """The not-run reason in the nearest non-blank line above a block, if that line is such a comment."""
    above = start - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    found = NOT_RUN.match(lines[above]) if above >= 0 else None
    return found.group(1) if found else None


def run_block(code: str, namespace: dict, name: str) -> None:
    if code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(code, namespace, name, name, 0)
        failures: list[str] = []
        result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=failures.append, clear_globs=False)
        assert result.failed == 0, "".join(failures)
        namespace.update(test.globs)  # a DocTest runs in a copy: later blocks see what this one defined
    else:
        exec(compile(code, name, "exec"), namespace)


@pytest.mark.parametrize("path", with_marks(MARKDOWN_FILES))
def test_markdown_examples(path):
    if path in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    text = (ROOT / path).read_text()
    namespace: dict = {"__name__": "__docs__"}
    torch.manual_seed(0)
    for line, language, code, reason in markdown_blocks(text):
        if reason is not None:
            assert reason, f"{path}:{line}: a not-run block needs a reason"
            continue
        if language == "python":
            run_block(code, namespace, f"{path}:{line}")


def test_every_not_run_comment_has_a_reason_and_a_python_block():
    """A `not-run` comment sits right above the python block it skips and says why."""
    for path in MARKDOWN_FILES:
        text = (ROOT / path).read_text()
        skipped = [(line, reason) for line, language, _, reason in markdown_blocks(text) if reason is not None]
        for line, reason in skipped:
            assert reason.strip(), f"{path}:{line}: empty not-run reason"
        comments = [m for m in text.splitlines() if "not-run" in m]
        assert len(comments) == len(skipped), f"{path}: a not-run comment is not right above a code block"
        for line, language, _, reason in markdown_blocks(text):
            if reason is not None:
                assert language == "python", f"{path}:{line}: not-run marks a {language or 'plain'} block"


def test_markdown_runner_reads_blocks_and_reasons():
    """The runner itself: languages, order, and the reason of a skipped block."""
    text = "a\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU -->\n```python\ny = 2\n```\n```bash\nls\n```\n"
    blocks = markdown_blocks(text)
    assert [(b[1], b[2], b[3]) for b in blocks] == [
        ("python", "x = 1\n", None),
        ("python", "y = 2\n", "needs a GPU"),
        ("bash", "ls\n", None),
    ]


# ------------------------------------------------------------------------------------------------------------
# the tests the documentation names
# ------------------------------------------------------------------------------------------------------------
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def test_every_named_test_exists():
    """`(test: tests/x.py::test_name)` in the docs names a test function that exists (or a test file)."""
    for path in MARKDOWN_FILES:
        for file, name in TEST_REFERENCE.findall((ROOT / path).read_text()):
            assert (ROOT / file).is_file(), f"{path}: {file} does not exist"
            if name:
                source = (ROOT / file).read_text()
                assert re.search(rf"^\s*def {name}\(", source, re.M), f"{path}: {file}::{name} does not exist"
