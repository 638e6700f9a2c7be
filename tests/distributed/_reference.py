"""The unsharded references of the distributed tests: torch ops with the pinned extension semantics."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

VOCAB = 11


def torch_reference(x, t, w, ignore_index, reduction, eps, z_loss, softcap, normalizer):
    """The unsharded loss from torch ops and the pinned extension semantics (class dim 1, or 0 for 1-D)."""
    class_dim = 0 if x.dim() == 1 else 1
    y = x if softcap is None else softcap * torch.tanh(x / softcap)
    rows = F.cross_entropy(y, t, w, ignore_index=ignore_index, reduction="none", label_smoothing=eps)
    prob = t.shape == x.shape
    valid = torch.ones_like(rows, dtype=torch.bool) if prob else t != ignore_index
    if z_loss:
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(y, class_dim) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum() / (1.0 if normalizer is None else normalizer)
    if prob:
        denominator = rows.numel()
    elif w is None:
        denominator = valid.sum()
    else:
        denominator = torch.where(valid, w[torch.where(valid, t, 0)], 0.0).sum()
    return rows.sum() / denominator


def make_case(seed, shape, dtype, prob, weighted, ignore_rows, scale=3.0):
    """Logits of `shape` (scale * randn), a target, a class weight; the same on every rank (same seed)."""
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    class_dim = 0 if len(shape) == 1 else 1
    classes = shape[class_dim]
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), class_dim).to(dtype)
    else:
        t_shape = shape[:class_dim] + shape[class_dim + 1 :]
        t = torch.randint(0, classes, t_shape, generator=g)
        if ignore_rows and t.dim() > 0:
            t.view(-1)[::3] = -100
    w = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.2).to(dtype) if weighted else None
    return x, t, w
