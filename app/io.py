"""Reading CT cases and writing label images: the one place that knows about files.

Three verbs, used by the command line (app/cli.py) and usable on their own:

- ``find_cases(input_dir)``: the cases in a folder, as ``Case`` records.
- ``read_case(case)``: one case as a validated 3-D scalar ``sitk.Image`` plus a list of warnings;
  an input that cannot be segmented raises ``InputError`` whose message names the file and says
  why.
- ``write_labels(labels, path)``: a label image written atomically in the format its name says.

What counts as a case in a folder (not recursive; names starting with "." are ignored):

1. Every ``.nii.gz``, ``.nii``, ``.mha``, ``.mhd`` and ``.nrrd`` file (suffixes in any case) is a
   case, and every subfolder that holds DICOM files. DICOM files directly in the input folder
   form one more case named after the folder.
2. Names follow the FLARE rule where they can: ``NAME_0000.<suffix>`` (or a DICOM folder
   ``NAME_0000``) is case ``NAME`` with output ``NAME.nii.gz``; any other image is named after
   the file without its suffix. Where case ``NAME`` exists, a file ``NAME_0001`` (and the other
   channels) and a file ``NAME.<suffix>`` (its label, as FLARE folders hold them) are not cases.
3. A file or folder is DICOM when it carries the "DICM" preamble marker or ends in ``.dcm``;
   reading it takes the one series ``sitk.ImageSeriesReader`` finds (several series in one folder
   are an error naming them: one series per folder).
4. Two inputs with the same case name (``a.nii`` and ``a.mha``; ``a_0000.nii`` and
   ``a_0000.nii.gz``) would write the same output file: both fail, named, and the others go on.
5. Every other visible entry is listed by ``survey`` with the reason it is not a case: not an
   image, a dangling link, a folder without DICOM files, a folder named like an image, a second
   channel, a label. (A ``.raw``/``.zraw`` beside its ``.mhd`` is part of that case.)

Array axis order follows SimpleITK: sizes and spacings (x, y, z); NumPy views (z, y, x).
"""

import math
import os
import re
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import method

FLARE_SUFFIX = "_0000.nii.gz"
FORMATS = ("nii.gz", "nii", "mha", "mhd", "nrrd")  # file formats read and written
DICOM_SEG = "dicom-seg"  # a DICOM Segmentation object NAME.dcm (app/dicom_seg.py), DICOM input only
# "same": the input's own format (NIfTI for DICOM input)
OUTPUT_FORMATS = (*FORMATS, "same", DICOM_SEG)
DEFAULT_OUTPUT_FORMAT = "nii.gz"
DICOM = "dicom"
DICOM_SUFFIXES = (".dcm", ".dicom")
MINIMUM_VOXELS_PER_AXIS = 2  # one voxel thick is a 2-D slice stored as 3-D

# Intensity checks (warnings, not refusals). A CT in HU holds air (about -1000 HU: around the
# body, in the lungs and bowel) in far more than 1% of its voxels, and bone or contrast (over
# 150 HU) in far more than 0.1%; the percentiles make single outlier voxels harmless. -500 HU lies
# halfway between air and soft tissue, so noise and partial volume do not move air across it.
# Measured on ../shared/data: 1st percentile -1011 and -1024 HU, 99.9th 777 and 1014 HU; on
# 12 mm sub-slabs of the real scan the 99.9th percentile never fell below 370 HU.
AIR_PERCENTILE, AIR_MAX_HU = 1.0, -500.0
DENSE_PERCENTILE, DENSE_MIN_HU = 99.9, 150.0
INTENSITY_SAMPLE_VOXELS = 2_000_000  # percentiles from a regular subsample of larger images
INT16_RANGE = (-32768, 32767)  # CT is stored as int16 HU (METHOD.md, "Intensity")


class InputError(ValueError):
    """An input that cannot be segmented; the message names the file and says why."""


@dataclass(frozen=True)
class Case:
    """One input: its case name, its file (or DICOM folder) and format.

    ``problem``: a reason known before reading (such as a name shared with another input) that
    makes ``read_case`` refuse it.
    """

    name: str
    path: Path
    format: str
    problem: str | None = None

    def output_path(self, output_dir, output_format=DEFAULT_OUTPUT_FORMAT):
        """Where the labels go: ``NAME.nii.gz``, or ``NAME.<format>`` (see ``OUTPUT_FORMATS``;
        ``NAME.dcm`` for a DICOM SEG)."""
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {output_format!r} is not one of "
                             f"{', '.join(OUTPUT_FORMATS)}")
        if output_format == DICOM_SEG:
            return Path(output_dir) / f"{self.name}.dcm"
        if output_format == "same":
            output_format = self.format if self.format in FORMATS else DEFAULT_OUTPUT_FORMAT
        return Path(output_dir) / f"{self.name}.{output_format}"


# ----------------------------------------------------------------------------------------------
# Finding cases
# ----------------------------------------------------------------------------------------------


def image_format(name):
    """The format ("nii.gz", "nii", ...) a file name says, or None."""
    lowered = name.lower()
    for fmt in FORMATS:  # "nii.gz" before "nii"
        if lowered.endswith("." + fmt):
            return fmt
    return None


