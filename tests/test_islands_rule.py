"""release.islands_rule: rule R-islands decides whether dropping small pieces after the argmax
becomes the default, from two score files of the same weights."""

import copy
import json
import subprocess
import sys

from release.islands_rule import conditions
from tests.conftest import ROOT
from tests.test_shipping_rule import scores


def with_islands(base, anatomy_nsd_gain=0.003):
    result = copy.deepcopy(base)
    result["min_island_fraction"] = 0.1
    for organ in result["anatomy_held_out"]["nsd_1mm"].values():
        organ["mean"] += anatomy_nsd_gain
    return result


def failed(base, islands):
    return [text for text, holds, _ in conditions(base, islands) if not holds]


def test_a_gain_with_no_harm_passes_and_each_condition_can_fail():
    base = scores()
    assert failed(base, with_islands(base)) == []
    assert [text[:2] for text in failed(base, with_islands(base, 0.001))] == ["3."]
    for path, metric in ((("anatomy_held_out", "dsc", "spleen", "mean"), "1. anatomy_held_out"),
                         (("generated_unseen", "nsd_1mm", "liver", "mean"), "1. generated_unseen"),
                         (("real_ct", "ts_dicom", "pancreas", "nsd"), "2. ts_dicom"),
                         (("real_ct", "chaos_ct3", "liver", "dsc"), "2. chaos_ct3"),
                         (("real_ct", "ts_example", "kidney", "dsc"), "2. ts_example")):
        for fall, fails in ((0.0009, False), (0.0015, True)):
            islands = with_islands(base)
            node = islands
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] -= fall
            assert any(text.startswith(metric) for text in failed(base, islands)) == fails, (
                path, fall)


def test_the_command_prints_the_verdict_and_refuses_a_file_scored_without_the_step(tmp_path):
    base = scores()
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "islands.json").write_text(json.dumps(with_islands(base)))

    def rule(second):
        return subprocess.run([sys.executable, "-m", "release.islands_rule",
                               str(tmp_path / "base.json"), str(tmp_path / second), "--json",
                               str(tmp_path / "verdict.json")], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    result = rule("islands.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ships: islands")
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["ships"] == "islands" and verdict["candidates"]["islands"]["passes"]
    (tmp_path / "verdict.json").unlink()
    result = rule("base.json")
    assert result.returncode == 2
    assert "was not scored with --min-island-fraction" in result.stderr
    assert not (tmp_path / "verdict.json").exists()
