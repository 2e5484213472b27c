"""Write weights.json: what the shipped weights were trained on, how long, with which settings.

    python -m training.provenance --weights weights --localization-run runs/loc \\
        --segmentation-run runs/scn

Reads each run folder's args.json, log.csv and latest checkpoint (whose iteration an export from
the run holds; args.json's target may never have been reached). A network fine-tuned in a second
run (``--init-weights`` from the first run's export) takes both folders, oldest first
(``--segmentation-run runs/scn runs/scn_finetune``): iterations and wall time add up, the settings
are the last run's, and ``runs`` lists each one. With ``--extend``, the run folders given
continue the network that weights.json already records (its own run folders may be gone, e.g. on
a fresh machine): they are appended to its chain. A network given no run folder keeps its recorded
entry. Keeps any ``scores`` already in
weights.json (release/score_weights.py --update writes them), the fields recorded by hand
(``use_restrictions``, ``machines``, ``model_card``, ``notes``) and per network those the runs
cannot tell (e.g. a learning-rate schedule across resumed runs).
"""

import argparse
import csv
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from app.weights import PROVENANCE, PreprocessingSettings


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


def real_shares(args):
    """The run's share of real samples, and each --data folder's when it gave one per folder
    (``--data-weight`` was one number before it took one per folder)."""
    shares = args["data_weight"] if isinstance(args["data_weight"], list) else [args["data_weight"]]
    if not args["data"]:
        return {"real_sample_share": 0.0}
    summary = {"real_sample_share": round(sum(shares), 6)}
    if len(shares) > 1:
        summary["real_sample_share_per_folder"] = dict(zip(args["data"], shares))
    return summary


def run_summary(run, up_to=None, after=0):
    """A run's settings, and what it trained from iteration ``after`` (a folder that began as a
    copy of another run's checkpoint at that iteration: its log holds the other run's rows) to
    ``up_to`` (default: its latest checkpoint)."""
    args = json.loads((run / "args.json").read_text())
    up_to = trained_iterations(run) if up_to is None else up_to
    seconds = training_seconds(run / "log.csv", up_to)
    if after:
        seconds = round(seconds - training_seconds(run / "log.csv", after), 1)
    return {
        "iterations": up_to - after,
        "training_wall_seconds": seconds,
        "generated_training_cases": args["generated"],
        "generated_in_plane_size": args["generated_size"],
        "real_training_data": args["data"],
        **real_shares(args),
        **other_sources(args),
        "crop_size_zyx": args["crop_size"],
        "learning_rate": args["learning_rate"],
        **learning_rate_schedule(args),
        "ema_decay": args["ema_decay"],
        "precision": args["precision"],
        "last_validation": last_validation(run / "log.csv", up_to),
    }


def other_sources(args):
    """The run's rendered real anatomy and pseudo-labelled folders with their sample shares, its
    share of samples shown with another scanner's image quality, and its sample seed; only what
    the run used (older args.json files have none of them)."""
    out = {}
    if args.get("anatomy"):
        out["anatomy_training_cases"] = args["anatomy_cases"]
        if args.get("anatomy_first_case"):
            out["anatomy_first_training_case"] = args["anatomy_first_case"]
        out["anatomy_sample_share"] = args["anatomy_weight"]
    if args.get("pseudo"):
        out["pseudo_label_folders"] = args["pseudo"]
        out["pseudo_sample_share"] = args["pseudo_weight"]
    if args.get("image_quality"):
        out["image_quality_share"] = args["image_quality"]
    if "seed" in args:
        out["sample_seed"] = args["seed"]
    return out


def learning_rate_schedule(args):
    """The run's warm-up and decay of its learning rate (training.train --warm-up, --decay), only
    those it used: a run without them (and any run older than them) trained at one rate."""
    schedule = {}
    if args.get("warm_up"):
        schedule["warm_up_iterations"] = args["warm_up"]
    if args.get("decay"):
        first, last = args["decay"]
        schedule["learning_rate_decay"] = {"cosine_from_iteration": first, "to_iteration": last,
                                           "final_learning_rate": args["final_learning_rate"]}
    return schedule


