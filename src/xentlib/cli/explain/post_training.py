"""`xentlib explain --example log-probs | policy-loss | distillation`: the post-training quantities step by step.

Every number shown is an intermediate of the float64 reference (`xentlib.reference.log_probs_steps`,
`xentlib.reference.policy_terms`, `xentlib.reference.distillation_steps`); the closing table computes the same
values again with torch's own ops (the composition an RL or GKD trainer writes) and with xentlib's fused
functions, and says whether they agree.

    log_probs:     u = z / T,  log p = log_softmax(u),  log p[t],  H = -sum_v p_v log p_v
    policy_loss:   r = exp(log p[t] - old),  pg = -min(r A, clip(r, 1 - e, 1 + e) A),
                   kl = exp(ref - log p[t]) - (ref - log p[t]) - 1,  loss = mean over tokens of pg + c kl
    distillation:  p = softmax(z_s / T), q = softmax(z_t / T), m = beta q + (1 - beta) p,
                   D = beta KL(q || m) + (1 - beta) KL(p || m)  per row, 'batchmean' = sum_rows D / N
"""

from __future__ import annotations

import numpy as np

from xentlib import reference
from xentlib.cli._examples import PostTraining
from xentlib.cli._shared import one_line, print_table
from xentlib.cli.explain.checks import agrees, max_difference
from xentlib.cli.explain.render import number, numbers

OPS = ("log_probs", "policy_loss", "distillation")


def explain_post_training(console, example: PostTraining, decimals: int) -> None:
    from rich.rule import Rule

    console.print(Rule(f"xentlib explain: {example.op}"))
    if example.note:
        console.print(example.note)
    if example.op == "log_probs":
        explain_log_probs(console, example, decimals)
    elif example.op == "policy_loss":
        explain_policy_loss(console, example, decimals)
    else:
        explain_distillation(console, example, decimals)


# --------------------------------------------------------------------------------------------- log_probs


def explain_log_probs(console, example: PostTraining, decimals: int) -> None:
    from rich.table import Table

    fmt = lambda v: number(v, decimals)
    logits, target = np.asarray(example.logits, dtype=np.float64), np.asarray(example.target, dtype=np.int64)
    temperature = float(example.options.get("temperature", 1.0))
    steps = reference.log_probs_steps(logits, target, temperature=temperature)
    console.print(
        f"{logits.shape[0]}x{logits.shape[1]} logits z, targets {target.tolist()}, temperature T = {temperature:g}"
    )
    for n in range(logits.shape[0]):
        table = Table(title=f"row {n}, target {target[n]}", title_justify="left")
        for header in ("class", "z", "u = z / T", "log p = log_softmax(u)", "p = exp(log p)", "-p log p"):
            table.add_column(header, justify="right")
        for v in range(logits.shape[1]):
            mark = " <- target" if v == target[n] else ""
            p = steps.p[n, v]
            table.add_row(
                f"{v}{mark}", fmt(logits[n, v]), fmt(steps.scaled[n, v]), fmt(steps.log_p[n, v]), fmt(p),
                fmt(-p * steps.log_p[n, v] if p > 0 else 0.0),
            )  # fmt: skip
        print_table(console, table)
        console.print(f"  log p[t] = {fmt(steps.log_prob[n])}   entropy H = -sum p log p = {fmt(steps.entropy[n])}")
    console.print(
        "log_softmax is (u - max) - log sum exp(u - max), never u - lse; the entropy sums -p log p (0 at p = 0),\n"
        "never lse - sum p u, which cancels on confident rows (docs/numerics.md, section 10)."
    )
    checks = [
        ("torch (log_softmax, gather, -sum p log p)", lambda: torch_log_probs(logits, target, temperature)),
        ("xentlib.log_probs", lambda: xentlib_log_probs(logits, target, temperature)),
    ]
    steps_values = np.stack([steps.log_prob, steps.entropy])
    render_checks(console, steps_values, checks, decimals, what="log p[t] and entropy per row")
    console.print(f"log p[t] = {numbers(steps.log_prob, decimals)}  (xentlib.reference.log_probs)")
    console.print(f"entropy = {numbers(steps.entropy, decimals)}")


def torch_log_probs(logits, target, temperature):
    import torch

    log_p = torch.log_softmax(torch.from_numpy(logits) / temperature, dim=-1)
    picked = log_p.gather(-1, torch.from_numpy(target).unsqueeze(-1)).squeeze(-1)
    return torch.stack([picked, -(log_p.exp() * log_p).sum(-1)])


def xentlib_log_probs(logits, target, temperature):
    import torch

    import xentlib

    picked, entropy = xentlib.log_probs(
        torch.from_numpy(logits), torch.from_numpy(target), temperature=temperature, return_entropy=True
    )
    return torch.stack([picked, entropy])


# ------------------------------------------------------------------------------------------- policy_loss


