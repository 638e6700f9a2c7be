"""`torch.nn` loss modules backed by `xentlib.functional`.

Each class subclasses its torch counterpart, so construction, attributes (`reduction`, `ignore_index`,
`label_smoothing`, `dim`), the `weight` / `pos_weight` buffers, `state_dict` keys, `repr` and `isinstance` checks
are exactly torch's; a checkpoint saved with one loads into the other. Only `forward` changes. The extensions are
keyword-only constructor arguments, off by default.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from xentlib import functional as F

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "LogSoftmax",
    "NLLLoss",
    "NLLLoss2d",
    "Softmax",
]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """`torch.nn.CrossEntropyLoss` computed by xentlib; extensions as in `xentlib.functional.cross_entropy`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss, self.softcap = z_loss, softcap
        self.backend, self.chunk_size, self.inplace_backward = backend, chunk_size, inplace_backward

    def forward(self, input: Tensor, target: Tensor, *, normalizer=None) -> Tensor:
        # the settings by keyword, as torch's modules call their functional forms (LinearCrossEntropyLoss alike)
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            normalizer=normalizer,
            backend=self.backend,
            chunk_size=self.chunk_size,
            inplace_backward=self.inplace_backward,
        )


class NLLLoss(torch.nn.NLLLoss):
    """`torch.nn.NLLLoss` computed by xentlib."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction)


class NLLLoss2d(NLLLoss):
    """Deprecated alias of `NLLLoss`, kept because torch keeps it (FutureWarning at construction)."""

    def __init__(self, *args, **kwargs) -> None:
        warnings.warn(
            "`NLLLoss2d` has been deprecated. Please use `NLLLoss` instead as a drop-in replacement.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)


class BCELoss(torch.nn.BCELoss):
    """`torch.nn.BCELoss` computed by xentlib."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """`torch.nn.BCEWithLogitsLoss` computed by xentlib."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class LogSoftmax(torch.nn.LogSoftmax):
    """`torch.nn.LogSoftmax` computed by xentlib."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class Softmax(torch.nn.Softmax):
    """`torch.nn.Softmax` computed by xentlib."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


if hasattr(torch.nn, "LinearCrossEntropyLoss"):
    _LinearCrossEntropyBase = torch.nn.LinearCrossEntropyLoss
else:  # torch < 2.13 has no such module: the same constructor checks and state, for out_features=()

    class _LinearCrossEntropyBase(torch.nn.modules.loss._WeightedLoss):
        # called only by LinearCrossEntropyLoss below, which passes every argument by name
        def __init__(self, in_features, num_classes, *, bias, device, dtype, reduction, weight, ignore_index,
                     label_smoothing) -> None:  # fmt: skip
            if weight is not None and weight.shape != (num_classes,):
                raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
            if not 0.0 <= label_smoothing <= 1.0:
                raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
            super().__init__(weight=weight, reduction=reduction)
            self.num_classes, self.out_features = num_classes, ()
            self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
            self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
            self.options = None


class LinearCrossEntropyLoss(_LinearCrossEntropyBase):
    """`torch.nn.LinearCrossEntropyLoss` (it owns `self.linear`) computed by `xentlib.linear_cross_entropy`.

    The (N, V) logits are never held. Same constructor, buffers and `state_dict` keys as torch's module
    (`out_features` must be `()`); the input is (..., in_features) with the leading dimensions flattened into rows.
    Extensions are keyword-only: `shift`, `z_loss`, `softcap`, `chunk_size`, `backend`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        shift: bool = False,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        if tuple(out_features) != ():
            raise NotImplementedError("xentlib's LinearCrossEntropyLoss supports out_features=() only")
        # torch's own parameters by keyword to torch's module (xentlib's extensions are kept below)
        super().__init__(
            in_features,
            num_classes,
            bias=bias,
            device=device,
            dtype=dtype,
            reduction=reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
        self.shift, self.z_loss, self.softcap = shift, z_loss, softcap
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, input: Tensor, target: Tensor, *, normalizer=None) -> Tensor:
        return F.linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            shift=self.shift,
            z_loss=self.z_loss,
            softcap=self.softcap,
            normalizer=normalizer,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
