"""Run a function on every rank of a fresh gloo process group made of fork-started processes.

Forked children start in milliseconds because they inherit the parent's imported modules (torch, xentlib), so
test files import everything they need at module level. Every wait has a deadline: a rank that hangs in a
collective makes the test fail after `timeout` seconds instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import queue
import socket
import traceback

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# Lazy imports paid once here rather than in every forked rank: torch.testing.assert_close pulls in sympy
# (~1 s); DDP, FSDP and DTensor pull in torch._dynamo (~3 s) and DTensor's own modules (~2 s).
torch.testing.assert_close(torch.zeros(1), torch.zeros(1))
try:
    import torch._dynamo  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401
except ImportError:  # pragma: no cover - older torch
    pass

COLLECTIVE_TIMEOUT_S = 20  # the process group's own default timeout: a hung collective raises in the rank
# Joining the group is not a collective: on a loaded two-core machine a forked rank can take seconds to reach the
# store or to accept the other ranks' connections, so the rendezvous gets its own generous deadline, independent
# of the (short) collective timeout a test asks for to catch a hang quickly.
RENDEZVOUS_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world: int, port: int, results, args, collective_timeout: float) -> None:
    try:
        torch.set_num_threads(1)  # forked OpenMP pools are not safe; one thread per rank on a small machine
        # joined with the rendezvous deadline (the store and gloo's connections between ranks both wait on it),
        # then the test's collective timeout set for what follows
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
        )
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=collective_timeout))
        results.put((rank, "joined", None))
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def _seconds_from_now(seconds: float) -> datetime.datetime:
    return datetime.datetime.now() + datetime.timedelta(seconds=seconds)


def run_ranks(fn, world: int, *args, timeout: float = 40.0, collective_timeout: float = COLLECTIVE_TIMEOUT_S) -> list:
    """fn(rank, world, *args) on `world` fork-started ranks; returns the per-rank results, in rank order.

    Fails the test if any rank raised (with its traceback) or if the ranks did not finish within `timeout` seconds
    of running `fn` (the rendezvous before it has its own deadline, RENDEZVOUS_TIMEOUT_S).
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_child, args=(fn, r, world, port, results, args, collective_timeout))
        for r in range(world)
    ]
    for p in processes:
        p.start()
    collected: dict[int, tuple[str, object]] = {}
    joined: set[int] = set()
    # Until every rank has joined, the rendezvous deadline (plus a margin for the ranks to report it) applies.
    deadline = _seconds_from_now(RENDEZVOUS_TIMEOUT_S + 5)
    try:
        while len(collected) < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=left)
            except queue.Empty:
                break
            if status == "joined":
                joined.add(rank)
                if len(joined) == world:
                    deadline = _seconds_from_now(timeout)
                continue
            collected[rank] = (status, value)
    finally:
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [r for r in range(world) if r not in collected]
    if missing and len(joined) < world:
        pytest.fail(f"ranks {sorted(set(range(world)) - joined)} did not join within {RENDEZVOUS_TIMEOUT_S} s")
    if missing:
        pytest.fail(f"ranks {missing} did not finish within {timeout} s (hang?)")
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(collected.items()) if s == "error"]
    if errors:
        pytest.fail("a rank raised:\n" + "\n".join(errors))
    return [collected[r][1] for r in range(world)]


def shard_bounds(sizes: list[int], rank: int) -> tuple[int, int]:
    """(vocab_start, vocab_end) of `rank` for contiguous shards of the given sizes."""
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@contextlib.contextmanager
def count_all_reduces():
    """Counts the calls of dist.all_reduce made inside the block (in this process): yields a dict {"n": count}."""
    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real
