"""`xentlib bench`: xentlib against torch and peer libraries, time and peak memory (see docs/benchmarks.md).

Part of the installed package; importing it imports neither torch nor matplotlib (the CLI validates its
arguments without them). Each measurement runs in a fresh process, `python -m xentlib.bench.worker SPEC`, so
peak memory is honest and the command works from a wheel as from a checkout. Layout:

    config.py   shapes, presets, options; validation without torch
    impls.py    the implementations compared (xentlib, torch, Liger Kernel, Cut Cross-Entropy) and their inputs
    measure.py  timing and peak memory of one configuration
    rss.py      resident set size now and at its peak (the CPU memory readings)
    machine.py  machine facts and limits (matmul, bandwidth, exp; CPU or GPU)
    worker.py   one measurement in a fresh process
    runner.py   the whole run: limits, one worker per configuration, outputs
    report.py   ratios, progress lines, table, CSV
    plots.py    PNG plots (matplotlib, the `bench` extra)
"""