# Our weights: NOTICE. The published weights that release.import_weights converts are GPL-3.0.
# Restrictions from the training data's terms are recorded by hand (``use_restrictions``) and kept.
LICENSE = "Apache-2.0"
RUN_FIELDS = ("iterations", "training_wall_seconds", "generated_training_cases", "learning_rate",
              "precision")
# In a run's chain entry when its summary has them (older args.json files lack some).
OPTIONAL_RUN_FIELDS = ("warm_up_iterations", "learning_rate_decay", "real_sample_share",
                       "real_sample_share_per_folder", "anatomy_training_cases",
                       "anatomy_first_training_case", "anatomy_sample_share",
                       "pseudo_label_folders", "pseudo_sample_share", "image_quality_share",
                       "sample_seed")


def chain_summary(runs, recorded=None):
    """One network trained in consecutive runs, each starting from the previous one's export.

    ``recorded``: the network's entry in an existing weights.json that the first of ``runs``
    continues; its ``runs`` list (or the entry itself, as one run) heads the chain.
    """
    summaries = [run_summary(run) for run in runs]
    chain = [{"run": run.name, **{k: s[k] for k in RUN_FIELDS + OPTIONAL_RUN_FIELDS if k in s}}
             for run, s in zip(runs, summaries)]
    if recorded is not None:
        if "iterations" not in recorded or "training_wall_seconds" not in recorded:
            raise ValueError("--extend: weights.json records no iterations and wall time for "
                             "the network to extend")
        chain = recorded.get("runs", [{"run": "recorded", **{k: recorded.get(k) for k in
                                                              RUN_FIELDS}}]) + chain
    if len(chain) == 1:
        return summaries[0]
    return {**summaries[-1],
            "iterations": sum(r["iterations"] for r in chain),
            "training_wall_seconds": round(sum(r["training_wall_seconds"] for r in chain), 1),
            "runs": chain}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--localization-run", type=Path, nargs="+", default=[],
                        help="run folder(s), oldest first when one fine-tuned the other; none: "
                             "keep the recorded entry")
    parser.add_argument("--segmentation-run", type=Path, nargs="+", default=[],
                        help="run folder(s), oldest first when one fine-tuned the other; none: "
                             "keep the recorded entry")
    parser.add_argument("--extend", action="store_true",
                        help="the run folders continue the networks weights.json records")
    parser.add_argument("--machine", default=None,
                        help="where the given runs trained (a key of weights.json's machines, or "
                             "a short description); recorded in each network entry written")
    args = parser.parse_args(argv)
    if not args.localization_run and not args.segmentation_run:
        parser.error("give --localization-run or --segmentation-run (or both)")
    path = args.weights / PROVENANCE
    previous = json.loads(path.read_text()) if path.exists() else {}
    provenance = {
        "date": datetime.date.today().isoformat(),
        "license": LICENSE,
        "training_code": "training/train.py",
        "preprocessing": asdict(PreprocessingSettings()),
    }
    for network, runs in (("localization", args.localization_run),
                          ("segmentation", args.segmentation_run)):
        recorded = previous.get(network, {})
        if not runs:
            if not recorded:
                parser.error(f"weights.json records no {network} network: give its run folder")
            provenance[network] = recorded
            continue
        try:
            summary = chain_summary(runs, recorded if args.extend else None)
        except ValueError as error:
            parser.error(f"{network}: {error}")
        provenance[network] = {**{k: v for k, v in recorded.items() if k not in summary},
                               **summary}
        if args.machine:
            provenance[network]["machine"] = args.machine
    for kept in ("use_restrictions", "machines", "real_anatomy", "model_card", "notes",
                 "shipping_rules", "scores"):
        if kept in previous:
            provenance[kept] = previous[kept]
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(provenance, indent=2) + "\n")
    temporary.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
