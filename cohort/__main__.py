"""python -m cohort run INPUT OUTPUT [--ray local|auto|ADDRESS] [--cpus-per-worker N]
    [--gpus-per-worker F] [--workers N] [--weights DIR] [--output-format nii.gz|dicom-seg|both]

Segments every case under INPUT (image files of every format app.io reads, and CT series of
DICOM trees as a PACS exports them) on a Ray cluster into OUTPUT/labels, with a manifest
(OUTPUT/manifest.sqlite), per-case logs (OUTPUT/logs) and the cohort table (OUTPUT/cohort.csv,
.parquet, .png). Safe to rerun: cases done before whose outputs verify are kept. Exit status:
0 every case done, 1 some failed, 2 nothing done (no case, unwritable output, weights missing),
130 interrupted. Details: docs/cohort.md.
"""

import argparse
import sys
from pathlib import Path


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cohort",
                                     description="Segment a cohort of CT scans on a Ray cluster.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="segment every case under INPUT into OUTPUT")
    run.add_argument("input_dir", type=Path, help="folder (searched recursively) of CT images "
                                                  "and DICOM files")
    run.add_argument("output_dir", type=Path, help="folder for labels/, logs/, the manifest and "
                                                   "the cohort table")
    run.add_argument("--ray", default="local",
                     help="'local' (default): start Ray on this machine; 'auto': join the running "
                          "cluster; or a cluster's address HOST:PORT")
    run.add_argument("--cpus-per-worker", type=positive(float), default=1.0,
                     help="CPUs Ray reserves for each worker (default 1)")
    run.add_argument("--gpus-per-worker", type=positive(float), default=None,
                     help="GPUs Ray gives each worker (default: 1 where the cluster has GPUs, "
                          "else none)")
    run.add_argument("--workers", type=positive(int), default=None,
                     help="number of workers (default: as many as the cluster's CPUs, or GPUs, "
                          "allow)")
    run.add_argument("--local-cpus", type=positive(int), default=None,
                     help="with --ray local: the CPUs Ray may use (default: all)")
    run.add_argument("--weights", type=Path, default=None,
                     help="weights folder (default: weights/)")
    run.add_argument("--output-format", choices=("nii.gz", "dicom-seg", "both"),
                     default="nii.gz",
                     help="nii.gz (default); dicom-seg: NAME.dcm for DICOM series (other cases "
                          "fail); both: NIfTI for every case and a DICOM SEG for DICOM series")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from cohort.run import run

    try:
        rows, kept, skipped = run(args.input_dir, args.output_dir, args.ray,
                                  args.cpus_per_worker, args.gpus_per_worker, args.workers,
                                  args.weights, args.output_format, args.local_cpus)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:  # ray.init: no cluster at that address
        print(f"error: --ray {args.ray}: cannot join the Ray cluster ({error})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cases are in the manifest; run the same command again to "
              "go on", file=sys.stderr)
        return 130
    failed = [row for row in rows if row["status"] != "done"]
    print(f"summary: {len(rows) - len(failed)} done ({len(kept)} kept from earlier runs), "
          f"{len(failed)} failed, {len(skipped)} files skipped; table: "
          f"{args.output_dir / 'cohort.csv'}, manifest: {args.output_dir / 'manifest.sqlite'}",
          file=sys.stderr)
    for row in failed:
        print(f"failed: {row['name']}: {row['error']}", file=sys.stderr)
    if rows and len(failed) == len(rows):
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
