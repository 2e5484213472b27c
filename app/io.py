"""Reading CT cases and writing label images: the one place that knows about files.

Three verbs, used by the command line (app/cli.py) and usable on their own:

- ``find_cases(input_dir)``: the cases in a folder, as ``Case`` records.
- ``read_case(case)``: one case as a validated 3-D scalar ``sitk.Image`` plus a list of warnings;
  an input that cannot be segmented raises ``InputError`` whose message names the file and says
  why.
- ``write_labels(labels, path)``: a label image written atomically in the format its name says.

What counts as a case in a folder (not recursive; names starting with "." are ignored):

1. FLARE mode: if the folder holds any ``NAME_0000.nii.gz``, exactly those are the cases (case
   ``NAME``, output ``NAME.nii.gz``) and everything else in it is ignored, as the challenge's
   contract says.
2. Otherwise every ``.nii.gz``, ``.nii``, ``.mha``, ``.mhd`` and ``.nrrd`` file is a case named
   after the file without its suffix (a ``.mhd`` header counts once; its ``.raw``/``.zraw`` data
   file is not a case), and every subfolder that holds DICOM files is a case named after the
   subfolder. DICOM files directly in the input folder form one more case named after the folder.
   Files of other types are ignored.
3. A file or folder is DICOM when it carries the "DICM" preamble marker or ends in ``.dcm``;
   reading it takes the one series ``sitk.ImageSeriesReader`` finds (several series in one folder
   are an error naming them: one series per folder).
4. Two inputs with the same case name (``a.nii`` and ``a.mha``) would write the same output file:
   both fail, named, and the others go on.

Array axis order follows SimpleITK: sizes and spacings (x, y, z); NumPy views (z, y, x).
"""

import gzip
import math
import os
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
OUTPUT_FORMATS = (*FORMATS, "same")  # "same": the input's own format (NIfTI for DICOM input)
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
        """Where the labels go: ``NAME.nii.gz``, or ``NAME.<format>`` (see ``OUTPUT_FORMATS``)."""
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {output_format!r} is not one of "
                             f"{', '.join(OUTPUT_FORMATS)}")
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


def find_cases(input_dir):
    """The cases in ``input_dir`` (rules in the module docstring), sorted by case name.

    Raises FileNotFoundError if the folder does not exist; returns [] when it holds no case.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    visible = sorted(entry for entry in input_dir.iterdir() if not entry.name.startswith("."))
    flare = [entry for entry in visible if entry.name.endswith(FLARE_SUFFIX) and entry.is_file()]
    if flare:
        return [Case(entry.name[: -len(FLARE_SUFFIX)], entry, "nii.gz") for entry in flare]
    cases, loose_dicom = [], False
    for entry in visible:
        if entry.is_dir():
            if holds_dicom(entry):
                cases.append(Case(entry.name, entry, DICOM))
        elif entry.is_file():
            fmt = image_format(entry.name)
            if fmt is not None:
                cases.append(Case(entry.name[: -len(fmt) - 1], entry, fmt))
            elif looks_like_dicom(entry):
                loose_dicom = True
    if loose_dicom:
        cases.append(Case(input_dir.resolve().name, input_dir, DICOM))
    return sorted(with_name_clashes_marked(cases), key=lambda case: (case.name, str(case.path)))


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
        names = ", ".join(case.path.name for case in group)
        marked.extend(Case(case.name, case.path, case.format,
                           f"{case.path}: case name {name!r} is shared by {names}; they would "
                           "write the same output file: rename all but one") for case in group)
    return marked


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_case(case):
    """Read and validate one case: (``sitk.Image``, list of warning messages).

    The image is 3-D with one value per voxel, of the file's pixel type (the predictor computes
    in float32, so wide or unsigned integer types cannot overflow there). Refusals raise
    ``InputError``: truncated or corrupt files, files no reader recognises, 2-D, 4-D and
    single-slice images, vector/RGB/complex pixels, NaN or infinite voxels, DICOM folders with
    no series or several. Warnings (the image is still returned): intensities that do not look
    like CT in HU, 8-bit pixels, integer values outside int16, header spacing of exactly
    1 x 1 x 1 mm, and for DICOM a modality other than CT.
    """
    if case.problem:
        raise InputError(case.problem)
    if case.format == DICOM:
        image, warnings = read_dicom_series(case.path)
    else:
        check_complete(case.path, case.format)
        image, warnings = read_image_file(case.path), []
    check_finite(image, case.path)
    warnings += spacing_warnings(image, case.path) + intensity_warnings(image, case.path)
    return image, warnings


def reader_message(error):
    """The useful last line of a SimpleITK/ITK exception."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    if "Unable to determine ImageIO reader" in last:
        return "no image reader recognises this file (not an image, or a corrupt header)"
    for prefix in ("sitk::ERROR:", "[nrrd]"):
        if last.startswith(prefix):
            last = last[len(prefix):].strip()
    return last[:300]


