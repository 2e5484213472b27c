"""Rule R-anatomy as code: each condition can fail, and the choice between candidates."""

import copy
import json

from release.shipping_rule import ORGANS, choose, conditions, main


def scores(anatomy=0.80, anatomy_nsd=0.40, generated=0.95, example=0.94, dicom_pancreas=0.36):
    organ_means = lambda value: {o: {"mean": value, "std": 0.0, "cases": 5} for o in ORGANS}  # noqa: E731
    return {
        "generated_unseen": {"dsc": organ_means(generated), "nsd_1mm": organ_means(0.7)},
        "real_ct": {
            "ts_example": {o: {"dsc": example, "nsd": 0.7} for o in ORGANS},
            "ts_dicom": {"liver": {"dsc": 0.96, "nsd": 0.8}, "spleen": {"dsc": 0.94, "nsd": 0.7},
                         "pancreas": {"dsc": dicom_pancreas, "nsd": 0.35}},
            "chaos_ct3": {"liver": {"dsc": 0.90, "nsd": 0.50}},
        },
        "anatomy_held_out": {"dsc": organ_means(anatomy), "nsd_1mm": organ_means(anatomy_nsd)},
    }


def failed(base, cand):
    return [text for text, holds, _ in conditions(base, cand) if not holds]


def test_a_candidate_better_on_anatomy_and_no_worse_elsewhere_passes():
    assert failed(scores(), scores(anatomy=0.83, anatomy_nsd=0.43)) == []


def test_each_condition_can_fail():
    base = scores()
    good = scores(anatomy=0.83, anatomy_nsd=0.43)
    assert failed(base, scores(anatomy=0.81, anatomy_nsd=0.43))[0].startswith(
        "1. held-out anatomy: mean dsc")
    one_organ = copy.deepcopy(good)
    one_organ["anatomy_held_out"]["dsc"]["spleen"]["mean"] = 0.785
    assert any("no organ's dsc" in text for text in failed(base, one_organ))
    for path, value, number in (
            (("real_ct", "chaos_ct3", "liver", "dsc"), 0.885, "2."),
            (("real_ct", "chaos_ct3", "liver", "nsd"), 0.47, "2."),
            (("real_ct", "ts_dicom", "liver", "dsc"), 0.93, "3."),
            (("real_ct", "ts_dicom", "spleen", "dsc"), 0.89, "3."),
            (("real_ct", "ts_dicom", "pancreas", "dsc"), 0.29, "4."),
            (("real_ct", "ts_example", "kidney", "dsc"), 0.905, "5."),
            (("generated_unseen", "dsc", "pancreas", "mean"), 0.93, "6.")):
        bad = copy.deepcopy(good)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert [text[:2] for text in failed(base, bad)] == [number], path


def test_choice_prefers_the_average_unless_the_snapshot_is_clearly_better(tmp_path, capsys):
    base = scores()
    a, b = scores(anatomy=0.85, anatomy_nsd=0.45), scores(anatomy=0.84, anatomy_nsd=0.44)
    assert choose(base, {"A": a, "B": b}) == "B"
    assert choose(base, {"A": scores(anatomy=0.87, anatomy_nsd=0.47), "B": b}) == "A"
    assert choose(base, {"A": a, "B": scores(anatomy=0.80)}) == "A"
    assert choose(base, {"A": scores(), "B": scores()}) is None
    for name, value in (("base", base), ("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    assert main([str(tmp_path / "base.json"), f"A={tmp_path / 'a.json'}",
                 f"B={tmp_path / 'b.json'}"]) == 0
    assert capsys.readouterr().out.strip().endswith("ships: B")


def test_the_shipped_scores_against_themselves_fail_only_for_lack_of_gain():
    """The rule reads the score file score_weights writes (weights.json holds the same dict)."""
    from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE

    shipped = json.loads((DEFAULT_WEIGHTS_DIR / PROVENANCE).read_text())["scores"]
    assert failed(shipped, shipped) == ["1. held-out anatomy: mean dsc rises >= 0.02",
                                        "1. held-out anatomy: mean nsd_1mm rises >= 0.02"]
