"""Add a scored round of a shipping rule to the rule's record in weights.json.

    python -m release.record_round OUT --rule R-pseudo2 --scored-on "2-core Intel Xeon" \\
        [--weights weights] [--next TEXT | --concluded TEXT]

OUT is the folder ``release/candidates.sh`` filled. The round is built from its files, not
typed: N and what each candidate is from candA/ and candB/ (the EMA snapshot, the snapshots
averaged), pass, fail and what ships from rule.json (the verdict), and for rules that pseudo-label
the unlabelled scan each candidate's organ volumes there (pseudo_A.json, pseudo_B.json). The rule
must already be recorded (it is written before its run) and must not hold a round at that N yet.
``--next`` says what comes after this round; ``--concluded`` closes the rule (its ``outcome``)
and drops ``next``. Installing a winning candidate's weights is a separate step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE


class RecordError(ValueError):
    """OUT or weights.json cannot give the round: names the file and what is wrong."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: missing (has release/candidates.sh finished?)") from None
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: not JSON ({error})") from None


def candidate_entry(folder: Path, network: str) -> dict:
    """The network's weights.json entry of a candidate folder."""
    entry = read_json(folder / PROVENANCE).get(network)
    if not isinstance(entry, dict):
        raise RecordError(f"{folder / PROVENANCE}: no {network} entry")
    return entry


def describe_candidates(out: Path, network: str) -> tuple[int, dict[str, str]]:
    """(N, {"A": ..., "B": ...}): A is an EMA snapshot, whose iteration is the round's N; B
    averages snapshots, the last of them at N."""
    snapshot = candidate_entry(out / "candA", network).get("snapshot")
    if not snapshot:
        raise RecordError(f"{out / 'candA' / PROVENANCE}: not a training snapshot")
    n = snapshot["iteration"]
    averaged = candidate_entry(out / "candB", network).get("averaged_snapshots")
    if not averaged:
        raise RecordError(f"{out / 'candB' / PROVENANCE}: not an average of training snapshots")
    iterations = [item["iteration"] for item in averaged]
    if iterations[-1] != n or len({item["run"] for item in averaged + [snapshot]}) != 1:
        raise RecordError(f"{out}: B averages snapshots {iterations}, A is snapshot {n} of "
                          f"{snapshot['run']}: not one round of one run")
    return n, {"A": f"EMA snapshot at {n}",
               "B": "mean of EMA snapshots " + ", ".join(str(i) for i in iterations)}


def round_record(out: Path, network: str, scored_on: str) -> dict:
    """The round's entry for weights.json's ``shipping_rules``."""
    n, candidates = describe_candidates(out, network)
    verdict = read_json(out / "rule.json")
    judged = verdict["candidates"]
    if set(judged) != set(candidates):
        raise RecordError(f"{out / 'rule.json'}: judges {sorted(judged)}, not both candidates")
    ships = verdict["ships"]
    passing = [name for name in sorted(judged) if judged[name]["passes"]]
    outcome = (f"{ships} ships" if ships else "nothing ships")
    if len(passing) == 2:
        outcome = f"both pass; {outcome}"
    record = {"n": n, "candidates": candidates, "outcome": outcome,
              "failed": {name: judged[name]["failed"] for name in sorted(judged)
                         if judged[name]["failed"]},
              "scored_on": scored_on}
    volumes = {}
    for name in sorted(candidates):
        path = out / f"pseudo_{name}.json"
        if path.exists():
            cases = read_json(path)["cases"]
            volumes[name] = (next(iter(cases.values()))["volumes_ml"] if len(cases) == 1 else
                             {case: entry["volumes_ml"] for case, entry in cases.items()})
    if volumes:
        record["pseudo_label_volumes_ml"] = volumes
    return record


def recorded_rule(provenance: dict, rule: str) -> dict:
    """The entry of ``rule`` in weights.json's ``shipping_rules``."""
    rules = provenance.get("shipping_rules") or []
    for entry in rules:
        if entry.get("rule") == rule:
            return entry
    known = ", ".join(entry.get("rule", "?") for entry in rules) or "none"
    raise RecordError(f"weights.json records no rule {rule} (recorded: {known}); a rule is "
                      "recorded when it is written, before its run")


def add_round(provenance: dict, rule: str, record: dict, next_step: str | None = None,
              concluded: str | None = None) -> dict:
    """``provenance`` with ``record`` appended to ``rule``'s rounds (a new dict)."""
    recorded = recorded_rule(provenance, rule)
    entry = dict(recorded)
    rounds = list(entry.get("rounds", []))
    if any(existing.get("n") == record["n"] for existing in rounds):
        raise RecordError(f"weights.json: {rule} already has a round at N = {record['n']}")
    entry["rounds"] = rounds + [record]
    if concluded:
        entry.pop("next", None)
        entry["outcome"] = concluded
    elif next_step:
        entry["next"] = next_step
    return {**provenance, "shipping_rules": [entry if item is recorded else item
                                             for item in provenance["shipping_rules"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder release/candidates.sh filled")
    parser.add_argument("--rule", required=True, help="the rule's name in weights.json")
    parser.add_argument("--scored-on", required=True, help="the machine that scored the round")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    after = parser.add_mutually_exclusive_group()
    after.add_argument("--next", dest="next_step", help="what comes after this round")
    after.add_argument("--concluded", help="the rule is closed: its outcome")
    args = parser.parse_args(argv)
    path = args.weights / PROVENANCE
    try:
        provenance = read_json(path)
        network = recorded_rule(provenance, args.rule).get("network", "segmentation")
        record = round_record(args.out, network, args.scored_on)
        updated = add_round(provenance, args.rule, record, args.next_step, args.concluded)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(json.dumps(updated, indent=2) + "\n")
    temporary.replace(path)
    print(f"{path}: {args.rule} round at N = {record['n']}: {record['outcome']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
