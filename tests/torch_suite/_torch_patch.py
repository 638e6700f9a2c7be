"""Swap torch's cross-entropy family for xentlib's, the way a user would: by assignment on `torch.nn.functional`
and `torch.nn`, so code that looks the names up at call time (torch's own test helpers included) runs xentlib.

`swapped()` is a context manager; `calls` counts how often each xentlib entry point ran while swapped in, so a
test can prove that xentlib, not torch, produced its result. `IMPLEMENTATIONS` / `implementation` give a pytest
parameter that runs a test once with torch and once with xentlib swapped in.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter

import pytest
import torch

import xentlib.functional as XF
import xentlib.nn as XN

FUNCTIONS = ("cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "log_softmax",
             "softmax")  # fmt: skip
MODULES = ("CrossEntropyLoss", "NLLLoss", "NLLLoss2d", "BCELoss", "BCEWithLogitsLoss", "LogSoftmax", "Softmax")

calls: Counter = Counter()


def _counted(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _counted_module(cls):
    """A subclass of xentlib's module whose forward is counted (same constructor, buffers, repr and bases)."""

    def forward(self, *args, **kwargs):
        calls[cls.__name__] += 1
        return cls.forward(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


SWAPS = [(torch.nn.functional, name, _counted(name, getattr(XF, name))) for name in FUNCTIONS] + [
    (torch.nn, name, _counted_module(getattr(XN, name))) for name in MODULES
]


@contextlib.contextmanager
def swapped():
    """torch.nn.functional.<fn> and torch.nn.<Module> of the family are xentlib's inside the block."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in SWAPS]
    try:
        for owner, name, replacement in SWAPS:
            setattr(owner, name, replacement)
        yield calls
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


IMPLEMENTATIONS = ("torch", "xentlib")


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    """Runs the test body with torch's family, then again with xentlib's swapped in; for xentlib, the test must
    have called into xentlib at least once."""
    if request.param == "torch":
        yield request.param
        return
    before = sum(calls.values())
    with swapped():
        yield request.param
    assert sum(calls.values()) > before, "the test never reached xentlib: the swap did not take effect"