def explain_policy_loss(console, example: PostTraining, decimals: int) -> None:
    from rich.table import Table

    fmt = lambda v: number(v, decimals)
    logits, target = np.asarray(example.logits, dtype=np.float64), np.asarray(example.target, dtype=np.int64)
    options = {k: np.asarray(v, dtype=np.float64) if isinstance(v, list) else v for k, v in example.options.items()}
    a, old, ref = options["advantages"], options["old_log_probs"], options["ref_log_probs"]
    eps, kl_coef = float(options["epsilon"]), float(options["kl_coef"])
    log_prob = reference.log_probs(logits, target).log_prob
    valid = target != -100
    terms = reference.policy_terms(log_prob, np.zeros_like(log_prob), valid, a, old, ref, epsilon=eps,
                                   kl_coef=kl_coef)  # fmt: skip
    console.print(
        f"{logits.shape[0]}x{logits.shape[1]} logits z of the sampled positions, sampled tokens {target.tolist()}, "
        f"clip range [{1 - eps:g}, {1 + eps:g}], kl_coef = {kl_coef:g}, reduction='mean'"
    )
    table = Table(title="per token (log p[t] from log_softmax, as in the log-probs example)", title_justify="left")
    headers = ("token", "log p[t]", "old log p", "r = exp(diff)", "clip(r)", "A", "pg = -min(rA, clip(r)A)",
               "kl (k3)", "loss_n", "d loss_n / d log p")  # fmt: skip
    for header in headers:
        table.add_column(header, justify="right")
    for n in range(len(target)):
        table.add_row(
            str(n), fmt(log_prob[n]), fmt(old[n]), fmt(terms.ratio[n]), fmt(terms.clipped[n]), fmt(a[n]),
            fmt(terms.surrogate[n]), fmt(terms.kl[n]), fmt(terms.loss[n]), fmt(terms.d_log_prob[n]),
        )  # fmt: skip
    print_table(console, table)
    console.print(
        "Where r A > clip(r) A the clipped term is the minimum: it does not depend on log p, so that token's\n"
        "surrogate gradient is 0 (only its KL term pulls); elsewhere d pg / d log p = -A r. The gradient wrt the\n"
        "logits is the log-probs example's with these per-token coefficients / N (docs/numerics.md, section 10)."
    )
    loss = float(terms.loss.sum() / valid.sum())
    console.print(f"\nreduction='mean': loss = sum of loss_n / {int(valid.sum())} tokens = {fmt(loss)}")
    checks = [
        ("torch (log_softmax, gather, TRL's GRPO loss)", lambda: torch_policy_loss(logits, target, a, old, ref, eps,
                                                                                   kl_coef)),  # fmt: skip
        ("xentlib.policy_loss", lambda: xentlib_policy_loss(logits, target, a, old, ref, eps, kl_coef)),
        ("xentlib.linear_policy_loss (identity head)",
         lambda: xentlib_policy_loss(logits, target, a, old, ref, eps, kl_coef, linear=True)),
    ]  # fmt: skip
    render_checks(console, np.float64(loss), checks, decimals, what="the loss")
    console.print(f"loss = {number(loss, max(decimals, 6))}  (xentlib.reference.policy_loss)")


def torch_policy_loss(logits, target, a, old, ref, eps, kl_coef):
    """The loss as TRL's GRPOTrainer computes it ('bnpo': the mean over tokens), in float64."""
    import torch

    log_p = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    logp = log_p.gather(-1, torch.from_numpy(target).unsqueeze(-1)).squeeze(-1)
    a, old, ref = (torch.from_numpy(v) for v in (a, old, ref))
    coef_1 = torch.exp(logp - old)
    per_token = -torch.min(coef_1 * a, torch.clamp(coef_1, 1 - eps, 1 + eps) * a)
    per_token = per_token + kl_coef * (torch.exp(ref - logp) - (ref - logp) - 1)
    return per_token.mean()


def xentlib_policy_loss(logits, target, a, old, ref, eps, kl_coef, linear=False):
    import torch

    import xentlib

    z, t = torch.from_numpy(logits), torch.from_numpy(target)
    per_token = dict(old_log_probs=torch.from_numpy(old), ref_log_probs=torch.from_numpy(ref), epsilon=eps,
                     kl_coef=kl_coef)  # fmt: skip
    if linear:
        eye = torch.eye(z.shape[1], dtype=torch.float64)
        return xentlib.linear_policy_loss(z, eye, t, torch.from_numpy(a), **per_token)
    return xentlib.policy_loss(z, t, torch.from_numpy(a), **per_token)


# ------------------------------------------------------------------------------------------ distillation


