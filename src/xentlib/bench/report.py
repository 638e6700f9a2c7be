"""Turning measurements into ratios, progress lines, a table (rich when installed) and a CSV."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from xentlib.bench.impls import BASELINES

# CSV columns that come first, in this order; every other measured key follows alphabetically.
LEADING_COLUMNS = (
    "problem", "shape", "n", "d", "v", "dtype", "impl", "role", "status", "note",
    "targets", "label_smoothing", "xentlib_backend", "chunk_size",
    "fwd_median_ms", "fwd_min_ms", "fwd_max_ms", "bwd_median_ms", "bwd_min_ms", "bwd_max_ms",
    "fwdbwd_median_ms", "fwdbwd_min_ms", "fwdbwd_max_ms", "compile_s", "first_call_s", "loss",
    "peak_bytes", "peak_extra_bytes", "peak_extra_vs_logits", "logits_bytes", "mem_method",
    "limit_kind", "limit_ms", "frac_of_limit", "frac_of_floor",
    "device", "cpu_model", "cores", "threads", "gpu", "python", "torch", "xentlib", "git_commit", "platform",
    "thp_env", "sys_thp", "load_1m", "warmup", "repeats",
)  # fmt: skip


def _group_key(row: dict) -> tuple:
    return (row["thp_env"], row["problem"], row["shape"], row["dtype"])


def add_ratios(rows: list[dict]) -> None:
    """Per (thp, problem, shape, dtype): speed-up and memory ratio of every row against every baseline.

    speedup_vs_B = time(B) / time(row): above 1 the row is faster than B.
    mem_vs_B = peak extra(row) / peak extra(B): below 1 the row needs less memory than B.
    frac_of_floor = time(the floor row: bare matmuls, three, or four for distill) / time(row).
    """
    ok = {(_group_key(row), row["impl"]): row for row in rows if row.get("status") == "ok"}
    floors = {_group_key(row): row for row in ok.values() if row.get("role") == "floor"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        for baseline in BASELINES:
            reference = ok.get((_group_key(row), baseline))
            if reference is None:
                continue
            row[f"speedup_vs_{baseline}"] = reference["fwdbwd_median_ms"] / row["fwdbwd_median_ms"]
            if reference.get("peak_extra_bytes", 0) > 0 and "peak_extra_bytes" in row:
                row[f"mem_vs_{baseline}"] = row["peak_extra_bytes"] / reference["peak_extra_bytes"]
        floor = floors.get(_group_key(row))
        if floor is not None:
            row["frac_of_floor"] = floor["fwdbwd_median_ms"] / row["fwdbwd_median_ms"]


def write_csv(rows: list[dict], path: Path) -> Path:
    extra = sorted({key for row in rows for key in row} - set(LEADING_COLUMNS))
    columns = list(LEADING_COLUMNS) + extra
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return path


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


# ----------------------------------------------------------------------------------------------- formatting


def mib(value) -> str:
    return "" if value is None else f"{value / 2**20:,.0f} MiB"


def ms_range(row: dict, phase: str) -> str:
    if f"{phase}_median_ms" not in row:
        return ""
    return f"{row[f'{phase}_median_ms']:.1f} [{row[f'{phase}_min_ms']:.1f}-{row[f'{phase}_max_ms']:.1f}]"


def ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def percent(value) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def format_progress(index: int, total: int, row: dict) -> str:
    head = f"[{index:>{len(str(total))}}/{total}] {row['problem']:<6} {row['shape']:<18} {row['dtype']:<4} "
    head += f"{row['impl']:<16}"
    if row.get("status") != "ok":
        return head + f" {row.get('status', 'error')}: {row.get('note', '')}"
    parts = [f"fwd+bwd {ms_range(row, 'fwdbwd')} ms"]
    if "peak_extra_bytes" in row:
        parts.append(f"peak extra {mib(row['peak_extra_bytes'])} ({row['peak_extra_vs_logits']:.2f}x logits)")
    if "compile_s" in row:
        parts.append(f"compile {row['compile_s']:.1f} s")
    return head + " " + ", ".join(parts)


def print_limits(limits: dict, thp_label: str, echo) -> None:
    matmuls = ", ".join(
        f"{key.removeprefix('matmul_gflops_')} {value:,.0f}" for key, value in limits.items() if "matmul" in key
    )
    echo(
        f"machine limits (THP_MEM_ALLOC_ENABLE={thp_label or 'unset'}): matmul GFLOP/s {matmuls}; "
        f"bandwidth {limits['bw_reused_gbs']:.1f} GB/s into reused memory, {limits['bw_fresh_gbs']:.1f} GB/s "
        f"into fresh memory; exp {limits['exp_gelem_s']:.2f} G elements/s (fp32)"
    )


def table_columns(rows: list[dict]) -> list[tuple[str, callable]]:
    baselines = [name for name in BASELINES if any(f"speedup_vs_{name}" in row for row in rows)]
    columns = []
    if len({row["thp_env"] for row in rows}) > 1:
        columns.append(("THP", lambda row: row["thp_env"] or "unset"))
    columns += [
        ("shape", lambda row: row["shape"]),
        ("dtype", lambda row: row["dtype"]),
        ("impl", lambda row: row["impl"]),
        ("fwd ms", lambda row: ms_range(row, "fwd")),
        ("bwd ms", lambda row: ms_range(row, "bwd")),
        ("fwd+bwd ms", lambda row: ms_range(row, "fwdbwd")),
    ]
    for name in baselines:
        header = f"vs {name.removeprefix('torch-')}"
        columns.append((header, lambda row, name=name: ratio(row.get(f"speedup_vs_{name}"))))
    columns += [
        ("peak extra", lambda row: mib(row.get("peak_extra_bytes"))),
        ("x logits", lambda row: ratio(row.get("peak_extra_vs_logits"))),
        ("of limit", lambda row: percent(row.get("frac_of_limit"))),
    ]
    if any("frac_of_floor" in row for row in rows):
        columns.append(("of floor", lambda row: percent(row.get("frac_of_floor"))))
    if any("compile_s" in row for row in rows):
        columns.append(("compile s", lambda row: f"{row['compile_s']:.1f}" if "compile_s" in row else ""))
    columns.append(("note", lambda row: "" if row.get("status") == "ok" else f"{row.get('status')}: {row['note']}"))
    return columns


TABLE_LEGEND = (
    "times: median [min-max] over the repeats; 'vs B' = time(B) / time(impl), above 1 is faster than B; "
    "peak extra = peak memory beyond the inputs (and the x/W gradients for linear), also in units of the "
    "logits size N*V; 'of limit' = bound / time (ce: the slower of 2*N*V*bytes at reused-memory "
    "bandwidth and N*V exps at exp rate; linear, logprobs: 6*N*D*V FLOPs at matmul rate; distill: 8*N*D*V); "
    "'of floor' = time of the bare matmuls (three; four for distill) / time."
)

TABLE_TITLES = {
    "ce": "logits (N, V)",
    "distill": "student and teacher: input (N, D), weight (V, D)",
}


TEXT_COLUMNS = ("THP", "shape", "dtype", "impl", "note")


def print_table(rows: list[dict], echo=print) -> None:
    for problem in dict.fromkeys(row["problem"] for row in rows):
        selected = [row for row in rows if row["problem"] == problem]
        columns = table_columns(selected)
        title = f"{problem}: {TABLE_TITLES.get(problem, 'input (N, D), weight (V, D)')}"
        try:
            _print_rich_table(title, columns, selected)
        except ImportError:
            _print_plain_table(title, columns, selected, echo)
    echo(TABLE_LEGEND)


def _print_rich_table(title: str, columns, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="left" if header in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(str(cell(row)) for _, cell in columns))
    console = Console() if sys.stdout.isatty() else Console(width=220, force_terminal=False)
    console.print(table)


def _print_plain_table(title: str, columns, rows: list[dict], echo) -> None:
    cells = [[header for header, _ in columns]] + [[str(cell(row)) for _, cell in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    left = [header in TEXT_COLUMNS for header, _ in columns]
    echo(title)
    for line in cells:
        padded = (
            text.ljust(width) if is_text else text.rjust(width)
            for text, width, is_text in zip(line, widths, left, strict=True)
        )
        echo("  ".join(padded).rstrip())
