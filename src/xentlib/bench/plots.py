"""PNG plots of the results (matplotlib, Agg backend): forward+backward time and peak extra memory against V
and against N, one figure per problem, one line per (implementation, dtype)."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("fwdbwd_median_ms", "v", "fwd+bwd time (ms)", "V (classes)"),
    ("fwdbwd_median_ms", "n", "fwd+bwd time (ms)", "N (rows)"),
    ("peak_extra_bytes", "v", "peak extra memory (MiB)", "V (classes)"),
    ("peak_extra_bytes", "n", "peak extra memory (MiB)", "N (rows)"),
)


def _series(rows: list[dict], metric: str, axis: str) -> dict[str, list[list[tuple[float, float]]]]:
    """label -> lines, each [(x, y)] sorted by x. A line joins only shapes whose other dimensions are equal
    (against N: same D and V), so shapes that differ in two dimensions are not joined as if one varied."""
    lines: dict[str, dict[tuple, list[tuple[float, float]]]] = {}
    several_thp = len({r["thp_env"] for r in rows}) > 1
    for row in rows:
        if row.get("status") != "ok" or metric not in row:
            continue
        label = f"{row['impl']} {row['dtype']}"
        if several_thp:
            label += f" THP={row['thp_env'] or 'unset'}"
        value = row[metric] / 2**20 if metric.endswith("_bytes") else row[metric]
        fixed = tuple(str(row.get(dim, "")) for dim in ("n", "d", "v") if dim != axis)
        lines.setdefault(label, {}).setdefault(fixed, []).append((float(row[axis]), float(value)))
    return {label: [sorted(points) for points in groups.values()] for label, groups in lines.items()}


def plot_problem(rows: list[dict], problem: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    for axis_plot, (metric, axis, ylabel, xlabel) in zip(axes.flat, PANELS, strict=True):
        for index, (label, lines) in enumerate(_series(rows, metric, axis).items()):
            color = f"C{index % 10}"
            for number, points in enumerate(lines):
                xs, ys = zip(*points, strict=True)
                axis_plot.plot(xs, ys, marker="o", color=color, label=label if number == 0 else None)
        axis_plot.set_xlabel(xlabel)
        axis_plot.set_ylabel(ylabel)
        axis_plot.set_xscale("log")
        axis_plot.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    shapes = ", ".join(dict.fromkeys(row["shape"] for row in rows))
    figure.suptitle(f"xentlib bench, {problem} ({shapes})")
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_results(rows: list[dict], out: Path) -> list[Path]:
    written = []
    for problem in dict.fromkeys(row["problem"] for row in rows):
        selected = [row for row in rows if row["problem"] == problem]
        written.append(plot_problem(selected, problem, out / f"{problem}.png"))
    return written
