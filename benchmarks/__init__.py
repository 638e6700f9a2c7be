"""Benchmark suite behind `xentlib bench` (see docs/benchmarks.md).

It lives in the source checkout, not in the installed package: `xentlib bench` finds this folder next to
`src/` (or in the current directory) and imports it from there. Layout:

    config.py   shapes, presets, options; validation without torch
    impls.py    the implementations compared and the random inputs they run on
    measure.py  timing and peak memory of one configuration
    machine.py  machine facts and limits (matmul, bandwidth, exp)
    worker.py   `python -m benchmarks.worker SPEC`: one measurement in a fresh process
    runner.py   the whole run: limits, one worker per configuration, outputs
    report.py   ratios, progress lines, table, CSV
    plots.py    PNG plots
"""
