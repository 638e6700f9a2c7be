"""torch's ModuleInfo samples (`torch.testing._internal.common_modules.module_db`) for the family's modules.

For every sample of CrossEntropyLoss, NLLLoss, BCELoss, BCEWithLogitsLoss, LogSoftmax and Softmax, in every
dtype the ModuleInfo lists for CPU: xentlib.nn's module is built with the sample's constructor arguments next to
torch's, their state_dicts must load into each other (strict) and agree, forward and input gradients must match
torch's, and the sample's reference_fn (evaluated with torch's module) must be met at least as closely as
torch meets it. tests/test_opinfo.py runs the same samples for forward/backward in float64/float32 only; this
adds the state_dict interchange, the reference functions and float16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import check_against_torch, fresh_copy, tolerance

import xentlib.nn as XN

try:
    from torch.testing._internal.common_modules import module_db
except Exception as error:  # noqa: BLE001 - any import problem means: not available here
    pytest.skip(f"torch.testing._internal is not usable: {error}", allow_module_level=True)

MODULES = ("CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "LogSoftmax", "Softmax")
INFOS = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in MODULES}
CASES = [(name, dtype) for name in MODULES for dtype in sorted(INFOS[name].dtypes, key=str)]


def test_every_module_is_found():
    assert set(INFOS) == set(MODULES)


def _pair(sample, name, dtype):
    c = sample.constructor_input
    ours, theirs = getattr(XN, name)(*c.args, **c.kwargs), getattr(torch.nn, name)(*c.args, **c.kwargs)
    return ours.to(dtype), theirs.to(dtype)


def _check_state_dicts(ours, theirs):
    """Same keys and values; each loads into the other strictly (weight / pos_weight buffers)."""
    # copies: the buffers may be the very tensors the sample passed to both constructors
    mine = {k: v.clone() for k, v in ours.state_dict().items()}
    torchs = {k: v.clone() for k, v in theirs.state_dict().items()}
    assert list(mine) == list(torchs)
    for key in torchs:
        torch.testing.assert_close(mine[key], torchs[key], rtol=0, atol=0)
    perturbed = {k: v + 1 for k, v in torchs.items()}
    ours.load_state_dict(perturbed, strict=True)
    theirs.load_state_dict({k: v + 1 for k, v in mine.items()}, strict=True)
    for key in torchs:
        torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], rtol=0, atol=0)
    ours.load_state_dict(torchs, strict=True)
    theirs.load_state_dict(torchs, strict=True)


def _with_float64_twin(module, dtype):
    """torch's module, which check_against_torch may also call with float64 inputs (its half-precision truth):
    then a float64 copy of it runs, so that the class-weight buffer matches the input dtype."""
    twin = copy.deepcopy(module).double()

    def call(input, *args, **kwargs):
        return (twin if input.dtype == torch.float64 and dtype != torch.float64 else module)(input, *args, **kwargs)

    return call


def _check_reference(sample, ours, theirs, args, kwargs):
    """Our output meets the sample's reference (computed with torch's module) at least as closely as torch's."""
    if sample.reference_fn is None:
        return
    expected = sample.reference_fn(theirs, *[fresh_copy(a) for a in args], **kwargs)
    with torch.no_grad():
        actual, torch_output = ours(*args, **kwargs), theirs(*args, **kwargs)
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected)
    rtol, atol = tolerance(torch_output.dtype)
    ours_err = (actual.double() - expected.double()).abs()
    torch_err = (torch_output.double() - expected.double()).abs()
    allowed = torch_err.nan_to_num(0.0) + atol + rtol * expected.double().abs()
    same_nans = torch.equal(actual.isnan(), expected.isnan()) or torch.equal(actual.isnan(), torch_output.isnan())
    assert same_nans, "NaN positions differ from the reference"
    bad = (ours_err > allowed) & ~actual.isnan()
    assert not bool(bad.any()), f"further from the reference than torch: {ours_err[bad][:4].tolist()}"


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_module_samples(name, dtype):
    info = INFOS[name]
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
    failures = []
    for sample in samples:
        ours, theirs = _pair(sample, name, dtype)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        try:
            assert repr(ours) == repr(theirs)
            _check_state_dicts(ours, theirs)
            check_against_torch(ours, _with_float64_twin(theirs, dtype), *args, **kwargs)
            _check_reference(sample, ours, theirs, args, kwargs)
        except AssertionError as error:
            failures.append(f"{sample.desc or 'default'} {sample.constructor_input.kwargs}: {str(error)[:300]}")
    assert samples, "no samples"
    assert not failures, f"{len(failures)} of {len(samples)} samples differ:\n" + "\n".join(failures[:15])
