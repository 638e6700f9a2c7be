"""The binary cross-entropy pair: one elementwise pass in the accumulation dtype, analytic gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BCE_GRAD_EPS = 9.999999960041972e-13  # float32(1e-12), used by torch for every dtype


def _reduce_elements(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / loss.numel() if reduction == "mean" else total


def _grad_elements(grad: Tensor, reduction: str, numel: int, acc: torch.dtype) -> Tensor:
    grad = grad.to(acc)
    return grad / numel if reduction == "mean" else grad


class BinaryCrossEntropyFunction(torch.autograd.Function):
    """l = -w (y max(log x, -100) + (1 - y) max(log(1 - x), -100));
    dl/dx = w (x - y) / max(x (1 - x), eps);  dl/dy = w (log(1 - x) - log x)."""

    @staticmethod
    def forward(ctx, input, target, weight, reduction):
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        x, y = input.to(acc), target.to(acc)
        log_x = torch.log(x).clamp_min_(-100.0)
        log_1mx = torch.log1p(-x).clamp_min_(-100.0)
        loss = -(y * log_x + (1.0 - y) * log_1mx)
        if weight is not None:
            loss = loss * weight.to(acc)
        ctx.save_for_backward(input, target, weight)
        ctx.reduction = reduction
        return _reduce_elements(loss, reduction).to(input.dtype)

    @staticmethod
    def backward(ctx, grad):
        input, target, weight = ctx.saved_tensors
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        x, y = input.to(acc), target.to(acc)
        g = _grad_elements(grad, ctx.reduction, input.numel(), acc)
        if weight is not None:
            g = g * weight.to(acc)
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_input = (g * (x - y) / (x * (1.0 - x)).clamp_min(BCE_GRAD_EPS)).to(input.dtype)
        if ctx.needs_input_grad[1]:
            grad_target = (g * (torch.log1p(-x) - torch.log(x))).to(target.dtype)
        return grad_input, grad_target, None, None


class BinaryCrossEntropyWithLogitsFunction(torch.autograd.Function):
    """With softplus(-x) = log1p(exp(-|x|)) + max(-x, 0) (stable) and pos_weight p:
    l = w ((1 - y) x + (1 + (p - 1) y) softplus(-x))
    dl/dx = w ((p y + 1 - y) sigmoid(x) - p y);   dl/dy = w (log sigmoid(-x) - p log sigmoid(x))."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, reduction, out_dtype):
        acc = torch.float64 if torch.float64 in (input.dtype, target.dtype) else torch.float32
        x, y = input.to(acc), target.to(acc)
        softplus_neg = torch.log1p(torch.exp(-x.abs())) + (-x).clamp_min(0.0)
        if pos_weight is None:
            loss = (1.0 - y) * x + softplus_neg
        else:
            loss = (1.0 - y) * x + (1.0 + (pos_weight.to(acc) - 1.0) * y) * softplus_neg
        if weight is not None:
            loss = loss * weight.to(acc)
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.reduction = reduction
        return _reduce_elements(loss, reduction).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        input, target, weight, pos_weight = ctx.saved_tensors
        acc = torch.float64 if torch.float64 in (input.dtype, target.dtype) else torch.float32
        x, y = input.to(acc), target.to(acc)
        g = _grad_elements(grad, ctx.reduction, input.numel(), acc)
        if weight is not None:
            g = g * weight.to(acc)
        p = 1.0 if pos_weight is None else pos_weight.to(acc)
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_input = (g * ((p * y + 1.0 - y) * torch.sigmoid(x) - p * y)).to(input.dtype)
        if ctx.needs_input_grad[1]:
            # -x + (p - 1) softplus(-x), written as log sigmoid(-x) - p log sigmoid(x): equal, but finite or +-inf
            # (never inf - inf) at x = +-inf
            grad_y = -x if pos_weight is None else F.logsigmoid(-x) - p * F.logsigmoid(x)
            grad_target = (g * grad_y).to(target.dtype)
        return grad_input, grad_target, None, None, None, None
