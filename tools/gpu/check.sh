#!/usr/bin/env bash
# The GPU check, prepared as one command for a machine with a CUDA GPU (run from the repository root):
#
#     OUT=gpu-results bash tools/gpu/check.sh [ce|linear|all|post]
#
# 1. the tests that need a GPU or run Triton kernels, compiled for the device (on CPU they run in the interpreter);
# 2. `xentlib bench --device cuda` at the gpu-large shapes: the card's limits, xentlib, torch eager, torch.compile,
#    torch's chunked F.linear_cross_entropy, and Liger Kernel / Cut Cross-Entropy when importable; `post`: the
#    post-training problems (logprobs with the fused policy loss, distill) against Liger's chunked GRPO and JSD.
# Results go under $OUT (versions.txt, tests.log, bench.log, bench/results.csv, bench/machine.json).
# Where the machine has no package index, put the peers' wheels in .whl/ first, from a machine where pip works:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform any -d .whl liger-kernel cut-cross-entropy
# xentlib runs from src/ (nothing is installed): the machine's own torch and triton are used.
set -uo pipefail
OUT=${OUT:-gpu-results}
PROBLEMS=${1:-all}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XENTLIB_CACHE_DIR=/tmp/xentlib-cache
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - >"$OUT/versions.txt" 2>&1 <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("triton", "liger_kernel", "cut_cross_entropy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "importable"))
    except Exception as error:
        print(name, "not importable:", error)
PY
cat "$OUT/versions.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests/test_runtime.py tests/backends 2>&1 \
    | tee "$OUT/tests.log" | tail -20
if [ "$PROBLEMS" = post ]; then  # post-training: the policy loss and distillation against Liger's chunked losses
    timeout 480 python3 -m xentlib bench --device cuda --shapes logprobs:8192x2304x256000,distill:8192x2304x256000 \
        --dtypes bf16 --warmup 3 --repeats 10 --no-plots --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
    exit 0
fi
case "$PROBLEMS" in
    all) problems=ce,linear ;;
    *) problems=$PROBLEMS ;;
esac
timeout 480 python3 -m xentlib bench --device cuda --preset gpu-large --problems "$problems" --warmup 3 --repeats 10 \
    --no-plots --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
