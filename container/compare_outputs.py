"""Compare two folders of label maps: the container's outputs and the local predict.sh's.

    .venv/bin/python container/compare_outputs.py CONTAINER_OUTPUTS LOCAL_OUTPUTS

Both folders must hold the same file names; each pair must have the same size, spacing, origin,
direction and pixel type, and the same label in every voxel. Prints one line per file and exits 1
on any difference (2 when a folder is empty or unreadable).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def geometry(image: sitk.Image) -> dict:
    """The header fields that must agree, with readable names."""
    return {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
            "direction": image.GetDirection(), "pixel type": image.GetPixelIDTypeAsString()}


def differences(first: Path, second: Path) -> list[str]:
    """What differs between two label images (empty when they are equal voxel for voxel)."""
    a, b = sitk.ReadImage(str(first)), sitk.ReadImage(str(second))
    found = [f"{key} {value} != {geometry(b)[key]}" for key, value in geometry(a).items()
             if value != geometry(b)[key]]
    if found:
        return found
    labels_a, labels_b = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    unequal = int(np.count_nonzero(labels_a != labels_b))
    if unequal:
        found.append(f"{unequal} of {labels_a.size} voxels have other labels")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folders = [Path(folder) for folder in argv]
    names = [sorted(p.name for p in folder.glob("*.nii.gz")) if folder.is_dir() else []
             for folder in folders]
    for folder, found in zip(folders, names, strict=True):
        if not found:
            print(f"no .nii.gz files in {folder}", file=sys.stderr)
            return 2
    if names[0] != names[1]:
        print(f"different files: {folders[0]}: {names[0]}; {folders[1]}: {names[1]}")
        return 1
    status = 0
    for name in names[0]:
        found = differences(folders[0] / name, folders[1] / name)
        if found:
            status = 1
            print(f"{name}: DIFFERENT: " + "; ".join(found))
        else:
            image = sitk.ReadImage(str(folders[0] / name))
            labels = np.unique(sitk.GetArrayViewFromImage(image)).tolist()
            print(f"{name}: identical ({'x'.join(map(str, image.GetSize()))} voxels, "
                  f"labels {labels}, same geometry)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
