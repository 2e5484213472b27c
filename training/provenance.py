"""Write weights.json: what the shipped weights were trained on, how long, with which settings.

    python -m training.provenance --weights weights --localization-run runs/loc \\
        --segmentation-run runs/scn

Reads each run folder's args.json, log.csv and latest checkpoint (whose iteration an export from
the run holds; args.json's target may never have been reached). A network fine-tuned in a second
run (``--init-weights`` from the first run's export) takes both folders, oldest first
(``--segmentation-run runs/scn runs/scn_finetune``): iterations and wall time add up, the settings
are the last run's, and ``runs`` lists each one. Keeps any ``scores`` already in
weights.json (evaluation/score_weights.py --update writes them), its ``notes``, and per network
the fields recorded by hand that the runs cannot tell (e.g. a learning-rate schedule across
resumed runs).
"""

import argparse
import csv
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from app.predictor import PROVENANCE, PreprocessingSettings


def log_rows(log_path, up_to=None):
    """The rows of a run's log.csv, only those up to iteration ``up_to`` when given."""
    with open(log_path) as f:
        return [row for row in csv.DictReader(f)
                if up_to is None or int(row["iteration"]) <= up_to]


def training_seconds(log_path, up_to=None):
    """Wall seconds of training from a run's log (the clock restarts with every resumed process)."""
    total, segment_max, previous = 0.0, 0.0, -1.0
    for row in log_rows(log_path, up_to):
        seconds = float(row["seconds"])
        if seconds < previous:
            total += segment_max
            segment_max = 0.0
        segment_max = max(segment_max, seconds)
        previous = seconds
    return round(total + segment_max, 1)


def last_validation(log_path, up_to=None):
    rows = [row for row in log_rows(log_path, up_to) if row["validation"]]
    return json.loads(rows[-1]["validation"]) if rows else None


def trained_iterations(run):
    """The iteration of the run's latest checkpoint (what an export from the run holds); without
    a checkpoint, the last iteration in its log."""
    checkpoints = run / "checkpoints"
    if checkpoints.is_dir():
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(str(checkpoints))
        if latest:
            return int(tf.train.load_checkpoint(latest).get_tensor(
                "iteration/.ATTRIBUTES/VARIABLE_VALUE"))
    rows = log_rows(run / "log.csv")
    return int(rows[-1]["iteration"]) if rows else 0


def run_summary(run):
    args = json.loads((run / "args.json").read_text())
    iterations = trained_iterations(run)
    return {
        "iterations": iterations,
        "training_wall_seconds": training_seconds(run / "log.csv", iterations),
        "generated_training_cases": args["generated"],
        "generated_in_plane_size": args["generated_size"],
        "real_training_data": args["data"],
        "real_sample_share": args["data_weight"] if args["data"] else 0.0,
        "crop_size_zyx": args["crop_size"],
        "learning_rate": args["learning_rate"],
        "ema_decay": args["ema_decay"],
        "precision": args["precision"],
        "last_validation": last_validation(run / "log.csv", iterations),
    }


def chain_summary(runs):
    """One network trained in consecutive runs, each starting from the previous one's export."""
    summaries = [run_summary(run) for run in runs]
    if len(summaries) == 1:
        return summaries[0]
    return {**summaries[-1],
            "iterations": sum(s["iterations"] for s in summaries),
            "training_wall_seconds": round(sum(s["training_wall_seconds"] for s in summaries), 1),
            "runs": [{"run": run.name, **{k: s[k] for k in (
                "iterations", "training_wall_seconds", "generated_training_cases",
                "learning_rate", "precision")}} for run, s in zip(runs, summaries)]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--localization-run", type=Path, nargs="+", required=True,
                        help="run folder(s), oldest first when one fine-tuned the other")
    parser.add_argument("--segmentation-run", type=Path, nargs="+", required=True,
                        help="run folder(s), oldest first when one fine-tuned the other")
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
        "localization": chain_summary(args.localization_run),
        "segmentation": chain_summary(args.segmentation_run),
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
