"""Check ``evaluation.trace`` against a real GPU: do its NVML samples see what was on the card?

    python -m evaluation.check_trace_gpu [--work DIR] [--out DIR]

Runs the trace (the same ``trace()`` the command line uses, 0.1 s sampling) on two tiny cases
whose "submission" is ``evaluation.gpu_load``: it holds 1024 MiB for 2 s, then 4096 MiB for 2 s,
and reports on the wall clock when each hold began and ended. Then a third case holds 2048 MiB
for a minute under a 10 s timeout. Checks, per case:

- every sample inside a hold reads ``gpu_used - gpu_used_before - hold`` = the same CUDA context
  size (within 16 MiB), and that context is between 0 and 2048 MiB;
- the FLARE21 maximum (value in > 2 % of samples) equals the reading during the largest hold;
- the per-process NVML memory of the command's process tree reaches the largest hold;
- the achieved sampling interval is 0.1 s (mean within 10 %);
- after the command ends (or is killed at the timeout) the GPU is back to where it started
  (within 16 MiB), so nothing was left holding memory.

Exit status 0 when every check passes, 1 when one fails, 2 when there is no GPU to check.
Needs NVML (nvidia-ml-py), PyTorch or CuPy, and SimpleITK for the tiny inputs.
"""

import argparse
import csv
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.trace import IMAGE_SUFFIX, Gpu, trace

ROOT = Path(__file__).resolve().parents[1]
HOLDS = ((1024, 2.0), (4096, 2.0))
TIMEOUT_HOLD = (2048, 60.0)
TIMEOUT_S = 10.0
CONTEXT_SPREAD_MIB = 16.0   # readings in one hold may differ by this much (driver bookkeeping)
MAX_CONTEXT_MIB = 2048.0
SETTLE_S = 0.15             # samples this close after a hold began may still see the previous one


def load_command(holds, report_dir):
    """The trace's command template: ``evaluation.gpu_load`` from this checkout, any directory."""
    hold_args = " ".join(f"{mib}:{seconds:g}" for mib, seconds in holds)
    return (f'PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}} '
            f"{shlex.quote(sys.executable)} -m evaluation.gpu_load {{inputs}} {{outputs}} "
            f"--hold {hold_args} --report {shlex.quote(str(report_dir))}/{{name}}.json")


def read_samples(path):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{key: float(value) if value not in ("", "None") else None
             for key, value in row.items()} for row in rows]


def hold_readings(samples, hold, before_mib):
    """The context sizes seen inside one hold: gpu_used - before - held, one per sample."""
    window = (hold["begin"] + SETTLE_S, hold["end"])
    return [s["gpu_used_mb"] - before_mib - hold["mib"] for s in samples
            if window[0] <= s["unix_time_s"] < window[1] and s["gpu_used_mb"] is not None]


def check_case(result, samples, report, gpu_after_mib):
    """(check, passed, detail) triples for one traced case; ``result`` is the summary record."""
    checks = []
    before = result["gpu_used_before_mb"]
    holds = report["holds"]
    seen = [hold_readings(samples, hold, before) for hold in holds]
    for hold, readings in zip(holds, seen):
        checks.append((f"{hold['mib']} MiB hold seen at a steady level",
                       bool(readings) and max(readings) - min(readings) <= CONTEXT_SPREAD_MIB,
                       f"{len(readings)} samples, context {min(readings, default=float('nan')):.0f}"
                       f"-{max(readings, default=float('nan')):.0f} MiB"))
    contexts = [value for readings in seen for value in readings]
    if contexts:
        checks.append(("context size plausible and the same in every hold",
                       0 <= min(contexts) and max(contexts) <= MAX_CONTEXT_MIB
                       and max(contexts) - min(contexts) <= CONTEXT_SPREAD_MIB,
                       f"{min(contexts):.0f}-{max(contexts):.0f} MiB"))
        largest = max(range(len(holds)), key=lambda i: holds[i]["mib"])
        level = before + holds[largest]["mib"] + float(np.median(seen[largest] or [np.nan]))
        checks.append(("FLARE21 maximum = reading during the largest hold",
                       result["gpu_max_mb_flare21"] is not None
                       and abs(result["gpu_max_mb_flare21"] - level) <= CONTEXT_SPREAD_MIB,
                       f"{result['gpu_max_mb_flare21']} vs {level:.0f} MB"))
        checks.append(("per-process NVML memory of the command's tree reaches the largest hold",
                       (result["gpu_tree_max_mb"] or 0) >= holds[largest]["mib"],
                       f"{result['gpu_tree_max_mb']} MB"))
    checks.append(("sampling interval 0.1 s",
                   result["mean_interval_s"] is not None
                   and abs(result["mean_interval_s"] - 0.1) <= 0.01,
                   f"mean {result['mean_interval_s']:.4f} s, max {result['max_interval_s']:.3f} s"))
    checks.append(("GPU memory back to the start after the command",
                   abs(gpu_after_mib - before) <= CONTEXT_SPREAD_MIB,
                   f"before {before:.0f} MB, after {gpu_after_mib:.0f} MB"))
    return checks


