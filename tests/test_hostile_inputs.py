"""Issue 26: hostile or careless input and failing disks.

Nothing wrong is reported as ok, nothing is destroyed, nothing is skipped in silence. Every file
here is real (written, broken or forged by the test); the command runs in-process with the real
Predictor or as a real `predict.sh` subprocess; the full disk is a real tmpfs.
"""

import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app import io as image_io
from app.cli import describe_error, is_out_of_memory, main
from app.io import Case, InputError, read_case
from tests.conftest import ROOT
from tests.test_inputs import ct_like, write, write_dicom_series

PREDICT = str(ROOT / "predict.sh")
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
# What a user may see on stderr with --quiet: our lines, nothing from the libraries
OUR_LINES = re.compile(r"^(\S+: (FAILED|warning): |\S+: existing output |skipped: |error: |"
                       r"interrupted|removed \d+ temporary|\d+ ok, \d+ failed)")
LIBRARY_NOISE = ("oneDNN", "absl", "I0000", "W0000", "** ERROR", "WARNING", "Traceback",
                 "itk::", "MetaImage:")


@pytest.fixture(scope="module")
def real_ct(shared_data):
    return shared_data / "images" / "ts_example_0000.nii.gz"


def run_predict(*args, timeout=300, env=None):
    completed = subprocess.run([PREDICT, *map(str, args)], capture_output=True, text=True,
                               encoding="utf-8", errors="replace", timeout=timeout, env=env)
    return completed


def assert_our_lines_only(stderr):
    """Every stderr line is one of ours (one per case, skip or summary): no library chatter."""
    for line in stderr.splitlines():
        if line.strip():
            assert OUR_LINES.match(line), f"not one of our lines: {line!r}\n{stderr}"
            assert not any(noise in line for noise in LIBRARY_NOISE), line


def tiny(seed=0, **kwargs):
    """A small CT-like image on an identity grid: cheap to segment."""
    kwargs.setdefault("direction", IDENTITY)
    kwargs.setdefault("size_xyz", (20, 18, 6))
    return ct_like(seed=seed, **kwargs)


def metaimage(path, data, dims, element="MET_SHORT", spacing="2 2 3", matrix="1 0 0 0 1 0 0 0 1",
              offset="0 0 0", compressed=False):
    """A hand-written .mha, header fields exactly as given (SimpleITK refuses to write some)."""
    body = zlib.compress(data) if compressed else data
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = {compressed}\nTransformMatrix = {matrix}\nOffset = {offset}\n"
              f"ElementSpacing = {spacing}\nDimSize = {dims}\nElementType = {element}\n"
              "ElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + body)
    return path


def nrrd(path, data, sizes, kind="short", directions="(2,0,0) (0,2,0) (0,0,3)",
         encoding="raw", origin="(0,0,0)"):
    body = gzip.compress(data) if encoding == "gzip" else data
    header = (f"NRRD0004\ntype: {kind}\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {sizes}\nspace directions: {directions}\nendian: little\n"
              f"encoding: {encoding}\nspace origin: {origin}\n\n")
    path.write_bytes(header.encode() + body)
    return path


def case_of(path):
    fmt = image_io.image_format(Path(path).name)
    return Case(Path(path).name[: -len(fmt) - 1], Path(path), fmt)


# ---------------------------------------------------------------------------------------------
# 1. A full disk: no truncated output reported as ok
# ---------------------------------------------------------------------------------------------


