"""release/candidates.sh, the shell that builds, scores and judges a shipping rule's candidates:
its rule step passes the score files it finds to the rule and keeps the verdict, and it refuses
what it does not know. (Scoring itself is release.score_weights' and release.roi_coverage's,
tested on their own.)"""

import json
import subprocess
import sys
from pathlib import Path

from tests.test_localization_rule import coverage
from tests.test_shipping_rule import scores

ROOT = Path(__file__).resolve().parents[1]


def candidates(*args, **env):
    return subprocess.run(["bash", "release/candidates.sh", *map(str, args)], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=120)


def write(out, name, score, cover):
    (out / f"scores_{name}.json").write_text(json.dumps(score))
    (out / f"cov_{name}.json").write_text(json.dumps(cover))


def test_the_rule_step_judges_the_scored_candidates_and_keeps_the_verdict(tmp_path):
    write(tmp_path, "baseline", scores(), coverage())
    write(tmp_path, "A", scores(), coverage(lowest_kidney=0.95))
    write(tmp_path, "B", scores(), coverage(lowest_kidney=0.93))
    result = candidates("loc", tmp_path / "run", 3000, tmp_path, "rule")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ships: A")  # A covers more than 0.01 better
    assert (tmp_path / "rule.txt").read_text() == result.stdout
    verdict = json.loads((tmp_path / "rule.json").read_text())
    assert verdict["ships"] == "A" and set(verdict["candidates"]) == {"A", "B"}
    assert all(c["passes"] and not c["failed"] for c in verdict["candidates"].values())
    printed = [line.split(":")[0].split(maxsplit=1)[1] for line in result.stdout.splitlines()
               if line.startswith("  ")]
    assert [c["condition"].split(":")[0] for c in verdict["candidates"]["A"]["conditions"]
            + verdict["candidates"]["B"]["conditions"]] == printed
    assert not list(tmp_path.glob("*.part"))


def test_a_candidate_without_both_score_files_is_left_out(tmp_path):
    write(tmp_path, "baseline", scores(), coverage())
    write(tmp_path, "A", scores(), coverage(lowest_kidney=0.95))
    (tmp_path / "scores_B.json").write_text(json.dumps(scores()))  # its coverage never finished
    (tmp_path / "cov_B.json.part").write_text("{")
    result = candidates("loc", tmp_path / "run", 3000, tmp_path, "rule")
    assert result.returncode == 0, result.stderr
    assert "candidate A:" in result.stdout and "candidate B:" not in result.stdout
    assert result.stdout.strip().endswith("ships: A")


def test_unknown_rules_and_steps_are_refused(tmp_path):
    result = candidates("segmentation", tmp_path / "run", 3000, tmp_path)
    assert result.returncode == 2 and "unknown rule: segmentation" in result.stderr
    result = candidates("loc", tmp_path / "run", 3000, tmp_path, "C")
    assert result.returncode == 2 and "unknown step: C" in result.stderr


def test_candidate_b_averages_snapshots_gap_apart_and_names_a_missing_one(tmp_path):
    run = tmp_path / "run"
    for iteration in (400, 600, 800):
        (run / "snapshots" / f"{iteration:06d}").mkdir(parents=True)
    result = candidates("pseudo", run, 1300, tmp_path / "out", "B")  # default gap 500: 000300
    assert result.returncode == 2
    assert f"no snapshot {run}/snapshots/000300 for candidate B" in result.stderr
    assert not (tmp_path / "out" / "candB").exists()
    (run / "snapshots" / "000600").rmdir()
    result = candidates("pseudo", run, 800, tmp_path / "out", "B", GAP="200")
    assert result.returncode == 2 and f"no snapshot {run}/snapshots/000600" in result.stderr


def test_a_gap_that_is_not_a_positive_whole_number_is_refused(tmp_path):
    for gap in ("0", "-200", "2e2", "x"):
        result = candidates("pseudo", tmp_path / "run", 800, tmp_path / "out", "B", GAP=gap)
        assert result.returncode == 2, gap
        assert f"GAP must be a positive whole number of iterations, not '{gap}'" in result.stderr