def settled_reading(gpu, seconds=5.0):
    """NVML's used memory once it has stopped changing (the driver frees a context lazily)."""
    last, deadline = None, time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = gpu.read()["gpu_used_mb"]
        if value == last:
            return value
        last = value
        time.sleep(0.2)
    return last


def write_input(folder, name):
    image = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16))
    sitk.WriteImage(image, str(folder / f"{name}{IMAGE_SUFFIX}"))


def run(work, out):
    gpu = Gpu()
    if not gpu.available:
        print(f"check_trace_gpu: no GPU to check ({gpu.reason})", file=sys.stderr)
        return 2
    print(f"GPU: {gpu.name}, {gpu.total_mb:.0f} MiB")
    reports = work / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    all_checks = []
    plans = [("holds", HOLDS, {}, ["case_a", "case_b"]),
             ("timeout", (TIMEOUT_HOLD,), {"timeout_s": TIMEOUT_S, "kill_grace_s": 2.0},
              ["case_t"])]
    for label, holds, options, names in plans:
        inputs = work / f"inputs_{label}"
        inputs.mkdir(exist_ok=True)
        for name in names:
            write_input(inputs, name)
        results = trace(inputs, out / label, load_command(holds, reports), progress=False,
                        **options)
        for result in results:
            record = asdict(result)
            after = settled_reading(gpu)
            samples = read_samples(out / label / "samples" / f"{result.name}.csv")
            if label == "timeout":
                checks = [("over-long case ends as timeout", result.status == "timeout",
                           result.reason or result.status),
                          ("GPU memory back to the start after the kill",
                           abs(after - result.gpu_used_before_mb) <= CONTEXT_SPREAD_MIB,
                           f"before {result.gpu_used_before_mb:.0f} MB, after {after:.0f} MB"),
                          ("the held memory was seen before the kill",
                           (result.gpu_max_mb or 0) - result.gpu_used_before_mb
                           >= TIMEOUT_HOLD[0], f"max {result.gpu_max_mb} MB")]
            else:
                report = json.loads((reports / f"{result.name}.json").read_text())
                checks = [("case ran", result.status == "ok",
                           f"{result.reason or 'ok'}; {report['framework']} ready "
                           f"{report['context_ready'] - report['started']:.1f} s after start")]
                checks += check_case(record, samples, report, after)
            all_checks += [(result.name, *check) for check in checks]
    gpu.close()
    width = max(len(c[1]) for c in all_checks)
    for name, check, passed, detail in all_checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name:7s} {check:{width}s}  {detail}")
    failed = [c for c in all_checks if not c[2]]
    print(f"{len(all_checks) - len(failed)} of {len(all_checks)} checks passed")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation.check_trace_gpu",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the traces are written (default: inside the scratch folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="check-trace-gpu-") as scratch:
        work = args.work or Path(scratch)
        return run(work, args.out or work / "trace")


if __name__ == "__main__":
    sys.exit(main())
