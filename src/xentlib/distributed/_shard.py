"""Row maths of the cross-entropy family on one vocabulary shard, and the merge of the shards' partial sums.

Each rank holds the logits of the classes [a, a + C_r) of a global vocabulary of V classes. For a row with
capped logits y (y = z without softcap) the single-device loss (docs/numerics.md, "Row loss and gradient") is

    lse = M + log S,   S = sum_c exp(y_c - M)   for any shift M (the global row max keeps exp() in range)
    l   = sum_c q_c (lse - y_c) + z_loss lse^2 = Q log S - sum_c q_c d_c + z_loss lse^2
          with d = y - M and Q = sum_c q_c
    dl/dy = (Q + 2 z_loss lse) exp(d) / S - q,          dl/dz = dl/dy (1 - (y / softcap)^2)

with q the target weights of the row: class index t: q = (1-eps) w_t onehot(t) + (eps/V) w; probabilities
p: q = w ((1-eps) p + eps/V). Every quantity is a sum over classes of something a rank can compute on its own
shard once it knows M, so the merge is:

    1. all-reduce MAX of the local row max                   -> M on every rank
    2. local partial sums over the shard, with d = y - M, stacked in one (k, rows) tensor:
         index:  S_r = sum_c exp(d_c),  D_r = d_t if a <= t < a + C_r else 0,  [W_r = w_t or 0 likewise],
                 [smoothing: sum_c w_c d_c (w = 1 without weights), and sum_c w_c]
         probs:  S_r,  Q_r = sum_c q_c,  QD_r = sum_c q_c d_c
    3. ONE all-reduce SUM of that tensor                     -> S, d_t, w_t, ... on every rank
    4. loss and dl/dz on the shard from the merged row statistics: no more communication, and the backward
       pass only scales the gradient made here.

A target is owned by exactly one rank, so the merged d_t is that rank's gathered value plus exact zeros: the
target logit is read with a gather (never a dot product with a one-hot), so a -inf elsewhere stays harmless.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from xentlib._semantics import CrossEntropyProblem


def class_sum(a: Tensor, b: Tensor) -> Tensor:
    """sum_c a[r, c, s] * b[r, c, s] -> (R, 1, S), elementwise in the accumulation dtype (b may broadcast, e.g. a
    class weight viewed as (1, C, 1)): no blocked matvec, whose summation order would depend on the shapes."""
    return (a * b).sum(1, keepdim=True)


@dataclass
class ShardProblem:
    """A validated vocabulary-parallel call: the rules of `prepare_cross_entropy`, the layout of the shard."""

    rules: CrossEntropyProblem  # kind, global target indices, valid mask, options, reduction, shapes, dtypes
    logits: Tensor  # (B, C_r, S) view of this rank's logits shard (for the linear version: unused)
    target: Tensor  # index: (B, S) global class indices (0 on ignored rows); prob: (B, C_r, S) target shard
    class_weight: Tensor | None  # (C_r,) this rank's slice of the class weight, accumulation dtype
    vocab_start: int
    local_size: int
    vocab_size: int
    group: object
    owned: Tensor | None = None  # (B, 1, S) bool: this rank holds the row's (non-ignored) target; made lazily
    local_target: Tensor | None = None  # (B, 1, S) int64: the target's index in this shard, 0 where not owned

    @property
    def acc(self) -> torch.dtype:
        return self.rules.acc_dtype

    @property
    def weighted(self) -> bool:
        return self.class_weight is not None

    def slots(self) -> list[str]:
        """Names of the per-row partial sums stacked for the SUM all-reduce, in order."""
        if self.rules.kind == "prob":
            return ["sum_exp", "q_sum", "qd_sum"]
        names = ["sum_exp", "target_d"]
        if self.weighted:
            names.append("target_w")
        if self.rules.smoothing > 0:
            names.append("smooth_d")
            if self.weighted:
                names.append("weight_sum")
        return names


@dataclass
class RowStats:
    """Merged per-row statistics, each (R, 1, S) in the accumulation dtype."""

    row_max: Tensor  # M, the global row max of the capped logits
    sum_exp: Tensor  # S = sum over the global vocabulary of exp(y - M)
    lse: Tensor  # M + log S
    coef: Tensor  # Q + 2 z_loss lse: the factor of the softmax in dl/dy
    target_weight: Tensor  # w_t (1 without weights), 0 on ignored rows (class indices); unused for probabilities
    loss: Tensor  # per-row loss incl. class weight and z-loss, 0 on ignored rows

    def chunk(self, rows, cols) -> RowStats:
        return RowStats(*(getattr(self, f.name)[rows, :, cols] for f in fields(self)))


def capped(z: Tensor, acc: torch.dtype, softcap: float | None) -> Tensor:
    """y = softcap * tanh(z / softcap) (or z) in the accumulation dtype, as a new tensor."""
    y = z.to(acc, copy=True)
    if softcap is not None:
        y.div_(softcap).tanh_().mul_(softcap)
    return y


def local_row_max(z: Tensor, acc: torch.dtype, softcap: float | None) -> Tensor:
    """(B, 1, S) max over this shard's classes of the capped logits (-inf for an empty shard).

    tanh is increasing, so the max of the capped logits is the capped max: no capped copy is needed.
    """
    if z.shape[1] == 0:
        return torch.full((z.shape[0], 1, z.shape[2]), -torch.inf, dtype=acc, device=z.device)
    m = z.amax(1, keepdim=True).to(acc)
    if softcap is not None:
        m = softcap * torch.tanh(m / softcap)
    return m


def all_reduce_max(row_max: Tensor, group) -> Tensor:
    # Before: row_max[b, 0, s] = max over THIS rank's classes of the capped logits of row (b, s).
    # After:  the max over the whole vocabulary, identical on every rank.
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    return row_max


def owned_targets(sp: ShardProblem, rows, cols) -> tuple[Tensor, Tensor]:
    """(owned, local index), each (R, 1, S): whether this rank holds the row's target class, and where.

    Computed once for all rows (a few small ops), then sliced per chunk."""
    if sp.owned is None:
        local = sp.target.unsqueeze(1) - sp.vocab_start
        owned = sp.rules.valid.unsqueeze(1) & (local >= 0) & (local < sp.local_size)
        sp.owned = owned
        sp.local_target = torch.where(owned, local, torch.zeros((), dtype=local.dtype, device=local.device))
    return sp.owned[rows, :, cols], sp.local_target[rows, :, cols]


def target_weights_shard(sp: ShardProblem, rows, cols) -> Tensor:
    """q restricted to this shard for probability targets: w ((1 - eps) p + eps / V), (R, C_r, S)."""
    q = sp.target[rows, :, cols].to(sp.acc, copy=True)
    eps = sp.rules.smoothing
    if eps > 0:
        q.mul_(1.0 - eps).add_(eps / sp.vocab_size)
    if sp.class_weight is not None:
        q.mul_(sp.class_weight.view(1, -1, 1))
    return q


def local_partials(sp: ShardProblem, z: Tensor, row_max: Tensor, rows, cols, exp_out: Tensor) -> Tensor:
    """This rank's partial sums for the rows of `z` (R, C_r, S), stacked as (k, R, S) in `sp.slots()` order.

    Writes exp(y - M) into `exp_out` (R, C_r, S), from which the gradient is made after the merge.
    """
    if sp.rules.softcap is None:
        d = torch.sub(z, row_max, out=exp_out)  # promotes half inputs to the accumulation dtype
    else:
        d = exp_out.copy_(z).div_(sp.rules.softcap).tanh_().mul_(sp.rules.softcap).sub_(row_max)
    parts: dict[str, Tensor] = {}
    zero = torch.zeros((), dtype=sp.acc, device=z.device)
    if sp.rules.kind == "index":
        owned, local = owned_targets(sp, rows, cols)
        # d_t on the rank that owns t, an exact 0 elsewhere (and on ignored rows)
        parts["target_d"] = torch.where(owned, d.gather(1, local), zero) if sp.local_size else zero.expand_as(owned)
        if sp.weighted:
            w_t = sp.class_weight[local] if sp.local_size else zero.expand_as(owned)
            parts["target_w"] = torch.where(owned, w_t, zero)
        if sp.rules.smoothing > 0:
            parts["smooth_d"] = (
                d.sum(1, keepdim=True) if not sp.weighted else class_sum(d, sp.class_weight.view(1, -1, 1))
            )
            if sp.weighted:
                parts["weight_sum"] = sp.class_weight.sum().expand_as(owned)
    else:
        q = target_weights_shard(sp, rows, cols)
        parts["q_sum"] = q.sum(1, keepdim=True)
        parts["qd_sum"] = class_sum(q, d)
    d.exp_()
    parts["sum_exp"] = d.sum(1, keepdim=True)
    return torch.cat([parts[name].to(sp.acc) for name in sp.slots()], dim=1).transpose(0, 1)


def all_reduce_partials(partials: Tensor, group) -> Tensor:
    # Before: partials[k, b, s] = this rank's partial sum k (see ShardProblem.slots) of row (b, s) over its
    #         own classes, with d = y - M for the global max M: sum exp(d); d_t, w_t (exact 0 unless this
    #         rank owns the target); smoothing sum_c w_c d_c and sum_c w_c; for probabilities sum q, sum q d.
    # After:  the same sums over the whole vocabulary, identical on every rank.
    dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
    return partials


def finish_rows(sp: ShardProblem, merged: Tensor, row_max: Tensor, rows, cols) -> RowStats:
    """Row loss, lse and gradient coefficients from the merged partial sums (k, R, S) of rows (rows, cols)."""
    stats = {name: merged[i].unsqueeze(1) for i, name in enumerate(sp.slots())}
    rules, vocab = sp.rules, sp.vocab_size
    log_s = stats["sum_exp"].log()
    lse = row_max + log_s
    valid = rules.valid[rows, cols].unsqueeze(1)
    if rules.kind == "index":
        w_t = stats["target_w"] if sp.weighted else rules.target_weight[rows, cols].unsqueeze(1)
        loss = w_t * (log_s - stats["target_d"])
        q_sum = w_t
        eps = rules.smoothing
        if eps > 0:  # torch: (1 - eps) * nll + eps / V * sum_c w_c (lse - y_c), the sum over the GLOBAL vocabulary
            w_sum = stats["weight_sum"] if sp.weighted else float(vocab)
            loss = (1.0 - eps) * loss + (eps / vocab) * (w_sum * log_s - stats["smooth_d"])
            q_sum = (1.0 - eps) * w_t + (eps / vocab) * w_sum
    else:
        w_t = torch.ones_like(log_s)
        q_sum = stats["q_sum"]
        loss = q_sum * log_s - stats["qd_sum"]
    coef = q_sum
    if rules.z_loss:
        loss = loss + rules.z_loss * lse * lse
        coef = q_sum + 2.0 * rules.z_loss * lse
    zero = torch.zeros((), dtype=sp.acc, device=loss.device)
    return RowStats(
        row_max=row_max,
        sum_exp=stats["sum_exp"],
        lse=lse,
        coef=coef,
        target_weight=torch.where(valid, w_t, zero),
        loss=torch.where(valid, loss, zero),
    )


def write_gradient(sp: ShardProblem, stats: RowStats, z: Tensor, exp_d: Tensor, rows, cols, scale) -> Tensor:
    """Turn exp_d = exp(y - M) (R, C_r, S) into scale * dl/dz on this shard, in place, and return it.

    dl/dy = coef p - q with p = exp(d) / S; `scale` is a number, a 0-d tensor or a (R, 1, S) tensor (per row).
    """
    rules = sp.rules
    eps = rules.smoothing
    exp_d.mul_(stats.coef * scale / stats.sum_exp)
    if rules.kind == "index":
        owned, local = owned_targets(sp, rows, cols)
        if sp.local_size:
            # the target slot: -(1 - eps) w_t, only on the rank that owns it
            exp_d.scatter_add_(1, local, torch.where(owned, -(1.0 - eps) * stats.target_weight * scale, 0.0))
        if eps > 0:
            smooth = (eps / sp.vocab_size) * scale
            w = sp.class_weight
            exp_d.sub_(smooth if w is None else smooth * w.view(1, -1, 1))
    else:
        exp_d.sub_(target_weights_shard(sp, rows, cols).mul_(scale))
    if rules.softcap is not None:  # dy/dz = 1 - tanh^2 = 1 - (y / softcap)^2
        t = z.to(sp.acc, copy=True).div_(rules.softcap).tanh_()
        exp_d.mul_(t.square_().neg_().add_(1.0))
    valid = rules.valid[rows, cols].unsqueeze(1)
    if not bool(valid.all()):
        exp_d.masked_fill_(~valid, 0.0)
    return exp_d


def mean_denominator(sp: ShardProblem, target_weight: Tensor) -> Tensor:
    """What the summed row losses are divided by: for 'mean', the sum of w_t over non-ignored rows (weighted
    class indices, known only after the merge) or the row count (probabilities: torch's numel / C of the FULL
    logits; the shard's numel / C_r is 0 / 0 on an empty shard); else the rules' denominator (count,
    normalizer or 1)."""
    rules = sp.rules
    if rules.reduction == "mean" and rules.kind == "index" and sp.weighted:
        return target_weight.sum()
    if rules.reduction == "mean" and rules.kind == "prob":
        return torch.tensor(float(target_weight.numel()), dtype=sp.acc, device=target_weight.device)
    return rules.denominator
