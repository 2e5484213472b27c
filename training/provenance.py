"""Write weights.json: what the shipped weights were trained on, how long, with which settings.

    python -m training.provenance --weights weights --localization-run runs/loc \\
        --segmentation-run runs/scn

Reads each run folder's args.json and log.csv; keeps any ``scores`` already in weights.json
(evaluation/score_weights.py --update writes them), its ``notes``, and per network the fields
recorded by hand that the runs cannot tell (e.g. a learning-rate schedule across resumed runs).
"""

import argparse
import csv
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from app.predictor import PROVENANCE, PreprocessingSettings


def training_seconds(log_path):
    """Wall seconds of training from a run's log (the clock restarts with every resumed process)."""
    total, segment_max, previous = 0.0, 0.0, -1.0
    with open(log_path) as f:
        for row in csv.DictReader(f):
            seconds = float(row["seconds"])
            if seconds < previous:
                total += segment_max
                segment_max = 0.0
            segment_max = max(segment_max, seconds)
            previous = seconds
    return round(total + segment_max, 1)


def last_validation(log_path):
    with open(log_path) as f:
        rows = [row for row in csv.DictReader(f) if row["validation"]]
    return json.loads(rows[-1]["validation"]) if rows else None


def run_summary(run):
    args = json.loads((run / "args.json").read_text())
    return {
        "iterations": args["iterations"],
        "training_wall_seconds": training_seconds(run / "log.csv"),
        "generated_training_cases": args["generated"],
        "generated_in_plane_size": args["generated_size"],
        "real_training_data": args["data"],
        "real_sample_share": args["data_weight"] if args["data"] else 0.0,
        "crop_size_zyx": args["crop_size"],
        "learning_rate": args["learning_rate"],
        "ema_decay": args["ema_decay"],
        "precision": args["precision"],
        "last_validation": last_validation(run / "log.csv"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--localization-run", type=Path, required=True)
    parser.add_argument("--segmentation-run", type=Path, required=True)
    parser.add_argument("--machine", default="2-core AMD EPYC CPU, no GPU")
    args = parser.parse_args(argv)
    path = args.weights / PROVENANCE
    previous = json.loads(path.read_text()) if path.exists() else {}
    provenance = {
        "date": datetime.date.today().isoformat(),
        "license": "trained by this project; no third-party weights",
        "machine": args.machine,
        "training_code": "training/train.py",
        "preprocessing": asdict(PreprocessingSettings()),
        "localization": run_summary(args.localization_run),
        "segmentation": run_summary(args.segmentation_run),
    }
    for network in ("localization", "segmentation"):
        recorded = previous.get(network, {})
        provenance[network] = {**{k: v for k, v in recorded.items() if k not in provenance[network]},
                               **provenance[network]}
    for kept in ("notes", "scores"):
        if kept in previous:
            provenance[kept] = previous[kept]
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(provenance, indent=2) + "\n")
    temporary.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
