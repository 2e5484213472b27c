"""K-fold splits of labelled cases: made once, stored as JSON, read by training (``--splits``).

    python -m training.splits --data FLARE21/TrainingImg_and_Mask --folds 4 --out splits.json

The file is a list with one entry per fold, ``{"train": [names], "validation": [names]}``; every
case is in the validation set of exactly one fold. Case names are those of training.cases
(the image name without ``_0000.nii.gz``).
"""

import argparse
import json
from pathlib import Path

import numpy as np


def make_folds(names, folds, seed=0):
    """Shuffle ``names`` with ``seed`` and deal them into ``folds`` validation sets."""
    names = sorted(set(names))
    if not 2 <= folds <= len(names):
        raise ValueError(f"{folds} folds need at least {folds} cases, got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    validation_sets = [sorted(names[i] for i in order[fold::folds]) for fold in range(folds)]
    return [{"train": sorted(set(names) - set(held_out)), "validation": held_out}
            for held_out in validation_sets]


def read_splits(path):
    """The folds stored in ``path``, checked: each fold's sets are disjoint."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the splits file ({error})") from None
    if not isinstance(splits, list) or not all(
            isinstance(fold, dict) and {"train", "validation"} <= set(fold) for fold in splits):
        raise ValueError(f"{path}: expected a list of {{'train': [...], 'validation': [...]}}")
    for index, fold in enumerate(splits):
        overlap = set(fold["train"]) & set(fold["validation"])
        if overlap:
            raise ValueError(f"{path}: fold {index} has cases in both sets: {sorted(overlap)[:5]}")
    return splits


def fold_of(path, fold):
    """(training names, validation names) of fold ``fold`` of the splits file ``path``."""
    splits = read_splits(path)
    if not 0 <= fold < len(splits):
        raise ValueError(f"{path}: fold {fold} does not exist (the file has {len(splits)} folds)")
    return set(splits[fold]["train"]), set(splits[fold]["validation"])


def write_splits(path, splits):
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(splits, indent=1) + "\n")
    temporary.replace(path)


def main(argv=None):
    from training.cases import find_cases

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="folder of labelled CT (FLARE naming or imagesTr/labelsTr); repeatable")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="splits JSON file to write")
    args = parser.parse_args(argv)
    names = [name for folder in args.data for name, _, _ in find_cases(folder)]
    splits = make_folds(names, args.folds, args.seed)
    write_splits(args.out, splits)
    sizes = ", ".join(str(len(fold["validation"])) for fold in splits)
    print(f"{len(set(names))} cases in {args.folds} folds (validation sizes {sizes}) -> {args.out}")


if __name__ == "__main__":
    main()
