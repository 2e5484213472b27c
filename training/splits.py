"""K-fold splits of labelled cases: made once, stored as JSON, read by training (``--splits``).

    python -m training.splits make --data FLARE21 --folds 4 --out splits.json
    python -m training.splits held-out --splits splits.json --fold 0 --data FLARE21 --out fold0

``held-out`` links a fold's validation cases into ``OUT/images`` (``NAME_0000.nii.gz``) and
``OUT/labels`` (``NAME.nii.gz``), ready for ``python -m app`` and ``python -m evaluation.evaluate``.

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


def link_held_out(splits_path, fold, data_dirs, out_dir):
    """Symlink the validation cases of ``fold`` into ``out_dir``/images and ``out_dir``/labels.

    Returns the number of cases linked; a held-out name without data is an error naming it.
    """
    from training.cases import find_cases

    _, held_out = fold_of(splits_path, fold)
    found = {name: (image, label)
             for folder in data_dirs for name, image, label in find_cases(folder)}
    missing = sorted(held_out - set(found))
    if missing:
        raise ValueError(f"{splits_path}: fold {fold} names cases not found in the data: "
                         f"{', '.join(missing[:5])}")
    out_dir = Path(out_dir)
    for sub in ("images", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for name in sorted(held_out):
        image, label = found[name]
        for link, target in ((out_dir / "images" / f"{name}_0000.nii.gz", image),
                             (out_dir / "labels" / f"{name}.nii.gz", label)):
            link.unlink(missing_ok=True)
            link.symlink_to(Path(target).resolve())
    return len(held_out)


def main(argv=None):
    from training.cases import find_cases

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="write a k-fold splits file")
    make.add_argument("--data", type=Path, action="append", required=True,
                      help="folder of labelled CT (FLARE naming or imagesTr/labelsTr); repeatable")
    make.add_argument("--folds", type=int, default=4)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", type=Path, required=True, help="splits JSON file to write")
    held_out = commands.add_parser("held-out", help="link a fold's validation cases into a folder")
    held_out.add_argument("--splits", type=Path, required=True)
    held_out.add_argument("--fold", type=int, required=True)
    held_out.add_argument("--data", type=Path, action="append", required=True)
    held_out.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "held-out":
        count = link_held_out(args.splits, args.fold, args.data, args.out)
        print(f"fold {args.fold}: {count} held-out cases linked into {args.out}/images and "
              f"{args.out}/labels")
        return
    names = [name for folder in args.data for name, _, _ in find_cases(folder)]
    splits = make_folds(names, args.folds, args.seed)
    write_splits(args.out, splits)
    sizes = ", ".join(str(len(fold["validation"])) for fold in splits)
    print(f"{len(set(names))} cases in {args.folds} folds (validation sizes {sizes}) -> {args.out}")


if __name__ == "__main__":
    main()
