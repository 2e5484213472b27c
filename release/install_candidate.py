"""Install the candidate a shipping rule chose as the shipped weights, with its provenance.

    python -m release.install_candidate OUT --rule R-decay --run RUNS/scn_decay \\
        --machine xeon_amx [--from-checkpoint 8000] [--weights weights]

OUT is the folder ``release/candidates.sh`` filled and ``release.record_round`` recorded: the
rule must hold a round at OUT's N whose verdict (OUT/rule.json) ships a candidate. That
candidate's network file replaces the shipped one; the other network must be the shipped one
byte for byte (it is what was scored beside it). weights.json gains, from files rather than by
hand:

- the run in the network's chain (``runs``): iterations and wall time from the run's log up to N,
  its settings and data sources from args.json, where it started, which rule shipped it;
- the totals, the run's settings at the network level, the export (which snapshots, numbered in
  the chain's iterations) and the run's last in-training validation up to N;
- ``scores``: the candidate's scores file (release.score_weights).

A run folder that began as a copy of the previous run's folder at its checkpoint N0 (to continue
its optimizer state, not only its exported weights) takes ``--from-checkpoint N0``: only what the
run trained after N0 is its own. Otherwise the run must have started from the shipped weights
(``--init-weights``). A pseudo-label folder the run trained on that weights.json does not list
yet becomes the network's next pseudo-label round, from the folder's own pseudo_labels.json
(which weights made the labels, what they cover, the volumes); a folder without one is refused.
What the runs cannot tell (the real-anatomy maps, partial labels, augmentation history) stays as
recorded; a run that trained on other anatomy cases than the network records, or on a partly
labelled case (its --data folders' declarations) that the network's ``partial_labels`` does not
list with the same organs, is refused, as those entries would then be wrong.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

from app import method
from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE, WEIGHTS_FILES
from release.record_round import RecordError, candidate_entry, read_json, recorded_rule
from training.provenance import OPTIONAL_RUN_FIELDS, RUN_FIELDS, run_summary

# The run's settings that describe the network as a whole once the run ships (the totals and the
# chain are computed; validation and export are the candidate's).
NETWORK_SETTINGS = ("generated_training_cases", "generated_in_plane_size", "real_training_data",
                    "real_sample_share", "real_sample_share_per_folder", "anatomy_training_cases",
                    "anatomy_first_training_case", "anatomy_sample_share", "pseudo_sample_share",
                    "image_quality_share", "sample_seed", "crop_size_zyx", "learning_rate",
                    "warm_up_iterations", "learning_rate_decay", "ema_decay", "precision")


class InstallError(RecordError):
    """The candidate cannot be installed: names the file and the reason."""


def chosen_candidate(out: Path, provenance: dict, rule: str) -> tuple[str, int, str]:
    """(candidate name, N, network): what the rule's verdict in OUT ships, checked against the
    round recorded in weights.json."""
    entry = recorded_rule(provenance, rule)
    network = entry.get("network", "segmentation")
    verdict = read_json(out / "rule.json")
    ships = verdict.get("ships")
    if not ships:
        raise InstallError(f"{out / 'rule.json'}: nothing ships in this round")
    snapshots = snapshots_of(out / f"cand{ships}", network)
    n = snapshots[-1][1]
    rounds = {item.get("n"): item for item in entry.get("rounds", [])}
    if n not in rounds:
        raise InstallError(f"weights.json: {rule} has no round at N = {n} (record it first: "
                           f"python -m release.record_round {out} --rule {rule} ...)")
    if f"{ships} ships" not in rounds[n].get("outcome", ""):
        raise InstallError(f"weights.json: {rule}'s round at N = {n} records "
                           f"{rounds[n].get('outcome')!r}, not that {ships} ships")
    return ships, n, network


def snapshots_of(folder: Path, network: str) -> list[tuple[str, int]]:
    """[(run folder, iteration)] of the training snapshots a candidate folder holds or averages."""
    entry = candidate_entry(folder, network)
    items = entry.get("averaged_snapshots") or ([entry["snapshot"]] if "snapshot" in entry else [])
    if not items:
        raise InstallError(f"{folder / PROVENANCE}: neither a training snapshot nor an average")
    return [(item["run"], item["iteration"]) for item in items]


def portable(path: str, runs_folder: Path) -> str:
    """A folder under the runs' parent folder as RUNS/..., as the pseudo-label rounds name it."""
    try:
        return "RUNS/" + Path(path).resolve().relative_to(runs_folder.resolve()).as_posix()
    except ValueError:
        return path


def check_anatomy(summary: dict, recorded: dict, run: Path):
    """Refuse a run whose rendered anatomy is not what weights.json's ``real_anatomy`` maps
    describe for the network."""
    if "anatomy_training_cases" in summary:
        maps = (recorded.get("real_anatomy") or {}).get("maps_used") or {}
        if sum(maps.values()) != summary["anatomy_training_cases"]:
            raise InstallError(f"{run / 'args.json'}: the run renders "
                               f"{summary['anatomy_training_cases']} anatomy maps, weights.json's "
                               f"real_anatomy counts {sum(maps.values())}: record its maps first")


