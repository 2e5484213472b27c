"""Hypothesis over NIfTI, MetaImage and NRRD header fields (issue 26).

Each example hand-writes one image file whose size, spacing, direction, origin and pixel type are
drawn (valid or not: zero, negative, NaN spacing; sheared, singular, NaN directions; sizes far
beyond the data), then runs the command in-process with the real Predictor. Whatever the header,
the case is either refused on one line naming the file, or segmented with an output on exactly
the grid ITK reads from the input; never a traceback, never a hang (an alarm ends an example
after EXAMPLE_SECONDS), and no example raises the process's peak memory by --max-gib.
"""

import contextlib
import gzip
import io
import itertools
import math
import resource
import signal
import struct
import traceback

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from app.cli import main
from app.io import Case, InputError, read_case

MAX_GIB = 1.0  # the --max-gib of every run
EXAMPLE_SECONDS = 90  # an example that takes longer is a hang
DATA_VOXELS_CAP = 40 ** 3  # larger declared sizes get (much) less data than they declare

PIXELS = {  # name: (numpy type, NIfTI datatype code, MetaImage type, NRRD type)
    "int16": ("<i2", 4, "MET_SHORT", "short"),
    "uint8": ("<u1", 2, "MET_UCHAR", "uchar"),
    "uint16": ("<u2", 512, "MET_USHORT", "ushort"),
    "int32": ("<i4", 8, "MET_INT", "int"),
    "float32": ("<f4", 16, "MET_FLOAT", "float"),
    "float64": ("<f8", 64, "MET_DOUBLE", "double"),
}
OUTCOMES = {"refused": 0, "segmented": 0}  # over the fuzzed examples


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rotation(quaternion):
    w, x, y, z = np.asarray(quaternion) / np.linalg.norm(quaternion)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


AXES = [np.eye(3)[list(order)] * np.array(signs)[:, None]  # permuted and flipped axes
        for order in itertools.permutations(range(3))
        for signs in itertools.product((1, -1), repeat=3)]
quaternions = st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(
    lambda q: np.linalg.norm(q) > 0.1)
SHEAR = np.array([[0, 0.3, 0], [0, 0, 0], [0, 0, 0]])
# At most one field is broken per example (half of them none), so that both outcomes occur.
DEFECTS = {
    None: {},
    "zero spacing": {"spacing": (0.0, 1.0, 2.0)},
    "negative spacing": {"spacing": (1.0, -1.5, 2.0)},
    "NaN spacing": {"spacing": (1.0, 1.0, math.nan)},
    "micrometre spacing": {"spacing": (1e-3, 1e-3, 1e-3)},
    "metre spacing": {"spacing": (1e3, 1e3, 1e3)},
    "sheared direction": {"direction": AXES[0] + SHEAR},
    "singular direction": {"direction": AXES[0][:, [0, 0, 2]]},
    "NaN direction": {"direction": np.full((3, 3), math.nan)},
    "NaN origin": {"origin": (math.nan, 0.0, 0.0)},
    "infinite origin": {"origin": (0.0, math.inf, 0.0)},
    "one voxel thick": {"size": (12, 12, 1)},
    "zero size": {"size": (0, 12, 12)},
    "declared 2000 x 2000 x 500": {"size": (2000, 2000, 500)},
    "declared 100000 x 30 x 30": {"size": (100_000, 30, 30)},
}
headers = st.fixed_dictionaries({
    "format": st.sampled_from(["nii.gz", "nii", "mha", "nrrd"]),
    "size": st.tuples(*[st.integers(2, 28) for _ in range(3)]),
    "spacing": st.tuples(*[st.floats(0.3, 8.0) for _ in range(3)]),
    "direction": st.one_of(st.sampled_from(AXES), quaternions.map(rotation)),
    "origin": st.tuples(*[st.floats(-1e4, 1e4) for _ in range(3)]),
    "pixel": st.sampled_from(sorted(PIXELS)),
    "seed": st.integers(0, 2**16),
    "defect": st.sampled_from([None] * (len(DEFECTS) - 1) + list(DEFECTS)),
}).map(lambda header: {**header, **DEFECTS[header["defect"]]})


def voxel_bytes(header):
    """CT-like values (air and bone) for at most DATA_VOXELS_CAP voxels of the declared size."""
    dtype = np.dtype(PIXELS[header["pixel"]][0])
    count = min(math.prod(header["size"]), DATA_VOXELS_CAP)
    rng = np.random.default_rng(header["seed"])
    low, high = (0, 255) if dtype == np.uint8 else (0, 3000) if dtype.kind == "u" else (-1024, 1500)
    return rng.integers(low, high, count).astype(dtype).tobytes()


def write_metaimage(path, header):
    matrix = np.asarray(header["direction"])
    fields = {"ObjectType": "Image", "NDims": 3, "BinaryData": "True",
              "BinaryDataByteOrderMSB": "False", "CompressedData": "False",
              "TransformMatrix": " ".join(repr(float(v)) for v in matrix.T.ravel()),
              "Offset": " ".join(repr(float(v)) for v in header["origin"]),
              "ElementSpacing": " ".join(repr(float(v)) for v in header["spacing"]),
              "DimSize": " ".join(map(str, header["size"])),
              "ElementType": PIXELS[header["pixel"]][2], "ElementDataFile": "LOCAL"}
    text = "".join(f"{key} = {value}\n" for key, value in fields.items())
    path.write_bytes(text.encode() + voxel_bytes(header))


