"""Benchmark: one process per case, as the organisers run it; seconds per stage.

    python -m benchmarks.predict [--size 512 512 200] [--repeats 2]

Generates one case, then runs ``predict.sh`` on it in a fresh process ``--repeats`` times and
prints the wall time of the whole command (process start, imports and model loading included)
and the per-stage seconds from the CLI's report.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 200))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    from synthetic import CaseGeometry, write_case

    work = Path(tempfile.mkdtemp(prefix="benchmark-"))
    geometry = CaseGeometry(tuple(args.size), tuple(args.spacing), (0.0, 0.0, 0.0),
                            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image_path, _ = write_case(work / "inputs", "bench", args.seed, geometry=geometry)
    (work / "inputs" / "bench.nii.gz").unlink()  # only the image goes in
    print(f"case {'x'.join(map(str, args.size))} at {args.spacing} mm: {image_path}")
    for repeat in range(args.repeats):
        report = work / f"report_{repeat}.jsonl"
        start = time.perf_counter()
        subprocess.run([str(ROOT / "predict.sh"), str(work / "inputs"), str(work / "outputs"),
                        "--quiet", "--report", str(report)], check=True)
        wall = time.perf_counter() - start
        record = json.loads(report.read_text().splitlines()[0])
        stages = {"model_load": record["model_load_seconds"], **record["seconds"]}
        print(f"run {repeat}: {wall:.2f} s end to end; peak RSS {record['peak_memory_mb']:.0f} MB; "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
