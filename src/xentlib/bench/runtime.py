"""xentlib inside the PyTorch runtime: the host overhead of a call, and a compiled training step.

`overhead`: the cost of one call on tiny logits, where the arithmetic is nothing and the Python and dispatch
around it are everything. One thread, (8, 10) and (128, 1000) float32 logits, forward only (no autograd) and
forward+backward, best of several loops of many calls; the ratio xentlib / torch.nn.functional.cross_entropy.

`step`: a small causal-LM-like model (embedding, two MLP blocks, a 32k-vocabulary head, 2048 tokens) trained one
step at a time under `torch.compile`, with the loss computed three ways: torch's cross_entropy on the logits,
torch's own chunked `F.linear_cross_entropy` (with `LinearCrossEntropyOptions`), and xentlib's
`linear_cross_entropy`. Each (loss, dtype) runs in a fresh process; it reports the median step time (compile time
excluded) and the peak extra memory of a step (resident-set high-water mark during the step minus the resident
set before it), and the ratios against the torch-loss step.

    xentlib bench overhead
    xentlib bench step --dtypes fp32,bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from xentlib.bench.rss import current_rss, peak_rss, reset_peak_rss

MIB = 1024 * 1024
LOSSES = ("torch-loss", "torch-chunked", "xentlib")


def _best_per_call(fn, calls: int, loops: int) -> float:
    best = float("inf")
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure_overhead(shape: tuple[int, int], calls: int = 2000, loops: int = 7) -> dict:
    import torch
    import torch.nn.functional as F

    import xentlib

    torch.manual_seed(0)
    x = torch.randn(*shape)
    t = torch.randint(0, shape[1], (shape[0],))
    leaf = x.clone().requires_grad_()
    row = {"shape": f"{shape[0]}x{shape[1]}"}
    for name, fn in (("torch", F.cross_entropy), ("xentlib", xentlib.cross_entropy)):
        with torch.no_grad():
            fn(x, t)
            row[f"{name}_forward_us"] = 1e6 * _best_per_call(lambda fn=fn: fn(x, t), calls, loops)

        def step(fn=fn):
            fn(leaf, t).backward()
            leaf.grad = None

        step()
        row[f"{name}_forward_backward_us"] = 1e6 * _best_per_call(step, calls // 2, loops)
    row["forward_ratio"] = row["xentlib_forward_us"] / row["torch_forward_us"]
    row["forward_backward_ratio"] = row["xentlib_forward_backward_us"] / row["torch_forward_backward_us"]
    return row


def run_overhead(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    rows = [measure_overhead(shape, args.calls) for shape in ((8, 10), (128, 1000))]
    print("host overhead per call, 1 thread, best of 7 loops (microseconds):")
    header = ("logits", "torch fwd", "xentlib fwd", "ratio", "torch f+b", "xentlib f+b", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (10, 10, 12, 6, 10, 12, 6))))
    for r in rows:
        print(
            f"{r['shape']:>10} {r['torch_forward_us']:10.1f} {r['xentlib_forward_us']:12.1f} {r['forward_ratio']:6.2f} "
            f"{r['torch_forward_backward_us']:10.1f} {r['xentlib_forward_backward_us']:12.1f} "
            f"{r['forward_backward_ratio']:6.2f}"
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# the compiled training step
# ----------------------------------------------------------------------------------------------------------------


def build_model(vocab: int, hidden: int, dtype):
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(hidden, 4 * hidden), torch.nn.Linear(4 * hidden, hidden)

        def forward(self, h):
            return h + self.down(torch.nn.functional.gelu(self.up(h)))

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.blocks = torch.nn.Sequential(Block(), Block())
            self.head = torch.nn.Linear(hidden, vocab, bias=False)

        def hidden_states(self, ids):
            return self.blocks(self.embed(ids))

    torch.manual_seed(0)
    return TinyLM().to(dtype)


def loss_function(name: str, model):
    import torch
    import torch.nn.functional as F

    import xentlib

    if name == "torch-loss":
        return lambda ids, labels: F.cross_entropy(model.head(model.hidden_states(ids)).float(), labels)
    if name == "torch-chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda ids, labels: F.linear_cross_entropy(
            model.hidden_states(ids), model.head.weight, labels, options=options
        ).float()
    return lambda ids, labels: xentlib.linear_cross_entropy(model.hidden_states(ids), model.head.weight, labels).float()


def measure_step(loss: str, dtype_name: str, tokens: int, vocab: int, hidden: int, warmup: int, repeats: int) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = build_model(vocab, hidden, dtype)
    compiled = torch.compile(loss_function(loss, model))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (tokens,), generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)

    def step():
        value = compiled(ids, labels)
        value.backward()
        for p in model.parameters():
            p.grad = None
        return value

    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    before = current_rss()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "loss": loss,
        "dtype": dtype_name,
        "tokens": tokens,
        "vocab": vocab,
        "hidden": hidden,
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "step_max_s": max(times),
        "compile_s": compile_s,
        "peak_extra_mib": (peak_rss() - before) / MIB,
        "logits_mib": tokens * vocab * torch.finfo(dtype).bits / 8 / MIB,
    }


def run_step(args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype in args.dtypes.split(","):
        for loss in LOSSES:
            command = [
                sys.executable, "-m", "xentlib.bench.runtime", "step-child", "--loss", loss, "--dtypes", dtype,
                "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{loss} {dtype}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"compiled training step, {args.tokens} tokens, vocabulary {args.vocab}, hidden {args.hidden}, "
          f"{args.threads} threads, median of {args.repeats}:")  # fmt: skip
    print(f"{'dtype':>5} {'loss':>14} {'step':>9} {'x torch':>8} {'peak extra':>11} {'x torch':>8} {'compile':>8}")
    for row in rows:
        base = next(r for r in rows if r["dtype"] == row["dtype"] and r["loss"] == "torch-loss")
        print(
            f"{row['dtype']:>5} {row['loss']:>14} {row['step_s']:8.3f}s {row['step_s'] / base['step_s']:8.2f} "
            f"{row['peak_extra_mib']:9.0f}MiB {row['peak_extra_mib'] / max(base['peak_extra_mib'], 1e-9):8.2f} "
            f"{row['compile_s']:7.1f}s"
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xentlib bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("overhead", "step", "step-child"))
    parser.add_argument("--calls", type=int, default=2000, help="overhead: calls per timed loop")
    parser.add_argument("--dtypes", default="fp32,bf16", help="step: comma-separated fp32, bf16")
    parser.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kind == "step-child":
        import torch

        torch.set_num_threads(args.threads)
        row = measure_step(args.loss, args.dtypes, args.tokens, args.vocab, args.hidden, args.warmup, args.repeats)
        print(json.dumps(row))
        return 0
    rows = run_overhead(args) if args.kind == "overhead" else run_step(args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
