"""Bad input: xentlib raises what torch 2.13 raises (same exception type), in the same order of checks.

Where SEMANTICS.md quotes torch's message, our message must contain the same leading words. Each case is
(function name, args, kwargs, words); `check_against_torch` runs it through both libraries.
"""

# ruff: noqa: E501 - the tables below keep one case per line, with torch's message words in full

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_error, check_against_torch

import xentlib.functional as X

f32, f64 = torch.float32, torch.float64


def x(*shape, dtype=f32, requires_grad=False):
    g = torch.Generator().manual_seed(len(shape))
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def p(*shape, dtype=f32):
    """Probabilities in (0, 1)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(7), dtype=dtype) * 0.98 + 0.01


def t(*values):
    return torch.tensor(values)


CE, NLL = "cross_entropy", "nll_loss"
BCE, BCEL = "binary_cross_entropy", "binary_cross_entropy_with_logits"
LSM, SM = "log_softmax", "softmax"

CASES = {
    # reduction: validated before any shape check
    "reduction_bogus": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(reduction="bogus"), "is not a valid value for reduction"),
    "reduction_upper": (NLL, (x(4, 3), t(0, 1, 2, 0)), dict(reduction="MEAN"), "is not a valid value for reduction"),
    "reduction_none_obj": (BCE, (p(4), p(4)), dict(reduction=None), "is not a valid value for reduction"),
    "reduction_int": (BCEL, (x(4), p(4)), dict(reduction=1), "is not a valid value for reduction"),
    "reduction_before_shape": (CE, (x(4, 3), t(0, 1)), dict(reduction="x"), "is not a valid value for reduction"),
    # python-level argument types
    "ignore_index_float": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(ignore_index=1.0), None),
    "ignore_index_none": (NLL, (x(4, 3), t(0, 1, 2, 0)), dict(ignore_index=None), None),
    "ignore_index_bool": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(ignore_index=True), None),
    "ignore_index_overflow": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(ignore_index=2**64), "Overflow"),
    "label_smoothing_str": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(label_smoothing="0.1"), None),
    "label_smoothing_none": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(label_smoothing=None), None),
    "weight_list": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(weight=[1.0, 2.0, 3.0]), None),
    "target_list": (CE, (x(4, 3), [0, 1, 2, 0]), {}, None),
    "nll_target_list": (NLL, (x(4, 3), [0, 1, 2, 0]), {}, None),
    # batch / shape
    "batch_mismatch": (CE, (x(4, 3), t(0, 1, 2, 0, 1)), {}, "Expected input batch_size (4) to match target batch_size (5)"),
    "batch_mismatch_nll": (NLL, (x(4, 3), t(0, 1)), {}, "Expected input batch_size (4) to match target batch_size (2)"),
    "0d_target_2d_input": (NLL, (x(4, 3), torch.tensor(1)), {}, "Expected input batch_size (4) to match target batch_size (0)"),
    "0d_input_nll": (NLL, (torch.tensor(1.0), torch.tensor(0)), {}, "Expected 1 or more dimensions (got 0)"),
    "0d_input_long_target": (CE, (torch.tensor(1.0), torch.tensor(0)), {}, "Expected floating point type for target"),
    "0d_input_float_target": (CE, (torch.tensor(1.0), torch.tensor(0.0)), {}, "Dimension specified as 1"),
    "1d_target_size": (CE, (x(5), t(1, 2)), {}, "For 1D input, 1D target must have size 1, but got target size: 2"),
    "1d_target_size_nll": (NLL, (x(5), t(1, 2)), {}, "For 1D input, 1D target must have size 1"),
    "multi_target": (CE, (x(4, 3), torch.zeros(4, 2, dtype=torch.long)), {}, "0D or 1D target tensor expected, multi-target not supported"),
    "multi_target_n1": (CE, (x(4, 3), torch.zeros(4, 1, dtype=torch.long)), {}, "0D or 1D target tensor expected"),
    "3d_mismatch": (CE, (x(2, 3, 5), torch.zeros(2, 6, dtype=torch.long)), {}, "Expected target size [2, 5], got [2, 6]"),
    "3d_mismatch_nll": (NLL, (x(2, 3, 5), torch.zeros(2, 6, dtype=torch.long)), {}, "Expected target size [2, 5], got [2, 6]"),
    "4d_target_dim": (CE, (x(2, 3, 4, 5), torch.zeros(2, 4, dtype=torch.long)), {}, "only batches of spatial targets supported (3D tensors) but got targets of dimension: 2"),
    "4d_mismatch": (NLL, (x(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long)), {}, "size mismatch (got input: [2, 3, 4, 5] , target: [2, 4, 6]"),
    "5d_mismatch": (CE, (x(2, 3, 2, 2, 2), torch.zeros(2, 2, 2, 3, dtype=torch.long)), {}, "Expected target size [2, 2, 2, 2], got [2, 2, 2, 3]"),
    # target dtype
    "target_int32": (CE, (x(4, 3), t(0, 1, 2, 0).int()), {}, "expected target dtype to be Long or Byte, but got Int"),
    "target_int16_nll": (NLL, (x(4, 3), t(0, 1, 2, 0).short()), {}, "expected target dtype to be Long or Byte, but got Short"),
    "target_bool": (CE, (x(4, 3), t(0, 1, 1, 0).bool()), {}, "expected target dtype to be Long or Byte, but got Bool"),
    "target_float": (CE, (x(4, 3), t(0.0, 1.0, 2.0, 0.0)), {}, "expected target dtype to be Long or Byte, but got Float"),
    "uint8_3d": (CE, (x(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint8)), {}, "expected scalar type Long but found Byte"),
    "uint8_4d_nll": (NLL, (x(2, 3, 2, 2), torch.zeros(2, 2, 2, dtype=torch.uint8)), {}, "expected scalar type Long but found Byte"),
    "prob_target_long": (CE, (x(4, 3), torch.zeros(4, 3, dtype=torch.long)), {}, "Expected floating point type for target with class probabilities, got Long"),
    "prob_ignore_index": (CE, (x(4, 3), p(4, 3)), dict(ignore_index=0), "ignore_index is not supported for floating point target"),
    # weight
    "weight_size": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(2)), "weight tensor should be defined either for all 3 classes or no classes but got weight tensor of shape: [2]"),
    "weight_2d": (NLL, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(3, 1)), "weight tensor should be defined either for all 3 classes or no classes"),
    "weight_size_3d": (CE, (x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)), dict(weight=torch.ones(2)), "weight tensor should be defined either for all or no classes"),
    "weight_size_prob": (CE, (x(4, 3), p(4, 3)), dict(weight=torch.ones(2)), "cross_entropy: weight tensor should be defined either for all 3 classes or no classes"),
    "weight_dtype": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(3, dtype=f64)), "expected scalar type Float but found Double"),
    "weight_dtype_nll": (NLL, (x(4, 3, dtype=f64), t(0, 1, 2, 0)), dict(weight=torch.ones(3)), "expected scalar type Double but found Float"),
    "weight_requires_grad": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(3, requires_grad=True)), "is not differentiable with respect to argument 'weight'"),
    "weight_requires_grad_nll": (NLL, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(3, requires_grad=True)), "is not differentiable with respect to argument 'weight'"),
    # out-of-range classes (IndexError naming the value)
    "target_out_of_range": (CE, (x(4, 3), t(0, 1, 3, 0)), {}, "Target 3 is out of bounds."),
    "target_out_of_range_none": (NLL, (x(4, 3), t(0, 1, 3, 0)), dict(reduction="none"), "Target 3 is out of bounds."),
    "target_negative": (CE, (x(4, 3), t(0, -1, 2, 0)), {}, "Target -1 is out of bounds."),
    "target_negative_other_ignore": (CE, (x(4, 3), t(0, -2, -1, 0)), dict(ignore_index=-1), "Target -2 is out of bounds."),
    "target_out_of_range_smoothing": (CE, (x(4, 3), t(0, 1, 5, 0)), dict(label_smoothing=0.1), "Target 5 is out of bounds."),
    "target_out_of_range_3d": (CE, (x(2, 3, 2), torch.tensor([[0, 7], [1, 2]])), {}, "Target 7 is out of bounds."),
    "target_out_of_range_1d": (CE, (x(3), torch.tensor(3)), {}, "Target 3 is out of bounds."),
    "uint8_out_of_range": (CE, (x(4, 3), t(0, 1, 200, 0).to(torch.uint8)), {}, None),
    # label smoothing
    "label_smoothing_gt_1": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(label_smoothing=1.5), "label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    "label_smoothing_inf": (CE, (x(4, 3), p(4, 3)), dict(label_smoothing=math.inf), "label_smoothing must be between 0.0 and 1.0"),
    # integer input
    "integer_input_ce": (CE, (torch.zeros(4, 3, dtype=torch.long), t(0, 1, 2, 0)), {}, "not implemented for 'Long'"),
    "integer_input_nll": (NLL, (torch.zeros(4, 3, dtype=torch.long), t(0, 1, 2, 0)), {}, "not implemented for 'Long'"),
    "integer_input_bce": (BCE, (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)), {}, "not implemented for 'Long'"),
    "integer_input_bcel": (BCEL, (torch.zeros(4, dtype=torch.long), p(4)), {}, None),
    # binary_cross_entropy
    "bce_size": (BCE, (p(4, 3), p(4, 1)), {}, "Using a target size (torch.Size([4, 1])) that is different to the input size (torch.Size([4, 3])) is deprecated"),
    "bce_size_n_n1": (BCE, (p(4), p(4, 1)), {}, "that is different to the input size"),
    "bce_input_range": (BCE, (p(4) + 1.0, p(4)), {}, "all elements of input should be between 0 and 1"),
    "bce_input_nan": (BCE, (torch.tensor([0.5, math.nan]), p(2)), {}, "all elements of input should be between 0 and 1"),
    "bce_target_range": (BCE, (p(4), p(4) - 1.0), {}, "all elements of target should be between 0 and 1"),
    "bce_input_before_target": (BCE, (p(4) + 1.0, p(4) - 1.0), {}, "all elements of input should be between 0 and 1"),
    "bce_target_dtype": (BCE, (p(4), p(4, dtype=f64)), {}, "Found dtype Double but expected Float"),
    "bce_target_long": (BCE, (p(4, dtype=f64), torch.zeros(4, dtype=torch.long)), {}, "Found dtype Long but expected Double"),
    "bce_weight_enlarges": (BCE, (p(4, 3), p(4, 3)), dict(weight=torch.ones(2, 4, 3)), "output with shape [4, 3] doesn't match the broadcast shape [2, 4, 3]"),
    "bce_weight_mismatch": (BCE, (p(4, 3), p(4, 3)), dict(weight=torch.ones(4)), None),
    "bce_weight_requires_grad": (BCE, (p(4), p(4)), dict(weight=torch.ones(4, requires_grad=True)), "is not differentiable with respect to argument 'weight'"),
    # binary_cross_entropy_with_logits
    "bcel_size": (BCEL, (x(4, 3), p(4, 1)), {}, "Target size (torch.Size([4, 1])) must be the same as input size (torch.Size([4, 3]))"),
    "bcel_long_target": (BCEL, (x(4, 3), torch.zeros(4, 3, dtype=torch.long)), {}, "result type Float can't be cast to the desired output type Long"),
    "bcel_bool_target": (BCEL, (x(4, 3), torch.zeros(4, 3, dtype=torch.bool)), {}, "Subtraction, the `-` operator, with two bool tensors"),
    "bcel_pos_weight_enlarges": (BCEL, (x(4, 3), p(4, 3)), dict(pos_weight=torch.ones(2, 4, 3)), "output with shape [4, 3] doesn't match the broadcast shape [2, 4, 3]"),
    "bcel_pos_weight_mismatch": (BCEL, (x(4, 3), p(4, 3)), dict(pos_weight=torch.ones(4)), None),
    "bcel_nchw_c_on_w": (BCEL, (x(2, 3, 4, 5), p(2, 3, 4, 5)), dict(pos_weight=torch.ones(3)), None),
    "bcel_weight_enlarges": (BCEL, (x(4, 3), p(4, 3)), dict(weight=torch.ones(2, 4, 3)), "output with shape [4, 3] doesn't match the broadcast shape [2, 4, 3]"),
    "bcel_weight_requires_grad": (BCEL, (x(4), p(4)), dict(weight=torch.ones(4, requires_grad=True)), "is not differentiable with respect to argument 'weight'"),
    "bcel_pos_weight_requires_grad": (BCEL, (x(4), p(4)), dict(pos_weight=torch.ones(4, requires_grad=True)), "is not differentiable with respect to argument 'pos_weight'"),
    # softmax family
    "softmax_dim_out_of_range": (SM, (x(4, 3), 2), {}, "Dimension out of range (expected to be in range of [-2, 1], but got 2)"),
    "log_softmax_dim_negative": (LSM, (x(4, 3), -3), {}, "Dimension out of range (expected to be in range of [-2, 1], but got -3)"),
    "softmax_0d_dim_1": (SM, (torch.tensor(1.0), 1), {}, "Dimension out of range"),
    "log_softmax_long": (LSM, (torch.zeros(4, 3, dtype=torch.long), 1), {}, '"log_softmax_lastdim_kernel_impl" not implemented for \'Long\''),
    "softmax_long": (SM, (torch.zeros(4, 3, dtype=torch.long), 1), {}, "not implemented for 'Long'"),
    "log_softmax_bool": (LSM, (torch.zeros(4, 3, dtype=torch.bool), -1), {}, "not implemented for 'Bool'"),
    "log_softmax_long_dtype_long": (LSM, (torch.zeros(4, 3, dtype=torch.long), 1), dict(dtype=torch.long), "not implemented for 'Long'"),
    "log_softmax_long_dim0": (LSM, (torch.zeros(4, 3, dtype=torch.long), 0), {}, "not implemented for 'Long'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_error_matches_torch(case):
    name, args, kwargs, words = CASES[case]
    error = check_against_torch(getattr(X, name), getattr(F, name), *args, words=words, **kwargs)
    assert isinstance(error, Exception), f"{case}: torch accepted this input"


@pytest.mark.parametrize("value", [-0.5, math.nan, 0, 1, True, 0.0])
def test_accepted_label_smoothing_values_do_not_raise(value):
    """eps < 0 and NaN silently mean no smoothing; ints and bools are accepted as floats."""
    result = check_against_torch(X.cross_entropy, F.cross_entropy, x(4, 3), t(0, 1, 2, 0), label_smoothing=value)
    assert not isinstance(result, Exception), f"label_smoothing={value!r} raised {result!r} in both libraries"


@pytest.mark.parametrize("ignore_index", [torch.tensor(1), -(2**63), 2**63 - 1])
def test_accepted_ignore_index_values(ignore_index):
    result = check_against_torch(X.cross_entropy, F.cross_entropy, x(4, 3), t(0, 1, 2, 0), ignore_index=ignore_index)
    assert not isinstance(result, Exception), f"ignore_index={ignore_index!r} raised {result!r} in both libraries"


def test_out_of_range_message_names_the_value_and_the_class_count():
    error = assert_same_error(lambda: X.nll_loss(x(4, 3), t(0, 9, 2, 0)), lambda: F.nll_loss(x(4, 3), t(0, 9, 2, 0)))
    assert "9" in str(error) and "3" in str(error)


LONG43 = torch.zeros(4, 3, dtype=torch.long)

# Where torch checks in a documented order, the first failing check wins in both libraries.
PRECEDENCE = {
    "batch_before_target_dtype": (CE, (x(4, 3), t(0, 1).int()), {}, "Expected input batch_size"),
    "target_dim_before_dtype": (CE, (x(4, 3), torch.zeros(4, 2, dtype=torch.int32)), {}, "multi-target"),
    "target_dtype_before_weight_size": (CE, (x(4, 3), t(0, 1, 2, 0).int()), dict(weight=torch.ones(2)), "target dtype"),
    "weight_size_before_weight_dtype": (NLL, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(2, dtype=f64)), "weight tensor should be defined"),
    "weight_dtype_before_bounds": (CE, (x(4, 3), t(0, 1, 7, 0)), dict(weight=torch.ones(3, dtype=f64)), "expected scalar type"),
    "weight_grad_before_size": (CE, (x(4, 3), t(0, 1, 2, 0)), dict(weight=torch.ones(2, requires_grad=True)), "not differentiable"),
    "weight_grad_before_bounds": (NLL, (x(4, 3), t(0, 1, 9, 0)), dict(weight=torch.ones(3, requires_grad=True)), "not differentiable"),
    "reduction_before_everything": (CE, (x(4, 3), t(0, 1).int()), dict(reduction="avg"), "not a valid value"),
    "smoothing_before_shapes": (CE, (x(4, 3), t(0, 1)), dict(label_smoothing=2.0), None),
    "bce_size_before_dtype": (BCE, (p(4), p(3, dtype=f64)), {}, "that is different to the input size"),
    "bce_dtype_before_range": (BCE, (p(4) + 1, p(4, dtype=f64)), {}, "Found dtype Double"),
    "bcel_size_before_dtype": (BCEL, (x(4), torch.zeros(3, dtype=torch.long)), {}, "must be the same as input size"),
    "0d_input_index_target": (CE, (torch.tensor(1.0), t(0, 1)), {}, "Dimension out of range"),
    "1d_input_2d_target": (CE, (x(3), torch.zeros(2, 2, dtype=torch.long)), {}, "0D or 1D target tensor expected"),
    "1d_target_dtype_before_size": (NLL, (x(3), t(0, 1).int()), {}, "expected target dtype to be Long or Byte"),
    "nll_weight_size_before_integer_input": (NLL, (LONG43, t(0, 1, 2, 0)), dict(weight=torch.ones(2)), "weight tensor should be defined"),
    "nll_integer_input_before_weight_dtype": (NLL, (LONG43, t(0, 1, 2, 0)), dict(weight=torch.ones(3)), "not implemented for 'Long'"),
    "nll_integer_input_before_bounds": (NLL, (LONG43, t(0, 5, 2, 0)), {}, "not implemented for 'Long'"),
    "prob_weight_size_before_integer_input": (CE, (LONG43, p(4, 3)), dict(weight=torch.ones(2)), "cross_entropy: weight tensor"),
    "prob_integer_input_before_smoothing": (CE, (LONG43, p(4, 3)), dict(label_smoothing=1.5), "not implemented for 'Long'"),
    "prob_weight_size_before_smoothing": (CE, (x(4, 3), p(4, 3)), dict(weight=torch.ones(2), label_smoothing=1.5), "cross_entropy: weight tensor"),
    "index_smoothing_before_integer_input": (CE, (LONG43, t(0, 1, 2, 0)), dict(label_smoothing=1.5), "label_smoothing must be between"),
    "index_smoothing_before_0d_input": (CE, (torch.tensor(1.0), t(0, 1)), dict(label_smoothing=1.5), "label_smoothing must be between"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PRECEDENCE))
def test_error_precedence(case):
    name, args, kwargs, words = PRECEDENCE[case]
    error = check_against_torch(getattr(X, name), getattr(F, name), *args, words=words, **kwargs)
    assert isinstance(error, Exception), f"{case}: torch accepted this input"


# ------------------------------------------------------------------------------------------------------------
# Deliberate differences: torch bugs we do not copy
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [5, 200])
def test_uint8_out_of_range_with_reduction_none_is_an_index_error(value):
    """torch formats a uint8 target as a character in the reduction='none' message: 'Target \\x05 is out of
    bounds.', or a UnicodeDecodeError for values >= 128. We raise the IndexError every other path raises."""
    target = t(0, 1, value, 0).to(torch.uint8)
    with pytest.raises((IndexError, UnicodeDecodeError)):
        F.nll_loss(x(4, 3), target, reduction="none")
    with pytest.raises(IndexError, match=f"Target {value} is out of bounds"):
        X.nll_loss(x(4, 3), target, reduction="none")


