"""Apply rule R-anatomy (weights/MODEL_CARD.md) to the scores of the shipped weights and of the
candidates, as ``python -m release.score_weights --anatomy ... --json FILE`` writes them.

    python -m release.shipping_rule BASELINE.json A=CANDIDATE_A.json [B=CANDIDATE_B.json]

Prints every condition with both numbers and PASS/FAIL per candidate, then the candidate the rule
ships (or none). The thresholds are the rule's, fixed before any candidate was scored; change them
only with a new rule in the model card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORGANS = ("liver", "kidney", "spleen", "pancreas")


def organ_means(section: dict, metric: str) -> dict[str, float]:
    return {organ: section[metric][organ]["mean"] for organ in ORGANS if organ in section[metric]}


def mean_of(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def no_organ_falls(text: str, before: dict[str, float], after: dict[str, float],
                   limit: float) -> tuple[str, bool, str]:
    """The condition ``text``: no organ's value in ``after`` is below ``before``'s by more than
    ``limit``; the numbers name the organ that fell most."""
    worst = min(before, key=lambda organ: after[organ] - before[organ])
    return (text, all(after[o] >= before[o] - limit - 1e-9 for o in before),
            f"worst {worst} {before[worst]:.4f} -> {after[worst]:.4f}")


def real_pancreas(real: dict) -> float:
    """The mean of ts_example's and ts_dicom's pancreas DSC (either alone is one small structure,
    too noisy to decide on)."""
    return 0.5 * (real["ts_example"]["pancreas"]["dsc"] + real["ts_dicom"]["pancreas"]["dsc"])


def dsc_of(case: dict) -> dict[str, float]:
    return {organ: scores["dsc"] for organ, scores in case.items()}


def prefer_average(passing: list[str], merit: dict[str, float]) -> str | None:
    """The rules' choice among the candidates that pass: B (the average of snapshots) unless A's
    merit is higher by more than 0.01."""
    if not passing:
        return None
    if set(passing) == {"A", "B"}:
        return "A" if merit["A"] - merit["B"] > 0.01 + 1e-9 else "B"
    return passing[0]


def conditions(base: dict, cand: dict) -> list[tuple[str, bool, str]]:
    """(condition, holds, numbers) for each of the rule's conditions."""
    out = []
    anatomy_base, anatomy_cand = base["anatomy_held_out"], cand["anatomy_held_out"]
    for metric, rise, fall in (("dsc", 0.02, 0.01), ("nsd_1mm", 0.02, 0.02)):
        b, c = organ_means(anatomy_base, metric), organ_means(anatomy_cand, metric)
        gain = mean_of(c.values()) - mean_of(b.values())
        out.append((f"1. held-out anatomy: mean {metric} rises >= {rise}", gain >= rise - 1e-9,
                    f"{mean_of(b.values()):.4f} -> {mean_of(c.values()):.4f} ({gain:+.4f})"))
        out.append(no_organ_falls(f"1. held-out anatomy: no organ's {metric} falls > {fall}",
                                  b, c, fall))
    real_b, real_c = base["real_ct"], cand["real_ct"]
    chaos_b, chaos_c = real_b["chaos_ct3"]["liver"], real_c["chaos_ct3"]["liver"]
    out.append(("2. chaos_ct3 liver DSC >= baseline - 0.01",
                chaos_c["dsc"] >= chaos_b["dsc"] - 0.01 - 1e-9,
                f"{chaos_b['dsc']:.4f} -> {chaos_c['dsc']:.4f}"))
    out.append(("2. chaos_ct3 liver NSD >= baseline - 0.02",
                chaos_c["nsd"] >= chaos_b["nsd"] - 0.02 - 1e-9,
                f"{chaos_b['nsd']:.4f} -> {chaos_c['nsd']:.4f}"))
    dicom = real_c["ts_dicom"]
    out.append(("3. ts_dicom liver DSC >= 0.94", dicom["liver"]["dsc"] >= 0.94,
                f"{dicom['liver']['dsc']:.4f}"))
    out.append(("3. ts_dicom spleen DSC >= 0.90", dicom["spleen"]["dsc"] >= 0.90,
                f"{dicom['spleen']['dsc']:.4f}"))
    out.append(("4. mean real pancreas DSC >= baseline - 0.03",
                real_pancreas(real_c) >= real_pancreas(real_b) - 0.03 - 1e-9,
                f"{real_pancreas(real_b):.4f} -> {real_pancreas(real_c):.4f}"))
    out.append(no_organ_falls("5. ts_example: no organ's DSC falls > 0.03",
                              dsc_of(real_b["ts_example"]), dsc_of(real_c["ts_example"]), 0.03))
    out.append(no_organ_falls("6. generated: no organ's mean DSC falls > 0.015",
                              organ_means(base["generated_unseen"], "dsc"),
                              organ_means(cand["generated_unseen"], "dsc"), 0.015))
    return out


