"""One measurement in a fresh process: `python -m xentlib.bench.worker '<json spec>'`.

A fresh process per (implementation, shape, dtype) keeps peak memory honest (nothing cached by an earlier
configuration) and isolates torch.compile caches. The spec is a JSON object, either
`{"kind": "limits", "device": ..., "threads": ..., "dtypes": [...]}` or
`{"kind": "config", "impl": ..., "problem": ..., "n": ..., "d": ..., "v": ..., "dtype": ..., "device": ...,
"threads": ..., "warmup": ..., "repeats": ..., "targets": ..., "label_smoothing": ..., "memory": ...,
"seed": ...}`. The result is printed as one JSON line after RESULT_PREFIX; warnings raised while measuring
go into its "note".
"""

from __future__ import annotations

import json
import sys
import warnings

RESULT_PREFIX = "XENTLIB-BENCH-RESULT "


def _setup_torch(spec: dict):
    import torch

    torch.set_num_threads(int(spec["threads"]))
    return torch.device(spec["device"])


def run_limits(spec: dict) -> dict:
    from xentlib.bench.machine import measure_limits

    device = _setup_torch(spec)
    return measure_limits(device, tuple(spec["dtypes"]))


def run_config(spec: dict) -> dict:
    from xentlib.bench.config import Shape
    from xentlib.bench.impls import find_impl, make_case
    from xentlib.bench.measure import measure

    device = _setup_torch(spec)
    shape = Shape(spec["problem"], n=spec["n"], v=spec["v"], d=spec.get("d"))
    case = make_case(shape, spec["dtype"], device, spec["targets"], spec["label_smoothing"], spec["seed"])
    case.xentlib_backend = spec.get("xentlib_backend", "auto")
    case.chunk_size = spec.get("chunk_size") or None
    impl = find_impl(spec["impl"], shape.problem)
    reason = impl.unavailable(case)
    if reason:
        return {"status": "skipped", "note": reason}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure(impl, case, spec["warmup"], spec["repeats"], spec["memory"])
    messages = dict.fromkeys(str(warning.message).splitlines()[0][:160] for warning in caught)
    return {"status": "ok", "note": " | ".join(messages)} | result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    result = run_limits(spec) if spec["kind"] == "limits" else run_config(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
