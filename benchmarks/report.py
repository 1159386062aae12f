"""Turn measurements into a Markdown table (medians, min-max, ratio against ProcessPoolExecutor) and plots."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

BASELINE = "process"


def machine() -> str:
    import zmq

    memory = ""
    try:
        with open("/proc/meminfo") as f:
            memory = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory}; {platform.system()} {platform.release()}; "
            f"Python {sys.version.split()[0]}; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["value"] for r in runs if "value" in r]
    if not values:
        skipped = next((r.get("skipped") or r.get("error") for r in runs), "no result")
        return {"skipped": skipped}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "unit": runs[0]["unit"], "better": runs[0]["better"]}


def _fmt(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def markdown(results: dict[str, dict[str, list[dict[str, Any]]]], command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Machine: {machine()}", ""]
    for workload, by_system in results.items():
        summaries = {system: summarize(runs) for system, runs in by_system.items()}
        unit = next((s["unit"] for s in summaries.values() if "unit" in s), "")
        better = next((s["better"] for s in summaries.values() if "better" in s), "")
        lines += [f"### {workload} ({unit}, {better} is better)", "",
                  f"| system | median | min–max | runs | vs {BASELINE} |", "|---|---:|---:|---:|---:|"]
        base = summaries.get(BASELINE, {}).get("median")
        for system, s in summaries.items():
            if "skipped" in s:
                lines.append(f"| {system} | skipped: {s['skipped']} | | | |")
                continue
            ratio = f"{s['median'] / base:.2f}×" if base else "–"
            lines.append(f"| {system} | {_fmt(s['median'])} | {_fmt(s['min'])}–{_fmt(s['max'])} | {s['n']} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, list[dict[str, Any]]]], folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    plain = [w for w in results if not w.startswith("scaling-")]
    if plain:
        fig, axes = plt.subplots(1, len(plain), figsize=(3.2 * len(plain), 3.6), squeeze=False)
        for ax, workload in zip(axes[0], plain):
            summaries = {s: summarize(r) for s, r in results[workload].items()}
            shown = {s: v for s, v in summaries.items() if "median" in v}
            names = list(shown)
            medians = [shown[n]["median"] for n in names]
            errors = [[shown[n]["median"] - shown[n]["min"] for n in names],
                      [shown[n]["max"] - shown[n]["median"] for n in names]]
            ax.bar(range(len(names)), medians, yerr=errors, capsize=3,
                   color=["tab:orange" if n.startswith("zmq") else "tab:gray" for n in names])
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
            unit = next(iter(shown.values()))["unit"] if shown else ""
            better = next(iter(shown.values()))["better"] if shown else ""
            ax.set_title(f"{workload}\n{unit} ({better} better)", fontsize=8)
        fig.tight_layout()
        path = folder / "workloads.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    scaling = sorted((w for w in results if w.startswith("scaling-")), key=lambda w: int(w.split("-")[1]))
    if scaling:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        systems = sorted({s for w in scaling for s in results[w]})
        for system in systems:
            points = [(int(w.split("-")[1]), summarize(results[w].get(system, [])).get("median")) for w in scaling]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("single-slot workers (10 ms sleep tasks)")
        ax.set_ylabel("fraction of the ideal rate")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / "scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def rst_summary(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """One table, a row per workload and a column per system: median, and ratio against the baseline."""
    systems: list[str] = []
    for by_system in results.values():
        systems += [s for s, runs in by_system.items() if s not in systems and "median" in summarize(runs)]
    header = ["workload", *systems]
    rows = []
    for workload, by_system in results.items():
        summaries = {system: summarize(runs) for system, runs in by_system.items()}
        base = summaries.get(BASELINE, {}).get("median")
        unit = next((v["unit"] for v in summaries.values() if "unit" in v), "")
        cells = [f"{workload} ({unit})"]
        for system in systems:
            value = summaries.get(system, {})
            if "median" not in value:
                cells.append("–")
            elif base and system != BASELINE:
                cells.append(f"{_fmt(value['median'])} ({value['median'] / base:.2f}×)")
            else:
                cells.append(_fmt(value["median"]))
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])