def looks_like_dicom(path):
    """True for a DICOM file: the "DICM" marker after the 128-byte preamble, or a DICOM suffix."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def holds_dicom(folder):
    """True if any visible file directly in ``folder`` looks like DICOM."""
    try:
        return any(entry.is_file() and not entry.name.startswith(".") and looks_like_dicom(entry)
                   for entry in folder.iterdir())
    except OSError:
        return False


@dataclass(frozen=True)
class Skipped:
    """A visible entry of the input folder that is not a case, and why."""

    path: Path
    reason: str


FLARE_CHANNEL = re.compile(r"(.+)_(\d{4})")  # NAME_0000: channel 0000 of case NAME
MHD_DATA_SUFFIXES = (".raw", ".zraw")
SUPPORTED = "supported: .nii.gz, .nii, .mha, .mhd, .nrrd files and DICOM series folders"


def check_input_folder(input_dir):
    """Raise FileNotFoundError (missing) or NotADirectoryError (a file) for a bad input path."""
    input_dir = Path(input_dir)
    if input_dir.is_dir():
        return input_dir
    if input_dir.exists():
        raise NotADirectoryError(f"{input_dir}: is a file, not a folder: give the folder that "
                                 "holds the images (every image in it is segmented)")
    raise FileNotFoundError(f"{input_dir}: input folder does not exist")


def survey(input_dir):
    """(cases, skipped): the cases in ``input_dir`` (rules in the module docstring), sorted by
    case name, and every other visible entry as a ``Skipped`` with its reason, sorted by name.
    """
    input_dir = check_input_folder(input_dir)
    visible = sorted(entry for entry in input_dir.iterdir() if not entry.name.startswith("."))
    found, skipped, loose_dicom = [], [], False  # found: (stem, path, format)
    for entry in visible:
        if entry.is_symlink() and not entry.exists():
            skipped.append(Skipped(entry, f"a dangling symbolic link (to {os.readlink(entry)})"))
        elif entry.is_dir():
            if image_format(entry.name):
                skipped.append(Skipped(entry, "a folder named like an image file (images are "
                                              "files; a DICOM series folder needs another name)"))
            elif holds_dicom(entry):
                found.append((entry.name, entry, DICOM))
            else:
                skipped.append(Skipped(entry, "a folder without DICOM files (subfolders are not "
                                              "searched)"))
        elif entry.is_file():
            fmt = image_format(entry.name)
            if fmt is not None:
                found.append((entry.name[: -len(fmt) - 1], entry, fmt))
            elif entry.suffix.lower() in MHD_DATA_SUFFIXES and any(
                    (entry.parent / (entry.stem + suffix)).is_file()
                    for suffix in (".mhd", ".MHD")):
                continue  # the data file of a .mhd case
            elif looks_like_dicom(entry):
                loose_dicom = True
            else:
                skipped.append(Skipped(entry, f"not an image ({SUPPORTED})"))
        else:
            skipped.append(Skipped(entry, "not a regular file or folder"))
    flare_inputs = {}  # case name -> its channel-0000 entry
    for stem, path, _ in found:
        match = FLARE_CHANNEL.fullmatch(stem)
        if match and match[2] == "0000":
            flare_inputs.setdefault(match[1], path)
    cases = []
    for stem, path, fmt in found:
        match = FLARE_CHANNEL.fullmatch(stem)
        if match and match[2] == "0000":
            cases.append(Case(match[1], path, fmt))
        elif match and match[1] in flare_inputs:
            skipped.append(Skipped(path, f"channel {match[2]} of case {match[1]}: only channel "
                                         f"0000 ({flare_inputs[match[1]].name}) is segmented"))
        elif stem in flare_inputs:
            skipped.append(Skipped(path, f"has case {stem}'s output name: its label (ground "
                                         f"truth)? only {flare_inputs[stem].name} is segmented"))
        else:
            cases.append(Case(stem, path, fmt))
    if loose_dicom:
        cases.append(Case(input_dir.resolve().name, input_dir, DICOM))
    cases = sorted(with_name_clashes_marked(cases), key=lambda case: (case.name, str(case.path)))
    return cases, sorted(skipped, key=lambda item: item.path.name)


def find_cases(input_dir):
    """The cases in ``input_dir`` (see ``survey``), sorted by case name.

    Raises FileNotFoundError if the folder does not exist, NotADirectoryError if it is a file;
    returns [] when it holds no case.
    """
    return survey(input_dir)[0]


def nothing_to_segment(input_dir, skipped):
    """The message for an input folder without a case: what it holds instead."""
    message = (f"{input_dir}: no images named *{FLARE_SUFFIX}, no other supported image "
               f"({', '.join('.' + f for f in FORMATS)}) and no DICOM series folder")
    if not skipped:
        return message + " (the folder is empty, or holds hidden files only)"
    listed = "; ".join(f"{item.path.name}: {item.reason}" for item in skipped[:8])
    more = f"; and {len(skipped) - 8} more" if len(skipped) > 8 else ""
    return f"{message}; it holds {len(skipped)} other entries: {listed}{more}"


def with_name_clashes_marked(cases):
    """Cases that share a name would share an output file: each gets a ``problem`` naming all."""
    by_name = {}
    for case in cases:
        by_name.setdefault(case.name, []).append(case)
    marked = []
    for name, group in by_name.items():
        if len(group) == 1:
            marked.extend(group)
            continue
        names = ", ".join(sorted(case.path.name for case in group))
        marked.extend(Case(case.name, case.path, case.format,
                           f"{case.path}: case name {name!r} is shared by {names}; they would "
                           "write the same output file (and ITK may read one file's voxels for "
                           "the other): rename or remove all but one") for case in group)
    return marked


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_case(case, replace_1mm_spacing=False, max_bytes=None):
    """Read and validate one case: (``sitk.Image``, list of warning messages).

    The image is 3-D with one value per voxel, of the file's pixel type (the predictor computes
    in float32, so wide or unsigned integer types cannot overflow there). Refusals raise
    ``InputError``: truncated or corrupt files, files no reader recognises, 2-D, 4-D and
    single-slice images, vector/RGB/complex pixels, NaN or infinite voxels, DICOM folders with
    no series or several, headers that ITK would silently reinterpret (see ``check_geometry``
    and ``check_header_numbers``), and images whose header declares more data than the file can
    hold or than ``max_bytes`` of working memory allow (checked before any voxel is read).
    Warnings (the image is still returned): intensities that do not look like CT in HU, 8-bit
    pixels, integer values outside int16, header spacing of exactly 1 x 1 x 1 mm, and for DICOM
    a modality other than CT. ``replace_1mm_spacing``: the caller segments a 1 mm image with
    the method's assumed spacing (the warning says so).
    """
    if case.problem:
        raise InputError(case.problem)
    if case.format == DICOM:
        image, warnings = read_dicom_series(case.path, max_bytes=max_bytes)
        check_finite(image, case.path)
    else:
        image, warnings = read_image_file(case.path, case.format, max_bytes), []
    warnings += (spacing_warnings(image, case.path, replace_1mm_spacing)
                 + intensity_warnings(image, case.path))
    return image, warnings


def reader_message(error):
    """The useful last line of a SimpleITK/ITK exception."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    if "Unable to determine ImageIO reader" in last:
        return "no image reader recognises this file (not an image, or a corrupt header)"
    if "orthonormal direction cosines" in last:  # NIfTI: neither sform nor qform is a rotation
        return ("the direction matrix (NIfTI sform and qform) is not a rotation: ITK reads "
                "orthonormal directions only")
    for prefix in ("sitk::ERROR:", "[nrrd]"):
        if last.startswith(prefix):
            last = last[len(prefix):].strip()
    return last[:300]


