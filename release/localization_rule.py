"""Apply rule R-loc (weights/MODEL_CARD.md) to a localization candidate: the ROI's coverage of
the held-out real anatomy, and the end-to-end scores with the shipped SCN.

    python -m release.localization_rule --baseline SCORES.json COVERAGE.json \\
        --candidate A SCORES.json COVERAGE.json [--candidate B SCORES.json COVERAGE.json]

SCORES: ``python -m release.score_weights --weights DIR --anatomy ../shared/anatomy --json``;
COVERAGE: ``python -m release.roi_coverage --weights DIR --seeds --anatomy ../shared/anatomy
--in-plane-size 512 --json``. Prints every condition with both numbers and PASS/FAIL, then the
candidate the rule ships (or none). The thresholds are the rule's, fixed before any candidate was
scored.
"""

from __future__ import annotations

import math

from release.shipping_rule import mean_of, organ_means, paired_rule_main, prefer_average
from release.shipping_rule import conditions as anatomy_rule_conditions

REAL_CASES = ("ts_example", "ts_dicom")
FULL = 0.995  # a map counts as fully covered when every organ has at least this share inside


def anatomy_records(coverage: dict) -> dict:
    return {name: record for name, record in coverage.items() if name.startswith("anatomy_")}


def lowest_organ_coverage(coverage: dict) -> float:
    return min(min(r["coverage_per_organ"].values()) for r in anatomy_records(coverage).values())


def fully_covered(coverage: dict) -> int:
    return sum(min(r["coverage_per_organ"].values()) >= FULL
               for r in anatomy_records(coverage).values())


def mean_roi_litres(coverage: dict) -> float:
    return mean_of(math.prod(r["roi_extent_mm_xyz"]) / 1e6
                 for r in anatomy_records(coverage).values())


def conditions(base_scores: dict, base_coverage: dict, scores: dict,
               coverage: dict) -> list[tuple[str, bool, str]]:
    """(condition, holds, numbers) for each of the rule's conditions."""
    out = []
    low_b, low_c = lowest_organ_coverage(base_coverage), lowest_organ_coverage(coverage)
    out.append(("1. anatomy ROI: lowest organ coverage rises >= 0.02", low_c - low_b >= 0.02 - 1e-9,
                f"{low_b:.4f} -> {low_c:.4f}"))
    full_b, full_c = fully_covered(base_coverage), fully_covered(coverage)
    out.append((f"1. anatomy ROI: maps with every organ >= {FULL} do not fall", full_c >= full_b,
                f"{full_b} -> {full_c} of {len(anatomy_records(coverage))}"))
    maps_b, maps_c = anatomy_records(base_coverage), anatomy_records(coverage)
    missing = sorted(set(maps_b) ^ set(maps_c))
    if missing:
        raise ValueError(f"the coverage files hold different maps: {', '.join(missing)}")
    change = {name: maps_c[name]["coverage"] - maps_b[name]["coverage"] for name in maps_b}
    worst = min(change, key=change.get)
    out.append(("1. anatomy ROI: no map's coverage falls > 0.005",
                min(change.values()) >= -0.005 - 1e-9,
                f"worst {worst} {maps_b[worst]['coverage']:.4f} -> "
                f"{maps_c[worst]['coverage']:.4f}"))
    real = [min(coverage[name]["coverage_per_organ"].values()) for name in REAL_CASES]
    out.append(("2. real CT ROI holds >= 0.999 of every organ", min(real) >= 0.999,
                ", ".join(f"{n} {v:.4f}" for n, v in zip(REAL_CASES, real))))
    size_b, size_c = mean_roi_litres(base_coverage), mean_roi_litres(coverage)
    out.append(("3. anatomy ROI: mean box volume grows <= 25%", size_c <= 1.25 * size_b + 1e-9,
                f"{size_b:.2f} -> {size_c:.2f} L"))
    anatomy_b, anatomy_c = base_scores["anatomy_held_out"], scores["anatomy_held_out"]
    for metric, fall in (("dsc", 0.005), ("nsd_1mm", 0.01)):
        b = mean_of(organ_means(anatomy_b, metric).values())
        c = mean_of(organ_means(anatomy_c, metric).values())
        out.append((f"4. held-out anatomy: mean {metric} falls <= {fall}", c - b >= -fall - 1e-9,
                    f"{b:.4f} -> {c:.4f}"))
    kidney_b = anatomy_b["dsc"]["kidney"]["mean"]
    kidney_c = anatomy_c["dsc"]["kidney"]["mean"]
    out.append(("4. held-out anatomy: kidney dsc falls <= 0.005",
                kidney_c - kidney_b >= -0.005 - 1e-9,
                f"{kidney_b:.4f} -> {kidney_c:.4f}"))
    out += [(f"5. (R-anatomy {text})", holds, numbers)
            for text, holds, numbers in anatomy_rule_conditions(base_scores, scores)
            if not text.startswith("1.")]
    return out


def choose(base: tuple[dict, dict], candidates: dict[str, tuple[dict, dict]]) -> str | None:
    """B when both pass unless A's lowest organ coverage is higher by more than 0.01."""
    passing = [name for name, (scores, coverage) in candidates.items()
               if all(holds for _, holds, _ in conditions(*base, scores, coverage))]
    return prefer_average(passing, {name: lowest_organ_coverage(coverage)
                                    for name, (_, coverage) in candidates.items()})


def main(argv=None) -> int:
    return paired_rule_main(argv, __doc__.split("\n")[0], "COVERAGE", conditions, choose)


if __name__ == "__main__":
    raise SystemExit(main())
