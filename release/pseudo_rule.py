"""Apply rule R-pseudo (weights/MODEL_CARD.md) to the SCN candidates of a run trained with
partial labels and pseudo-labels.

    python -m release.pseudo_rule --baseline SCORES.json PSEUDO.json \\
        --candidate A SCORES.json PSEUDO.json [--candidate B SCORES.json PSEUDO.json]

SCORES: ``python -m release.score_weights --weights DIR --anatomy ../shared/anatomy --json``;
PSEUDO: the ``pseudo_labels.json`` that ``python -m training.pseudo_label
../shared/data/unlabelled/images --weights DIR`` writes (its organ volumes: the unlabelled scan
has no reference, so plausible adult volumes are the only check there). Prints every condition
with both numbers and PASS/FAIL, then the candidate the rule ships (or none). The thresholds are
the rule's, fixed before any candidate was scored.
"""

from __future__ import annotations


from release.shipping_rule import (anatomy_merit, dsc_of, mean_of, no_organ_falls, organ_means,
                                   paired_rule_main, prefer_average, real_pancreas)
from training.pseudo_label import PLAUSIBLE_ADULT_ML as PLAUSIBLE_ML
from training.pseudo_label import plausible_organs


def plausible_count(pseudo: dict) -> int:
    """Organ volumes inside PLAUSIBLE_ML, counted over every case of a pseudo_labels.json."""
    if not pseudo["cases"]:
        raise ValueError("the pseudo_labels.json lists no case")
    return sum(len(plausible_organs(entry["volumes_ml"])) for entry in pseudo["cases"].values())


def dicom_mean_dsc(scores: dict) -> float:
    return mean_of(organ["dsc"] for organ in scores["real_ct"]["ts_dicom"].values())


def conditions(base_scores: dict, base_pseudo: dict, scores: dict,
               pseudo: dict) -> list[tuple[str, bool, str]]:
    """(condition, holds, numbers) for each of the rule's conditions."""
    out = []
    anatomy_b, anatomy_c = base_scores["anatomy_held_out"], scores["anatomy_held_out"]
    for metric, fall in (("dsc", 0.005), ("nsd_1mm", 0.01)):
        b = mean_of(organ_means(anatomy_b, metric).values())
        c = mean_of(organ_means(anatomy_c, metric).values())
        out.append((f"1. held-out anatomy: mean {metric} falls <= {fall}", c - b >= -fall - 1e-9,
                    f"{b:.4f} -> {c:.4f}"))
    out.append(no_organ_falls("1. held-out anatomy: no organ's dsc falls > 0.01",
                              organ_means(anatomy_b, "dsc"), organ_means(anatomy_c, "dsc"), 0.01))
    real_b, real_c = base_scores["real_ct"], scores["real_ct"]
    for organ in ("liver", "spleen"):
        before, after = real_b["ts_dicom"][organ]["dsc"], real_c["ts_dicom"][organ]["dsc"]
        out.append((f"2. ts_dicom {organ} DSC falls <= 0.01", after - before >= -0.01 - 1e-9,
                    f"{before:.4f} -> {after:.4f}"))
    out.append(("3. mean real pancreas DSC falls <= 0.03",
                real_pancreas(real_c) - real_pancreas(real_b) >= -0.03 - 1e-9,
                f"{real_pancreas(real_b):.4f} -> {real_pancreas(real_c):.4f}"))
    chaos_b, chaos_c = real_b["chaos_ct3"]["liver"], real_c["chaos_ct3"]["liver"]
    for metric, fall in (("dsc", 0.005), ("nsd", 0.01)):
        out.append((f"4. chaos_ct3 liver {metric.upper()} falls <= {fall}",
                    chaos_c[metric] - chaos_b[metric] >= -fall - 1e-9,
                    f"{chaos_b[metric]:.4f} -> {chaos_c[metric]:.4f}"))
    out.append(no_organ_falls("5. ts_example: no organ's DSC falls > 0.02",
                              dsc_of(real_b["ts_example"]), dsc_of(real_c["ts_example"]), 0.02))
    out.append(no_organ_falls("6. generated: no organ's mean DSC falls > 0.015",
                              organ_means(base_scores["generated_unseen"], "dsc"),
                              organ_means(scores["generated_unseen"], "dsc"), 0.015))
    count_b, count_c = plausible_count(base_pseudo), plausible_count(pseudo)
    volumes = "; ".join(", ".join(f"{organ} {entry['volumes_ml'][organ]:.0f}"
                                  for organ in PLAUSIBLE_ML) for entry in pseudo["cases"].values())
    out.append(("7. unlabelled CT: organs with plausible volumes do not fall", count_c >= count_b,
                f"{count_b} -> {count_c} ({volumes} mL)"))
    merit_b, merit_c = anatomy_merit(base_scores), anatomy_merit(scores)
    dicom_b, dicom_c = dicom_mean_dsc(base_scores), dicom_mean_dsc(scores)
    out.append(("8. gain: held-out anatomy merit rises >= 0.01 or ts_dicom mean DSC >= 0.02",
                merit_c - merit_b >= 0.01 - 1e-9 or dicom_c - dicom_b >= 0.02 - 1e-9,
                f"merit {merit_b:.4f} -> {merit_c:.4f}, ts_dicom {dicom_b:.4f} -> {dicom_c:.4f}"))
    return out


def choose(base: tuple[dict, dict], candidates: dict[str, tuple[dict, dict]]) -> str | None:
    """B when both pass unless A's held-out anatomy merit is higher by more than 0.01."""
    passing = [name for name, (scores, pseudo) in candidates.items()
               if all(holds for _, holds, _ in conditions(*base, scores, pseudo))]
    return prefer_average(passing, {name: anatomy_merit(scores)
                                    for name, (scores, _) in candidates.items()})


def main(argv=None) -> int:
    return paired_rule_main(argv, __doc__.split("\n")[0], "PSEUDO", conditions, choose)


if __name__ == "__main__":
    raise SystemExit(main())