def check_partial_labels(args: dict, recorded: dict, run: Path):
    """Refuse a run whose --data folders declare partly labelled cases (labelled.json,
    dataset.json) that weights.json's ``partial_labels`` does not list with the same organs."""
    from training.cases import case_coverage
    from training.coverage import ALL_ORGANS, DeclarationError

    listed = (recorded.get("partial_labels") or {}).get("cases", {})
    for folder in args.get("data") or []:
        if not Path(folder).is_dir():
            raise InstallError(f"{run / 'args.json'}: its --data folder {folder} is not here, so "
                               f"its partial labels cannot be checked")
        try:
            coverage = case_coverage(folder)
        except DeclarationError as error:
            raise InstallError(str(error)) from None
        for case, covered in sorted(coverage.items()):
            if tuple(covered) == tuple(ALL_ORGANS):
                continue
            organs = [method.LABELS[label] for label in covered]
            if sorted(listed.get(case, [])) != sorted(organs):
                raise InstallError(f"{run / 'args.json'}: case {case} of {folder} covers "
                                   f"{organs}, weights.json's partial_labels lists "
                                   f"{listed.get(case)}: record it first")


# What a pseudo-label round records of the folder's pseudo_labels.json (training.pseudo_label):
# how the labels were thresholded and which organs they cover, and per case what came out.
ROUND_SETTINGS = ("min_probability", "min_island_fraction", "second_weights", "precision",
                  "ignored", "outside_roi", "covered")
ROUND_CASE_FIELDS = ("volumes_ml", "covered", "ignored_share", "ignored_share_of_organ_voxels")


def pseudo_round(folder: Path, name: str, number: int, share) -> dict:
    """Pseudo-label round ``number`` from ``folder``'s pseudo_labels.json, named ``name`` in
    weights.json."""
    path = folder / "pseudo_labels.json"
    if not path.is_file():
        raise InstallError(f"{path}: missing, so the run's pseudo-label folder {name}, not among "
                           f"weights.json's pseudo_labels rounds, cannot be recorded")
    made = read_json(path)
    cases = made.get("cases")
    weights = made.get("weights")
    if not cases or not isinstance(weights, dict) or "sha256" not in weights:
        raise InstallError(f"{path}: lists no pseudo-labelled case or not the weights that "
                           f"made them")
    images = sorted({Path(case["input"]).parent.as_posix() for case in cases.values()})
    return {"round": number, "folder": name, "images": images[0] if len(images) == 1 else images,
            "cases": sorted(cases), "made_on": weights.get("date"),
            "weights_sha256": weights["sha256"],
            "weights_export": {network: weights[network]["export"]
                               for network in ("localization", "segmentation")
                               if isinstance(weights.get(network), dict)},
            **{key: made[key] for key in ROUND_SETTINGS if key in made},
            "per_case": {case: {key: entry[key] for key in ROUND_CASE_FIELDS if key in entry}
                         for case, entry in sorted(cases.items())},
            "sample_share": share}


def pseudo_labels_with_run(recorded: dict, folders: list[str], summary: dict) -> dict | None:
    """The network's ``pseudo_labels`` entry once the run ships: its recorded rounds, then a new
    round for each of the run's folders (as given in args.json) not among them."""
    entry = dict(recorded.get("pseudo_labels") or {})
    rounds = list(entry.get("rounds", []))
    names = {item.get("folder") for item in rounds}
    for folder, name in zip(folders, summary.get("pseudo_label_folders", [])):
        if name not in names:
            number = max((item.get("round", 0) for item in rounds), default=0) + 1
            rounds.append(pseudo_round(Path(folder), name, number,
                                       summary.get("pseudo_sample_share")))
            names.add(name)
    return {**entry, "rounds": rounds} if rounds else None


