"""PNG plots of the traces written by ``evaluation.trace``: one per case and one overview.

Memory in MB (MiB), time in s, CPU in % of the whole machine. Files are written under a temporary
name and renamed, so a plot on disk is always complete.
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend

from evaluation.trace import FLARE22_GPU_ALLOWANCE_MB


def _save(figure, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def _steps(axis, times, values, end_s, **style):
    """Sample-and-hold curve as the summary integrates it: each value holds until the next
    sample, the last until ``end_s``; missing values are left out."""
    points = [(t, v) for t, v in zip(times, values) if v is not None]
    if points:
        points.append((max(end_s, points[-1][0]), points[-1][1]))
        axis.step([t for t, _ in points], [v for _, v in points], where="post", **style)


def _cpu_steps(axis, times, values, **style):
    """CPU readings are averages over the interval before each sample (the first from 0)."""
    points = [(t, v) for t, v in zip(times, values) if v is not None]
    if points:
        points.insert(0, (0.0, points[0][1]))
        axis.step([t for t, _ in points], [v for _, v in points], where="pre", **style)


def plot_case(path, result, samples):
    """Three panels over time: GPU memory (whole GPU and the command's processes, the 2048 MB
    allowance and the FLARE21 maximum), RAM (process-tree RSS), system CPU utilisation."""
    times, end_s = [s.t_s for s in samples], result.running_time_s
    figure, (gpu_axis, ram_axis, cpu_axis) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    title = f"{result.name}: {result.status}, {result.running_time_s:.1f} s"
    if result.reason:
        title += f" ({result.reason})"
    figure.suptitle(title)

    if result.gpu_max_mb is None:
        gpu_axis.text(0.5, 0.5, "no GPU measurement (no NVIDIA GPU or NVML library)",
                      ha="center", va="center", transform=gpu_axis.transAxes)
        gpu_axis.set_yticks([])
    else:
        _steps(gpu_axis, times, [s.gpu_used_mb for s in samples], end_s,
               label="GPU used (total - free)")
        if any(s.gpu_tree_mb for s in samples):
            _steps(gpu_axis, times, [s.gpu_tree_mb for s in samples], end_s,
                   label="command's processes (NVML)")
        gpu_axis.axhline(FLARE22_GPU_ALLOWANCE_MB, color="grey", linestyle=":",
                         label="2048 MB (FLARE22 allowance)")
        if result.gpu_max_mb_flare21 is not None:
            gpu_axis.axhline(result.gpu_max_mb_flare21, color="red", linestyle="--",
                             label=f"FLARE21 max {result.gpu_max_mb_flare21:.0f} MB")
        gpu_axis.legend(loc="upper left", fontsize="small")
    gpu_axis.set_ylabel("GPU memory (MB)")

    _steps(ram_axis, times, [s.rss_tree_mb for s in samples], end_s, color="tab:green")
    ram_axis.set_ylabel("RSS, process tree (MB)")
    _cpu_steps(cpu_axis, times, [s.cpu_percent for s in samples], color="tab:orange")
    cpu_axis.set_ylabel("system CPU (%)")
    cpu_axis.set_ylim(0, 105)
    cpu_axis.set_xlabel("time since the command started (s)")
    for axis in (gpu_axis, ram_axis, cpu_axis):
        axis.axvline(result.running_time_s, color="black", linewidth=0.8)
        axis.grid(alpha=0.3)
    _save(figure, path)


def plot_overview(path, results):
    """Bar charts, one bar per case: running time, GPU memory (FLARE21 maximum), GPU area above
    2048 MB, CPU area, peak RSS. Failed and timed-out cases are drawn in red."""
    names = [r.name for r in results]
    colours = ["tab:blue" if r.status == "ok" else "tab:red" for r in results]
    panels = [("running time (s)", "running_time_s"),
              ("GPU max, FLARE21 (MB)", "gpu_max_mb_flare21"),
              ("GPU area above 2048 MB (MB*s)", "gpu_area_mb_s_flare22"),
              ("CPU area (%*s)", "cpu_area_percent_s"),
              ("peak RSS, process tree (MB)", "rss_peak_mb")]
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.5 * len(names) + 3), 11),
                                sharex=True)
    for axis, (label, key) in zip(axes, panels):
        values = [getattr(r, key) for r in results]
        axis.bar(range(len(names)), [0 if v is None else v for v in values], color=colours)
        if all(v is None for v in values):
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
            axis.set_yticks([])
        axis.set_ylabel(label, fontsize="small")
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
    figure.suptitle(f"{len(results)} cases ({sum(r.status == 'ok' for r in results)} ok)")
    figure.tight_layout()
    _save(figure, path)