class Tmpfs:
    """A real tmpfs of ``size`` mounted at ``folder`` (root only), filled to ``free`` bytes."""

    def __init__(self, folder, size="2m", free=0):
        self.folder, self.size, self.free = Path(folder), size, free

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                                  str(self.folder)], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        stats = os.statvfs(self.folder)
        available = stats.f_bavail * stats.f_frsize
        (self.folder / "filler").write_bytes(b"\0" * (available - self.free))
        return self.folder

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.folder)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs (a real full disk) needs root")
def test_a_full_disk_fails_each_case_and_the_report_without_a_traceback(real_ct, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        shutil.copy(real_ct, inputs / f"{name}_0000.nii.gz")
    # 8 KiB free: a label image (10 KB) is cut short, and the NIfTI writer does not say so
    with Tmpfs(tmp_path / "out", free=8192) as outputs, \
            Tmpfs(tmp_path / "reports", size="64k", free=0) as reports:
        completed = run_predict(inputs, outputs, "--quiet", "--report", reports / "r.jsonl")
        left = sorted(p.name for p in outputs.iterdir())
    assert completed.returncode == 2, completed.stderr  # every case failed
    for name in ("a", "b"):
        line = next(line for line in completed.stderr.splitlines() if line.startswith(f"{name}:"))
        assert line.startswith(f"{name}: FAILED: ") and "cannot be written" in line, line
        assert "bytes free" in line
    assert left == ["filler"]  # nothing truncated renamed into place, no temporary left
    assert "error: --report" in completed.stderr and "cannot be written" in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("0 ok, 2 failed (a, b)")
    assert_our_lines_only(completed.stderr)


def test_a_written_file_that_does_not_read_back_as_meant_is_a_failure(tmp_path):
    """Without a full disk: a sheared grid, which the NIfTI writer silently replaces by a
    rotation, reads back elsewhere; it is refused, not renamed into place."""
    labels = sitk.Cast(tiny(low=0, high=5), sitk.sitkUInt8)
    labels.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(OSError, match="labels.nii.gz: cannot be written: it reads back with "
                                      "direction"):
        image_io.write_labels(labels, tmp_path / "labels.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 2. Two files that resolve to one case
# ---------------------------------------------------------------------------------------------


def test_a_nii_beside_the_nii_gz_of_a_case_is_refused_by_name(tmp_path, predictor, capsys):
    inputs = tmp_path / "in"
    write(tiny(seed=1), inputs / "c_0000.nii.gz")
    write(tiny(seed=2, size_xyz=(18, 20, 6)), inputs / "c_0000.nii")  # ITK would read these
    assert main([str(inputs), str(tmp_path / "out"), "--quiet"], predictor=predictor) == 2
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("c: FAILED")]
    assert len(failed) == 2 and all("c_0000.nii, c_0000.nii.gz" in line for line in failed), err
    assert not (tmp_path / "out" / "c.nii.gz").exists()
    # read directly, as a caller of app.io may: the .nii.gz is refused, the .nii named
    with pytest.raises(InputError, match=r"c_0000.nii lies beside it"):
        read_case(Case("c", inputs / "c_0000.nii.gz", "nii.gz"))
    # and without FLARE names
    write(tiny(seed=3), tmp_path / "plain" / "x.nii.gz")
    write(tiny(seed=4), tmp_path / "plain" / "x.nii")
    assert all(case.problem and "x.nii, x.nii.gz" in case.problem
               for case in image_io.find_cases(tmp_path / "plain"))


# ---------------------------------------------------------------------------------------------
# 3. NaN and infinite voxels, in every format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.mha", "ct.nrrd", "ct.mhd"])
def test_nan_and_infinite_voxels_are_refused_in_every_format(tmp_path, name):
    values = sitk.GetArrayFromImage(tiny(size_xyz=(30, 24, 10))).astype(np.float32)
    values[4:6, 10:12, 5:15] = np.nan  # a 40-voxel slab
    values[0, 0, 0] = np.inf
    image = sitk.GetImageFromArray(values)
    path = write(image, tmp_path / name)
    with pytest.raises(InputError, match=r"41 voxels are NaN or infinite") as refusal:
        read_case(case_of(path))
    assert str(path) in str(refusal.value)


def test_a_big_endian_float_nifti_with_nan_is_refused(tmp_path):
    path = write(sitk.Cast(tiny(), sitk.sitkFloat64), tmp_path / "ct.nii")
    data = path.read_bytes()
    layout = image_io.nifti_layout(data)
    assert layout["datatype"] == 64 and layout["order"] == "<"
    values = np.frombuffer(data[layout["vox_offset"]:], "<f8").copy()
    values[7] = np.nan
    swapped = bytearray(data[:layout["vox_offset"]]) + values.astype(">f8").tobytes()
    for offset, fields in ((0, "i"), (40, "8h"), (70, "2h"), (76, "8f"), (108, "f"), (112, "2f"),
                           (252, "2h"), (256, "6f"), (280, "12f")):  # the header, big-endian
        size = struct.calcsize("<" + fields)
        swapped[offset:offset + size] = struct.pack(
            ">" + fields, *struct.unpack("<" + fields, data[offset:offset + size]))
    path.write_bytes(bytes(swapped))
    assert image_io.nifti_layout(bytes(swapped))["order"] == ">"
    with pytest.raises(InputError, match="1 voxels are NaN or infinite"):
        read_case(case_of(path))


# ---------------------------------------------------------------------------------------------
# 4. Outputs and report never destroy an input or a label
# ---------------------------------------------------------------------------------------------


def test_a_report_or_output_folder_on_an_input_is_refused_before_any_work(tmp_path, capsys):
    inputs = tmp_path / "in"
    image = write(tiny(), inputs / "a_0000.nii.gz")
    before = image.read_bytes()
    assert main([str(inputs), str(tmp_path / "out"), "--report", str(image)]) == 2
    assert "writing the report would destroy it" in capsys.readouterr().err
    assert image.read_bytes() == before and not (tmp_path / "out").exists()

    series = write_dicom_series(tiny(), inputs / "s_0000", "1.2.3.9")
    assert main([str(inputs), str(series / "labels")]) == 2
    assert "lies inside) the input" in capsys.readouterr().err
    assert not (series / "labels").exists()
    assert main([str(inputs), str(tmp_path / "out"), "--report", str(series / "r.jsonl")]) == 2
    assert "lies inside) the input" in capsys.readouterr().err


def test_a_flare_label_beside_its_image_is_not_overwritten_without_overwrite(tmp_path, predictor,
                                                                              capsys):
    folder = tmp_path / "case_folder"
    write(tiny(), folder / "a_0000.nii.gz")
    label = write(sitk.Cast(tiny(low=0, high=5), sitk.sitkUInt8), folder / "a.nii.gz")
    truth = label.read_bytes()
    assert main([str(folder), str(folder), "--quiet"], predictor=predictor) == 2
    err = capsys.readouterr().err
    assert "skipped: " in err and "a.nii.gz: has case a's output name" in err
    assert "a: FAILED" in err and "--overwrite allows it" in err
    assert label.read_bytes() == truth
    assert main([str(folder), str(folder), "--quiet", "--overwrite"], predictor=predictor) == 0
    assert label.read_bytes() != truth


# ---------------------------------------------------------------------------------------------
# 5. Bounded work: declared sizes are checked before any voxel is read
# ---------------------------------------------------------------------------------------------


HUGE = "2000 2000 500"  # 2e9 voxels: 8 GB as int32


@pytest.mark.parametrize("make", ["nrrd_raw", "nrrd_gzip", "mha_raw", "mha_zlib", "nii_gz"])
def test_a_header_declaring_a_huge_volume_is_refused_in_bounded_memory(tmp_path, make):
    """Each read runs in a child process limited to 1 GiB of address space beyond what it uses:
    allocating the declared 8 GB would fail there (ITK: "Failed to allocate")."""
    data = np.random.default_rng(0).integers(-1000, 1000, 1_400_000).astype("<i4").tobytes()
    if make.startswith("nrrd"):
        path = nrrd(tmp_path / "huge.nrrd", data, HUGE, kind="int",
                    encoding="gzip" if make == "nrrd_gzip" else "raw")
    elif make.startswith("mha"):
        path = metaimage(tmp_path / "huge.mha", data, HUGE, element="MET_INT",
                         compressed=make == "mha_zlib")
    else:
        small = write(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int32)), tmp_path / "s.nii")
        header = bytearray(small.read_bytes()[:352])
        header[40:56] = np.array([3, 2000, 2000, 500, 1, 1, 1, 1], "<i2").tobytes()
        path = tmp_path / "huge.nii.gz"
        path.write_bytes(gzip.compress(bytes(header) + data))
    code = ("import resource, sys\n"
            "from app.io import read_case, Case, InputError\n"
            "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))\n"
            f"try:\n    read_case(Case('huge', __import__('pathlib').Path({str(path)!r}), "
            f"{image_io.image_format(path.name)!r}))\n"
            "except InputError as error:\n    print('REFUSED', error)\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=ROOT, timeout=120)
    assert completed.stdout.startswith("REFUSED "), completed.stdout + completed.stderr
    assert str(path) in completed.stdout and "declares 2000000000 voxels" in completed.stdout


def test_a_case_over_the_memory_limit_is_refused_before_reading(tmp_path, capsys):
    write(tiny(size_xyz=(64, 64, 64)), tmp_path / "in" / "big_0000.nii.gz")
    write_dicom_series(tiny(size_xyz=(64, 64, 16)), tmp_path / "in" / "series", "1.2.3.77")
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet", "--max-gib",
                 "0.001"]) == 2
    err = capsys.readouterr().err
    for name in ("big", "series"):
        assert re.search(rf"^{name}: FAILED: .*more than the limit of 0.001 GiB \(--max-gib\)",
                         err, re.M), err