def anatomy_merit(scores: dict) -> float:
    """The tie-break: mean of (held-out anatomy mean DSC, mean NSD)."""
    section = scores["anatomy_held_out"]
    return 0.5 * (mean_of(organ_means(section, "dsc").values())
                  + mean_of(organ_means(section, "nsd_1mm").values()))


def choose(base: dict, candidates: dict[str, dict]) -> str | None:
    """The candidate the rule ships: B when both pass unless A's merit is higher by > 0.01."""
    passing = [name for name, scores in candidates.items()
               if all(holds for _, holds, _ in conditions(base, scores))]
    return prefer_average(passing, {name: anatomy_merit(scores)
                                    for name, scores in candidates.items()})


def report(checked, chosen):
    """Print each candidate's conditions, PASS or FAIL with their numbers, then what ships.

    ``checked``: {title: [(text, holds, numbers), ...]}; ``chosen``: a candidate's name or None.
    """
    for title, results in checked.items():
        print(f"{title}:")
        for text, holds, numbers in results:
            print(f"  {'PASS' if holds else 'FAIL'}  {text}: {numbers}")
    print(f"ships: {chosen if chosen else 'nothing (no candidate passes)'}")


def paired_rule_main(argv, description: str, second: str, conditions, choose) -> int:
    """The command line of a rule whose candidates each bring a score file and a second file
    (R-loc: ROI coverage, R-pseudo: pseudo-label volumes): ``--baseline SCORES SECOND
    --candidate NAME SCORES SECOND`` (A and B, each at most once)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--baseline", nargs=2, type=Path, required=True,
                        metavar=("SCORES", second), help="the shipped weights' files")
    parser.add_argument("--candidate", nargs=3, action="append", required=True,
                        metavar=("NAME", "SCORES", second), help="A or B and its files")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the verdict (rule_verdict) as JSON, for the record")
    args = parser.parse_args(argv)
    names = [name for name, _, _ in args.candidate]
    if any(name not in ("A", "B") for name in names) or len(set(names)) != len(names):
        parser.error(f"candidates are A and B, each once: {names}")

    def load(*paths):
        return tuple(json.loads(Path(path).read_text()) for path in paths)

    base = load(*args.baseline)
    candidates = {name: load(scores, other) for name, scores, other in args.candidate}
    checked = {name: conditions(*base, *files) for name, files in candidates.items()}
    chosen = choose(base, candidates)
    report({f"candidate {name}": results for name, results in checked.items()}, chosen)
    if args.json:
        temporary = args.json.with_name(args.json.name + ".part")
        temporary.write_text(json.dumps(rule_verdict(checked, chosen), indent=1) + "\n")
        temporary.replace(args.json)
    return 0


def rule_verdict(checked, chosen) -> dict:
    """What ``report`` prints, as data: per candidate each condition with its numbers, whether it
    holds, the conditions that fail; and the candidate that ships (None: nothing)."""
    return {"candidates": {
                name: {"passes": all(holds for _, holds, _ in results),
                       "failed": [text for text, holds, _ in results if not holds],
                       "conditions": [{"condition": text, "holds": holds, "numbers": numbers}
                                      for text, holds, numbers in results]}
                for name, results in checked.items()},
            "ships": chosen}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline", type=Path, help="scores of the shipped weights")
    parser.add_argument("candidates", nargs="+", metavar="NAME=FILE",
                        help="candidate scores, named A and B as in the rule")
    args = parser.parse_args(argv)
    named = {}
    for item in args.candidates:
        name, sep, path = item.partition("=")
        if not sep or name not in ("A", "B") or name in named:
            parser.error(f"candidates are A=FILE and B=FILE, each once: {item!r}")
        named[name] = Path(path)
    args.candidates = named
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base = json.loads(args.baseline.read_text())
    candidates = {name: json.loads(path.read_text()) for name, path in args.candidates.items()}
    report({f"candidate {name} ({args.candidates[name]})": conditions(base, scores)
            for name, scores in candidates.items()}, choose(base, candidates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