def read_image_file(path, fmt=None, max_bytes=None):
    """One image file, every check that needs no voxels done before its voxels are loaded.

    Order: the name against the content (``check_file_kind``), the header's own numbers
    (``check_header_numbers``), the declared size against the file and ``max_bytes`` (as the
    header says it, then as ITK reads it), the data's completeness (and, for NIfTI, its
    NaN/infinite values, which ITK's NIfTI reader turns into 0), ITK's view of the header
    (dimension, pixel kind, geometry), then the voxels.
    """
    path = Path(path)
    fmt = fmt or image_format(path.name)
    check_file_kind(path, fmt)
    check_header_numbers(path, fmt)
    declared = declared_data(path, fmt)
    if declared is not None:  # before the data are inflated to check them
        check_declared_size(path, fmt, *declared, max_bytes)
    nonfinite = check_complete(path, fmt)
    if nonfinite:
        raise InputError(f"{path}: {nonfinite} voxels are NaN or infinite")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read: {reader_message(error)}") from None
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    check_shape(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                pixel_type, path)
    check_geometry(reader.GetSpacing()[:3], reader.GetDirection(), reader.GetOrigin()[:3],
                   reader.GetDimension(), path)
    voxels = math.prod(reader.GetSize())
    bytes_per_voxel = reader.GetNumberOfComponents() * pixel_bytes(reader.GetPixelID())
    check_declared_size(path, fmt, voxels, bytes_per_voxel, max_bytes)
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read (truncated or corrupt?): "
                         f"{reader_message(error)}") from None
    except MemoryError:
        raise InputError(f"{path}: out of memory reading {voxels} voxels ({pixel_type})") from None
    if image.GetDimension() == 4:  # a 4-D image holding one volume (check_shape allowed it)
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    check_finite(image, path)
    return image


def check_shape(dimension, size, components, pixel_type, path):
    """Refuse what is not one scalar 3-D volume (a 4-D image of one volume passes)."""
    shape = " x ".join(map(str, size))
    if dimension == 4 and size[3] == 1:
        size = size[:3]
    elif dimension != 3:
        kind = ("a time series or multi-channel image?" if dimension > 3 else "a single slice?")
        raise InputError(f"{path}: is a {dimension}-D image ({shape} voxels): one 3-D CT volume "
                         f"is needed ({kind})")
    if min(size) < MINIMUM_VOXELS_PER_AXIS:
        raise InputError(f"{path}: is {shape} voxels, one voxel thick: a 2-D slice stored as "
                         f"3-D; a CT volume of at least {MINIMUM_VOXELS_PER_AXIS} voxels along "
                         "every axis is needed")
    if components != 1:
        raise InputError(f"{path}: has {components} values per voxel ({pixel_type}): a CT has one "
                         "(an RGB, vector or complex image is not CT)")


# --- headers ITK would reinterpret in silence --------------------------------------------------

ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I|: 1e-3 moves a 500 mm image by at most 0.5 mm
SINGULAR_DETERMINANT = 1e-6


def check_geometry(spacing, direction, origin, dimension, path):
    """Refuse a spacing, direction or origin that ITK or an output format would change.

    ITK refuses a zero spacing only when the voxels are read ("truncated or corrupt?" then), flips
    a negative MetaImage spacing into the direction, keeps a non-orthonormal direction that the
    NIfTI writer then replaces by a rotation (the output lands elsewhere), and cannot invert a
    singular one.
    """
    spacing = np.asarray(spacing, float)
    shown = " x ".join(f"{s:g}" for s in spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{path}: voxel spacing {shown} mm: every spacing must be a positive "
                         "number (a zero, negative or missing spacing in the header)")
    if not np.all(np.isfinite(origin)):
        raise InputError(f"{path}: origin {tuple(origin)} is not a finite position")
    side = int(round(math.sqrt(len(direction))))  # 4 x 4 for a 4-D image of one volume
    matrix = np.asarray(direction, float).reshape(side, side)[:3, :3]
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < SINGULAR_DETERMINANT:
        raise InputError(f"{path}: the direction matrix {format_matrix(matrix)} is singular (two "
                         "axes point along the same line, or one is zero): no valid orientation")
    deviation = float(np.abs(matrix.T @ matrix - np.eye(3)).max())
    if deviation > ORTHONORMAL_TOLERANCE:
        raise InputError(f"{path}: the direction matrix {format_matrix(matrix)} is not a rotation "
                         f"(its axes are not orthogonal unit vectors: off by {deviation:.3g}); "
                         "ITK and the NIfTI writer would silently replace it and move the image: "
                         "fix the header")


def format_matrix(matrix):
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(matrix)) + "]"


METAIMAGE_NUMBER_FIELDS = ("Offset", "Origin", "Position", "ElementSpacing", "ElementSize",
                           "TransformMatrix", "Rotation", "Orientation", "CenterOfRotation")
NRRD_NUMBER_FIELDS = ("space origin", "space directions", "spacings", "axis mins", "axis maxs")
NIFTI1_FLOATS = {"pixdim": (76, 8), "quatern/qoffset": (256, 6), "srow": (280, 12)}
NIFTI2_DOUBLES = {"pixdim": (104, 8), "quatern/qoffset": (352, 6), "srow": (400, 12)}


