"""Rule R-pseudo as code: each condition can fail, and the choice between candidates."""

import copy
import json

import pytest

from release.pseudo_rule import choose, conditions, main, plausible_count
from tests.test_shipping_rule import scores


def pseudo(liver=1579.0, kidney=422.0, spleen=376.0, pancreas=40.0):
    volumes = {"liver": liver, "kidney": kidney, "spleen": spleen, "pancreas": pancreas}
    return {"cases": {"scan": {"volumes_ml": volumes, "ignored_share": 0.01}}, "failed": {}}


BASE = (scores(), pseudo())
GOOD = (scores(anatomy=0.85, anatomy_nsd=0.41), pseudo())


def failed(base, cand):
    return [text for text, holds, _ in conditions(*base, *cand) if not holds]


def changed(path, value, base=GOOD[0]):
    out = copy.deepcopy(base)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def test_a_gain_on_held_out_anatomy_with_nothing_worse_passes():
    assert failed(BASE, GOOD) == []


def test_without_a_gain_on_unseen_cases_nothing_ships():
    assert failed(BASE, BASE) == [
        "8. gain: held-out anatomy merit rises >= 0.01 or ts_dicom mean DSC >= 0.02"]
    dicom_gain = scores()
    for organ, value in (("liver", 0.97), ("spleen", 0.95), ("pancreas", 0.40)):
        dicom_gain["real_ct"]["ts_dicom"][organ]["dsc"] = value
    assert failed(BASE, (dicom_gain, pseudo())) == []


def test_each_condition_can_fail():
    for path, value, number in (
            (("anatomy_held_out", "nsd_1mm", "liver", "mean"), 0.32, "1."),
            (("anatomy_held_out", "dsc", "spleen", "mean"), 0.789, "1."),
            (("real_ct", "ts_dicom", "liver", "dsc"), 0.949, "2."),
            (("real_ct", "ts_dicom", "spleen", "dsc"), 0.929, "2."),
            (("real_ct", "ts_dicom", "pancreas", "dsc"), 0.29, "3."),
            (("real_ct", "chaos_ct3", "liver", "dsc"), 0.894, "4."),
            (("real_ct", "chaos_ct3", "liver", "nsd"), 0.489, "4."),
            (("real_ct", "ts_example", "kidney", "dsc"), 0.919, "5."),
            (("generated_unseen", "dsc", "liver", "mean"), 0.934, "6.")):
        assert [text[:2] for text in failed(BASE, (changed(path, value), pseudo()))] == [number], \
            path
    mean_falls = scores(anatomy=0.794, anatomy_nsd=0.43)
    assert "1. held-out anatomy: mean dsc falls <= 0.005" in failed(BASE, (mean_falls, pseudo()))
    assert failed(BASE, (GOOD[0], pseudo(spleen=420.0))) == [
        "7. unlabelled CT: organs with plausible volumes do not fall"]


def test_plausible_volumes_are_counted_per_organ_and_case():
    assert plausible_count(pseudo()) == 3  # pancreas 40 mL is below 50
    assert plausible_count(pseudo(pancreas=50.0)) == 4
    two = pseudo(liver=900.0)
    two["cases"]["second"] = pseudo()["cases"]["scan"]
    assert plausible_count(two) == 5
    with pytest.raises(ValueError, match="no case"):
        plausible_count({"cases": {}, "failed": {"scan": "unreadable"}})


def test_choice_prefers_the_average_unless_the_snapshot_is_clearly_better(tmp_path, capsys):
    a = (scores(anatomy=0.83, anatomy_nsd=0.41), pseudo())
    assert choose(BASE, {"A": a, "B": GOOD}) == "B"
    clearly = (scores(anatomy=0.87, anatomy_nsd=0.43), pseudo())
    assert choose(BASE, {"A": clearly, "B": GOOD}) == "A"
    assert choose(BASE, {"A": BASE, "B": BASE}) is None
    files = {}
    for name, (score, volumes) in (("base", BASE), ("a", a), ("b", GOOD)):
        files[name] = (tmp_path / f"{name}.json", tmp_path / f"{name}_pseudo.json")
        files[name][0].write_text(json.dumps(score))
        files[name][1].write_text(json.dumps(volumes))
    argv = ["--baseline", *map(str, files["base"])]
    for name in ("A", "B"):
        argv += ["--candidate", name, *map(str, files[name.lower()])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.strip().endswith("ships: B")
    argv[argv.index("A") + 1:argv.index("A") + 3] = map(str, files["base"])  # A: no gain
    assert main(argv + ["--json", str(tmp_path / "rule.json")]) == 0
    verdict = json.loads((tmp_path / "rule.json").read_text())
    assert verdict["ships"] == "B" and verdict["candidates"]["B"]["passes"]
    assert verdict["candidates"]["A"]["failed"] == failed(BASE, BASE) != []
    assert [c["holds"] for c in verdict["candidates"]["A"]["conditions"]] == [
        holds for _, holds, _ in conditions(*BASE, *BASE)]
    assert capsys.readouterr().out.strip().endswith("ships: B")
    with pytest.raises(SystemExit):
        main(["--baseline", *map(str, files["base"]), "--candidate", "C", *map(str, files["a"])])