def read_image_file(path):
    """One image file, checked for dimension and pixel kind before its voxels are loaded."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read: {reader_message(error)}") from None
    check_shape(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                sitk.GetPixelIDValueAsString(reader.GetPixelID()), path)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read (truncated or corrupt?): "
                         f"{reader_message(error)}") from None
    if image.GetDimension() == 4:  # a 4-D image holding one volume (check_shape allowed it)
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
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


# --- completeness of the data (ITK silently fills a short NIfTI with zeros) -------------------


def check_complete(path, fmt):
    """Refuse a truncated or corrupt file before ITK reads it (``InputError``).

    NIfTI (.nii and .nii.gz): the data must be as long as the header says, and a gzip stream
    whole. MetaImage: likewise, from its text header. NRRD: its reader refuses short data itself.
    """
    if fmt in ("nii", "nii.gz"):
        check_nifti_complete(path, compressed=(fmt == "nii.gz"))
    elif fmt in ("mha", "mhd"):
        check_metaimage_complete(path)


def nifti_expected_bytes(header):
    """vox_offset plus the data size that a NIfTI-1 or NIfTI-2 header describes, or None.

    ``header``: the first 540 (or more) bytes of the file; either byte order.
    """
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            vox_offset = struct.unpack(order + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            vox_offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 1 for n in dims[1:dims[0] + 1]):
            return None
        return int(vox_offset) + math.prod(dims[1:dims[0] + 1]) * bitpix // 8
    return None


def check_nifti_complete(path, compressed):
    """Raise InputError if a NIfTI file (gzip stream included) is shorter than its header says.

    A .nii.gz is inflated once (in the CLI's reader thread, overlapping the previous case or
    TensorFlow's start), which also proves the gzip stream whole: zlib checks each member's
    CRC-32 and length. ITK itself reads a truncated or corrupt stream without complaint.
    """
    if compressed:
        inflated = inflated_bytes(path, 0, gzip_wrapper=True, keep=540)
        if inflated is None:
            raise InputError(f"{path}: truncated or corrupt gzip data (the stream ends early or "
                             "fails its checksum)")
        total, header = inflated
    else:
        with open(path, "rb") as stream:
            header = stream.read(540)
        total = os.path.getsize(path)
    expected = nifti_expected_bytes(header)
    if expected is None:
        raise InputError(f"{path}: not a NIfTI file (no valid NIfTI-1/NIfTI-2 header)")
    if total < expected:
        raise InputError(f"{path}: truncated: the header describes {expected} bytes, "
                         f"the {'decompressed ' if compressed else ''}file holds {total}")


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
                   output_bytes=1 << 26):
    """(length, first ``keep`` bytes) of the zlib stream at ``offset`` in ``path`` once
    inflated (``gzip_wrapper``: a gzip file, every member); None if incomplete or corrupt.

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


def read_dicom_series(folder):
    """The one DICOM series in ``folder``: (image, warnings). Slices sorted by position (GDCM).

    Refused: no series, several series (their IDs are named), a file that looks like DICOM but is
    not part of the series (GDCM skips unreadable files silently: truncated?), unevenly spaced
    slices (missing or duplicate slices). Warned: a modality other than CT.
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


def spacing_warnings(image, path):
    """A warning when the header spacing is exactly 1 x 1 x 1 mm (METHOD.md, stage 1)."""
    if tuple(image.GetSpacing()) != method.SUSPICIOUS_SPACING_MM:
        return []
    assumed = " x ".join(f"{s:g}" for s in method.ASSUMED_SPACING_MM)
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


def written_files(path):
    """The files a label image at ``path`` consists of: data file(s) first, the name itself last."""
    path = Path(path)
    if image_format(path.name) == "mhd":
        return [path.with_suffix(".raw"), path]
    return [path]


def write_labels(labels, path):
    """Write a label image atomically in the format its name says (see ``FORMATS``).

    Everything is written into a hidden temporary folder beside the target and then renamed into
    place, data before header (.mhd + .raw), so a reader never sees a partial file; on failure
    nothing is left behind. NIfTI .nii.gz, .mha and .nrrd are compressed; .nii and .mhd are not.
    """
    path = Path(path)
    fmt = image_format(path.name)
    if fmt is None:
        raise ValueError(f"{path}: unknown output format (use one of {', '.join(FORMATS)})")
    staging = path.parent / f".partial-{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        sitk.WriteImage(labels, str(staging / path.name), useCompression=fmt in ("nii.gz", "mha",
                                                                               "nrrd"))
        for final in written_files(path):
            os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
