"""Each --data folder's own share of the training samples: argument checks, the draws, and the
run summary that weights.json keeps."""

from types import SimpleNamespace

import numpy as np
import pytest

from training.provenance import real_shares
from training.train import folder_shares, parse_args, pick_real_case


def flare_folder(root, names):
    """A FLARE-layout folder whose cases find_cases lists (empty files: only names matter)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in names:
        (root / "images" / f"{name}_0000.nii.gz").touch()
        (root / "labels" / f"{name}.nii.gz").touch()
    return root


def cases(*names):
    return [SimpleNamespace(name=name) for name in names]


def test_one_share_or_one_per_folder_and_nothing_else():
    args = parse_args(["--stage", "segmentation", "--run", "r", "--data", "a", "--data", "b",
                       "--data-weight", "0.1", "0.05"])
    assert args.data_weight == [0.1, 0.05]
    assert parse_args(["--stage", "segmentation", "--run", "r", "--data", "a", "--data", "b",
                       "--data-weight", "0.15"]).data_weight == [0.15]
    assert parse_args(["--stage", "segmentation", "--run", "r"]).data_weight == [0.2]
    for shares in (["0.1", "0.05", "0.05"], ["0.7", "0.6"], ["-0.1", "0.2"]):
        with pytest.raises(SystemExit):
            parse_args(["--stage", "segmentation", "--run", "r", "--data", "a", "--data", "b",
                        "--data-weight", *shares])


def test_each_folder_gets_its_share_and_its_cases_evenly(tmp_path):
    full = flare_folder(tmp_path / "full", ["ts_a", "ts_b"])
    liver_only = flare_folder(tmp_path / "partial", ["chaos"])
    real = cases("chaos", "ts_a", "ts_b")
    groups = folder_shares([full, liver_only], [0.1, 0.05], real)
    probabilities, folders = groups
    assert probabilities == pytest.approx([2 / 3, 1 / 3])
    assert [[case.name for case in folder] for folder in folders] == [["ts_a", "ts_b"], ["chaos"]]
    rng = np.random.default_rng(0)
    draws = [pick_real_case(rng, real, groups).name for _ in range(30000)]
    shares = {name: draws.count(name) / len(draws) for name in ("ts_a", "ts_b", "chaos")}
    assert shares == pytest.approx({"ts_a": 1 / 3, "ts_b": 1 / 3, "chaos": 1 / 3}, abs=0.015)
    groups = folder_shares([full, liver_only], [0.12, 0.03], real)
    draws = [pick_real_case(rng, real, groups).name for _ in range(30000)]
    assert draws.count("chaos") / len(draws) == pytest.approx(0.2, abs=0.015)


def test_one_share_draws_exactly_as_before(tmp_path):
    """Runs started before per-folder shares resume with the same samples."""
    real = cases("a", "b", "c")
    assert folder_shares([tmp_path], [0.2], real) is None
    rng, earlier = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(50):
        assert pick_real_case(rng, real, None) is real[earlier.integers(len(real))]


def test_a_folder_with_a_share_but_no_training_case_is_an_error_naming_it(tmp_path):
    full = flare_folder(tmp_path / "full", ["ts_a"])
    empty = flare_folder(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="empty.*share 0.05 but no training case"):
        folder_shares([full, empty], [0.1, 0.05], cases("ts_a"))
    probabilities, folders = folder_shares([full, empty], [0.1, 0.0], cases("ts_a"))
    assert list(probabilities) == [1.0, 0.0] and folders[1] == []


def test_the_run_summary_keeps_the_total_and_each_folder_share():
    assert real_shares({"data": ["a"], "data_weight": 0.15}) == {"real_sample_share": 0.15}
    assert real_shares({"data": ["a"], "data_weight": [0.15]}) == {"real_sample_share": 0.15}
    assert real_shares({"data": ["a", "b"], "data_weight": [0.1, 0.05]}) == {
        "real_sample_share": 0.15, "real_sample_share_per_folder": {"a": 0.1, "b": 0.05}}
    assert real_shares({"data": [], "data_weight": [0.2]}) == {"real_sample_share": 0.0}
