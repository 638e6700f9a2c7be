"""torch's own test samples: every OpInfo / ModuleInfo sample of the family, run through torch and xentlib.

`torch.testing._internal` is internal: if its layout changes (or `expecttest` is missing) this module skips
instead of failing. Each test loops over the samples of one (op, dtype) and reports every failing sample.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_against_torch

import xentlib.functional as X
import xentlib.nn as XN

try:
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
except Exception as error:  # noqa: BLE001 - any import problem means: not available here
    pytest.skip(f"torch.testing._internal is not usable: {error}", allow_module_level=True)

OPS = {
    "nn.functional.cross_entropy": X.cross_entropy,
    "nn.functional.nll_loss": X.nll_loss,
    "log_softmax": X.log_softmax,
    "softmax": X.softmax,
    "nn.functional.binary_cross_entropy": X.binary_cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": X.binary_cross_entropy_with_logits,
}
MODULES = ("CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "LogSoftmax", "Softmax")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

OP_INFOS = {f"{op.name}.{op.variant_test_name}".rstrip("."): op for op in op_db if op.name in OPS}
MODULE_INFOS = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in MODULES}


def describe(sample) -> str:
    def show(value):
        return f"tensor{tuple(value.shape)}:{value.dtype}" if isinstance(value, torch.Tensor) else repr(value)

    args = ", ".join(show(a) for a in (sample.input, *sample.args))
    kwargs = ", ".join(f"{k}={show(v)}" for k, v in sample.kwargs.items())
    return f"({args}{', ' if kwargs else ''}{kwargs})"


def run_all(cases) -> None:
    """cases: (description, thunk); every thunk runs, then all failures are reported together."""
    failures, count = [], 0
    for description, thunk in cases:
        count += 1
        try:
            thunk()
        except AssertionError as error:
            failures.append(f"{description}: {str(error).splitlines()[0]}")
    assert count > 0, "no samples"
    assert not failures, f"{len(failures)} of {count} samples differ:\n" + "\n".join(failures[:20])


def test_every_op_is_found():
    """Guard against a silent empty run if torch renames the entries."""
    assert {op.name for op in OP_INFOS.values()} == set(OPS)
    assert set(MODULE_INFOS) == set(MODULES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(OP_INFOS))
def test_op_samples(name, dtype):
    op = OP_INFOS[name]
    if dtype not in op.supported_dtypes("cpu"):
        pytest.skip(f"{name} does not list {dtype} on CPU")
    ours = OPS[op.name]
    samples = op.sample_inputs("cpu", dtype, requires_grad=True)
    run_all((describe(s), lambda s=s: check_against_torch(ours, op.op, s.input, *s.args, **s.kwargs)) for s in samples)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", MODULES)
def test_module_samples(name, dtype):
    info = MODULE_INFOS[name]
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)

    def run(module_input):
        c, f = module_input.constructor_input, module_input.forward_input
        ours, theirs = getattr(XN, name)(*c.args, **c.kwargs), getattr(torch.nn, name)(*c.args, **c.kwargs)
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        assert repr(ours) == repr(theirs)
        check_against_torch(ours, theirs, *f.args, **f.kwargs)

    run_all((f"{i.desc or 'default'} {i.constructor_input.kwargs}", lambda i=i: run(i)) for i in inputs)
