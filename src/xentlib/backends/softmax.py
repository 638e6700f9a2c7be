"""log_softmax / softmax: one chunked pass, float32 accumulation for half types, gradient from the saved output.

The chunks are those of the PyTorch backend (`torch_chunked.chunk_shape`), so one setting sizes both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xentlib.backends import torch_chunked


def _rows_along(tensor: Tensor, dim: int) -> Tensor:
    """View `tensor` as (before, size(dim), after) so that `dim` becomes dimension 1 without a transposed copy."""
    shape = tensor.shape
    return tensor.reshape(math.prod(shape[:dim]), shape[dim] if shape else 1, math.prod(shape[dim + 1 :]))


def softmax_forward(input: Tensor, dim: int, log: bool) -> Tensor:
    """log_softmax = d - log sum exp(d), softmax = exp(d) / sum exp(d), with d = x - max(x) along `dim`."""
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    if input.numel() == 0:
        return out
    x3, out3 = _rows_along(input, dim), _rows_along(out, dim)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    batch, classes, spatial = x3.shape
    block = torch_chunked.chunk_shape(batch, classes, spatial, None)
    work_full = torch.empty((block[0], classes, block[1]), dtype=acc, device=input.device)
    exp_full = torch.empty_like(work_full) if log else None
    for rows, cols in torch_chunked.iter_chunks(batch, spatial, block):
        x = x3[rows, :, cols]
        r, _, s = x.shape
        work = work_full[:r, :, :s]
        m = x.amax(1, keepdim=True).to(acc)
        if x.dtype == acc:
            torch.sub(x, m, out=work)
        else:
            work.copy_(x)
            work.sub_(m)
        if log:
            e = exp_full[:r, :, :s]
            torch.exp(work, out=e)
            torch.sub(work, e.sum(1, keepdim=True).log_(), out=out3[rows, :, cols])
        else:
            work.exp_()
            torch.div(work, work.sum(1, keepdim=True), out=out3[rows, :, cols])
    return out


class SoftmaxFunction(torch.autograd.Function):
    """Backward from the saved output (plain torch ops, so double backward works):
    log_softmax: dx = g - exp(out) * sum(g);   softmax: dx = out * (g - sum(g * out))."""

    @staticmethod
    def forward(ctx, input, dim, log):
        out = softmax_forward(input, dim, log)
        ctx.save_for_backward(out)
        ctx.dim, ctx.log = dim, log
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        g, o = grad.to(acc), out.to(acc)
        if ctx.log:
            result = g - o.exp() * g.sum(ctx.dim, keepdim=True)
        else:
            result = o * (g - (g * o).sum(ctx.dim, keepdim=True))
        return result.to(out.dtype), None, None