def check_header_numbers(path, fmt):
    """Refuse header numbers that are not finite: ITK reads a NaN origin as 0, for example.

    Also reads each format's header once more for what ITK hides: "not a MetaImage/NIfTI file".
    """
    bad = None
    if fmt in ("mha", "mhd"):
        fields, _ = metaimage_header(path)
        for key in METAIMAGE_NUMBER_FIELDS:
            if key in fields and not all_finite(fields[key].split()):
                bad = f"{key} = {fields[key]}"
                break
    elif fmt == "nrrd":
        for key, value in nrrd_header(path).items():
            if key in NRRD_NUMBER_FIELDS and not all_finite(
                    re.findall(r"[^\s(),]+", value.replace("none", ""))):
                bad = f"{key}: {value}"
                break
    elif fmt in ("nii", "nii.gz"):
        header = nifti_header_bytes(path, compressed=(fmt == "nii.gz"))
        layout = nifti_layout(header)
        if layout is None:
            raise InputError(f"{path}: not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
        order, version = layout["order"], layout["version"]
        fields = NIFTI1_FLOATS if version == 1 else NIFTI2_DOUBLES
        for key, (offset, count) in fields.items():
            code = "f" if version == 1 else "d"
            values = struct.unpack(order + code * count,
                                   header[offset:offset + count * struct.calcsize(code)])
            if not np.all(np.isfinite(values)):
                bad = f"{key} = {' '.join(f'{v:g}' for v in values)}"
                break
    if bad:
        raise InputError(f"{path}: the header holds a value that is not a finite number ({bad}); "
                         "ITK would read it as 0 or refuse it later")
    if fmt in ("nii", "nii.gz"):
        check_nifti_sform(header, layout, path)


def check_nifti_sform(header, layout, path):
    """Refuse a NIfTI whose sform (in use: sform_code > 0) is not a rotation times the spacing:
    ITK then takes the qform instead, or the identity, with no more than a warning."""
    order, version = layout["order"], layout["version"]
    if version == 1:
        sform_code = struct.unpack(order + "h", header[254:256])[0]
        srow = struct.unpack(order + "12f", header[280:328])
    else:
        sform_code = struct.unpack(order + "i", header[348:352])[0]
        srow = struct.unpack(order + "12d", header[400:496])
    if sform_code <= 0:
        return
    matrix = np.asarray(srow, float).reshape(3, 4)[:, :3]
    lengths = np.linalg.norm(matrix, axis=0)
    if np.any(lengths == 0):
        return  # a zero axis: the direction checks on ITK's reading say it
    direction = matrix / lengths
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > ORTHONORMAL_TOLERANCE:
        raise InputError(f"{path}: the NIfTI sform {format_matrix(matrix)} is sheared (its axes "
                         f"are not orthogonal: off by {deviation:.3g}); ITK would silently use "
                         "the qform (or no orientation) instead: fix the header")


def all_finite(tokens):
    try:
        return all(math.isfinite(float(token)) for token in tokens)
    except ValueError:
        return False


def nrrd_header(path, limit_bytes=1 << 16):
    """The "key: value" fields of an NRRD header (lower-case keys); {} for what is no NRRD."""
    with open(path, "rb") as stream:
        head = stream.read(limit_bytes)
    if not head.startswith(b"NRRD"):
        return {}
    fields = {}
    for line in head.split(b"\n")[1:]:
        line = line.decode("latin-1").rstrip("\r")
        if not line:
            break
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lstrip("=").strip()
    return fields


def check_file_kind(path, fmt):
    """Refuse a file whose name says another kind than its content, and a ``.nii.gz`` that ITK
    would not read itself: beside ``X.nii.gz`` the NIfTI library reads ``X.nii`` instead."""
    if not path.is_file():
        raise InputError(f"{path}: is not a regular file")
    if fmt != "nii.gz":
        return
    with open(path, "rb") as stream:
        head = stream.read(540)
    if not head.startswith(b"\x1f\x8b"):
        if nifti_layout(head) is not None:
            raise InputError(f"{path}: is an uncompressed NIfTI file named .nii.gz: rename it to "
                             f"{path.name[:-3]}")
        raise InputError(f"{path}: is not gzip-compressed data, which a .nii.gz must be (empty, "
                         "truncated or not an image?)")
    stem = path.name[:-3]
    for sibling in {stem, stem[:-4] + ".nii", stem[:-4] + ".NII"}:
        if (path.parent / sibling).exists():
            raise InputError(f"{path}: {sibling} lies beside it, and ITK's NIfTI reader would take "
                             f"its voxels instead: move one of them away")


# --- declared size: bounded work before any voxel is read ---------------------------------------

MAX_DEFLATE_RATIO = 1032  # zlib cannot inflate more than 1032 bytes per input byte
WORKING_BYTES_PER_VOXEL = 18  # besides the image itself (docs/inputs.md, "Memory")


def pixel_bytes(pixel_id):
    probe = sitk.Image([1, 1, 1], pixel_id) if pixel_id >= 0 else None
    if probe is None:
        return 8
    return max(1, probe.GetSizeOfPixelComponent())


def working_bytes(voxels, bytes_per_voxel):
    """Estimated peak memory of one case: its image plus the predictor's per-voxel working set."""
    return voxels * (bytes_per_voxel + WORKING_BYTES_PER_VOXEL)


def compression_bound(path, fmt):
    """How many data bytes the file can hold per byte at most, or None (no bound known)."""
    if fmt in ("nii", "mhd"):
        return 1 if fmt == "nii" else None
    if fmt == "nii.gz":
        return MAX_DEFLATE_RATIO
    if fmt == "mha":
        fields, _ = metaimage_header(path)
        return MAX_DEFLATE_RATIO if fields.get("CompressedData", "").lower() == "true" else 1
    if fmt == "nrrd":
        fields = nrrd_header(path)
        if "data file" in fields or "datafile" in fields:
            return None
        encoding = fields.get("encoding", "raw").lower()
        return {"raw": 1, "hex": 1, "txt": 8, "text": 8, "ascii": 8, "gz": MAX_DEFLATE_RATIO,
                "gzip": MAX_DEFLATE_RATIO}.get(encoding)
    return None


def gib(count):
    return f"{count / 2**30:.3g} GiB"


def declared_data(path, fmt):
    """(voxels, bytes per voxel) as a NIfTI or MetaImage header says them, or None."""
    if fmt in ("nii", "nii.gz"):
        layout = nifti_layout(nifti_header_bytes(path, compressed=(fmt == "nii.gz")))
        if layout is not None:
            return math.prod(layout["dims"]), max(1, layout["bitpix"] // 8)
    elif fmt in ("mha", "mhd"):
        fields, _ = metaimage_header(path)
        element_bytes = METAIMAGE_TYPE_BYTES.get(fields.get("ElementType", "").replace("_ARRAY",
                                                                                         ""))
        try:
            voxels = math.prod(int(n) for n in fields.get("DimSize", "").split())
            channels = int(fields.get("ElementNumberOfChannels", "1"))
        except ValueError:
            return None
        if element_bytes:
            return voxels, element_bytes * channels
    return None


def check_declared_size(path, fmt, voxels, bytes_per_voxel, max_bytes):
    """Refuse, before reading voxels, a header that declares more data than the file can hold
    (even at the format's largest compression ratio) or a case whose estimated working memory
    exceeds ``max_bytes`` (``--max-gib``)."""
    declared = voxels * bytes_per_voxel
    ratio = compression_bound(path, fmt)
    if ratio is not None:
        size = os.path.getsize(path)
        if declared > ratio * size + (1 << 16):
            how = ("uncompressed: truncated, or" if ratio == 1
                   else f"even compressed at the largest ratio ({ratio}:1):")
            raise InputError(f"{path}: the header declares {voxels} voxels ({gib(declared)} of "
                             f"data) but the file holds {size} bytes, too few {how} a corrupt or "
                             "forged header")
    if max_bytes is not None and working_bytes(voxels, bytes_per_voxel) > max_bytes:
        raise InputError(f"{path}: {voxels} voxels would need about "
                         f"{gib(working_bytes(voxels, bytes_per_voxel))} of memory, more than the "
                         f"limit of {gib(max_bytes)} (--max-gib)")


def default_max_bytes():
    """This machine's memory, or the container's (cgroup) limit where lower."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        pass
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(name).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            limits.append(int(value))
    return min(limits) if limits else None


# --- completeness of the data (ITK silently fills a short NIfTI with zeros) -------------------


def check_complete(path, fmt):
    """Refuse a truncated or corrupt file before ITK reads it (``InputError``).

    NIfTI (.nii and .nii.gz): the data must be as long as the header says, and a gzip stream
    whole. MetaImage: likewise, from its text header. NRRD: its reader refuses short data itself.
    Returns the number of NaN or infinite values of a floating-point NIfTI (ITK reads them as 0).
    """
    if fmt in ("nii", "nii.gz"):
        return check_nifti_complete(path, compressed=(fmt == "nii.gz"))
    if fmt in ("mha", "mhd"):
        check_metaimage_complete(path)
    return 0


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def nifti_layout(header):
    """What a NIfTI-1 or NIfTI-2 header says about its data, or None if it is no NIfTI header.

    ``header``: the first 540 (or more) bytes of the file; either byte order. Keys: order,
    version, dims, bitpix, datatype, vox_offset, expected (vox_offset plus the data's size).
    """
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            version = 1
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            vox_offset = struct.unpack(order + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            version = 2
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            vox_offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if (not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 1 for n in dims[1:dims[0] + 1])
                or not math.isfinite(vox_offset) or vox_offset < 0):
            return None
        return {"order": order, "version": version, "dims": dims[1:dims[0] + 1],
                "bitpix": bitpix, "datatype": datatype, "vox_offset": int(vox_offset),
                "expected": int(vox_offset) + math.prod(dims[1:dims[0] + 1]) * bitpix // 8}
    return None


def nifti_header_bytes(path, compressed):
    """The first 540 bytes of a NIfTI file's (inflated) content."""
    if not compressed:
        with open(path, "rb") as stream:
            return stream.read(540)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as stream:
            head = b""
            while len(head) < 540:
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                head += inflater.decompress(chunk, 540 - len(head))
                while inflater.unconsumed_tail and len(head) < 540:
                    head += inflater.decompress(inflater.unconsumed_tail, 540 - len(head))
                if inflater.eof:
                    break
            return head
    except zlib.error:
        raise InputError(f"{path}: truncated or corrupt gzip data (the stream ends early or "
                         "fails its checksum)") from None


class NonFiniteCounter:
    """Counts NaN/infinite values of a float NIfTI's data as its bytes stream past."""

    def __init__(self, layout):
        self.dtype = np.dtype(layout["order"] + NIFTI_FLOAT_TYPES[layout["datatype"]])
        self.start, self.end = layout["vox_offset"], layout["expected"]
        self.position, self.carry, self.count = 0, b"", 0

    def feed(self, chunk):
        first, self.position = self.position, self.position + len(chunk)
        low, high = max(self.start - first, 0), min(self.end - first, len(chunk))
        if high <= low:
            return
        data = self.carry + chunk[low:high]
        usable = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data[:usable], self.dtype)
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.carry = data[usable:]


def check_nifti_complete(path, compressed):
    """Raise InputError if a NIfTI file (gzip stream included) is shorter than its header says;
    return the number of NaN or infinite values of a floating-point file.

    A .nii.gz is inflated once (in the CLI's reader thread, overlapping the previous case or
    TensorFlow's start), which also proves the gzip stream whole: zlib checks each member's
    CRC-32 and length. ITK itself reads a truncated or corrupt stream without complaint, and
    turns NaN into 0.
    """
    header = nifti_header_bytes(path, compressed)
    layout = nifti_layout(header)
    if layout is None:
        raise InputError(f"{path}: not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
    counter = NonFiniteCounter(layout) if layout["datatype"] in NIFTI_FLOAT_TYPES else None
    if compressed:
        total = inflated_bytes(path, 0, gzip_wrapper=True,
                               consume=counter.feed if counter else None)
        if total is None:
            raise InputError(f"{path}: truncated or corrupt gzip data (the stream ends early or "
                             "fails its checksum)")
        total = total[0]
    else:
        total = os.path.getsize(path)
        if counter and total >= layout["expected"]:
            with open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    counter.feed(chunk)
    expected = layout["expected"]
    if total < expected:
        raise InputError(f"{path}: truncated: the header describes {expected} bytes, "
                         f"the {'decompressed ' if compressed else ''}file holds {total}")
    return counter.count if counter else 0


METAIMAGE_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2,
                        "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4,
                        "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def metaimage_header(path, limit_bytes=1 << 16):
    """(fields as {key: value}, header length in bytes) of a MetaImage file.

    The header is "Key = Value" lines up to and including ``ElementDataFile``.
    """
    with open(path, "rb") as stream:
        head = stream.read(limit_bytes)
    fields, offset = {}, 0
    for line in head.split(b"\n"):
        offset += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            break
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
    raise InputError(f"{path}: not a MetaImage file (no ElementDataFile line in its header)")


def check_metaimage_complete(path):
    """Raise InputError if a MetaImage (.mha, or .mhd with its data file) is missing data."""
    fields, header_bytes = metaimage_header(path)
    element_bytes = METAIMAGE_TYPE_BYTES.get(fields.get("ElementType", "").replace("_ARRAY", ""))
    try:
        voxels = math.prod(int(n) for n in fields.get("DimSize", "").split())
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return  # an odd header: ITK's reader decides
    data_file = fields["ElementDataFile"]
    if element_bytes is None or data_file == "LIST" or "%" in data_file:
        return  # multi-file layouts: ITK's reader decides
    if data_file == "LOCAL":
        data_path, offset = path, header_bytes
    else:
        data_path, offset = Path(path).parent / data_file, 0
        if not data_path.is_file():
            raise InputError(f"{path}: its data file {data_path.name} is missing")
    expected = voxels * channels * element_bytes
    if fields.get("CompressedData", "False").lower() == "true":
        inflated = inflated_bytes(data_path, offset)
        if inflated is None:
            raise InputError(f"{path}: truncated or corrupt compressed data in {data_path.name}")
        available = inflated[0]
    else:
        available = os.path.getsize(data_path) - offset
    if available < expected:
        raise InputError(f"{path}: truncated: the header describes {expected} data bytes, "
                         f"{data_path.name} holds {max(available, 0)}")


def inflated_bytes(path, offset, gzip_wrapper=False, keep=0, chunk_bytes=1 << 22,
                   output_bytes=1 << 26, consume=None):
    """(length, first ``keep`` bytes) of the zlib stream at ``offset`` in ``path`` once
    inflated (``gzip_wrapper``: a gzip file, every member); None if incomplete or corrupt.
    ``consume``: called with every inflated block, in order.

    zlib inflates large blocks with the GIL released, so this runs beside Python work in
    other threads (``gzip.open`` hands the GIL back and forth every few KiB, and took 3 s
    instead of 0.7 s for a 512x512x300 CT while TensorFlow was imported). At most
    ``output_bytes`` are inflated at a time, whatever the compression ratio.
    """
    wbits = 16 + zlib.MAX_WBITS if gzip_wrapper else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    total, head = 0, b""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            pending = b""
            while True:
                if not pending:
                    pending = stream.read(chunk_bytes)
                    if not pending:
                        return None  # the file ends inside the stream
                inflated = inflater.decompress(pending, output_bytes)
                pending = inflater.unconsumed_tail
                total += len(inflated)
                if consume is not None:
                    consume(inflated)
                if len(head) < keep:
                    head += inflated[:keep - len(head)]
                if inflater.eof:
                    rest = inflater.unused_data + stream.read(2)
                    if not gzip_wrapper or not rest.startswith(b"\x1f\x8b"):
                        return total, head  # the end (gzip ignores trailing bytes too)
                    inflater = zlib.decompressobj(wbits)  # the next gzip member
                    pending = rest
    except zlib.error:
        return None


# --- DICOM -------------------------------------------------------------------------------------


class quiet_itk:
    """Turn ITK's warnings to stderr off inside a ``with`` (the checks here say it better)."""

    def __enter__(self):
        self.before = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)

    def __exit__(self, *exc):
        sitk.ProcessObject.SetGlobalWarningDisplay(self.before)


def dicom_series_files(folder):
    """The files of the one DICOM series in ``folder``, sorted by slice position (GDCM).

    Refused (``InputError``): no series, several series (their IDs are named), a file that looks
    like DICOM but is not part of the series (GDCM skips unreadable files silently: truncated?).
    """
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    with quiet_itk():
        series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no readable DICOM series in this folder")
    if len(series) > 1:
        listed = ", ".join(repr(uid) for uid in series)
        raise InputError(f"{folder}: {len(series)} DICOM series in one folder ({listed}): put each "
                         "series in a folder of its own")
    with quiet_itk():
        files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    in_series = {Path(name).resolve() for name in files}
    strays = sorted(entry.name for entry in folder.iterdir()
                    if entry.is_file() and not entry.name.startswith(".")
                    and entry.resolve() not in in_series and looks_like_dicom(entry))
    if strays:
        raise InputError(f"{folder}: {len(strays)} DICOM file(s) could not be read with the series "
                         f"(truncated or corrupt?): {', '.join(strays[:5])}"
                         + (" ..." if len(strays) > 5 else ""))
    return list(files)


def sort_dicom_files(files, folder):
    """``files`` of one series sorted as GDCM sorts a folder's series: by ImagePositionPatient
    along the slice normal (the cross product of ImageOrientationPatient's row and column
    directions), ascending. Files without a position keep their order (by name)."""
    keyed = []
    for name in sorted(str(f) for f in files):
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            with quiet_itk():
                reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            return sorted(str(f) for f in files)
        keyed.append((float(np.dot(np.cross(cosines[:3], cosines[3:6]), position)), name))
    if not keyed:
        raise InputError(f"{folder}: no DICOM files in the series")
    return [name for _, name in sorted(keyed)]


def read_dicom_series(folder, max_bytes=None, files=None):
    """The one DICOM series in ``folder``: (image, warnings). Slices sorted by position (GDCM).

    ``files``: the series' files, already found (a series that shares its folder with others, as
    archives export them); default ``dicom_series_files(folder)``. Refused: what
    ``dicom_series_files`` refuses, unevenly spaced slices (missing or duplicate slices). Warned:
    a modality other than CT.
    """
    folder = Path(folder)
    if files is None:
        files = dicom_series_files(folder)
    else:
        files = sort_dicom_files(files, folder)
    reader = sitk.ImageSeriesReader()
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        with quiet_itk():
            first.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{folder}: the DICOM series cannot be read: {Path(files[0]).name}: "
                         f"{reader_message(error)}") from None
    voxels = math.prod(first.GetSize()) * len(files)
    check_declared_size(folder, DICOM, voxels,
                        first.GetNumberOfComponents() * pixel_bytes(first.GetPixelID()), max_bytes)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: the DICOM series cannot be read: "
                         f"{reader_message(error)}") from None
    check_shape(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                image.GetPixelIDTypeAsString(), folder)
    check_geometry(image.GetSpacing(), image.GetDirection(), image.GetOrigin(), 3, folder)
    check_slice_spacing(reader, image, folder)
    warnings = []
    modality = (reader.GetMetaData(0, "0008|0060").strip()
                if reader.HasMetaDataKey(0, "0008|0060") else "")
    if modality and modality != "CT":
        warnings.append(f"{folder}: DICOM modality is {modality}, not CT")
    return image, warnings


