"""Which organs a case's label covers: declarations in ``labelled.json`` and ``dataset.json``.

A label image drawn for one organ (e.g. a liver data set) leaves the other organs unlabelled:
their voxels read as background although they may be organ. A folder declares such cases in

- ``labelled.json``: ``{"CASE": ["liver"], ...}`` per case; the key ``"*"`` (or a plain list
  ``["liver"]`` instead of an object) declares every case of the folder that is not named;
- ``dataset.json`` (nnU-Net style): a top-level ``"labelled"`` of either form above, and/or a
  ``"labelled"`` list in an entry of ``"training"`` (the case named by its ``"label"`` or
  ``"image"`` path).

Organ names: liver, kidneys (or kidney), spleen, pancreas, case-insensitive; label ids 1-4 are
accepted too. A case nobody declares covers every organ. Coverage is a tuple of label ids
(``method.LABELS``), e.g. ``(1,)`` for a liver-only label.
"""

import json
from pathlib import Path

import numpy as np

from app import method

ALL_ORGANS = tuple(sorted(method.LABELS))
DECLARATION_FILES = ("labelled.json", "dataset.json")
FOLDER_KEY = "*"  # a labelled.json key declaring every case it does not name
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


class DeclarationError(ValueError):
    """A declaration that cannot be read; the message names the file and what is wrong."""


def organ_ids_by_name(organs=None):
    """{lower-case name: label id} of ``organs`` (label id -> name, default ``method.LABELS``),
    with the plural and singular of each name."""
    names = {}
    for label_id, name in (organs or method.LABELS).items():
        name = name.lower()
        names[name] = label_id
        names[name[:-1] if name.endswith("s") else name + "s"] = label_id
    return names


def parse_organs(value, source, organs=None):
    """Sorted tuple of label ids for a declared list of organ names (or ids).

    ``source`` names the file and entry in the DeclarationError raised for anything else.
    """
    known = organ_ids_by_name(organs)
    ids = set((organs or method.LABELS).keys())
    if not isinstance(value, list) or not value:
        raise DeclarationError(f"{source}: expected a non-empty list of organ names "
                               f"(e.g. [\"liver\"]), got {json.dumps(value)}")
    covered = set()
    for item in value:
        if isinstance(item, str) and item.strip().lower() in known:
            covered.add(known[item.strip().lower()])
        elif isinstance(item, int) and not isinstance(item, bool) and item in ids:
            covered.add(item)
        else:
            raise DeclarationError(
                f"{source}: unknown organ {json.dumps(item)}; known organs: "
                f"{', '.join(name for name in (organs or method.LABELS).values())} "
                f"(or label ids {', '.join(str(i) for i in sorted(ids))})")
    return tuple(sorted(covered))


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DeclarationError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise DeclarationError(f"{path}: not UTF-8 text ({error})") from None


def _declared(value, source, organs):
    """{case or FOLDER_KEY: ids} of a labelled.json document (or dataset.json's "labelled")."""
    if isinstance(value, list):
        return {FOLDER_KEY: parse_organs(value, source, organs)}
    if not isinstance(value, dict):
        raise DeclarationError(f"{source}: expected an object {{\"CASE\": [organs]}} or a list "
                               f"of organs, got {type(value).__name__}")
    return {str(case): parse_organs(names, f"{source}, case {case!r}", organs)
            for case, names in value.items()}


def case_name(path):
    """Case name of an image path: ``NAME.nii.gz`` and ``NAME_0000.nii.gz`` are both NAME."""
    name = Path(str(path)).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.removesuffix("_0000")


def read_labelled_json(path, organs=None):
    """{case name or ``"*"``: covered label ids} of a labelled.json file."""
    return _declared(_read_json(path), str(path), organs)


def read_dataset_json(path, organs=None):
    """{case name or ``"*"``: covered label ids} of an nnU-Net style dataset.json file (empty
    when it declares nothing: every case then covers every organ)."""
    document = _read_json(path)
    if not isinstance(document, dict):
        raise DeclarationError(f"{path}: expected a JSON object")
    declared = {}
    if "labelled" in document:
        declared.update(_declared(document["labelled"], f"{path}, \"labelled\"", organs))
    entries = document.get("training", [])
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, dict) and "labelled" in entry:
            reference = entry.get("label") or entry.get("image")
            if not isinstance(reference, str):
                raise DeclarationError(f"{path}, training entry {index}: \"labelled\" needs the "
                                       "entry's \"label\" or \"image\" path to name its case")
            name = case_name(reference)
            covered = parse_organs(entry["labelled"], f"{path}, training entry {index} ({name})",
                                   organs)
            if declared.get(name, covered) != covered:
                raise DeclarationError(f"{path}: case {name!r} is declared twice, differently")
            declared[name] = covered
    return declared


def read_declaration(path, organs=None):
    """Declarations of one file, read as labelled.json unless it is named dataset.json."""
    path = Path(path)
    if path.name == "dataset.json":
        return read_dataset_json(path, organs)
    return read_labelled_json(path, organs)


def folder_declarations(folder, organs=None):
    """Declarations of the labelled.json and dataset.json in ``folder`` (either, both or none:
    {} means every case covers every organ). A case declared differently by both files is an
    error naming both."""
    declared, sources = {}, {}
    for file_name in DECLARATION_FILES:
        path = Path(folder) / file_name
        if not path.is_file():
            continue
        for case, covered in read_declaration(path, organs).items():
            if case in declared and declared[case] != covered:
                raise DeclarationError(f"{path} and {sources[case]} declare case {case!r} "
                                       "differently")
            declared[case], sources[case] = covered, path
    return declared


def covered_organs(declarations, name):
    """The label ids case ``name`` covers: its own declaration, else the folder's, else all."""
    return declarations.get(name, declarations.get(FOLDER_KEY, ALL_ORGANS))


def coverage_vector(covered, classes=method.NUM_CLASSES):
    """float32 (classes,): 1 for background (always known) and each covered label id, else 0;
    the per-sample coverage the training losses take."""
    vector = np.zeros(classes, np.float32)
    vector[0] = 1.0
    vector[list(covered)] = 1.0
    return vector