def test_running_out_of_host_memory_is_not_taken_for_the_gpu():
    with pytest.raises(RuntimeError) as itk_failure:  # SimpleITK's own allocation failure
        sitk.Image(200000, 200000, 20000, sitk.sitkFloat64)
    with pytest.raises(MemoryError) as numpy_failure:
        np.empty(2**62, np.uint8)
    for error in (itk_failure.value, numpy_failure.value):
        assert not is_out_of_memory(error)
        assert describe_error(error).startswith("out of memory (the machine's, not the GPU's)")


# ---------------------------------------------------------------------------------------------
# 6. Nothing skipped in silence
# ---------------------------------------------------------------------------------------------


def test_every_supported_image_is_segmented_and_every_other_entry_listed(tmp_path, predictor,
                                                                         capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for index, name in enumerate(("a_0000.nii.gz", "b_0000.mha", "c_0000.nrrd", "d_0000.nii",
                                  "E_0000.NII.GZ", "plain.mhd")):
        write(tiny(seed=index), inputs / name.lower()).rename(inputs / name)  # ITK writes lower
    write_dicom_series(tiny(seed=7), inputs / "f_0000", "1.2.3.55")
    write(tiny(seed=8), inputs / "a_0001.nii.gz")  # a second channel
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "gone_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (inputs / "g_0000.nii.gz").mkdir()  # a folder named like a case
    (inputs / "docs").mkdir()
    code = main([str(inputs), str(outputs), "--quiet"], predictor=predictor)
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in outputs.iterdir()) == [
        "E.nii.gz", "a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz", "f.nii.gz", "plain.nii.gz"]
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    reasons = {Path(line.split(": ")[1]).name: line.split(": ", 2)[2] for line in skipped}
    assert len(skipped) == len(reasons) == 5, err  # each entry listed once
    assert reasons["a_0001.nii.gz"].startswith("channel 0001 of case a")
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["gone_0000.nii.gz"].startswith("a dangling symbolic link")
    assert reasons["g_0000.nii.gz"].startswith("a folder named like an image file")
    assert reasons["docs"].startswith("a folder without DICOM files")
    assert "7 ok, 0 failed" in err


