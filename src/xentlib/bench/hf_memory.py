"""Peak-memory growth over a Hugging Face Trainer run, unpatched against `xentlib.integrations.transformers.patch`.

A tiny randomly-initialised causal LM with a real-sized vocabulary trains for N optimizer steps on random tokens
whose labels have a varying fraction of padded (-100) positions per sample, with gradient accumulation. Each of
the two runs (unpatched, patched) happens in a fresh subprocess, and reports the growth of its peak resident set
size over the run:

    growth = (peak RSS over steps 2..N) - (RSS right after step 1)

where the peak is the kernel's high-water mark (VmHWM), reset after step 1 (`/proc/self/clear_refs`), or
`getrusage`'s peak where that reset is unavailable. A run whose working set is the same every step grows by
little; a run whose buffers change shape from step to step (e.g. with the number of ignored rows) fragments the
allocator and grows. The growth varies from run to run (by a factor of 3 or more on a busy machine):
`--repeats` runs each mode several times, alternating, and reports the medians.

    python src/xentlib/bench/hf_memory.py --steps 100 --model llama

Runs on CPU; needs transformers and accelerate (the Trainer's dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from xentlib.bench.rss import current_rss, peak_rss, reset_peak_rss

MODELS = ("llama", "gpt2")
MODES = ("unpatched", "patched")
MIB = 1024 * 1024


# argparse declarations, one per option: alike in shape to the CLI's (cli/train.py), sharing no logic.
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--model", choices=MODELS, default="llama", help="tiny model family (default llama)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--accumulation", type=int, default=4, help="gradient accumulation steps (default 4)")
    parser.add_argument(
        "--pad-fraction",
        type=float,
        default=0.3,
        help="mean fraction of padded (-100) labels; each sample pads a uniform fraction in [0, 2x] (default 0.3)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per mode, alternating modes, each in a fresh process (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("both", *MODES), default="both", help="run both (default) or one mode")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one mode, in this process
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.accumulation, args.repeats) < 1 or args.seq < 2:
        parser.error("--steps, --batch, --accumulation, --repeats must be >= 1 and --seq >= 2")
    if not 0.0 <= args.pad_fraction <= 0.5:
        parser.error("--pad-fraction must be in [0, 0.5] (each sample pads up to twice as much)")
    return args


# ----------------------------------------------------------------------------------------------------------
# One run (in the child process)
# ----------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace):
    import torch
    import transformers

    torch.manual_seed(args.seed)
    if args.model == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers, n_head=4,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class RandomTokens:
    """Sample i: random token ids and their labels with the tail padded (-100); the padded fraction is drawn per
    sample, uniform in [0, 2 * pad_fraction], so the number of ignored rows changes from micro-batch to
    micro-batch. Generated on demand from (seed, i): the dataset itself costs no memory."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.length = args.steps * args.accumulation * args.batch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        import torch

        args = self.args
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
        input_ids = torch.randint(0, args.vocab, (args.seq,), generator=generator)
        labels = input_ids.clone()
        padded = int(torch.rand((), generator=generator).item() * 2 * args.pad_fraction * args.seq)
        if padded:
            labels[-padded:] = -100
        return {"input_ids": input_ids, "labels": labels}


def run_one(args: argparse.Namespace, mode: str) -> dict:
    """Train `args.steps` optimizer steps with the Trainer, unpatched or patched; return the RSS figures."""
    import transformers

    model = build_model(args).train()
    if mode == "patched":
        from xentlib.integrations.transformers import patch

        patch(model)
    readings: dict = {"mode": mode, "peak_by_step": {}}
    checkpoints = {max(1, round(args.steps * q)) for q in (0.1, 0.25, 0.5, 0.75, 1.0)}

    class MemoryCallback(transformers.TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            step = state.global_step
            if step == 1:
                readings["rss_after_first_step"] = current_rss()
                readings["peak_reset"] = reset_peak_rss()
                readings["started"] = time.perf_counter()
            elif step in checkpoints:
                readings["peak_by_step"][step] = peak_rss()

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = transformers.TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=1e-4,
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = transformers.Trainer(
            model=model, args=training_args, train_dataset=RandomTokens(args), callbacks=[MemoryCallback()]
        )
        trainer.train()
    readings["peak"] = peak_rss()
    readings["seconds_after_first_step"] = time.perf_counter() - readings.get("started", time.perf_counter())
    readings.pop("started", None)
    readings["growth"] = readings["peak"] - readings.get("rss_after_first_step", readings["peak"])
    return readings


# ----------------------------------------------------------------------------------------------------------
# Both runs (in the parent process), each in a fresh subprocess
# ----------------------------------------------------------------------------------------------------------


def run_in_subprocess(argv: list[str], mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--mode", mode, "--child"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {mode} run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: list[dict]) -> str:
    lines = [
        f"{args.model}: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, micro-batch {args.batch} x "
        f"{args.seq} tokens, accumulation {args.accumulation}, padded labels ~{args.pad_fraction:.0%} "
        f"(0-{2 * args.pad_fraction:.0%} per sample), {args.steps} steps",
        f"{'mode':<10} {'RSS after step 1':>17} {'peak, steps 2..N':>17} {'growth':>10} {'s/step':>8}",
    ]
    for result in results:
        per_step = result["seconds_after_first_step"] / max(args.steps - 1, 1)
        lines.append(
            f"{result['mode']:<10} {result['rss_after_first_step'] / MIB:>13.0f} MiB {result['peak'] / MIB:>13.0f} MiB "
            f"{result['growth'] / MIB:>+6.0f} MiB {per_step:>8.2f}"
        )
        trend = ", ".join(f"{step}: {peak / MIB:.0f}" for step, peak in sorted(result["peak_by_step"].items()))
        lines.append(f"{'':<10} peak so far by step (MiB): {trend}")
    growth = {mode: [r["growth"] for r in results if r["mode"] == mode] for mode in MODES}
    if args.repeats > 1:
        for mode, values in growth.items():
            if values:
                values_mib = ", ".join(f"{value / MIB:+.0f}" for value in values)
                lines.append(f"{mode:<10} growth median {statistics.median(values) / MIB:+.0f} MiB ({values_mib})")
    if all(growth.values()) and statistics.median(growth["unpatched"]) > 0:
        ratio = statistics.median(growth["patched"]) / statistics.median(growth["unpatched"])
        lines.append(f"growth ratio patched / unpatched{' (medians)' if args.repeats > 1 else ''}: {ratio:.2f}")
    if not all(result.get("peak_reset") for result in results):
        lines.append("(peak RSS could not be reset after step 1: the peak includes model construction)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        result = run_one(args, args.mode)
        result["peak_by_step"] = {int(step): peak for step, peak in result["peak_by_step"].items()}
        print(json.dumps(result))
        return 0
    passed_on = _strip_options(argv, ("--mode", "--json", "--repeats"))
    modes = MODES if args.mode == "both" else (args.mode,)
    results = []
    for mode in modes * args.repeats:  # alternating, so that a slow phase of the machine hits both
        result = run_in_subprocess(passed_on, mode)
        result["peak_by_step"] = {int(step): peak for step, peak in result["peak_by_step"].items()}
        results.append(result)
    print(report(args, results))
    if args.json:
        with open(args.json, "w") as output:
            json.dump({"arguments": {k: v for k, v in vars(args).items() if k != "child"}, "results": results}, output)
    return 0


def _strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the given options and their values (`--name value` or `--name=value`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