def explain_distillation(console, example: PostTraining, decimals: int) -> None:
    from rich.table import Table

    fmt = lambda v: number(v, decimals)
    student = np.asarray(example.logits, dtype=np.float64)
    teacher = np.asarray(example.options["teacher"], dtype=np.float64)
    beta, temperature = float(example.options.get("beta", 0.5)), float(example.options.get("temperature", 1.0))
    steps = reference.distillation_steps(student, teacher, beta=beta, temperature=temperature)
    rows = student.shape[0]
    console.print(
        f"{rows}x{student.shape[1]} student logits z_s and teacher logits z_t, beta = {beta:g}, "
        f"temperature T = {temperature:g}, reduction='batchmean'"
    )
    console.print(
        "p = softmax(z_s / T) (student), q = softmax(z_t / T) (teacher), m = beta q + (1 - beta) p\n"
        "(log m computed as logaddexp(log beta + log q, log(1 - beta) + log p), never from probabilities)"
    )
    p, q, m = np.exp(steps.log_p), np.exp(steps.log_q), np.exp(steps.log_m)
    for n in range(rows):
        table = Table(title=f"row {n}", title_justify="left")
        headers = ("class", "z_s", "z_t", "p", "q", "m", "p log(p / m)", "q log(q / m)", "d D / d z_s")
        for header in headers:
            table.add_column(header, justify="right")
        for v in range(student.shape[1]):
            table.add_row(
                str(v), fmt(student[n, v]), fmt(teacher[n, v]), fmt(p[n, v]), fmt(q[n, v]), fmt(m[n, v]),
                fmt(p[n, v] * (steps.log_p[n, v] - steps.log_m[n, v])),
                fmt(q[n, v] * (steps.log_q[n, v] - steps.log_m[n, v])), fmt(steps.grad[n, v]),
            )  # fmt: skip
        print_table(console, table)
        w_t, w_s = steps.weights
        console.print(
            f"  KL(q || m) = {fmt(steps.kl_teacher[n])}   KL(p || m) = {fmt(steps.kl_student[n])}\n"
            f"  D = {w_t:g} * KL(q || m) + {w_s:g} * KL(p || m) = {fmt(steps.divergence[n])}"
        )
    console.print(
        "beta = 0 is KL(q || p) and beta = 1 is KL(p || q) exactly (TRL's convention); the teacher gets no gradient;\n"
        "d D / d z_s = (1 - beta) p (log p - log m - KL(p || m)) / T (docs/numerics.md, section 11)."
    )
    total = float(steps.divergence.sum())
    loss = total / rows
    console.print("\nreduction='batchmean': loss = sum of the row divergences / number of rows")
    console.print(f"                        = {fmt(total)} / {rows} = {fmt(loss)}")
    checks = [
        ("torch (log_softmax, logsumexp, kl_div: TRL's GKD)", lambda: torch_gkd(student, teacher, beta, temperature)),
        ("xentlib.distillation_loss", lambda: xentlib_distillation(student, teacher, beta, temperature)),
        (
            "xentlib.linear_distillation_loss (identity head)",
            lambda: xentlib_linear_distillation(student, teacher, beta, temperature),
        ),
    ]
    render_checks(console, np.float64(loss), checks, decimals, what="the loss")
    console.print(f"loss = {number(loss, max(decimals, 6))}  (xentlib.reference.distillation)")


def torch_gkd(student, teacher, beta, temperature):
    """TRL's `GKDTrainer.generalized_jsd_loss` composition (0 < beta < 1), in float64, 'batchmean'."""
    import torch
    import torch.nn.functional as F

    log_p = F.log_softmax(torch.from_numpy(student) / temperature, dim=-1)
    log_q = F.log_softmax(torch.from_numpy(teacher) / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-b), log_q + torch.log(b)]), dim=0)
        kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        jsd = b * kl_q + (1 - b) * kl_p
    return jsd.sum() / jsd.shape[0]


def xentlib_distillation(student, teacher, beta, temperature):
    import torch

    import xentlib

    return xentlib.distillation_loss(
        torch.from_numpy(student), torch.from_numpy(teacher), beta=beta, temperature=temperature
    )


def xentlib_linear_distillation(student, teacher, beta, temperature):
    """The fused linear form with identity heads: x @ I.T is the logits themselves."""
    import torch

    import xentlib

    eye = torch.eye(student.shape[1], dtype=torch.float64)
    return xentlib.linear_distillation_loss(
        torch.from_numpy(student), eye, torch.from_numpy(teacher), eye, beta=beta, temperature=temperature
    )


# ---------------------------------------------------------------------------------------------- checks


def render_checks(console, steps_values, checks, decimals: int, what: str) -> None:
    from rich.table import Table

    table = Table(title=f"{what} from each implementation (float64)", title_justify="left")
    for header, justify in (("source", "left"), ("value", "right"), ("max |diff| vs steps", "right"), ("", "left")):
        table.add_column(header, justify=justify)
    shown = lambda values: numbers(values, max(decimals, 6))
    table.add_row("these steps (xentlib.reference, numpy)", shown(steps_values), "", "")
    for source, compute in checks:
        try:
            value = compute()
        except (ImportError, AttributeError, NotImplementedError):
            table.add_row(source, "", "", "not available")
            continue
        except Exception as error:  # show, do not hide
            table.add_row(source, "", "", f"{type(error).__name__}: {one_line(error)}")
            continue
        value = value.detach().double().numpy() if hasattr(value, "detach") else np.asarray(value)
        verdict = "agrees" if agrees(value, steps_values) else "DIFFERS"
        table.add_row(source, shown(value), f"{max_difference(value, steps_values):.1e}", verdict)
    print_table(console, table)