def check_slice_spacing(reader, image, folder):
    """Refuse a series whose slice positions are not evenly spaced by the image's z spacing.

    ITK takes the spacing from the first two slices, so a missing slice would shift every slice
    after it. Positions come from each file's ImagePositionPatient (0020|0032); multi-frame and
    position-less series are not checked.
    """
    count = len(reader.GetFileNames())
    if count < 2 or count != image.GetSize()[2]:
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(count)])
    except (RuntimeError, ValueError):
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    gaps = np.diff(positions @ normal)
    spacing = image.GetSpacing()[2]
    tolerance = 0.1 * spacing + 1e-3
    if np.any(np.abs(gaps - spacing) > tolerance):
        odd = gaps[np.abs(gaps - spacing) > tolerance]
        raise InputError(f"{folder}: DICOM slices are not evenly spaced (missing or duplicate "
                         f"slices?): gaps of {', '.join(f'{g:.2f}' for g in odd[:5])} mm where "
                         f"{spacing:.2f} mm is expected")


# --- content checks ----------------------------------------------------------------------------


def check_finite(image, path, slices_per_block=64):
    """Refuse a floating-point image with NaN or infinite voxels (they would spread through the
    networks)."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    voxels = sitk.GetArrayViewFromImage(image)
    bad = sum(int(np.count_nonzero(~np.isfinite(voxels[start:start + slices_per_block])))
              for start in range(0, voxels.shape[0], slices_per_block))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")


def spacing_warnings(image, path, replaced=False):
    """A warning when the header spacing is exactly 1 x 1 x 1 mm (METHOD.md, stage 1).

    ``replaced``: the caller segments it with the method's assumed spacing instead.
    """
    if tuple(image.GetSpacing()) != method.SUSPICIOUS_SPACING_MM:
        return []
    assumed = " x ".join(f"{s:g}" for s in method.ASSUMED_SPACING_MM)
    if replaced:
        return [f"{path}: header spacing is exactly 1 x 1 x 1 mm; segmented as {assumed} mm "
                "(--replace-1mm-spacing), the output keeps the input's 1 mm header"]
    return [f"{path}: header spacing is exactly 1 x 1 x 1 mm, often a converter's default when "
            f"the real spacing was lost; segmented as 1 mm (the published method assumed "
            f"{assumed} mm instead: --replace-1mm-spacing)"]


def intensity_sample(image):
    """A regular subsample (about ``INTENSITY_SAMPLE_VOXELS``) of the voxels, float64, flat."""
    voxels = sitk.GetArrayViewFromImage(image).ravel()
    step = max(1, voxels.size // INTENSITY_SAMPLE_VOXELS)
    return voxels[::step].astype(np.float64)


def intensity_warnings(image, path):
    """Warnings for values that do not look like CT in HU, and for integer types that may
    overflow or clip it.

    - no air: the ``AIR_PERCENTILE`` is above ``AIR_MAX_HU`` (MR, unrescaled CT stored as
      0..4095, 8-bit images, label maps);
    - nothing dense: the ``DENSE_PERCENTILE`` is below ``DENSE_MIN_HU`` (MR, normalised images);
    - 8-bit pixels cannot hold -1024..3071 HU;
    - integer values outside int16, the type CT is read as (METHOD.md): unsigned or raw exports.
    """
    warnings = []
    pixel = image.GetPixelID()
    type_name = image.GetPixelIDTypeAsString()
    if pixel in (sitk.sitkUInt8, sitk.sitkInt8):
        warnings.append(f"{path}: {type_name} pixels cannot hold CT's -1024..3071 HU (windowed, "
                        "scaled or converted to 8 bits?)")
    elif pixel in (sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64,
                   sitk.sitkUInt64):
        extremes = sitk.MinimumMaximumImageFilter()
        extremes.Execute(image)
        low, high = extremes.GetMinimum(), extremes.GetMaximum()
        if low < INT16_RANGE[0] or high > INT16_RANGE[1]:
            warnings.append(f"{path}: {type_name} values {low:g}..{high:g} overflow int16 "
                            f"({INT16_RANGE[0]}..{INT16_RANGE[1]}), the type CT is stored as "
                            "(computed in float32 here, so nothing wraps; but are these HU?)")
    sample = intensity_sample(image)
    air, dense = np.percentile(sample, [AIR_PERCENTILE, DENSE_PERCENTILE])
    if air > AIR_MAX_HU or dense < DENSE_MIN_HU:
        reasons = []
        if air > AIR_MAX_HU:
            reasons.append(f"no air: the darkest {AIR_PERCENTILE:g}% of voxels are above "
                           f"{AIR_MAX_HU:g} (at {air:g})")
        if dense < DENSE_MIN_HU:
            reasons.append(f"nothing dense: the brightest {100 - DENSE_PERCENTILE:g}% are below "
                           f"{DENSE_MIN_HU:g} (at {dense:g})")
        warnings.append(f"{path}: intensities do not look like CT in HU ({'; '.join(reasons)}); "
                        "MR, 8-bit or unrescaled images give meaningless labels")
    return warnings


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class OutputError(OSError):
    """An output that could not be written whole; the message names the file and says why."""


PARTIAL_PREFIX = ".partial-"  # .partial-PID-HEX: a temporary folder (or file) of process PID
GRID_TOLERANCE = {"Spacing": 1e-5, "Origin": 1e-3, "Direction": 1e-5}  # NIfTI stores float32


def check_writable(output_dir):
    """Create the output folder and prove it writable, before any work; PermissionError if not."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"{output_dir}: output folder is not writable ({error})") from None


