"""release.record_round: a shipping rule's round recorded in weights.json from the files that
release/candidates.sh leaves (candidate folders, the rule's verdict, pseudo-label volumes)."""

import json

import pytest

from release import pseudo_rule
from release.record_round import main
from tests.test_pseudo_rule import BASE, GOOD, pseudo
from tests.test_shipping_rule import scores

RULE = {"rule": "R-x", "network": "segmentation", "written": "2026-12-07", "rounds": [],
        "next": "round 1"}


def candidate(out, name, entry):
    folder = out / f"cand{name}"
    folder.mkdir()
    (folder / "weights.json").write_text(json.dumps({"segmentation": entry}))


def scored_round(out, a=GOOD, b=GOOD, run="runs/x", n=4000):
    """OUT as candidates.sh leaves it: candidate folders, score and pseudo files, the verdict."""
    out.mkdir()
    candidate(out, "A", {"snapshot": {"run": run, "iteration": n}, "iterations": 100})
    candidate(out, "B", {"averaged_snapshots": [{"run": run, "iteration": i}
                                                for i in (n - 1000, n - 500, n)]})
    argv = []
    for name, (score, volumes) in (("baseline", BASE), ("A", a), ("B", b)):
        (out / f"scores_{name}.json").write_text(json.dumps(score))
        (out / f"pseudo_{name}.json").write_text(json.dumps(volumes))
        argv += (["--baseline"] if name == "baseline" else ["--candidate", name]) + [
            str(out / f"scores_{name}.json"), str(out / f"pseudo_{name}.json")]
    assert pseudo_rule.main(argv + ["--json", str(out / "rule.json")]) == 0
    return out


def weights(folder, rules):
    folder.mkdir()
    (folder / "weights.json").write_text(json.dumps({"segmentation": {"iterations": 1},
                                                     "shipping_rules": rules}))
    return folder


def recorded(folder):
    return json.loads((folder / "weights.json").read_text())


def test_a_round_is_built_from_the_scoring_files(tmp_path, capsys):
    out = scored_round(tmp_path / "out", a=BASE)  # A: no gain; B passes
    folder = weights(tmp_path / "weights", [{"rule": "R-old"}, RULE])
    assert main([str(out), "--rule", "R-x", "--scored-on", "a CPU", "--weights", str(folder),
                 "--next", "round 2"]) == 0
    provenance = recorded(folder)
    assert provenance["shipping_rules"][0] == {"rule": "R-old"}
    rule = provenance["shipping_rules"][1]
    assert rule["next"] == "round 2"
    [entry] = rule["rounds"]
    assert entry["n"] == 4000 and entry["scored_on"] == "a CPU"
    assert entry["candidates"] == {"A": "EMA snapshot at 4000",
                                   "B": "mean of EMA snapshots 3000, 3500, 4000"}
    assert entry["outcome"] == "B ships"
    verdict = json.loads((out / "rule.json").read_text())
    assert entry["failed"] == {"A": verdict["candidates"]["A"]["failed"]} != {"A": []}
    assert entry["pseudo_label_volumes_ml"] == {"A": BASE[1]["cases"]["scan"]["volumes_ml"],
                                                "B": GOOD[1]["cases"]["scan"]["volumes_ml"]}
    assert "R-x round at N = 4000: B ships" in capsys.readouterr().out
    # the same round twice is refused and changes nothing
    assert main([str(out), "--rule", "R-x", "--scored-on", "a CPU", "--weights",
                 str(folder)]) == 1
    assert "already has a round at N = 4000" in capsys.readouterr().err
    assert recorded(folder) == provenance
    assert not list(folder.glob("*.part"))


def test_a_concluding_round_closes_the_rule(tmp_path):
    failing = (scores(), pseudo(pancreas=10.0, spleen=500.0))  # fewer plausible organs, no gain
    out = scored_round(tmp_path / "out", a=failing, b=failing, n=6000)
    folder = weights(tmp_path / "weights", [RULE])
    assert main([str(out), "--rule", "R-x", "--scored-on", "a CPU", "--weights", str(folder),
                 "--concluded", "rewritten as R-y"]) == 0
    rule = recorded(folder)["shipping_rules"][0]
    assert rule["outcome"] == "rewritten as R-y" and "next" not in rule
    entry = rule["rounds"][0]
    assert entry["outcome"] == "nothing ships" and set(entry["failed"]) == {"A", "B"}
    assert any(text.startswith("7.") for text in entry["failed"]["B"])


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "rule.json").unlink(), "rule.json: missing"),
    (lambda out: (out / "rule.json").write_text("{"), "rule.json: not JSON"),
    (lambda out: (out / "candA" / "weights.json").write_text('{"segmentation": {}}'),
     "candA/weights.json: not a training snapshot"),
    (lambda out: (out / "candB" / "weights.json").write_text(json.dumps({"segmentation": {
        "averaged_snapshots": [{"run": "runs/other", "iteration": 4000}]}})),
     "not one round of one run"),
])
def test_a_folder_that_cannot_give_the_round_is_named_and_nothing_is_written(
        tmp_path, capsys, damage, message):
    out = scored_round(tmp_path / "out")
    damage(out)
    folder = weights(tmp_path / "weights", [RULE])
    before = (folder / "weights.json").read_text()
    assert main([str(out), "--rule", "R-x", "--scored-on", "a CPU",
                 "--weights", str(folder)]) == 1
    assert message in capsys.readouterr().err
    assert (folder / "weights.json").read_text() == before


def test_a_rule_not_written_before_is_refused(tmp_path, capsys):
    out = scored_round(tmp_path / "out")
    folder = weights(tmp_path / "weights", [{"rule": "R-old"}])
    assert main([str(out), "--rule", "R-new", "--scored-on", "a CPU",
                 "--weights", str(folder)]) == 1
    assert "records no rule R-new (recorded: R-old)" in capsys.readouterr().err