def test_bce_target_list_is_a_type_error():
    """torch's binary_cross_entropy calls target.size() and fails with AttributeError on a list; we raise the
    TypeError every other function in the family raises for a non-tensor argument."""
    with pytest.raises(AttributeError):
        F.binary_cross_entropy(p(4), [0.0, 1.0, 0.5, 0.5])
    with pytest.raises(TypeError, match="must be Tensor"):
        X.binary_cross_entropy(p(4), [0.0, 1.0, 0.5, 0.5])


def test_uint8_target_with_smoothing_and_weight_works():
    """torch's smoothing path gathers the weight with the raw uint8 target and fails ("gather(): Expected dtype
    int32/int64 for index"); we accept uint8 there as everywhere else on 2-D inputs: the long target's result."""
    target, w = t(0, 1, 2, 0), torch.tensor([0.5, 1.0, 2.0])
    with pytest.raises(RuntimeError, match="gather"):
        F.cross_entropy(x(4, 3), target.to(torch.uint8), w, label_smoothing=0.2)
    check_against_torch(
        lambda x, t, w, **k: X.cross_entropy(x, t.to(torch.uint8), w, **k), F.cross_entropy,
        x(4, 3, requires_grad=True), target, w, label_smoothing=0.2,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_unbatched_size_one_target_with_smoothing_works(reduction):
    """torch fails on a 1-D input with a (1,) target and label smoothing ("output with shape [] doesn't match the
    broadcast shape [1]"); we give the 0-d target's result, as without smoothing."""
    with pytest.raises(RuntimeError, match="broadcast shape"):
        F.cross_entropy(x(3), t(1), label_smoothing=0.2, reduction=reduction)
    check_against_torch(
        lambda x, t, **k: X.cross_entropy(x, t.reshape(1), **k), F.cross_entropy, x(3, requires_grad=True),
        torch.tensor(1), label_smoothing=0.2, reduction=reduction,
    )  # fmt: skip


# A grid of valid and invalid arguments: whatever torch raises first, we raise the same exception type.
GRID_INPUTS = {
    "f32(4,3)": x(4, 3),
    "f64(4,3)": x(4, 3, dtype=f64),
    "f32(3)": x(3),
    "f32(2,3,4)": x(2, 3, 4),
    "long(4,3)": LONG43,
    "0d": torch.tensor(1.0),
    "f16(4,3)": x(4, 3).half(),
}
GRID_TARGETS = {
    "long(4)": t(0, 1, 2, 0),
    "long(4)_oob": t(0, 5, 2, 0),
    "int(4)": t(0, 1, 2, 0).int(),
    "f32(4,3)": p(4, 3),
    "f64(4,3)": p(4, 3, dtype=f64),
    "long(4,3)": torch.zeros(4, 3, dtype=torch.long),
    "long(2,4)": torch.zeros(2, 4, dtype=torch.long),
    "long()": torch.tensor(1),
    "u8(4)": t(0, 1, 2, 0).to(torch.uint8),
    "long(5)": torch.zeros(5, dtype=torch.long),
    "f32(3)": p(3),
    "f32(2,3,4)": p(2, 3, 4),
}
GRID_WEIGHTS = [None, torch.ones(3), torch.ones(3, dtype=f64), torch.ones(2), torch.ones(3, requires_grad=True)]
GRID_OPTIONS = [
    {},
    dict(label_smoothing=1.5),
    dict(ignore_index=0),
    dict(reduction="none"),
    dict(reduction="bad"),
    dict(label_smoothing=0.2, ignore_index=5),
]
# torch bugs we do not copy (tested above): uint8 + smoothing + weight, 1-D input + (1,) target + smoothing
GRID_KNOWN = {("u8(4)", "label_smoothing")}


@pytest.mark.parametrize("fn", [CE, NLL])
@pytest.mark.parametrize("input_name", list(GRID_INPUTS))
def test_error_grid(fn, input_name):
    mismatches, count = [], 0
    for target_name, target in GRID_TARGETS.items():
        for weight in GRID_WEIGHTS:
            for options in GRID_OPTIONS:
                if fn == NLL and "label_smoothing" in options:
                    continue
                if (target_name, next(iter(options), "")) in GRID_KNOWN and weight is not None:
                    continue
                count += 1
                outcomes = []
                for lib in (F, X):
                    try:
                        getattr(lib, fn)(GRID_INPUTS[input_name], target, weight, **options)
                        outcomes.append("ok")
                    except Exception as error:  # noqa: BLE001 - compared below
                        outcomes.append(f"{type(error).__name__}: {str(error)[:70]}")
                if outcomes[0].split(":")[0] != outcomes[1].split(":")[0]:
                    mismatches.append(f"{target_name} w={weight} {options}: torch {outcomes[0]} | ours {outcomes[1]}")
    assert count and not mismatches, f"{len(mismatches)} of {count} differ:\n" + "\n".join(mismatches[:10])


BCE_GRID_INPUTS = {
    "p_f32": p(4, 3),
    "p_f64": p(4, 3, dtype=f64),
    "logits_f32": x(4, 3) * 3,
    "long": LONG43,
    "p_f16": p(4, 3).half(),
    "p_0d": p(),
    "bool": torch.zeros(4, 3, dtype=torch.bool),
    "nan": torch.full((4, 3), math.nan),
}
BCE_GRID_TARGETS = {
    "f32": p(4, 3),
    "f64": p(4, 3, dtype=f64),
    "f16": p(4, 3).half(),
    "long": LONG43,
    "bool": torch.zeros(4, 3, dtype=torch.bool),
    "f32(4,1)": p(4, 1),
    "f32(3)": p(3),
    "out_of_range": p(4, 3) + 1,
    "0d": p(),
    "nan": torch.full((4, 3), math.nan),
}
BCE_GRID_WEIGHTS = [
    None,
    torch.ones(3),
    torch.ones(3, dtype=f64),
    torch.ones(4),
    torch.ones(2, 4, 3),
    torch.ones(3, requires_grad=True),
    torch.ones(3, dtype=torch.long),
    torch.ones(4, 1),
]


@pytest.mark.parametrize("fn, weight_arg", [(BCE, "weight"), (BCEL, "weight"), (BCEL, "pos_weight")])
@pytest.mark.parametrize("input_name", list(BCE_GRID_INPUTS))
def test_bce_error_grid(fn, weight_arg, input_name):
    mismatches, count = [], 0
    for target_name, target in BCE_GRID_TARGETS.items():
        for weight in BCE_GRID_WEIGHTS:
            for reduction in ("mean", "none", "bad"):
                count += 1
                outcomes = []
                for lib in (F, X):
                    kwargs = {weight_arg: weight, "reduction": reduction}
                    try:
                        getattr(lib, fn)(BCE_GRID_INPUTS[input_name], target, **kwargs)
                        outcomes.append("ok")
                    except Exception as error:  # noqa: BLE001 - compared below
                        outcomes.append(f"{type(error).__name__}: {str(error)[:70]}")
                if outcomes[0].split(":")[0] != outcomes[1].split(":")[0]:
                    mismatches.append(f"{target_name} {weight_arg}={weight}: torch {outcomes[0]} | ours {outcomes[1]}")
    assert count and not mismatches, f"{len(mismatches)} of {count} differ:\n" + "\n".join(mismatches[:10])


SOFTMAX_GRID_INPUTS = {
    "f32(4,3)": x(4, 3),
    "0d": torch.tensor(1.0),
    "long": LONG43,
    "bool": torch.zeros(4, 3, dtype=torch.bool),
    "complex": torch.zeros(4, 3, dtype=torch.complex64),
    "f16(2,3,4)": x(2, 3, 4).half(),
    "empty_f32": x(0, 3),
    "empty_long": torch.zeros(0, 3, dtype=torch.long),
    "u8(3)": torch.zeros(3, dtype=torch.uint8),
    "long_0d": torch.tensor(3),
}
SOFTMAX_GRID_DIMS = [None, 0, 1, -1, 2, -3, 3, 1.0, "a", (1,), True]
SOFTMAX_GRID_DTYPES = [None, torch.float64, torch.float16, torch.long, torch.bool, torch.complex64, torch.bfloat16, "x"]


@pytest.mark.parametrize("fn", [LSM, SM])
@pytest.mark.parametrize("input_name", list(SOFTMAX_GRID_INPUTS))
def test_softmax_error_grid(fn, input_name):
    """Same exception type (or success with the same output dtype) for every dim / dtype argument."""
    mismatches, count = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dim in SOFTMAX_GRID_DIMS:
            for dtype in SOFTMAX_GRID_DTYPES:
                count += 1
                outcomes = []
                for lib in (F, X):
                    try:
                        outcomes.append(
                            f"ok {getattr(lib, fn)(SOFTMAX_GRID_INPUTS[input_name], dim, dtype=dtype).dtype}"
                        )
                    except Exception as error:  # noqa: BLE001 - compared below
                        outcomes.append(f"{type(error).__name__}: {str(error)[:70]}")
                if outcomes[0].split(":")[0] != outcomes[1].split(":")[0]:
                    mismatches.append(f"dim={dim!r} dtype={dtype}: torch {outcomes[0]} | ours {outcomes[1]}")
    assert count and not mismatches, f"{len(mismatches)} of {count} differ:\n" + "\n".join(mismatches[:10])