def partial_name():
    return f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"


def process_alive(pid):
    if pid == os.getpid():  # our own PID, reused from a killed run (containers start at 1)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder):
    """Remove the temporary ``.partial-PID-*`` entries of processes that no longer run (a killed
    run leaves them); returns their names. Those of running processes are left alone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(re.escape(PARTIAL_PREFIX) + r"(\d+)-[0-9a-f]+(\..*)?", entry.name)
        if not match or process_alive(int(match[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def written_files(path):
    """The files a label image at ``path`` consists of: data file(s) first, the name itself last."""
    path = Path(path)
    if image_format(path.name) == "mhd":
        return [path.with_suffix(".raw"), path]
    return [path]


def free_bytes(folder):
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def grid_difference(image, reference):
    """None if ``image`` lies on ``reference``'s grid (within NIfTI's float32 precision), else
    what differs."""
    if image.GetSize() != reference.GetSize():
        return f"size {image.GetSize()} instead of {reference.GetSize()}"
    for name, tolerance in GRID_TOLERANCE.items():
        got, wanted = getattr(image, f"Get{name}")(), getattr(reference, f"Get{name}")()
        if not np.allclose(got, wanted, rtol=tolerance, atol=tolerance):
            return f"{name.lower()} {tuple(round(v, 6) for v in got)} instead of " \
                   f"{tuple(round(v, 6) for v in wanted)}"
    return None


def verify_written(staged, labels):
    """Raise OutputError unless the file at ``staged`` reads back as ``labels``: complete data,
    the same pixel type, grid and voxels. (The NIfTI writer does not report a short write on a
    full disk: the file is truncated or empty and ITK still wrote "successfully".)"""
    fmt = image_format(staged.name)
    try:
        check_complete(staged, fmt)
        with quiet_itk():
            back = sitk.ReadImage(str(staged))
    except (InputError, RuntimeError) as error:
        reason = str(error) if isinstance(error, InputError) else reader_message(error)
        reason = reason.replace(str(staged) + ": ", "")
        raise OutputError(f"it does not read back ({reason})") from error
    problem = grid_difference(back, labels)
    if problem is None and back.GetPixelID() != labels.GetPixelID():
        problem = f"pixel type {back.GetPixelIDTypeAsString()}"
    if problem is None and not np.array_equal(sitk.GetArrayViewFromImage(back),
                                              sitk.GetArrayViewFromImage(labels)):
        problem = "other voxel values"
    if problem:
        raise OutputError(f"it reads back with {problem}")


def sync(path):
    """Flush a written file to the disk, so that a failure to store it surfaces here."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_labels(labels, path):
    """Write a label image atomically in the format its name says (see ``FORMATS``), verified.

    Everything is written into a hidden temporary folder beside the target, flushed to the disk,
    read back and compared with ``labels`` (pixel type, grid and every voxel), and only then
    renamed into place, data before header (.mhd + .raw), so a reader never sees a partial or
    wrong file; on failure nothing is left behind and ``OutputError`` (an OSError) names the
    file, the reason and the free space. NIfTI .nii.gz, .mha and .nrrd are compressed; .nii and
    .mhd are not.
    """
    path = Path(path)
    fmt = image_format(path.name)
    if fmt is None:
        raise ValueError(f"{path}: unknown output format (use one of {', '.join(FORMATS)})")
    staging = path.parent / partial_name()
    try:
        staging.mkdir()
        staged = staging / path.name
        with quiet_itk():
            sitk.WriteImage(labels, str(staged), useCompression=fmt in ("nii.gz", "mha", "nrrd"))
        for final in written_files(path):
            sync(staging / final.name)
        verify_written(staged, labels)
        for final in written_files(path):
            os.replace(staging / final.name, final)
    except (OSError, RuntimeError) as error:
        free = free_bytes(path.parent)
        space = f"; {free} bytes free in {path.parent}" if free is not None else ""
        reason = reader_message(error) if isinstance(error, RuntimeError) else (
            str(error) if isinstance(error, OutputError) else
            f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else ""))
        raise OutputError(f"{path}: cannot be written: {reason}{space}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def existing_output_problem(case, output_path):
    """None if ``output_path`` (every file of it) exists, reads whole and lies on the input's
    grid as uint8 labels; else why not (``--skip-existing`` segments such a case again)."""
    missing = [f.name for f in written_files(output_path) if not f.is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        check_complete(output_path, image_format(Path(output_path).name))
        with quiet_itk():
            output = sitk.ReadImage(str(output_path))
    except (InputError, RuntimeError) as error:
        return f"unreadable ({error if isinstance(error, InputError) else reader_message(error)})"
    if output.GetPixelID() != sitk.sitkUInt8:
        return f"pixel type {output.GetPixelIDTypeAsString()}, not uint8 labels"
    try:
        wanted = input_grid(case)
    except (InputError, RuntimeError) as error:
        return f"the input cannot be read ({error})"
    if output.GetSize() != wanted["Size"]:
        return f"on another grid: size {output.GetSize()} instead of {wanted['Size']}"
    for name, tolerance in GRID_TOLERANCE.items():
        if not np.allclose(getattr(output, f"Get{name}")(), wanted[name], rtol=tolerance,
                           atol=tolerance):
            return f"on another grid: {name.lower()} differs from the input's"
    return None


def input_grid(case):
    """Size, Spacing, Origin, Direction of a case's image, from its header where it has one."""
    if case.format == DICOM:
        with quiet_itk():
            image, _ = read_dicom_series(case.path)
        return {name: getattr(image, f"Get{name}")()
                for name in ("Size", "Spacing", "Origin", "Direction")}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(case.path))
    with quiet_itk():
        reader.ReadImageInformation()
    side = int(round(math.sqrt(len(reader.GetDirection()))))
    return {"Size": tuple(reader.GetSize()[:3]), "Spacing": reader.GetSpacing()[:3],
            "Origin": reader.GetOrigin()[:3],
            "Direction": tuple(np.asarray(reader.GetDirection()).reshape(side, side)[:3, :3]
                               .ravel())}
