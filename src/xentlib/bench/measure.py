"""Timing and peak memory of one implementation on one case, inside the worker process.

Timing: after `warmup` untimed calls, each repeat times forward and backward separately (with a device
synchronization between them); forward+backward is their sum. Before every call the gradients are cleared
and, for implementations that overwrite their input, the inputs are restored; neither is timed.

Memory ("peak extra"): the most memory one forward+backward needs beyond its inputs. On CPU it is the
resident set size: after warm-up, freed heap memory is returned to the kernel (malloc_trim) and the
high-water mark VmHWM is reset through /proc/self/clear_refs (so compilation and earlier calls do not count);
one forward+backward runs; the new VmHWM minus VmRSS before the call is the peak. On GPU it is
`torch.cuda.max_memory_allocated()` minus the memory allocated before the call. For the linear problem the
gradients of x and W are outputs every implementation must produce, so their size is subtracted; for ce the
logits gradient counts (it is the buffer an in-place backward saves).
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass

from xentlib.bench.impls import Case, Impl, Step
from xentlib.bench.rss import current_rss, peak_rss, reset_peak_rss

PHASES = ("fwd", "bwd", "fwdbwd")


@dataclass
class Preparer:
    """Clears gradients and restores overwritten inputs before each call (never timed)."""

    case: Case
    restore_inputs: bool

    def __post_init__(self):
        self.pristine = [leaf.detach().clone() for leaf in self.case.leaves] if self.restore_inputs else []

    def __call__(self) -> None:
        import torch

        for leaf in self.case.leaves:
            leaf.grad = None
        with torch.no_grad():
            for leaf, saved in zip(self.case.leaves, self.pristine, strict=False):
                leaf.copy_(saved)


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def timed_call(step: Step, device) -> tuple[float, float, object]:
    """(forward seconds, backward seconds, forward's handle) of one training step."""
    synchronize(device)
    start = time.perf_counter()
    handle = step.forward()
    synchronize(device)
    middle = time.perf_counter()
    step.backward(handle)
    synchronize(device)
    end = time.perf_counter()
    return middle - start, end - middle, handle


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def warm_up(step: Step, prepare: Preparer, device, count: int) -> dict:
    """Runs `count` untimed steps; returns the first call's time (compilation included) and its loss."""
    first_call_s, loss = None, None
    for index in range(count):
        prepare()
        forward_s, backward_s, handle = timed_call(step, device)
        if index == 0:
            first_call_s = forward_s + backward_s
            loss = float(handle.detach().float()) if getattr(handle, "ndim", None) == 0 else None
        del handle
    return {"first_call_s": first_call_s, "loss": loss}


def time_repeats(step: Step, prepare: Preparer, device, repeats: int) -> dict[str, list[float]]:
    samples = {phase: [] for phase in PHASES}
    for _ in range(repeats):
        prepare()
        forward_s, backward_s, handle = timed_call(step, device)
        del handle
        samples["fwd"].append(forward_s)
        samples["bwd"].append(backward_s)
        samples["fwdbwd"].append(forward_s + backward_s)
    return samples


# ---------------------------------------------------------------------------------------------------- memory


def release_free_heap() -> None:
    """Gives freed heap memory back to the kernel (glibc), so that reusing it in the call counts as growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_of_step(step: Step, prepare: Preparer, case: Case) -> dict:
    """Peak bytes of one forward+backward beyond what was resident (CPU) or allocated (GPU) before it."""
    import torch

    prepare()
    gc.collect()
    output_bytes = 0 if case.shape.problem == "ce" else sum(t.numel() * t.element_size() for t in case.leaves)
    if getattr(case.device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(case.device)
        before = torch.cuda.memory_allocated(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        step.backward(step.forward())
        torch.cuda.synchronize(case.device)
        peak = torch.cuda.max_memory_allocated(case.device) - before
        method = "cuda.max_memory_allocated"
    else:
        release_free_heap()
        if not reset_peak_rss():
            return {"mem_method": "unavailable (cannot reset VmHWM)"}
        before = current_rss()
        step.backward(step.forward())
        peak = peak_rss() - before
        method = "VmHWM-VmRSS"
    extra = peak - output_bytes
    return {
        "mem_method": method,
        "peak_bytes": peak,
        "peak_extra_bytes": extra,
        "peak_extra_vs_logits": extra / case.logits_bytes,
    }


def measure(impl: Impl, case: Case, warmup: int, repeats: int, memory: bool) -> dict:
    """Every number of one (impl, shape, dtype) configuration."""
    step = impl.build(case)
    prepare = Preparer(case, restore_inputs=impl.mutates_input)
    result = warm_up(step, prepare, case.device, warmup)
    if impl.compiled:
        result["compile_s"] = result["first_call_s"]
    if memory:
        result |= peak_memory_of_step(step, prepare, case)
    samples = time_repeats(step, prepare, case.device, repeats)
    for phase, values in samples.items():
        for stat, value in summarize(values).items():
            result[f"{phase}_{stat}_ms"] = value * 1e3
        result[f"{phase}_samples_ms"] = ";".join(f"{value * 1e3:.3f}" for value in values)
    return result
