"""Rule R-loc as code: each condition can fail, and the choice between candidates."""

import copy
import json

import pytest

from release.localization_rule import choose, conditions, main
from tests.test_shipping_rule import scores

MAPS = ("anatomy_a", "anatomy_b", "anatomy_c")


def coverage(lowest_kidney=0.90, extent=(300.0, 200.0, 200.0), real=1.0):
    record = lambda kidney: {  # noqa: E731
        "coverage": round((3 + kidney) / 4, 4), "roi_extent_mm_xyz": list(extent),
        "coverage_per_organ": {"liver": 1.0, "kidney": kidney, "spleen": 1.0, "pancreas": 1.0}}
    out = {name: record(1.0) for name in MAPS}
    out["anatomy_a"] = record(lowest_kidney)
    for name in ("ts_example", "ts_dicom"):
        out[name] = record(real)
    return out


def failed(base, cand):
    return [text for text, holds, _ in conditions(*base, *cand) if not holds]


BASE = (scores(), coverage())


def test_better_coverage_with_the_same_scores_passes():
    assert failed(BASE, (scores(), coverage(lowest_kidney=0.93))) == []


def test_each_coverage_condition_can_fail():
    assert failed(BASE, (scores(), coverage(lowest_kidney=0.91))) == [
        "1. anatomy ROI: lowest organ coverage rises >= 0.02"]
    fewer_full = coverage(lowest_kidney=0.95)
    fewer_full["anatomy_b"]["coverage_per_organ"]["spleen"] = 0.99
    assert failed(BASE, (scores(), fewer_full)) == [
        "1. anatomy ROI: maps with every organ >= 0.995 do not fall"]
    one_map_falls = coverage(lowest_kidney=0.95)
    one_map_falls["anatomy_c"]["coverage"] = 0.99
    assert failed(BASE, (scores(), one_map_falls)) == [
        "1. anatomy ROI: no map's coverage falls > 0.005"]
    assert "2. real CT ROI holds >= 0.999 of every organ" in failed(
        BASE, (scores(), coverage(lowest_kidney=0.95, real=0.99)))
    assert failed(BASE, (scores(), coverage(lowest_kidney=0.95, extent=(340, 220, 220)))) == [
        "3. anatomy ROI: mean box volume grows <= 25%"]


def test_end_to_end_scores_can_fail():
    worse = scores()
    worse["anatomy_held_out"]["dsc"]["kidney"]["mean"] = 0.79
    assert failed(BASE, (worse, coverage(lowest_kidney=0.95))) == [
        "4. held-out anatomy: kidney dsc falls <= 0.005"]
    assert failed(BASE, (scores(anatomy=0.79, anatomy_nsd=0.38), coverage(lowest_kidney=0.95))) == [
        "4. held-out anatomy: mean dsc falls <= 0.005",
        "4. held-out anatomy: mean nsd_1mm falls <= 0.01",
        "4. held-out anatomy: kidney dsc falls <= 0.005"]
    assert failed(BASE, (scores(dicom_pancreas=0.25), coverage(lowest_kidney=0.95))) == [
        "5. (R-anatomy 4. mean real pancreas DSC >= baseline - 0.03)"]


def test_different_map_sets_are_an_error():
    other = coverage(lowest_kidney=0.95)
    other["anatomy_d"] = other.pop("anatomy_c")
    with pytest.raises(ValueError, match="anatomy_c, anatomy_d"):
        conditions(*BASE, scores(), other)


def test_choice_prefers_the_mean_unless_the_snapshot_covers_clearly_more(tmp_path, capsys):
    a, b = (scores(), coverage(lowest_kidney=0.95)), (scores(), coverage(lowest_kidney=0.93))
    assert choose(BASE, {"A": a, "B": b}) == "A"
    assert choose(BASE, {"A": a, "B": (scores(), coverage(lowest_kidney=0.945))}) == "B"
    assert choose(BASE, {"A": (scores(), coverage()), "B": b}) == "B"
    assert choose(BASE, {"A": BASE, "B": BASE}) is None
    files = {}
    for name, (s, c) in (("base", BASE), ("a", a), ("b", copy.deepcopy(b))):
        for kind, value in (("scores", s), ("coverage", c)):
            files[name, kind] = tmp_path / f"{name}_{kind}.json"
            files[name, kind].write_text(json.dumps(value))
    argv = ["--baseline", str(files["base", "scores"]), str(files["base", "coverage"])]
    for name in ("a", "b"):
        argv += ["--candidate", name.upper(), str(files[name, "scores"]),
                 str(files[name, "coverage"])]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("ships: A")


def test_the_shipped_coverage_against_itself_fails_only_for_lack_of_gain():
    """The rule reads what roi_coverage and score_weights write; weights.json holds the scores."""
    from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE

    shipped = json.loads((DEFAULT_WEIGHTS_DIR / PROVENANCE).read_text())["scores"]
    base = (shipped, coverage())
    assert failed(base, base) == ["1. anatomy ROI: lowest organ coverage rises >= 0.02"]
