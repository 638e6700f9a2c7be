"""torch's own module/criterion test entries (`torch.testing._internal.common_nn`) for the family, run on xentlib.

Every entry of `criterion_tests` and `get_new_module_tests()` whose name belongs to the family (BCELoss,
BCEWithLogitsLoss, NLLLoss, NLLLoss2d, NLLLossNd, softmax, log_softmax; CrossEntropyLoss has no entry left there,
its samples live in the ModuleInfo database, see test_torch_module_info.py) is checked two ways:

* `test_torch_machinery`: torch's own `CriterionTest` / `NewModuleTest` runs the entry (reference_fn, gradcheck,
  gradgradcheck, non-contiguous inputs, float/double casts), once with torch and once with
  `torch.nn.functional` / `torch.nn` swapped for xentlib's;
* `test_same_as_torch`: the entry's module is built twice from the same random state, once with torch's
  family and once with xentlib's, and forward and input gradients are compared in float64, float32 and the half
  types (SEMANTICS.md: in half precision xentlib may be closer to the float64 truth than torch, never further).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from _torch_patch import calls, swapped
from conftest import check_against_torch

try:
    import torch.testing._internal.common_nn as common_nn
    from torch.testing._internal.common_utils import freeze_rng_state, set_default_dtype
except Exception as error:  # noqa: BLE001 - any import problem means: not available here
    pytest.skip(f"torch.testing._internal is not usable: {error}", allow_module_level=True)

IN_SCOPE = re.compile(r"^(BCELoss|BCEWithLogitsLoss|NLLLoss|NLLLoss2d|NLLLossNd|softmax|log_softmax)_")
SEED = 1234


def _entries() -> dict[str, tuple[type, dict]]:
    """fullname -> (test class, entry) for the family; built afresh so that constructors bind the current
    torch.nn.functional (some entries capture `F.softmax` when they are made)."""
    found = {}
    for entry in common_nn.criterion_tests:
        if IN_SCOPE.match(entry["fullname"]):
            found[entry["fullname"]] = (common_nn.CriterionTest, dict(entry))
    for entry in common_nn.get_new_module_tests():
        name = entry.get("fullname") or ""
        if IN_SCOPE.match(name):
            found[name] = (common_nn.NewModuleTest, dict(entry))
    return found


NAMES = sorted(_entries())


def _build(name: str):
    """The entry's test object, from a fixed random state (its closures hold random targets and weights)."""
    with freeze_rng_state():
        torch.manual_seed(SEED)
        cls, entry = _entries()[name]
        entry.pop("decorator", None)
        return cls(**entry)


class _Case(common_nn.NNTestCase):
    """The hooks torch's module/criterion machinery expects from its test case."""

    _do_cuda_memory_leak_check = False

    def runTest(self):  # noqa: N802 - unittest's name
        pass

    def _forward(self, module, input):
        with freeze_rng_state():
            return module(*input) if isinstance(input, tuple) else module(input)

    def _backward(self, module, input, output, grad_output, create_graph=False):
        output.backward(grad_output, retain_graph=True, create_graph=create_graph)
        grads = tuple(
            None if i.grad is None else i.grad.data for i in (input if isinstance(input, tuple) else (input,))
        )
        return grads if isinstance(input, tuple) else grads[0]

    def _forward_criterion(self, criterion, input, target, extra_args=None):
        inputs = input if isinstance(input, tuple) else (input,)
        return criterion(*inputs, target, *(extra_args or ()))

    def _backward_criterion(self, criterion, input, output, target, gradOutput=None, extra_args=None):  # noqa: N803
        inputs = input if isinstance(input, tuple) else (input,)
        for i in inputs:
            if i.grad is not None:
                i.grad.data.zero_()
        grad = torch.ones(()) if gradOutput is None else gradOutput
        criterion(*inputs, target, *(extra_args or ())).backward(grad.to(output))
        grads = tuple(i.grad.data for i in inputs)
        return grads if isinstance(input, tuple) else grads[0]

    def _zero_grad_parameters(self, module):
        for p in module.parameters():
            if p.grad is not None:
                p.grad = None

    def _get_parameters(self, module):
        params = list(module.parameters())
        return params, [p.grad for p in params]


def _maybe_swapped(implementation: str):
    return swapped() if implementation == "xentlib" else contextlib.nullcontext()


def test_every_family_entry_is_found():
    """Guard against an empty run if torch renames or moves the entries."""
    families = {IN_SCOPE.match(n).group(1) for n in NAMES}
    assert families == {"BCELoss", "BCEWithLogitsLoss", "NLLLoss", "NLLLoss2d", "NLLLossNd", "softmax", "log_softmax"}
    assert len(NAMES) >= 30


@pytest.mark.parametrize("implementation", ["torch", "xentlib"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_machinery(name, implementation):
    """torch's own check of the entry (what test_nn.py's generated test_<name> runs on CPU)."""
    before = sum(calls.values())
    with _maybe_swapped(implementation):
        test = _build(name)
        test(_Case("runTest"))
    if implementation == "xentlib":
        assert sum(calls.values()) > before, "xentlib was never called"


def _dtypes(test) -> list[torch.dtype]:
    """The dtypes the entry is meant to run in: its default dtype and float32 (torch casts modules to both),
    plus the half types its CUDA variants enable (half unless check_half=False / skip_half; bfloat16 only
    with check_bfloat16)."""
    dtypes = [torch.float64, torch.float32]
    if getattr(test, "check_half", True) and not getattr(test, "skip_half", False):
        dtypes.append(torch.float16)
    if getattr(test, "check_bfloat16", isinstance(test, common_nn.NewModuleTest)):
        dtypes.append(torch.bfloat16)
    return dtypes


def _instance(name: str, implementation: str, dtype: torch.dtype):
    """(call, args): the entry's module built under `implementation`, called with it, on `dtype` copies."""
    with _maybe_swapped(implementation):
        test = _build(name)
        with set_default_dtype(test.default_dtype):
            module = test.constructor(*test.constructor_args)
            input = test._get_input()
            target = test._get_target() if isinstance(test, common_nn.CriterionTest) else None
    module = module.to(dtype)
    inputs = input if isinstance(input, tuple) else (input,)
    args = [_as(i, dtype, requires_grad=True) for i in inputs]
    if target is not None:
        args.append(_as(target, dtype, requires_grad=False))

    def call(*tensors):
        with _maybe_swapped(implementation):
            return module(*tensors)

    return call, args


def _as(tensor, dtype, requires_grad):
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return tensor
    return tensor.detach().to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_same_as_torch(name):
    """xentlib's module/functional against torch's on the same entry, in each dtype the entry runs in."""
    for dtype in _dtypes(_build(name)):
        theirs, args = _instance(name, "torch", dtype)
        ours, _ = _instance(name, "xentlib", dtype)
        before = sum(calls.values())
        try:
            check_against_torch(ours, theirs, *args)
        except AssertionError as error:
            raise AssertionError(f"{dtype}: {error}") from error
        assert sum(calls.values()) > before, "xentlib was never called"
