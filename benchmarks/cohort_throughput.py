"""Cases per hour of the cohort command (Ray, 1 and 2 workers) beside the folder command, on
this machine; Ray's overhead per case; peak memory per worker; a paper estimate for N nodes.

    python -m benchmarks.cohort_throughput [--cases 8] [--size 256 256 80] [--work DIR]

Every mode segments the same generated cases from scratch, each in a fresh process, as a user
runs it (start-up and model loading included in the wall time):

- folder: ``python -m app IN OUT --report``;
- cohort, k workers: ``python -m cohort run IN OUT --ray local --workers k`` (a new local Ray
  cluster each time, one CPU per worker).

Per case: the folder command's seconds (read wait + predict + write, from its report) and the
cohort's time between two cases finishing on one worker (from the manifest, as the driver saw
them: Ray's scheduling and calls included), each without the first case of a process (the
networks' first call traces them). Ray's overhead per case = cohort(1 worker) / folder - 1.
"""

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from synthetic import CaseGeometry, generate_case

ROOT = Path(__file__).resolve().parent.parent


def make_cases(folder, count, size):
    folder.mkdir(parents=True, exist_ok=True)
    spacing = (384.0 / size[0], 384.0 / size[1], 3.0)  # a 384 mm field of view
    for seed in range(count):
        geometry = CaseGeometry(size, spacing, (-190.0, -200.0, -330.0))
        image, _ = generate_case(100 + seed, geometry=geometry)
        sitk.WriteImage(image, str(folder / f"b{seed:03d}_0000.nii.gz"), useCompression=True)


def timed(command):
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_USAGE_STATS_ENABLED": "0"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def folder_mode(inputs, work):
    output, report = work / "folder_out", work / "folder.jsonl"
    wall = timed([sys.executable, "-m", "app", str(inputs), str(output), "--quiet",
                  "--report", str(report)])
    records = [json.loads(line) for line in report.read_text().splitlines()]
    per_case = [r["seconds"]["total"] for r in records][1:]
    return {"wall_s": wall, "per_case_s": statistics.median(per_case),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in records)}


def cohort_mode(inputs, work, workers):
    output = work / f"cohort_{workers}"
    wall = timed([sys.executable, "-m", "cohort", "run", str(inputs), str(output), "--ray",
                  "local", "--workers", str(workers), "--local-cpus", "2"])
    with sqlite3.connect(output / "manifest.sqlite") as connection:
        rows = [(updated, json.loads(record)) for updated, record in connection.execute(
            "SELECT updated, record FROM cases WHERE status = 'done' ORDER BY updated")]
    by_worker = {}
    for updated, record in rows:
        by_worker.setdefault(record["pid"], []).append((updated, record))
    intervals, on_worker = [], []
    for finished in by_worker.values():  # the first case of each worker left out
        intervals += [b[0] - a[0] for a, b in zip(finished, finished[1:])]
        on_worker += [record["seconds"]["total"] for _, record in finished[1:]]
    return {"wall_s": wall, "per_case_s": statistics.median(intervals) if intervals else None,
            "on_worker_s": statistics.median(on_worker) if on_worker else None,
            "peak_memory_mb": max(record["peak_memory_mb"] for _, record in rows),
            "workers_seen": len(by_worker)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 80),
                        help="voxels x y z of each generated case")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new "
                                                                "temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cohort-benchmark-"))
    inputs = work / "in"
    make_cases(inputs, args.cases, tuple(args.size))
    print(f"{args.cases} generated cases of {'x'.join(map(str, args.size))} voxels in {inputs}; "
          f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.1f}")
    results = {"folder": folder_mode(inputs, work)}
    for workers in (1, 2):
        results[f"cohort, {workers} worker{'s' if workers > 1 else ''}"] = cohort_mode(
            inputs, work, workers)
    # cases/h end to end (start-up and loading included) and steady (the per-case time of each
    # worker, all workers at once)
    print(f"{'mode':<18} {'wall s':>7} {'cases/h':>8} {'steady':>7} {'s/case':>7} "
          f"{'peak MB':>8}")
    for mode, result in results.items():
        workers = result.get("workers_seen", 1)
        per_case = result["per_case_s"]
        steady = f"{workers * 3600 / per_case:.0f}" if per_case else "-"
        print(f"{mode:<18} {result['wall_s']:7.1f} {args.cases / result['wall_s'] * 3600:8.0f} "
              f"{steady:>7} {per_case or 0:7.2f} {result['peak_memory_mb']:8.0f}")
    folder, single = results["folder"], results["cohort, 1 worker"]
    overhead = single["per_case_s"] / folder["per_case_s"] - 1
    print(f"Ray's overhead per case (1 worker vs folder, first case of each left out): "
          f"{overhead:+.1%} ({single['per_case_s']:.2f} s vs {folder['per_case_s']:.2f} s; "
          f"on the worker itself {single['on_worker_s']:.2f} s)")
    per_case = single["per_case_s"]
    print(f"on paper, from {per_case:.2f} s per case per worker: N nodes x W workers give "
          f"N x W x {3600 / per_case:.0f} cases/h (e.g. 10 nodes x 2 workers: "
          f"{10 * 2 * 3600 / per_case:.0f} cases/h; 50,000 series in "
          f"{50_000 * per_case / (10 * 2) / 3600:.1f} h); on GPUs, time one case with "
          "--gpus-per-worker and use the same formula (N nodes x G GPUs)")
    return results


if __name__ == "__main__":
    main()
