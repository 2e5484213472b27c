"""Finding the cases of a cohort: every image app.io reads, anywhere under the input folder, and
DICOM trees as a PACS exports them (nested folders, several series per study and per folder,
non-image objects beside the images).

One case per image file (app.io's formats and FLARE naming, folder by folder; files in label
folders, ``LABEL_FOLDERS``, are not cases) and one per CT series (SeriesInstanceUID). Everything
else that looks like DICOM is listed with the reason it is not a case: another modality, a
localizer (scout), a dose report or other non-image object, a series of one slice, a file
pydicom cannot read.
"""

import json
import multiprocessing
import os
import re
import sqlite3
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from app import io as image_io

# DICOM attributes read for discovery and for the cohort table (headers only, no pixels)
HEADER_TAGS = ("SOPClassUID", "Modality", "ImageType", "SeriesInstanceUID", "StudyInstanceUID",
               "PatientID", "SeriesNumber", "SeriesDescription", "Manufacturer",
               "ManufacturerModelName", "SliceThickness", "ContrastBolusAgent", "Rows",
               "ImagePositionPatient", "FrameOfReferenceUID", "StudyDate")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # one slice a file: what a case is made of
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"  # multi-frame: not read (yet)
PARALLEL_FROM_FILES = 2000  # fewer DICOM files to parse: one process (a pool's start costs ~1 s)
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Folders of label images in the FLARE / nnU-Net / ../shared/data layouts: not CT to segment
LABEL_FOLDERS = {"labels", "labelstr", "labelsts"}


@dataclass(frozen=True)
class CohortCase:
    """One case: its unique name (output NAME.nii.gz / NAME.dcm), where it is, and how a rerun
    recognises it (``identity``).

    ``files``: the series' files for a DICOM case (any folders), else empty. ``header``: DICOM
    attributes for the cohort table (IDs, scanner, series description, slice thickness).
    """

    name: str
    path: Path
    format: str
    identity: str
    files: tuple = ()
    header: dict = field(default_factory=dict)
    problem: str | None = None

    def app_case(self):
        """The ``app.io.Case`` of a file case (a DICOM case is read from ``files``)."""
        return image_io.Case(self.name, self.path, self.format, self.problem)


def file_identity(path):
    """path + size + mtime: a file replaced or changed is a new input for a rerun."""
    stat = Path(path).stat()
    return f"file:{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def safe_name(text):
    return SAFE_NAME.sub("_", text).strip("._") or "case"