def write_nrrd(path, header):
    columns = np.asarray(header["direction"]) * np.asarray(header["spacing"])[None, :]
    vectors = " ".join("(" + ",".join(repr(float(v)) for v in columns[:, i]) + ")"
                       for i in range(3))
    text = (f"NRRD0004\ntype: {PIXELS[header['pixel']][3]}\ndimension: 3\n"
            "space: left-posterior-superior\n"
            f"sizes: {' '.join(map(str, header['size']))}\nspace directions: {vectors}\n"
            "endian: little\nencoding: raw\n"
            f"space origin: ({','.join(repr(float(v)) for v in header['origin'])})\n\n")
    path.write_bytes(text.encode() + voxel_bytes(header))


def write_nifti(path, header):
    """A NIfTI-1 file whose sform (RAS) carries the direction, spacing and origin."""
    dtype, code = np.dtype(PIXELS[header["pixel"]][0]), PIXELS[header["pixel"]][1]
    flip = np.diag([-1.0, -1.0, 1.0])  # LPS -> RAS
    with np.errstate(invalid="ignore"):  # NaN and infinite fields are written as they are
        affine = flip @ (np.asarray(header["direction"]) * np.asarray(header["spacing"])[None, :])
        origin = flip @ np.asarray(header["origin"], float)
    data = bytearray(352)
    struct.pack_into("<i", data, 0, 348)
    dims = [3, *[min(n, 32767) for n in header["size"]], 1, 1, 1, 1]
    struct.pack_into("<8h", data, 40, *dims)
    struct.pack_into("<2h", data, 70, code, dtype.itemsize * 8)
    struct.pack_into("<8f", data, 76, 1.0, *header["spacing"], 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", data, 108, 352.0)
    struct.pack_into("<f", data, 112, 1.0)  # scl_slope
    struct.pack_into("<2h", data, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    struct.pack_into("<12f", data, 280, *np.hstack([affine, origin[:, None]]).ravel())
    data[344:348] = b"n+1\0"
    content = bytes(data) + voxel_bytes(header)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)


WRITERS = {"nii.gz": write_nifti, "nii": write_nifti, "mha": write_metaimage, "nrrd": write_nrrd}


class Hang(Exception):
    pass


def on_alarm(signum, frame):
    raise Hang(f"an example ran longer than {EXAMPLE_SECONDS} s")


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header=headers)
def test_any_header_is_refused_by_name_or_segmented_on_its_exact_grid(header, predictor,
                                                                      tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "in" / f"fuzz_0000.{header['format']}"
    path.parent.mkdir()
    WRITERS[header["format"]](path, header)
    err = io.StringIO()
    peak_before = peak_rss_kib()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(EXAMPLE_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(path.parent), str(folder / "out"), "--quiet", "--output-format",
                         "same", "--max-gib", str(MAX_GIB)], predictor=predictor)
    except Exception:  # the point: no exception may escape
        pytest.fail(f"{header}: an exception escaped:\n{traceback.format_exc()}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    # the process's peak memory grew by less than the limit: no forged size was allocated
    # (the first example also starts TensorFlow's runtime, about 0.3 GiB)
    grown_gib = (peak_rss_kib() - peak_before) / 2**20
    assert grown_gib < MAX_GIB, f"{header}: peak memory grew by {grown_gib:.2f} GiB"
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert "Traceback" not in err.getvalue(), err.getvalue()
    if code == 2:  # refused: one line naming the file, then the summary (warnings may precede)
        lines = [line for line in lines if not line.startswith(f"fuzz: warning: {path}: ")]
        assert len(lines) == 2 and lines[0].startswith(f"fuzz: FAILED: {path}: "), lines
        assert len(lines[0]) > len(f"fuzz: FAILED: {path}: ") + 10, lines  # a reason
        OUTCOMES["refused"] += 1
        return
    assert code == 0, (header, lines)
    image, _ = read_case(Case("fuzz", path, header["format"]))
    output = sitk.ReadImage(str(folder / "out" / f"fuzz.{header['format']}"))
    assert output.GetSize() == image.GetSize()
    for name in ("Spacing", "Origin", "Direction"):
        np.testing.assert_allclose(getattr(output, f"Get{name}")(), getattr(image, f"Get{name}")(),
                                   rtol=1e-6, atol=1e-4, err_msg=f"{name} of {header}")
    assert output.GetPixelID() == sitk.sitkUInt8
    OUTCOMES["segmented"] += 1


def test_the_fuzzed_examples_were_both_refused_and_segmented():
    """Runs after the fuzz test (file order): both outcomes were exercised."""
    assert OUTCOMES["refused"] and OUTCOMES["segmented"], OUTCOMES


def test_a_refused_header_is_an_input_error(tmp_path):
    """The writers above make what they claim: a valid header reads, a sheared one is refused."""
    valid = {"format": "mha", "size": (8, 7, 6), "spacing": (1.5, 2.0, 3.0),
             "direction": AXES[5], "origin": (1.0, 2.0, 3.0), "pixel": "int16", "seed": 1}
    for fmt in WRITERS:
        path = tmp_path / f"ok.{fmt}"
        WRITERS[fmt](path, {**valid, "format": fmt})
        image, _ = read_case(Case("ok", path, fmt))
        assert image.GetSize() == (8, 7, 6)
        np.testing.assert_allclose(image.GetSpacing(), (1.5, 2.0, 3.0), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-5)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), AXES[5], atol=1e-6)
        sheared = {**valid, "format": fmt, "direction": AXES[0] + SHEAR}
        WRITERS[fmt](tmp_path / f"bad.{fmt}", sheared)
        with pytest.raises(InputError, match="is not a rotation|is sheared"):
            read_case(Case("bad", tmp_path / f"bad.{fmt}", fmt))
