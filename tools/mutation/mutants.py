"""The named mutants: one plausible bug each, the exact text it replaces, and the tests that should catch it.

`file` is relative to src/xentlib/; `old` must occur exactly `count` times (None: at least once, all replaced).
`tests` are pytest arguments run from the repository root; keep each selection under about a minute on a busy
2-core machine (a node id, or a file with -k).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: list[str]
    why: str = ""
    count: int | None = 1


F = "tests/test_functional.py"
L = "tests/test_linear.py"
E = "tests/test_errors.py"
K = "tests/backends/test_cpu_kernel.py"
A = "tests/test_accuracy.py"
T = "tests/backends/test_triton.py"

MUTANTS: list[Mutant] = [
    Mutant(
        "c-distillation-mixture-ratio-halved",
        "backends/cpu_post_training.c",
        "vf ratio = blend(big > (vf){}, small / big, (vf){});",
        "vf ratio = blend(big > (vf){}, small / big * 0.5f, (vf){});",
        ["tests/test_distillation.py", "-k", "both_cpu and kernel"],
        "log m's exact path (lanes where the mixture underflows) with the smaller term's ratio halved",
    ),
    Mutant(
        "c-policy-sweep-kl-sign-flipped",
        "backends/cpu_post_training.c",
        "if (a->kl_coef != 0.0f) d += a->kl_coef * (1.0f - expf(a->ref_log_probs[r] - l));",
        "if (a->kl_coef != 0.0f) d += a->kl_coef * (1.0f - expf(a->ref_log_probs[r] + l));",
        ["tests/test_policy_loss.py", "-k", "one_sweep"],
        "the policy sweep's KL derivative with the sign of l flipped",
    ),
    Mutant(
        "c-policy-sweep-clip-ignored",
        "backends/cpu_post_training.c",
        "float d = ratio * advantage <= clipped * advantage ? -advantage * ratio : 0.0f;",
        "float d = -advantage * ratio;",
        ["tests/test_policy_loss.py", "-k", "one_sweep"],
        "the policy sweep's surrogate gradient without the clip (every token as if unclipped)",
    ),
    Mutant(
        "c-policy-sweep-entropy-term-dropped",
        "backends/cpu_post_training.c",
        "        if (h != 0.0f) {\n            vf u = load_lanes(row, dtype, c, classes);",
        "        if (0) {\n            vf u = load_lanes(row, dtype, c, classes);",
        ["tests/test_policy_loss.py", "-k", "one_sweep"],
        "the policy sweep's gradient without the entropy term off the target",
    ),
    # ---------------------------------------------------------------- the traced Triton op
    Mutant(
        "traced-op-always-opaque",
        "backends/ops.py",
        'if logits.device.type == "cpu" or not _TRITON_INSTALLED or torch.compiler.is_exporting():',
        "if True:",
        ["tests/backends/test_triton_traced.py", "-k", "launches_our_kernels"],
        "a traced accelerator call records the opaque custom op: Inductor never sees the Triton kernels",
    ),
    Mutant(
        "traced-launch-not-wrapped",
        "backends/triton/ops.py",
        "return wrap_triton(kernel) if traced() else kernel",
        "return kernel",
        ["tests/backends/test_triton_traced.py", "-k", "launches_our_kernels"],
        "the launches are not wrapped: tracing the op would run the kernel on fake tensors",
    ),
    # ---------------------------------------------------------------- distributed
    Mutant(
        "dist-max-to-min",
        "distributed/_shard.py",
        "op=dist.ReduceOp.MAX",
        "op=dist.ReduceOp.MIN",
        ["tests/distributed/test_shard_extremes.py", "-k", "large"],
        "every ReduceOp.MAX -> MIN: the row max shift becomes the row min (exact in maths, overflows at scale)",
        count=None,
    ),
    Mutant(
        "dist-smoothing-over-local-vocab",
        "distributed/_shard.py",
        'loss = (1.0 - eps) * loss + (eps / vocab) * (w_sum * log_s - stats["smooth_d"])',
        'loss = (1.0 - eps) * loss + (eps / sp.local_size) * (w_sum * log_s - stats["smooth_d"])',
        ["tests/distributed/test_shard_extremes.py", "-k", "not large"],
        "label smoothing divided by the shard's class count instead of the global vocabulary",
    ),
    Mutant(
        "dist-prob-mean-over-shard",
        "distributed/_shard.py",
        "return torch.tensor(float(target_weight.numel()), dtype=sp.acc, device=target_weight.device)",
        "return rules.denominator",
        ["tests/distributed/test_shard_extremes.py", "-k", "not large"],
        "probability-target 'mean' divided by the shard's numel / C_r (0 / 0 on an empty shard)",
    ),
    Mutant(
        "dist-count-tokens-local",
        "distributed/tokens.py",
        "dist.all_reduce(count_and_errors, op=dist.ReduceOp.SUM, group=group)",
        "pass",
        ["tests/distributed/test_token_normalizer.py", "-k", "count_tokens_over_ranks"],
        "count_tokens forgets the all-reduce: each rank divides by its own count",
    ),
    # ---------------------------------------------------------------- the C kernel
    Mutant(
        "c-bf16-truncate",
        "backends/cpu_rows.h",
        "vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;",
        "vu rounded = u >> 16;",
        [K, "-k", "rounded_to_nearest or rounded_once"],
        "bfloat16 results truncated instead of rounded to nearest even",
    ),
    Mutant(
        "c-lse-minus-target",
        "backends/cpu_rows.c",
        "row_loss = prob.keep * w_t * (log_s - (load_scalar(row, dtype, t) - m));",
        "row_loss = prob.keep * w_t * (lse - load_scalar(row, dtype, t));",
        [f"{A}::test_tied_large_logits", f"{A}::test_float32_accuracy_at_large_logits"],
        "the loss formed as lse - y_t (cancels at large logits) instead of log s - (y_t - m)",
    ),
    Mutant(
        "c-zloss-grad-doubled",
        "backends/cpu_rows.c",
        "q_sum += 2.0f * z_loss * lse;",
        "q_sum += 4.0f * z_loss * lse;",
        [K, "-k", "matches_the_pytorch_ops"],
        "z-loss coefficient doubled in the gradient only (the loss is right)",
    ),
    Mutant(
        "c-smoothing-grad-unscaled",
        "backends/cpu_rows.c",
        "smooth = scale * prob.spread;",
        "smooth = prob.spread;",
        [K, "-k", "matches_the_pytorch_ops"],
        "the smoothing part of the gradient not multiplied by the reduction's scale",
    ),
    Mutant(
        "c-entropy-sign",
        "backends/cpu_rows.c",
        "entropy_out[r] = log_s - sums.expected_gap / sums.exp_sum;",
        "entropy_out[r] = log_s + sums.expected_gap / sums.exp_sum;",
        [K, "-k", "matches_the_pytorch_ops"],
        "entropy = log s + E[y - m] instead of log s - E[y - m]",
    ),
    Mutant(
        "c-exp-cutoff-80",
        "backends/cpu_rows.h",
        "vi tiny = x < splat(-87.0f);\n    x = blend(tiny, splat(-87.0f), x);",
        "vi tiny = x < splat(-80.0f);\n    x = blend(tiny, splat(-80.0f), x);",
        [f"{K}::test_exp_accuracy_over_the_whole_range"],
        "exp flushed to zero below -80 instead of -87",
    ),
    Mutant(
        "c-argmax-last-tie",
        "backends/cpu_rows.c",
        "for (int64_t c = 0; c < classes; c++)\n        if (scratch[c] == value",
        "for (int64_t c = classes - 1; c >= 0; c--)\n        if (scratch[c] == value",
        [f"{F}::test_return_stats", "tests/test_stats_ties.py"],
        "arg-max ties resolved to the last class (torch: the first)",
    ),
    # ---------------------------------------------------------------- the PyTorch backend
    Mutant(
        "torch-smoothing-eps-x1.2",
        "backends/torch_chunked.py",
        "loss = (1.0 - eps) * loss + (eps / classes) * smooth",
        "loss = (1.0 - eps) * loss + (eps * 1.2 / classes) * smooth",
        [f"{L}::test_options_match_torch_and_reference", "-k", "smoothing"],
        "the smoothing term of the loss uses 1.2 eps",
    ),
    Mutant(
        "torch-zloss-grad-doubled",
        "backends/torch_chunked.py",
        "coef = q_sum + 2.0 * problem.z_loss * lse if problem.z_loss else q_sum",
        "coef = q_sum + 4.0 * problem.z_loss * lse if problem.z_loss else q_sum",
        [f"{L}::test_options_match_torch_and_reference", "-k", "z_loss"],
        "z-loss coefficient doubled in the gradient only",
    ),
    Mutant(
        "torch-softcap-slope",
        "backends/torch_chunked.py",
        "y.div_(cap).square_().neg_().add_(1.0)",
        "y.div_(cap).neg_().add_(1.0)",
        [f"{L}::test_options_match_torch_and_reference", "-k", "softcap"],
        "softcap derivative 1 - t instead of 1 - t^2",
    ),
    Mutant(
        "torch-bce-clamp-50",
        "backends/bce.py",
        "clamp_min_(-100.0)",
        "clamp_min_(-50.0)",
        [f"{F}::test_binary_cross_entropy_clamp_and_grad_eps"],
        "binary_cross_entropy clamps its logs at -50 instead of -100",
        count=2,
    ),
    Mutant(
        "torch-target-slot-unscaled",
        "backends/torch_chunked.py",
        "p.scatter_add_(1, target, -(1.0 - eps) * scale * w_t)",
        "p.scatter_add_(1, target, -(1.0 - eps) * w_t)",
        [f"{L}::test_options_match_torch_and_reference", "-k", "plain"],
        "the target slot of the gradient not scaled by the reduction",
    ),
    Mutant(
        "torch-ignored-rows-not-zeroed",
        "backends/torch_chunked.py",
        "p.masked_fill_(~valid, 0.0)",
        "p",
        [f"{F}::test_cross_entropy_non_finite_in_ignored_row_does_not_leak", f"{F}::test_cross_entropy_ignore_index"],
        "the gradient of ignored rows left as softmax (torch's op for float64 and softcap)",
    ),
    Mutant(
        "torch-prob-smoothing-uniform-dropped",
        "backends/torch_chunked.py",
        "q.mul_(1.0 - eps).add_(eps / classes)",
        "q.mul_(1.0 - eps)",
        [f"{L}::test_options_match_torch_and_reference", "-k", "prob and smoothing"],
        "probability targets smoothed without the uniform eps / C part",
    ),
    Mutant(
        "torch-entropy-sign",
        "backends/torch_chunked.py",
        "(-torch.special.xlogy(p, p).sum(1, keepdim=True))",
        "(torch.special.xlogy(p, p).sum(1, keepdim=True))",
        [f"{L}::test_return_stats_values_and_gradients"],
        "entropy with the wrong sign",
    ),
    # ---------------------------------------------------------------- Triton (runs in the interpreter on CPU)
    Mutant(
        "triton-smoothing-eps-x1.2",
        "backends/triton/rowmath.py",
        "        loss += smoothing / C * (w_sum * log_s + w_gap)",
        "        loss += smoothing * 1.2 / C * (w_sum * log_s + w_gap)",
        [f"{T}::test_row_kernel_matches_float64", "tests/backends/test_triton_tiled.py", "-k", "smooth"],
        "label smoothing 1.2 eps in the shared Triton row maths (row, tile and tiled linear kernels)",
    ),
    Mutant(
        "triton-softcap-slope",
        "backends/triton/rowmath.py",
        "slope = 1.0 - r * r",
        "slope = 1.0 - r",
        [f"{T}::test_row_kernel_matches_float64", "-k", "softcap"],
        "softcap derivative 1 - t instead of 1 - t^2 in every Triton kernel",
    ),
    # ---------------------------------------------------------------- linear_cross_entropy
    Mutant(
        "linear-prob-smoothing-halved",
        "linear.py",
        "    norm = sem.normalizer_from_operands(normalizer, normalizer_value)\n",
        "    norm = sem.normalizer_from_operands(normalizer, normalizer_value)\n"
        "    if target.is_floating_point():\n"
        "        scalars = (*scalars[:2], scalars[2] / 2, *scalars[3:])\n",
        [f"{L}::test_options_match_torch_and_reference", "-k", "prob and smoothing"],
        "eps 0.1 -> 0.05 for probability targets in the linear sweep",
    ),
    Mutant(
        "linear-pad-with-a-valid-row",
        "linear.py",
        "ignored = (~valid).nonzero()[:1]",
        "ignored = valid.nonzero()[:1]",
        [f"{L}::test_chunk_sizes_agree", f"{L}::test_options_match_torch_and_reference", "-k", "ignore"],
        "the chunk padding repeats a valid row (counted twice) instead of an ignored one",
    ),
    Mutant(
        "linear-bias-grad-overwritten",
        "linear.py",
        "db += grad_z.sum(0, dtype=db.dtype)",
        "db.copy_(grad_z.sum(0, dtype=db.dtype))",
        [f"{L}::test_options_match_torch_and_reference", "-k", "plain"],
        "the bias gradient of each chunk overwrites the previous chunks'",
    ),
    Mutant(
        "linear-weight-grad-never-first",
        "linear.py",
        "first=start == 0)",
        "first=False)",
        [f"{L}::test_uninitialized_gradient_memory_is_overwritten"],
        "the weight gradient accumulated into uninitialized memory",
    ),
    Mutant(
        "linear-shift-wrong-rows",
        "_semantics/linear.py",
        "input_rows = positions[..., :-1].reshape(-1)",
        "input_rows = positions[..., 1:].reshape(-1)",
        [f"{L}::test_shift_matches_slicing"],
        "shift=True reads positions 1.. instead of 0..T-2",
    ),
    # ---------------------------------------------------------------- the semantic core
    Mutant(
        "sem-weighted-mean-count",
        "_semantics/cross_entropy.py",
        "count = target_weight.sum()",
        "count = valid.sum().to(acc)",
        [f"{F}::test_cross_entropy_index", "-k", "mean"],
        "weighted 'mean' divided by the count of valid rows instead of the sum of their weights",
    ),
    Mutant(
        "sem-ignore-mask-dropped",
        "_semantics/cross_entropy.py",
        "        valid = index != ignore_index\n        if not check_targets:",
        "        valid = torch.ones_like(index, dtype=torch.bool)\n        if not check_targets:",
        [f"{F}::test_cross_entropy_ignore_index"],
        "the ignore mask dropped: every row counted",
    ),
    Mutant(
        "sem-prob-mean-denominator",
        "_semantics/cross_entropy.py",
        "count = batch * spatial if classes else math.nan",
        "count = batch * spatial * classes if classes else math.nan",
        [f"{F}::test_cross_entropy_probabilities", "-k", "mean"],
        "probability-target 'mean' divided by numel instead of numel / C",
    ),
    Mutant(
        "sem-class-bound-off-by-one",
        "_semantics/cross_entropy.py",
        "out_of_range = valid & ((index < 0) | (index >= classes))",
        "out_of_range = valid & ((index < 0) | (index > classes))",
        [E],
        "a target equal to C accepted as a class index",
    ),
    Mutant(
        "sem-negative-targets-accepted",
        "_semantics/cross_entropy.py",
        "out_of_range = valid & ((index < 0) | (index >= classes))",
        "out_of_range = valid & (index >= classes)",
        [E],
        "negative class indices (other than ignore_index) not checked",
    ),
    Mutant(
        "sem-smoothing-1-rejected",
        "_semantics/arguments.py",
        "    if eps > 1.0:\n",
        "    if eps >= 1.0:\n",
        [f"{E}::test_accepted_label_smoothing_values_do_not_raise"],
        "label_smoothing=1.0 rejected (torch accepts [0, 1])",
    ),
    Mutant(
        "sem-legacy-or",
        "_semantics/arguments.py",
        "if size_average and reduce:",
        "if size_average or reduce:",
        [f"{F}::test_legacy_reduction_arguments"],
        "legacy size_average=False, reduce=True read as 'mean'",
    ),
    Mutant(
        "sem-normalizer-ignored",
        "_semantics/cross_entropy.py",
        "    elif normalizer is not None:\n        value = normalizer",
        "    elif normalizer is not None:\n        value = 1.0",
        [f"{F}::test_normalizer_divides_the_sum"],
        "normalizer accepted but not applied",
    ),
    Mutant(
        "sem-normalizer-with-mean",
        "_semantics/arguments.py",
        'if reduction != "sum":',
        'if reduction == "none":',
        [f"{F}::test_normalizer_only_with_sum", f"{L}::test_normalizer_needs_reduction_sum"],
        "normalizer accepted with reduction='mean'",
    ),
    Mutant(
        "sem-float64-accumulates-in-float32",
        "_semantics/arguments.py",
        "return torch.float64 if torch.float64 in dtypes else torch.float32",
        "return torch.float32",
        [f"{F}::test_cross_entropy_index", "-k", "dtype0 and mean"],  # dtype0: float64
        "float64 inputs accumulated in float32",
    ),
    Mutant(
        "sem-prob-ignore-index-zero",
        "_semantics/cross_entropy.py",
        '    if ignore_index >= 0:\n        raise RuntimeError(\n            f"ignore_index is not supported',
        '    if ignore_index > 0:\n        raise RuntimeError(\n            f"ignore_index is not supported',
        [E],
        "ignore_index=0 accepted with probability targets (torch raises for any ignore_index >= 0)",
    ),
    Mutant(
        "sem-uint8-3d",
        "_semantics/cross_entropy.py",
        "if target.dtype == torch.uint8 and input.dim() <= 2:",
        "if target.dtype == torch.uint8:",
        [E],
        "uint8 class indices accepted for N-d inputs (torch: only 1-D and 2-D)",
    ),
    # ---------------------------------------------------------------- more: composite, ops, threads, precision
    Mutant(
        "composite-smoothing-eps-x1.2",
        "backends/composite.py",
        "loss = (1.0 - eps) * loss + (eps / classes) * smooth",
        "loss = (1.0 - eps) * loss + (eps * 1.2 / classes) * smooth",
        [
            f"{L}::test_gradcheck_and_gradgradcheck",
            "tests/test_runtime.py::test_torch_func_grad_vmap_jacrev",
            "tests/test_runtime.py::test_forward_mode_ad",
        ],
        "label smoothing 1.2 eps in the composite (torch.func, forward-mode AD, double backward)",
    ),
    Mutant(
        "composite-grad-output-ignored",
        "backends/composite.py",
        "return buffer.mul_(grad_loss.to(buffer.dtype))",
        "return buffer",
        [f"{F}::test_cross_entropy_index", "-k", "dtype1 and mean"],  # dtype1: float32
        "the saved float32 gradient not multiplied by grad_output",
    ),
    Mutant(
        "ops-rounded-once-scale-dropped",
        "backends/ops.py",
        "problem.grad_scale = problem.grad_scale * grad_output.to(problem.grad_scale.dtype)",
        "problem.grad_scale = problem.grad_scale",
        ["tests/test_precision.py::test_half_precision_gradient_is_rounded_once_for_any_grad_output"],
        "the half-precision gradient recomputed without grad_output folded in",
    ),
    Mutant(
        "torch-lse-sign",
        "backends/torch_chunked.py",
        "lse = y_best - log_p.gather(1, best)",
        "lse = y_best + log_p.gather(1, best)",
        [f"{F}::test_return_stats", "-k", "dtype0"],  # dtype0: float64 (the PyTorch ops)
        "lse = y_a + log p_a (log p_a <= 0, so the wrong side of y_a)",
    ),
    Mutant(
        "c-horizontal-running-sum",
        "backends/cpu_rows.h",
        "    for (int width = LANES / 2; width >= 1; width /= 2)\n"
        "        for (int lane = 0; lane < width; lane++) v[lane] += v[lane + width];\n",
        "    for (int lane = 1; lane < LANES; lane++) v[0] += v[lane];\n",
        [f"{A}::test_tied_large_logits", f"{A}::test_float32_accuracy_at_large_logits", "-k", "cpu-kernel or tied"],
        "the lanes summed left to right instead of as a tree (rounding only)",
    ),
    Mutant(
        "c-thread-part-short",
        "backends/cpu_rows.c",
        "rows * k / threads, rows * (k + 1) / threads,",
        "rows * k / threads, rows * (k + 1) / threads - (k + 1 < threads),",
        [f"{K}::test_many_rows_split_over_threads_equal_one_thread"],
        "the last row of every thread's part but the last is never computed",
    ),
    Mutant(
        "linear-row-scale-dropped",
        "linear.py",
        "grad_logits.mul_(row_scale[rows].to(grad_logits.dtype).unsqueeze(1))",
        "pass",
        [f"{L}::test_options_match_torch_and_reference", "-k", "plain and none"],
        "reduction='none': per-row grad_output not applied in the second sweep",
    ),
    Mutant(
        "dist-linear-dx-not-reduced",
        "distributed/linear.py",
        "dist.all_reduce(self.dx, op=dist.ReduceOp.SUM, group=group)",
        "pass",
        ["tests/distributed/test_vocab_parallel_linear.py::test_linear_matches_unsharded"],
        "the input gradient of vocab-parallel linear not summed over the shards",
    ),
    Mutant(
        "sem-negative-zloss-accepted",
        "_semantics/arguments.py",
        "not 0 <= z_loss < math.inf",
        "not z_loss < math.inf",
        [f"{F}::test_invalid_extension_arguments"],
        "a negative z_loss accepted",
    ),
    Mutant(
        "triton-bf16-truncate",
        "backends/triton/rowmath.py",
        "bits = bits + 0x7FFF + ((bits >> 16) & 1)",
        "bits = bits",
        [f"{T}::test_low_precision_at_least_as_accurate_as_torch", "-k", "dtype0"],  # dtype0: bfloat16
        "Triton bfloat16 results truncated instead of rounded (the interpreter's software rounding)",
    ),
    # ---------------------------------------------------------------- subtler: shifts, NaN rules, tiny constants
    Mutant(
        "dist-softcap-max-uncapped",
        "distributed/_shard.py",
        "    if softcap is not None:\n        m = softcap * torch.tanh(m / softcap)\n",
        "",
        ["tests/distributed/test_shard_extremes.py", "tests/distributed/test_shard_softcap.py"],
        "with softcap, the rows are shifted by the max of the UNcapped logits (exact in maths; exp underflows when "
        "the raw logits are far above the cap)",
    ),
    Mutant(
        "c-nan-row-not-detected",
        "backends/cpu_rows.h",
        "return any_nan ? NAN : m;",
        "return m;",
        [K, "-k", "non_finite"],
        "a NaN logit that is not the row's max leaves the row finite",
    ),
    Mutant(
        "c-argmax-of-nan-row",
        "backends/cpu_rows.c",
        "if (scratch[c] == value || (value != value && scratch[c] != scratch[c])) return c;",
        "if (scratch[c] == value) return c;",
        [K, "-k", "non_finite"],
        "the arg-max of a NaN row is 0 instead of the first NaN (torch.argmax)",
    ),
    Mutant(
        "torch-bce-grad-eps-1e-12",
        "backends/bce.py",
        "BCE_GRAD_EPS = 9.999999960041972e-13",
        "BCE_GRAD_EPS = 1e-12",
        [f"{F}::test_binary_cross_entropy_clamp_and_grad_eps", f"{F}::test_binary_cross_entropy"],
        "the BCE gradient's eps as the float64 1e-12 instead of torch's float32(1e-12)",
    ),
    Mutant(
        "torch-bce-logits-unstable-softplus",
        "backends/bce.py",
        "softplus_neg = torch.log1p(torch.exp(-x.abs())) + (-x).clamp_min(0.0)",
        "softplus_neg = torch.log1p(torch.exp(-x))",
        [f"{F}::test_bce_with_logits_extreme_and_non_finite"],
        "softplus(-x) as log1p(exp(-x)) (overflows for x << 0)",
    ),
    Mutant(
        "linear-half-accumulator-not-zeroed",
        "linear.py",
        "    if first:\n        acc.zero_()\n",
        "",
        [f"{T}::test_linear_bfloat16_close_to_float64", f"{T}::test_linear_chunks_match_float64"],
        "the float32 weight-gradient accumulator of the Triton path (half inputs) starts from uninitialized memory",
    ),
    Mutant(
        "sem-nan-smoothing-passes",
        "_semantics/arguments.py",
        "    if not value > 0.0:  # also NaN",
        "    if value <= 0.0:",
        [f"{E}::test_accepted_label_smoothing_values_do_not_raise", f"{F}::test_label_smoothing"],
        "label_smoothing=NaN kept (torch: NaN means no smoothing)",
    ),
    # ---------------------------------------------------------------- argument bounds
    Mutant(
        "sem-ignore-index-upper-bound",
        "_semantics/arguments.py",
        "if not -(2**63) <= value < 2**63:",
        "if not -(2**63) <= value <= 2**63:",
        [E, "-k", "ignore_index", "tests/test_argument_bounds.py"],
        "ignore_index = 2**63 accepted (torch: Overflow, it does not fit in int64)",
    ),
    Mutant(
        "sem-ignore-index-lower-bound",
        "_semantics/arguments.py",
        "if not -(2**63) <= value < 2**63:",
        "if not -(2**63) - 1 <= value < 2**63:",
        [E, "-k", "ignore_index", "tests/test_argument_bounds.py"],
        "ignore_index = -2**63 - 1 accepted (torch: Overflow)",
    ),
    # ---------------------------------------------------------------- the common call and the post-training kernels
    Mutant(
        "c-common-mean-over-all-rows",
        "backends/cpu_rows.c",
        ".scale = c->mean ? 1.0f / (float)count : 1.0f,",
        ".scale = c->mean ? 1.0f / (float)rows : 1.0f,",
        ["tests/backends/test_common_call.py", "-k", "same_bits"],
        "the short path's gradient scaled by 1 / rows for 'mean', ignored rows counted",
    ),
    Mutant(
        "common-mean-ignores-count",
        "backends/common_call.py",
        "return row_loss.mean() if call.count == rows else row_loss.sum().div_(call.count)",
        "return row_loss.mean()",
        ["tests/backends/test_common_call.py", "-k", "same_bits"],
        "the short path's 'mean' divides by all rows, ignored ones too",
    ),
    Mutant(
        "c-log-probs-target-entropy-term",
        "backends/cpu_post_training.c",
        "p_t * (g + h * (log_p_t + entropy))",
        "p_t * (g + h * log_p_t)",
        ["tests/test_log_probs.py", "-k", "both_cpu_paths"],
        "the entropy's gradient at the target class without + H",
    ),
    Mutant(
        "c-distillation-weight-dropped",
        "backends/cpu_post_training.c",
        "(general ? 1.0f - beta : 1.0f) / temperature;",
        "1.0f / temperature;",
        ["tests/test_distillation.py", "-k", "both_cpu_paths"],
        "the student's gradient for 0 < beta < 1 without its (1 - beta) weight",
    ),
    # ---------------------------------------------------------------------------------------- the policy loss
    Mutant(
        "policy-clipped-token-keeps-gradient",
        "policy.py",
        "d_log_prob = torch.where(ratio.detach() * a <= clipped.detach() * a, -a * ratio.detach(), 0.0)",
        "d_log_prob = -a * ratio.detach()",
        ["tests/test_policy_loss.py", "-k", "explicit_derivatives or linear_policy_loss_matches"],
        "a clipped token's surrogate still pulls on log p in the fused op (PPO's clip ignored in the gradient)",
    ),
    Mutant(
        "policy-kl-derivative-sign",
        "policy.py",
        "d_log_prob = d_log_prob + call.kl_coef * (1.0 - delta.detach().exp())",
        "d_log_prob = d_log_prob + call.kl_coef * (delta.detach().exp() - 1.0)",
        ["tests/test_policy_loss.py", "-k", "explicit_derivatives or linear_policy_loss_matches"],
        "the k3 KL's gradient with the wrong sign: the policy pushed away from the reference",
    ),
    Mutant(
        "policy-mean-over-all-tokens",
        "policy.py",
        "weights = torch.where(valid, 1.0 if call.token_weight is None else call.token_weight, zero)",
        "weights = torch.ones_like(valid, dtype=zero.dtype) if call.token_weight is None else call.token_weight",
        ["tests/test_policy_loss.py", "-k", "matches_reference"],
        "'mean' divides by every token, prompt and padding too, and ignored tokens' weights count",
    ),
    Mutant(
        "policy-kernel-sweep-unnormalized",
        "backends/cpu_post_training.c",
        "vf p = e * splat(inv_s), coef = splat(g);",
        "vf p = e, coef = splat(g);",
        ["tests/test_policy_loss.py", "-k", "cpu_kernel or onednn or bfloat16"],
        "the policy sweep's gradient from the exponentials left unnormalized (e, not e / s)",
    ),
]