def read_header(path):
    """The discovery attributes of a DICOM file as a dict, or raise ``InputError``."""
    import pydicom

    try:
        with warnings.catch_warnings():  # pydicom's guesses about a broken file: ours says it
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True,
                                      specific_tags=list(HEADER_TAGS))
    except Exception as error:  # pydicom raises several kinds for a broken file
        raise image_io.InputError(f"{path}: not a readable DICOM file ({error})") from None
    header = {}
    for tag in HEADER_TAGS:
        value = dataset.get(tag)
        if value is None or value == "":
            continue
        if tag == "ImageType" or tag == "ImagePositionPatient":
            value = [str(v) for v in value]
        elif tag in ("SeriesNumber", "Rows"):
            value = int(value)
        elif tag == "SliceThickness":
            value = float(value)
        else:
            value = str(value)
        header[tag] = value
    if not header.get("SOPClassUID"):
        meta = getattr(dataset, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID"):
            header["SOPClassUID"] = str(meta.MediaStorageSOPClassUID)
    if not any(header.get(tag) for tag in ("SOPClassUID", "Modality", "SeriesInstanceUID",
                                           "Rows")):
        raise image_io.InputError(f"{path}: not a readable DICOM file (no SOP class, modality, "
                                  "series UID or image size in it: corrupt?)")
    return header


def header_or_error(path):
    """(header, None) or (None, reason) for one file: ``read_header`` for a process pool."""
    try:
        return read_header(path), None
    except image_io.InputError as error:
        return None, str(error).split(": ", 1)[1]


class HeaderCache:
    """The discovery attributes of DICOM files read before, by path, size and mtime, in SQLite
    (OUTPUT/discovery.sqlite): a rerun over an archive of millions of files parses only the new
    or changed ones."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS headers (path TEXT PRIMARY KEY, size INTEGER, "
              "mtime_ns INTEGER, header TEXT, error TEXT)")

    def __init__(self, path):
        self.connection = sqlite3.connect(path, timeout=30)
        with self.connection:
            self.connection.execute(self.SCHEMA)
        self.hits = 0

    def get(self, path, stat):
        row = self.connection.execute("SELECT size, mtime_ns, header, error FROM headers "
                                      "WHERE path = ?", (str(path),)).fetchone()
        if row is None or (row[0], row[1]) != (stat.st_size, stat.st_mtime_ns):
            return None
        self.hits += 1
        return (json.loads(row[2]) if row[2] else None), row[3]

    def put_many(self, entries):
        """``entries``: (path, stat, header or None, error or None)."""
        with self.connection:
            self.connection.executemany(
                "INSERT OR REPLACE INTO headers VALUES (?, ?, ?, ?, ?)",
                [(str(path), stat.st_size, stat.st_mtime_ns,
                  json.dumps(header) if header is not None else None, error)
                 for path, stat, header, error in entries])

    def close(self):
        self.connection.close()


def read_headers(paths, cache=None, processes=None, parallel_from=PARALLEL_FROM_FILES):
    """{path: (header or None, reason or None)} for DICOM files, in their order: from ``cache``
    where it knows the file as it is, the rest parsed, in a pool of ``processes`` (default:
    every CPU) when there are at least ``parallel_from`` of them."""
    results, todo = {}, []
    for path in paths:
        stat = path.stat()
        cached = cache.get(path, stat) if cache is not None else None
        if cached is not None:
            results[path] = cached
        else:
            todo.append((path, stat))
    processes = processes or os.cpu_count() or 1
    if len(todo) >= parallel_from and processes > 1:
        # spawn, not fork: the caller may hold threads (TensorFlow, Ray) that fork would copy
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            read = list(pool.map(header_or_error, [path for path, _ in todo], chunksize=256))
    else:
        read = [header_or_error(path) for path, _ in todo]
    for (path, _), result in zip(todo, read):
        results[path] = result
    if cache is not None and todo:
        cache.put_many([(path, stat, *result) for (path, stat), result in zip(todo, read)])
    return {path: results[path] for path in paths}  # in the order of ``paths``


def not_a_ct_series(header, count):
    """Why a series (its first file's ``header``, ``count`` files) is not a case, or None."""
    from pydicom.uid import UID

    modality = header.get("Modality", "")
    sop_class = header.get("SOPClassUID", "")
    if sop_class == ENHANCED_CT_IMAGE_STORAGE:
        return ("an Enhanced (multi-frame) CT object: not read by this version (one file per "
                "slice, CT Image Storage, is)")
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        kind = UID(sop_class).name if UID(sop_class).is_valid else sop_class
        if "Dose" in kind:
            return f"a dose report ({kind})"
        if modality and modality != "CT":
            return f"modality {modality}, not CT ({kind})"
        return f"not a CT image ({kind})"
    if modality and modality != "CT":
        return f"modality {modality}, not CT"
    image_type = [v.upper() for v in header.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return "a localizer (scout) image, not a volume"
    if count < 2:
        return "a single slice, not a volume"
    return None


def walk(input_dir):
    """(folder, visible file names, visible subfolders) for every folder under ``input_dir``,
    following symbolic links to folders (each real folder once, so a link loop ends)."""
    seen = set()
    for folder, subfolders, files in os.walk(input_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        yield Path(folder), sorted(f for f in files if not f.startswith(".")), subfolders


def discover(input_dir, cache=None, processes=None):
    """(cases, skipped): every case under ``input_dir`` (``CohortCase``, sorted by name) and
    every other visible file as ``app.io.Skipped`` with its reason. ``cache``: a
    ``HeaderCache``; ``processes``: for ``read_headers``.

    Names: FLARE names as the folder command gives them, prefixed by the subfolder's path
    (``sub__NAME``) below the top; a CT series is named ``PATIENT_SERIESNUMBER_UIDTAIL`` from its
    header (or its folder's path when it has no UIDs).
    """
    input_dir = image_io.check_input_folder(input_dir)
    cases, skipped, dicom_files = [], [], []
    for folder, files, _ in walk(input_dir):
        if folder != input_dir and folder.name.lower() in LABEL_FOLDERS:
            skipped.extend(image_io.Skipped(folder / name, "in a label folder (labels, labelsTr, "
                                                           "labelsTs): ground truth, not CT")
                           for name in files)
            continue
        relative = folder.relative_to(input_dir)
        prefix = "__".join(relative.parts)
        folder_cases, folder_skipped = image_io.survey(folder)
        for case in folder_cases:
            if case.format == image_io.DICOM:
                continue  # DICOM files are grouped by series below, wherever they lie
            name = safe_name(f"{prefix}__{case.name}" if prefix else case.name)
            cases.append(CohortCase(name, case.path, case.format, file_identity(case.path),
                                    problem=case.problem))
        skipped.extend(item for item in folder_skipped if not item.path.is_dir())
        for name in files:
            path = folder / name
            if image_io.image_format(name) or not path.is_file():
                continue
            if image_io.looks_like_dicom(path):
                dicom_files.append(path)
    series = {}  # ("uid", SeriesInstanceUID) or ("folder", folder) -> [(file, header)]
    for path, (header, error) in read_headers(dicom_files, cache, processes).items():
        if error:
            skipped.append(image_io.Skipped(path, error))
            continue
        uid = header.get("SeriesInstanceUID")
        key = ("uid", uid) if uid else ("folder", str(path.parent))
        series.setdefault(key, []).append((path, header))
    for (kind, key), members in sorted(series.items()):
        header = members[0][1]
        reason = not_a_ct_series(header, len(members))
        if reason:
            skipped.extend(image_io.Skipped(path, reason) for path, _ in members)
            continue
        files = tuple(sorted(str(path) for path, _ in members))
        folder = Path(os.path.commonpath([str(Path(f).parent) for f in files]))
        if kind == "uid":
            identity = f"dicom:{key}"
            name = "_".join(str(part) for part in (
                header.get("PatientID") or "patient", header.get("SeriesNumber", "series"),
                key.rsplit(".", 1)[-1]))
        else:  # an anonymised series without UIDs: its folder and files
            stats = [Path(f).stat() for f in files]
            identity = (f"dicom-folder:{folder.resolve()}:{len(files)}:"
                        f"{sum(s.st_size for s in stats)}:{max(s.st_mtime_ns for s in stats)}")
            name = "__".join(folder.relative_to(input_dir).parts) or input_dir.resolve().name
        cases.append(CohortCase(safe_name(name), folder, image_io.DICOM, identity, files,
                                {k: header[k] for k in HEADER_TAGS if k in header}))
    return unique_names(cases), sorted(skipped, key=lambda item: str(item.path))


def unique_names(cases):
    """Cases sorted by name; a name shared by several gets ``-2``, ``-3``, ... in path order."""
    by_name = {}
    for case in sorted(cases, key=lambda c: (c.name, str(c.path), c.identity)):
        by_name.setdefault(case.name, []).append(case)
    named = []
    for name, group in by_name.items():
        for number, case in enumerate(group, start=1):
            named.append(case if number == 1 else
                         CohortCase(f"{name}-{number}", case.path, case.format, case.identity,
                                    case.files, case.header, case.problem))
    return sorted(named, key=lambda c: c.name)
