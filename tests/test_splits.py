"""K-fold splits: a partition of the cases, stored and read back, honoured by training."""

import json

import pytest

from training.splits import fold_of, main, make_folds, read_splits, write_splits


def test_folds_partition_the_cases_and_depend_only_on_the_seed():
    names = [f"case_{i:03d}" for i in range(10)]
    folds = make_folds(names, 4, seed=1)
    held_out = [name for fold in folds for name in fold["validation"]]
    assert sorted(held_out) == names  # each case held out exactly once
    assert sorted(len(fold["validation"]) for fold in folds) == [2, 2, 3, 3]
    for fold in folds:
        assert sorted(fold["train"] + fold["validation"]) == names
    assert make_folds(reversed(names), 4, seed=1) == folds
    assert make_folds(names, 4, seed=2) != folds


def test_too_few_cases_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="4 folds need at least 4 cases"):
        make_folds(["a", "b", "c"], 4)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": ["a", "b"], "validation": ["b"]}]))
    with pytest.raises(ValueError, match="fold 0 has cases in both sets"):
        read_splits(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="splits.json: cannot read"):
        read_splits(path)
    write_splits(path, make_folds(["a", "b"], 2))
    with pytest.raises(ValueError, match="fold 2 does not exist"):
        fold_of(path, 2)


def test_command_line_splits_a_flare_folder(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"case_{i}_0000.nii.gz").touch()
        (data / f"case_{i}.nii.gz").touch()
    (data / "unlabelled_0000.nii.gz").touch()  # no label: not a training case
    main(["make", "--data", str(data), "--folds", "2", "--out", str(tmp_path / "splits.json")])
    folds = read_splits(tmp_path / "splits.json")
    validation = folds[0]["validation"] + folds[1]["validation"]
    assert sorted(validation) == [f"case_{i}" for i in range(5)]
    assert "5 cases in 2 folds" in capsys.readouterr().out

    main(["held-out", "--splits", str(tmp_path / "splits.json"), "--fold", "1", "--data", str(data),
          "--out", str(tmp_path / "fold1")])
    images = sorted(p.name for p in (tmp_path / "fold1" / "images").iterdir())
    labels = sorted(p.name for p in (tmp_path / "fold1" / "labels").iterdir())
    assert images == [f"{name}_0000.nii.gz" for name in folds[1]["validation"]]
    assert labels == [f"{name}.nii.gz" for name in folds[1]["validation"]]
    assert (tmp_path / "fold1" / "labels" / labels[0]).resolve() == data / labels[0]

    write_splits(tmp_path / "bad.json", [{"train": [], "validation": ["case_9"]}] * 2)
    with pytest.raises(ValueError, match="not found in the data: case_9"):
        main(["held-out", "--splits", str(tmp_path / "bad.json"), "--fold", "0",
              "--data", str(data), "--out", str(tmp_path / "bad")])


def test_training_holds_out_the_fold_s_validation_cases(tmp_path):
    from synthetic import write_case
    from training.train import parse_args, prepare_cases

    data = tmp_path / "data"
    for i in range(3):
        write_case(data, f"case_{i}", seed=40 + i, in_plane_size=48)
    write_splits(tmp_path / "splits.json", [
        {"train": ["case_0"], "validation": ["case_1"]},  # case_2 in neither set: left out
        {"train": ["case_1", "case_2"], "validation": ["case_0"]}])
    args = parse_args(["--stage", "segmentation", "--run", str(tmp_path / "run"),
                       "--data", str(data), "--splits", str(tmp_path / "splits.json"),
                       "--fold", "0", "--generated", "0", "--validation", "1",
                       "--generated-size", "48", "--workers", "1"])
    real, generated, validation, anatomy = prepare_cases(args)
    assert anatomy == []
    assert [case.name for case in real] == ["case_0"]
    assert generated == []
    assert [case.name for case in validation] == ["case_1", "generated_validation_0000"]