def installed_entry(recorded: dict, run: Path, snapshots: list[tuple[str, int]],
                    from_checkpoint: int, rule: str, name: str, machine: str) -> dict:
    """The network's weights.json entry once the candidate ships."""
    n = snapshots[-1][1]
    if any(Path(folder).resolve() != run.resolve() for folder, _ in snapshots):
        raise InstallError(f"the candidate holds snapshots of {sorted({f for f, _ in snapshots})}"
                           f", not of {run}")
    if from_checkpoint >= snapshots[0][1]:
        raise InstallError(f"--from-checkpoint {from_checkpoint}: the candidate's snapshots "
                           f"({[i for _, i in snapshots]}) must come after it")
    chain = list(recorded.get("runs") or [])
    if not chain or "iterations" not in recorded:
        raise InstallError("weights.json records no chain of runs for the network")
    if any(item.get("run") == run.name for item in chain):
        raise InstallError(f"weights.json: run {run.name} is already in the chain")
    args = read_json(run / "args.json")
    if not from_checkpoint and not args.get("init_weights"):
        raise InstallError(f"{run / 'args.json'}: the run started from scratch, not from the "
                           f"shipped weights, so it does not continue their chain")
    summary = run_summary(run, up_to=n, after=from_checkpoint)
    folders = list(summary.get("pseudo_label_folders", []))
    if folders:
        summary["pseudo_label_folders"] = [portable(p, run.parent) for p in folders]
    check_anatomy(summary, recorded, run)
    check_partial_labels(args, recorded, run)
    pseudo_labels = pseudo_labels_with_run(recorded, folders, summary)
    first = recorded["iterations"]
    started = {"started_from": chain[-1]["run"]}
    if from_checkpoint:
        started["started_from_checkpoint"] = from_checkpoint
    link = {"run": run.name, "first_iteration": first,
            **{k: summary[k] for k in RUN_FIELDS + OPTIONAL_RUN_FIELDS if k in summary},
            "shipped": {"rule": rule, "candidate": name}, **started, "machine": machine}
    iterations = [first + i - from_checkpoint for _, i in snapshots]
    export = {"weights": "ema", "run": run.name,
              **({"mean_of_iterations": iterations} if len(iterations) > 1 else
                 {"iteration": iterations[0]})}
    validation = summary["last_validation"]
    entry = {**recorded, **{k: summary[k] for k in NETWORK_SETTINGS if k in summary},
             "export": export, "iterations": first + summary["iterations"],
             "training_wall_seconds": round(recorded["training_wall_seconds"]
                                            + summary["training_wall_seconds"], 1),
             "runs": chain + [link], "machine": machine,
             **({"pseudo_labels": pseudo_labels} if pseudo_labels else {})}
    # settings the new run does not have (a schedule) must not be inherited from older runs
    for key in NETWORK_SETTINGS:
        if key not in summary:
            entry.pop(key, None)
    if validation:
        entry["last_validation"] = {"iteration": n, "run": run.name,
                                    "validation_cases": args.get("validation"), **validation}
    else:
        entry.pop("last_validation", None)
    return entry


def install(out: Path, weights: Path, rule: str, run: Path, machine: str,
            from_checkpoint: int = 0) -> tuple[str, dict]:
    """Install OUT's chosen candidate into ``weights``; returns (candidate, new weights.json)."""
    path = weights / PROVENANCE
    provenance = read_json(path)
    name, n, network = chosen_candidate(out, provenance, rule)
    if machine not in provenance.get("machines", {}):
        raise InstallError(f"{path}: machine {machine!r} is not among its machines "
                           f"({', '.join(provenance.get('machines', {})) or 'none'}): add it")
    candidate = out / f"cand{name}"
    for other in WEIGHTS_FILES:
        if other != network and not filecmp.cmp(candidate / WEIGHTS_FILES[other],
                                                weights / WEIGHTS_FILES[other], shallow=False):
            raise InstallError(f"{candidate / WEIGHTS_FILES[other]}: differs from the shipped "
                               f"{other} network, so the candidate was not scored beside it")
    if filecmp.cmp(candidate / WEIGHTS_FILES[network], weights / WEIGHTS_FILES[network],
                   shallow=False):
        raise InstallError(f"{candidate / WEIGHTS_FILES[network]}: already the shipped weights")
    entry = installed_entry(provenance.get(network) or {}, run,
                            snapshots_of(candidate, network), from_checkpoint, rule, name,
                            machine)
    updated = {**provenance, "date": datetime.date.today().isoformat(), network: entry,
               "scores": read_json(out / f"scores_{name}.json")}
    target = weights / WEIGHTS_FILES[network]
    staged = {suffix: target.with_name(target.name + suffix) for suffix in (".part", ".previous")}
    staged_json = path.with_name(path.name + ".part")
    try:
        shutil.copyfile(candidate / WEIGHTS_FILES[network], staged[".part"])
        staged_json.write_text(json.dumps(updated, indent=2) + "\n")
        shutil.copyfile(target, staged[".previous"])
        os.replace(staged[".part"], target)
        try:
            os.replace(staged_json, path)
        except OSError:  # weights and weights.json change together or not at all
            os.replace(staged[".previous"], target)
            raise
    finally:
        for part in (*staged.values(), staged_json):
            part.unlink(missing_ok=True)
    return name, updated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder release/candidates.sh filled")
    parser.add_argument("--rule", required=True, help="the rule's name in weights.json")
    parser.add_argument("--run", type=Path, required=True, help="the candidates' training run")
    parser.add_argument("--machine", required=True,
                        help="where the run trained (a key of weights.json's machines)")
    parser.add_argument("--from-checkpoint", type=int, default=0, metavar="N0",
                        help="the run folder began as a copy of the previous run's at its "
                             "checkpoint N0")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    args = parser.parse_args(argv)
    if args.from_checkpoint < 0:
        parser.error(f"--from-checkpoint {args.from_checkpoint}: must be >= 0")
    try:
        name, updated = install(args.out, args.weights, args.rule, args.run, args.machine,
                                args.from_checkpoint)
    except (RecordError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    network = recorded_rule(updated, args.rule).get("network", "segmentation")
    print(f"installed {args.out / f'cand{name}'} as the {network} network in {args.weights}: "
          f"{updated[network]['iterations']} iterations in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
