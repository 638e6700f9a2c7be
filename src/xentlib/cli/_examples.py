"""Built-in examples for `xentlib explain --example NAME`.

Three kinds:
* `Worked` examples: small inputs that `explain` walks through step by step (the textbook numbers, weights,
  smoothing, ignore_index, probability targets, nll_loss, the binary losses, the fused linear layer).
* `Mistake` examples: a common way to call cross_entropy wrongly. Each holds the code that makes the mistake
  and the code that fixes it; `explain` executes both snippets for real with torch and shows what each
  produces (the error message or the wrong number), so the text on screen is exactly the code that ran.
* `PostTraining` examples: per-token log-probabilities and entropy (RL) and a distillation divergence (GKD),
  step by step from the reference's intermediates.

Plain data only: this module imports neither numpy nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Worked:
    """Arguments for the step-by-step explainer, as `xentlib explain` reads them from the command line."""

    name: str
    summary: str
    op: str
    logits: Any
    target: Any
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Mistake:
    """A common misuse: `setup` defines the tensors, `wrong` and `fix` each assign `loss` (or raise)."""

    name: str
    summary: str
    setup: str
    wrong: str
    fix: str
    why: str


TEXTBOOK_LOGITS = [[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]]

# One entry per example, each field by name: the entries look alike by design (data, not code to share).
WORKED = (
    Worked(
        name="textbook",
        summary="two rows, three classes: row losses 1.5210 and 0.6247, mean 1.073",
        op="cross_entropy",
        logits=TEXTBOOK_LOGITS,
        target=[0, 2],
        note="The classic worked example: row 0 puts little mass on its target class, row 1 a lot.",
    ),
    Worked(
        name="textbook-same-row",
        summary="one row of logits repeated three times, targets 0, 1, 2: mean 1.1142",
        op="cross_entropy",
        logits=[[0.1234, 0.5555, 0.3211]] * 3,
        target=[0, 1, 2],
        note="Same logits in every row: the mean over targets 0, 1, 2 is the average surprise of the row.",
    ),
    Worked(
        name="class-weights",
        summary="class weights: the mean divides by the summed weights of the targets, not by N",
        op="cross_entropy",
        logits=TEXTBOOK_LOGITS + [[1.2, -0.3, 0.4]],
        target=[0, 2, 1],
        options={"weight": [1.0, 2.0, 3.0]},
    ),
    Worked(
        name="label-smoothing",
        summary="label_smoothing=0.1: a little of every class's -log p joins the target's",
        op="cross_entropy",
        logits=TEXTBOOK_LOGITS,
        target=[0, 2],
        options={"label_smoothing": 0.1},
    ),
    Worked(
        name="ignore-index",
        summary="ignore_index=-100 skips a row: loss 0 there and the mean divides by the rows that count",
        op="cross_entropy",
        logits=TEXTBOOK_LOGITS + [[5.0, -2.0, 0.3]],
        target=[0, 2, -100],
    ),
    Worked(
        name="probability-target",
        summary="soft targets (a distribution per row): same shape as the logits",
        op="cross_entropy",
        logits=TEXTBOOK_LOGITS,
        target=[[0.7, 0.2, 0.1], [0.0, 0.25, 0.75]],
    ),
    Worked(
        name="nll",
        summary="nll_loss on log-probabilities: cross_entropy = nll_loss(log_softmax(logits))",
        op="nll_loss",
        logits=[[-1.5210, -1.3989, -0.6262], [-1.1444, -1.9228, -0.6247]],
        target=[0, 2],
        note="These are log_softmax(textbook logits) to 4 decimals: the loss matches the textbook example.",
    ),
    Worked(
        name="bce",
        summary="binary_cross_entropy on probabilities, one independent yes/no per element",
        op="bce",
        logits=[[0.9, 0.2, 0.6], [0.05, 0.7, 0.5]],
        target=[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
    ),
    Worked(
        name="bce-with-logits",
        summary="binary_cross_entropy_with_logits with pos_weight: the stable form on raw scores",
        op="bce_with_logits",
        logits=[[2.2, -1.4, 0.4], [-3.0, 0.8, 0.0]],
        target=[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
        options={"pos_weight": [1.0, 2.0, 0.5]},
    ),
    Worked(
        name="linear",
        summary="linear_cross_entropy: logits = input @ weight.T + bias, then cross_entropy",
        op="linear",
        logits=[[0.5, -1.0], [1.5, 0.25]],
        target=[2, 0],
        options={"linear_weight": [[0.3, -0.2], [-0.6, 0.1], [0.9, 0.4]], "bias": [0.1, 0.0, -0.1]},
    ),
    Worked(
        name="minus-inf",
        summary="a -inf logit (a masked class) on a non-target class: probability 0, loss still finite",
        op="cross_entropy",
        logits=[[1.0, "-inf", 0.5], [0.2, 0.3, 0.1]],
        target=[0, 2],
    ),
)

MISTAKE_SETUP = (
    "logits = torch.tensor([[4.0, 0.5, -1.0], [0.1, 5.0, 0.2]])  # raw scores from the model\n"
    "target = torch.tensor([0, 1])                               # class indices, int64"
)

MISTAKES = (
    Mistake(
        name="mistake-probabilities",
        summary="passing probabilities (softmax output) to cross_entropy",
        setup=MISTAKE_SETUP,
        wrong="probs = logits.softmax(dim=1)\nloss = F.cross_entropy(probs, target)",
        fix="loss = F.cross_entropy(logits, target)",
        why="cross_entropy applies log_softmax itself. Probabilities lie in [0, 1], so their softmax is never"
        " confident: with 3 classes even a perfect prediction scores log(1 + 2/e) = 0.551, and the "
        "gradients shrink as the model improves.",
    ),
    Mistake(
        name="mistake-log-probabilities",
        summary="passing log-probabilities (log_softmax output) to cross_entropy",
        setup=MISTAKE_SETUP,
        wrong="log_probs = logits.log_softmax(dim=1)\nloss = F.cross_entropy(log_probs, target)",
        fix="loss = F.cross_entropy(logits, target)\n# or, if the model already returns log-probabilities:\n"
        "loss_nll = F.nll_loss(logits.log_softmax(dim=1), target)",
        why="Harmless for the number (log_softmax of log-probabilities changes nothing, since their logsumexp"
        " is 0) but it normalizes twice. Keep one: cross_entropy on logits, or nll_loss on log-"
        "probabilities.",
    ),
    Mistake(
        name="mistake-logits-to-nll",
        summary="passing raw logits to nll_loss",
        setup=MISTAKE_SETUP,
        wrong="loss = F.nll_loss(logits, target)",
        fix="loss = F.nll_loss(logits.log_softmax(dim=1), target)  # = F.cross_entropy(logits, target)",
        why="nll_loss only picks -input[n, target[n]]; it never normalizes. On raw logits it rewards making "
        "the target logit large without lowering the others, and the 'loss' can be negative.",
    ),
    Mistake(
        name="mistake-btc",
        summary="(B, T, C) logits from a sequence model passed as they are",
        setup="B, T, C = 2, 3, 5\nlogits = torch.randn(B, T, C, generator=torch.Generator().manual_seed(0))\n"
        "target = torch.randint(0, C, (B, T), generator=torch.Generator().manual_seed(1))",
        wrong="loss = F.cross_entropy(logits, target)",
        fix="loss = F.cross_entropy(logits.view(-1, C), target.view(-1))\n"
        "# same number: put the classes in dim 1\nloss_t = F.cross_entropy(logits.transpose(1, 2), target)",
        why="cross_entropy takes the classes in dim 1: (N, C) or (N, C, d1, ...). A (B, T, C) tensor is read "
        "as B rows of T classes at C positions, so the target shape (B, T) does not fit.",
    ),
    Mistake(
        name="mistake-btc-silent",
        summary="(B, T, C) logits with T == C: no error, wrong number",
        setup="B, T, C = 2, 4, 4\nlogits = torch.randn(B, T, C, generator=torch.Generator().manual_seed(0))\n"
        "target = torch.randint(0, C, (B, T), generator=torch.Generator().manual_seed(1))",
        wrong="loss = F.cross_entropy(logits, target)",
        fix="loss = F.cross_entropy(logits.view(-1, C), target.view(-1))",
        why="When T happens to equal C the shapes fit, so torch normalizes over the time axis instead of the "
        "classes. Nothing fails; the model just learns the wrong thing. Flatten to (B*T, C) explicitly.",
    ),
    Mistake(
        name="mistake-float-target",
        summary="class indices stored as floats",
        setup="logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 3.0, 0.2]])\ntarget = torch.tensor([0.0, 1.0])",
        wrong="loss = F.cross_entropy(logits, target)",
        fix="loss = F.cross_entropy(logits, target.long())",
        why="A target with one entry per row is a class index and must be int64 (uint8 also works for 2-D "
        "logits). Only a target with the logits' own shape is read as probabilities, and that one is "
        "float.",
    ),
    Mistake(
        name="mistake-int32-target",
        summary="class indices as int32 (e.g. straight from numpy on some platforms)",
        setup="logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 3.0, 0.2]])\n"
        "target = torch.tensor([0, 1], dtype=torch.int32)",
        wrong="loss = F.cross_entropy(logits, target)",
        fix="loss = F.cross_entropy(logits, target.long())",
        why="The class-index path accepts int64 (and uint8 for 2-D logits) only; int32 is rejected.",
    ),
    Mistake(
        name="mistake-one-hot-long",
        summary="one-hot integer targets",
        setup=MISTAKE_SETUP + "\none_hot = F.one_hot(target, num_classes=3)  # int64, shape (2, 3)",
        wrong="loss = F.cross_entropy(logits, one_hot)",
        fix="loss = F.cross_entropy(logits, one_hot.argmax(dim=1))  # class indices\n"
        "loss_p = F.cross_entropy(logits, one_hot.float())         # or probabilities",
        why="A target with the logits' shape means class probabilities, which must be floating point. Pass "
        "the indices, or convert the one-hot rows to float.",
    ),
)


@dataclass(frozen=True)
class PostTraining:
    """A post-training quantity walked through step by step: `log_probs` (per-token log p(target) and entropy,
    the inputs of an RL policy-gradient loss) or `distillation` (GKD's divergence of a student from a teacher)."""

    name: str
    summary: str
    op: str  # "log_probs", "policy_loss" or "distillation"
    logits: Any  # (N, V); the student's for distillation
    target: Any = None  # (N,) class indices for log_probs
    options: dict[str, Any] = field(default_factory=dict)  # temperature; policy_loss: advantages, ...; teacher, beta
    note: str = ""


POST_TRAINING = (
    PostTraining(
        name="log-probs",
        summary="per-token log p(target) and entropy at temperature 0.7 (the inputs of GRPO/PPO losses)",
        op="log_probs",
        logits=[[2.0, 0.5, -1.0, 0.1], [0.3, 0.2, 1.1, -0.4]],
        target=[0, 3],
        options={"temperature": 0.7},
        note="An RL trainer scores the sampled tokens with log p(target) and adds the entropy as a bonus.",
    ),
    PostTraining(
        name="policy-loss",
        summary="PPO/GRPO's clipped surrogate on three sampled tokens, one ratio clipped, with a KL to a reference",
        op="policy_loss",
        logits=[[2.0, 0.5, -1.0, 0.1], [0.3, 0.2, 1.1, -0.4], [1.2, -0.3, 0.4, 0.9]],
        target=[0, 3, 2],
        options={
            "advantages": [1.0, -0.5, 0.8],
            "old_log_probs": [-0.45, -2.1, -1.95],
            "ref_log_probs": [-0.30, -2.4, -1.5],
            "epsilon": 0.2,
            "kl_coef": 0.05,
        },
        note="The policy's new log p over the sampling policy's gives the ratio r; PPO clips r A so one step cannot "
        "move a token's probability far.",
    ),
    PostTraining(
        name="distillation",
        summary="GKD's generalized Jensen-Shannon divergence, beta=0.5, of a student from a teacher",
        op="distillation",
        logits=[[1.0, 0.2, -0.5, 0.0], [0.1, 1.5, -0.3, 0.4]],
        options={"teacher": [[2.0, -0.2, -1.0, 0.3], [0.0, 0.8, 0.6, -0.1]], "beta": 0.5, "temperature": 1.0},
        note="The student p is pulled towards the teacher q through their mixture m = beta q + (1 - beta) p.",
    ),
)

EXAMPLES: dict[str, Worked | Mistake | PostTraining] = {
    example.name: example for example in WORKED + MISTAKES + POST_TRAINING
}