def test_an_input_folder_with_nothing_usable_says_what_it_found(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")
    (tmp_path / "in" / "scans").mkdir()
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no images named" in err
    assert "it holds 2 other entries: readme.txt: not an image" in err
    assert "scans: a folder without DICOM files" in err


# ---------------------------------------------------------------------------------------------
# 7. Headers that ITK silently reinterprets, and real reasons
# ---------------------------------------------------------------------------------------------


def sheared_sform(path):
    """The NIfTI at ``path`` with x sheared along y in its sform; its qform stays valid (ITK reads
    the qform then, with a warning only)."""
    data = bytearray(path.read_bytes())
    srow = list(struct.unpack("<12f", data[280:328]))
    srow[1] = 1.0
    struct.pack_into("<12f", data, 280, *srow)
    path.write_bytes(bytes(data))
    return path


VOXELS = np.random.default_rng(5).integers(-1000, 1500, 8 * 7 * 6).astype("<i2").tobytes()


@pytest.mark.parametrize("make,reason", [
    (lambda p: metaimage(p / "oblique.mha", VOXELS, "8 7 6", matrix="1 0 0 0.5 1 0 0 0 1"),
     "is not a rotation"),
    (lambda p: nrrd(p / "sheared.nrrd", VOXELS, "8 7 6", directions="(2,0,0) (1,2,0) (0,0,3)"),
     "is not a rotation"),
    (lambda p: metaimage(p / "singular.mha", VOXELS, "8 7 6", matrix="1 0 0 1 0 0 0 0 1"),
     "is singular"),
    (lambda p: nrrd(p / "singular.nrrd", VOXELS, "8 7 6", directions="(2,0,0) (2,0,0) (0,0,3)"),
     "is singular"),
    (lambda p: metaimage(p / "zero.mha", VOXELS, "8 7 6", spacing="0 2 3"),
     "voxel spacing 0 x 2 x 3 mm: every spacing must be a positive number"),
    (lambda p: metaimage(p / "negative.mha", VOXELS, "8 7 6", spacing="-2 2 3"),
     "every spacing must be a positive number"),
    (lambda p: nrrd(p / "zero.nrrd", VOXELS, "8 7 6", directions="(0,0,0) (0,2,0) (0,0,3)"),
     "every spacing must be a positive number"),
    (lambda p: metaimage(p / "nan.mha", VOXELS, "8 7 6", offset="nan 0 0"),
     r"not a finite number \(Offset = nan 0 0\)"),
    (lambda p: nrrd(p / "nan.nrrd", VOXELS, "8 7 6", origin="(0,inf,0)"),
     "not a finite number"),
    (lambda p: sheared_sform(write(tiny(), p / "sheared.nii")),
     "the NIfTI sform .* is sheared .* ITK would silently use the qform"),
    (lambda p: Path(shutil.copy(write(tiny(), p / "real.nii"), p / "plain.nii.gz")),
     "is an uncompressed NIfTI file named .nii.gz: rename it to plain.nii"),
])
def test_headers_itk_would_reinterpret_are_refused_with_the_real_reason(tmp_path, make, reason):
    path = Path(make(tmp_path))
    with pytest.raises(InputError, match=reason) as refusal:
        read_case(case_of(path))
    assert str(refusal.value).startswith(str(path))


def test_an_input_path_that_is_a_file_says_so(tmp_path, capsys):
    path = write(tiny(), tmp_path / "a_0000.nii.gz")
    assert main([str(path), str(tmp_path / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_the_1mm_warning_names_the_spacing_used(tmp_path, predictor, capsys):
    write(tiny(spacing=(1.0, 1.0, 1.0), size_xyz=(24, 24, 10)), tmp_path / "in" / "u_0000.nrrd")
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet",
                 "--replace-1mm-spacing"], predictor=predictor) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "warning" in line)
    assert "segmented as 0.8145 x 0.8145 x 2.528 mm (--replace-1mm-spacing)" in warning
    assert "segmented as 1 mm" not in warning


# ---------------------------------------------------------------------------------------------
# 8. One line per failure on the console
# ---------------------------------------------------------------------------------------------


def test_the_console_shows_our_lines_only_and_verbose_shows_the_rest(tmp_path):
    inputs = tmp_path / "in"
    write(tiny(), inputs / "good_0000.nii.gz")
    metaimage(inputs / "huge_0000.mha", VOXELS, HUGE)  # ITK printed "MetaImage: ..." here
    nii = write(tiny(), tmp_path / "x.nii").read_bytes()
    (inputs / "bad_0000.nii").write_bytes(nii[:348] + b"\0" * 10)  # a NIfTI header, no data
    completed = run_predict(inputs, tmp_path / "out", "--quiet")
    assert completed.returncode == 1, completed.stderr
    assert_our_lines_only(completed.stderr)
    assert len([line for line in completed.stderr.splitlines() if "FAILED" in line]) == 2
    # as a user runs it: without the TF_CPP_MIN_LOG_LEVEL that tests/conftest.py sets (at level
    # 2 TensorFlow printed nothing on an AVX2-only CPU, which has no oneDNN start-up warning)
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    verbose = run_predict(inputs, tmp_path / "out2", "--quiet", "--verbose", env=env)
    assert verbose.returncode == 1
    assert any(noise in verbose.stderr for noise in ("oneDNN", "absl", "I0000")), verbose.stderr


# ---------------------------------------------------------------------------------------------
# 9. Interruptions: one line, whole outputs, resumable
# ---------------------------------------------------------------------------------------------


def test_ctrl_c_prints_one_line_and_leaves_only_whole_outputs(real_ct, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index in range(4):
        shutil.copy(real_ct, inputs / f"ct{index}_0000.nii.gz")
    # a test run as a background job (`pytest ... &`) has SIGINT ignored, which a child would
    # inherit; with a handler installed here, the child starts with the default action instead
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([PREDICT, str(inputs), str(outputs), "--quiet"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    first = process.stdout.readline()  # the first case is done
    assert first.startswith("ct0: size"), first + process.stderr.read()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted:")
    assert_our_lines_only(err)
    written = sorted(outputs.iterdir())
    assert all(not p.name.startswith(".partial-") for p in written)
    for path in written:
        assert sitk.ReadImage(str(path)).GetSize() == (122, 101, 112)


def test_skip_existing_keeps_verified_outputs_and_stale_temporaries_are_removed(
        tmp_path, predictor, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c"):
        write(tiny(seed=ord(name)), inputs / f"{name}_0000.nii.gz")
    assert main([str(inputs), str(outputs), "--quiet"], predictor=predictor) == 0
    capsys.readouterr()
    kept = (outputs / "a.nii.gz").stat().st_mtime_ns
    cut = (outputs / "b.nii.gz").read_bytes()
    (outputs / "b.nii.gz").write_bytes(cut[: len(cut) // 2])  # a killed copy, say
    (outputs / "c.nii.gz").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its PID no longer runs
    stale = outputs / f".partial-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "a.nii.gz").write_bytes(b"half")
    alive = outputs / f".partial-{os.getppid()}-0123abcd"  # a run still going: left alone
    alive.mkdir()
    assert main([str(inputs), str(outputs), "--quiet", "--skip-existing"],
                predictor=predictor) == 0
    captured = capsys.readouterr()
    assert (outputs / "a.nii.gz").stat().st_mtime_ns == kept
    assert "a: kept the existing" in captured.out
    assert "b: existing output" in captured.err and "segmented again" in captured.err
    assert "removed 1 temporary file(s) of an interrupted run" in captured.err
    assert not stale.exists() and alive.exists()
    for name in ("b", "c"):
        assert sitk.ReadImage(str(outputs / f"{name}.nii.gz")).GetSize() == (20, 18, 6)
    assert "3 ok, 0 failed; 1 existing outputs kept" in captured.err


def test_the_exit_status_is_2_when_every_case_failed(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_0000.nii.gz").write_bytes(b"not gzip")
    (tmp_path / "in" / "b_0000.mha").write_bytes(b"not an image")
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "0 ok, 2 failed (a, b)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 10. Two runs sharing a report
# ---------------------------------------------------------------------------------------------


def test_two_runs_sharing_a_report_leave_it_whole(tmp_path):
    inputs, outputs, report = tmp_path / "in", tmp_path / "out", tmp_path / "report.jsonl"
    cases = [f"case{index}" for index in range(10)]  # enough for the runs' writes to overlap
    for index, name in enumerate(cases):
        write(tiny(seed=index, size_xyz=(24 + index, 20, 6)), inputs / f"{name}_0000.nii.gz")
    runs = [subprocess.Popen([PREDICT, str(inputs), str(outputs), "--quiet", "--report",
                              str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    records = [json.loads(line) for line in report.read_text().splitlines()]  # each line whole
    assert sorted(r["case"] for r in records) == cases
    for run, (_, err) in zip(runs, results):
        assert run.returncode == 0, err
        assert_our_lines_only(err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
