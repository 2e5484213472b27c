"""Apply rule R-islands (weights/MODEL_CARD.md) to the scores of the same weights without and
with the step after the argmax that drops an organ's small pieces.

    python -m release.islands_rule BASELINE.json ISLANDS.json [--json FILE]

Both files come from ``python -m release.score_weights --anatomy ... --json FILE``, the second
with ``--min-island-fraction``. Prints every condition with both numbers and PASS/FAIL, then
whether the step becomes the default. The thresholds are the rule's, fixed before it was scored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from release.shipping_rule import ORGANS, mean_of, no_organ_falls, organ_means, report, rule_verdict

FALL = 0.001  # the most any organ's score may fall, anywhere
NSD_GAIN = 0.002  # the held-out anatomy mean NSD gain the step must bring
NSD = "nsd_1mm"
REAL_CASES = ("ts_example", "ts_dicom", "chaos_ct3")


def conditions(base: dict, islands: dict) -> list[tuple[str, bool, str]]:
    """(condition, holds, numbers) for each of the rule's conditions."""
    if islands.get("min_island_fraction", 0) <= 0:
        raise ValueError("the second scores file was not scored with --min-island-fraction")
    out = []
    for section in ("anatomy_held_out", "generated_unseen"):
        for metric in ("dsc", NSD):
            out.append(no_organ_falls(f"1. {section}: no organ's mean {metric} falls > {FALL}",
                                      organ_means(base[section], metric),
                                      organ_means(islands[section], metric), FALL))
    for case in REAL_CASES:
        for metric in ("dsc", "nsd"):
            before = {organ: s[metric] for organ, s in base["real_ct"][case].items()}
            after = {organ: s[metric] for organ, s in islands["real_ct"][case].items()}
            out.append(no_organ_falls(f"2. {case}: no organ's {metric} falls > {FALL}",
                                      before, after, FALL))
    before = mean_of(organ_means(base["anatomy_held_out"], NSD)[o] for o in ORGANS)
    after = mean_of(organ_means(islands["anatomy_held_out"], NSD)[o] for o in ORGANS)
    out.append((f"3. anatomy_held_out: mean NSD over the organs rises >= {NSD_GAIN}",
                after - before >= NSD_GAIN - 1e-9, f"{before:.4f} -> {after:.4f}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("baseline", type=Path, help="scores without the step")
    parser.add_argument("islands", type=Path, help="scores with --min-island-fraction")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the verdict as JSON, for the record")
    args = parser.parse_args(argv)
    try:
        base, islands = (json.loads(path.read_text()) for path in (args.baseline, args.islands))
        checked = conditions(base, islands)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"{error}")
    chosen = "islands" if all(holds for _, holds, _ in checked) else None
    report({f"--min-island-fraction {islands['min_island_fraction']}": checked}, chosen)
    if args.json:
        temporary = args.json.with_name(args.json.name + ".part")
        temporary.write_text(json.dumps(rule_verdict({"islands": checked}, chosen), indent=1)
                             + "\n")
        temporary.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
