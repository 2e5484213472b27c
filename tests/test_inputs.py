"""Every input a user may hand over, and every way it can be wrong (app/io.py and the CLI).

All files are real files that the tests write (and break) in temporary folders; predictions run
through the real Predictor. Only the GPU running out of memory is simulated.
"""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from app import io as image_io
from app import method
from app.cli import is_out_of_memory, main, organ_volumes_ml
from app.io import Case, InputError, find_cases, read_case, write_labels
from evaluation.metrics import dice
from synthetic import CaseGeometry, generate_case

ANGLE = np.radians(5.7)  # an oblique direction: rotated about z
OBLIQUE = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def ct_like(size_xyz=(24, 20, 8), spacing=(2.0, 2.5, 3.0), origin=(-20.0, 10.0, -300.0),
            direction=OBLIQUE, seed=0, pixel=np.int16, low=-1024, high=1500):
    """A small image with CT-like values (air and bone present) and a non-trivial geometry."""
    values = np.random.default_rng(seed).integers(low, high, tuple(reversed(size_xyz)))
    image = sitk.GetImageFromArray(values.astype(pixel))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def write(image, path, compress=None):
    """Write with SimpleITK; ``compress`` None: compressed unless the format is .nii or .mhd."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress is None:
        compress = image_io.image_format(path.name) not in ("nii", "mhd")
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def case_of(path):
    fmt = image_io.image_format(Path(path).name)
    return Case(Path(path).name[: -len(fmt) - 1], Path(path), fmt)


def same_grid(a, b):
    return (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (
        b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())


def close_grid(a, b, atol=1e-6):
    """Equal grids up to the precision of another file format (NIfTI stores float32)."""
    return a.GetSize() == b.GetSize() and all(
        np.allclose(getattr(a, f"Get{name}")(), getattr(b, f"Get{name}")(), atol=atol)
        for name in ("Spacing", "Origin", "Direction"))


def write_dicom_series(image, folder, series_uid):
    """One DICOM file per slice of ``image`` (int16), with positions, orientation and UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for z in range(image.GetDepth()):
        plane = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{z + 1}", "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
                "0020|000e": series_uid, "0020|0013": str(z + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0018|0050": str(image.GetSpacing()[2])}
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)
    return folder


def on_grid(image, reference):
    """``image`` resampled onto ``reference``'s grid in physical space (nearest neighbour)."""
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         image.GetPixelID())


# ---------------------------------------------------------------------------------------------
# Finding cases
# ---------------------------------------------------------------------------------------------


def test_a_folder_with_flare_names_names_cases_by_the_flare_rule_and_lists_the_rest(tmp_path):
    write(ct_like(), tmp_path / "b_0000.nii.gz")
    write(ct_like(), tmp_path / "a_0000.nii.gz")
    write(ct_like(), tmp_path / "a_0001.nii.gz")  # a second channel: not FLARE's input
    write(ct_like(), tmp_path / "other.mha")  # not FLARE-named: a case under its own name
    (tmp_path / "notes.txt").write_text("listed, not a case")
    cases, skipped = image_io.survey(tmp_path)
    assert [(c.name, c.path.name, c.format) for c in cases] == [
        ("a", "a_0000.nii.gz", "nii.gz"), ("b", "b_0000.nii.gz", "nii.gz"),
        ("other", "other.mha", "mha")]
    assert cases[0].output_path(tmp_path / "out") == tmp_path / "out" / "a.nii.gz"
    assert [(s.path.name, s.reason.split(":")[0]) for s in skipped] == [
        ("a_0001.nii.gz", "channel 0001 of case a"), ("notes.txt", "not an image (supported")]


def test_without_flare_names_every_format_and_dicom_folder_is_a_case(tmp_path):
    for name in ("ct1.nii.gz", "ct2.nii", "ct3.mha", "ct4.mhd", "ct5.nrrd"):
        write(ct_like(), tmp_path / name)
    write_dicom_series(ct_like(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)), tmp_path / "series",
                       "1.2.3.4")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"ignored")
    cases = find_cases(tmp_path)
    assert [(c.name, c.format) for c in cases] == [
        ("ct1", "nii.gz"), ("ct2", "nii"), ("ct3", "mha"), ("ct4", "mhd"), ("ct5", "nrrd"),
        ("series", "dicom")]  # ct4.raw is not a case of its own
    assert (tmp_path / "ct4.raw").is_file()
    assert cases[3].output_path(tmp_path, "same").name == "ct4.mhd"
    assert cases[5].output_path(tmp_path, "same").name == "series.nii.gz"  # DICOM: NIfTI


def test_dicom_files_directly_in_the_input_folder_are_one_case_named_after_it(tmp_path):
    folder = write_dicom_series(ct_like(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
                                tmp_path / "scan_17", "1.2.3.4")
    assert [(c.name, c.path, c.format) for c in find_cases(folder)] == [
        ("scan_17", folder, "dicom")]


def test_inputs_that_share_a_case_name_both_fail_naming_each_other(tmp_path):
    write(ct_like(), tmp_path / "ct.nii")
    write(ct_like(), tmp_path / "ct.mha")
    write(ct_like(), tmp_path / "other.nrrd")
    cases = {c.path.name: c for c in find_cases(tmp_path)}
    for name in ("ct.nii", "ct.mha"):
        with pytest.raises(InputError, match="ct.mha, ct.nii"):
            read_case(cases[name])
    read_case(cases["other.nrrd"])


def test_an_empty_or_missing_input_folder_has_no_cases(tmp_path):
    assert find_cases(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Reading valid files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.mha", "ct.mhd", "ct.nrrd"])
def test_every_format_reads_back_with_its_voxels_and_oblique_geometry(tmp_path, name):
    image = ct_like()
    path = write(image, tmp_path / name)
    read, warnings = read_case(case_of(path))
    assert warnings == []
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read),
                                  sitk.GetArrayViewFromImage(image))


def test_a_4d_image_holding_one_volume_is_read_as_3d(tmp_path):
    volume = sitk.JoinSeries([ct_like(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))])
    path = write(volume, tmp_path / "one_volume.nrrd")
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    image, _ = read_case(case_of(path))
    assert image.GetDimension() == 3 and image.GetSize() == (24, 20, 8)


def test_a_dicom_series_is_read_in_physical_space(tmp_path):
    image = ct_like(direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    folder = write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.1")
    read, warnings = read_case(Case("series", folder, "dicom"))
    assert warnings == [] and read.GetSize() == image.GetSize()
    # GDCM may store the slices in the other order: the same voxels at the same places
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid(read, image)),
                                  sitk.GetArrayViewFromImage(image))


def test_the_real_dicom_series_reads_as_the_documented_ct(shared_data):
    folder = shared_data / "dicom" / "ts_dicom_slices"
    image, warnings = read_case(Case("ts_dicom_slices", folder, "dicom"))
    assert warnings == []
    assert image.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))


# ---------------------------------------------------------------------------------------------
# Refusals: one clear message naming the file
# ---------------------------------------------------------------------------------------------


def data_file(path):
    """The file holding a written image's voxels (a .mhd keeps them in .raw/.zraw)."""
    for suffix in (".raw", ".zraw"):
        if path.suffix == ".mhd" and path.with_suffix(suffix).exists():
            return path.with_suffix(suffix)
    return path


@pytest.mark.parametrize("name,compress", [
    ("ct.nii.gz", True), ("ct.nii", False), ("ct.mha", False), ("ct.mha", True),
    ("ct.mhd", False), ("ct.mhd", True), ("ct.nrrd", False), ("ct.nrrd", True)])
def test_a_truncated_file_of_every_format_is_refused(tmp_path, name, compress):
    path = write(ct_like(size_xyz=(40, 30, 20)), tmp_path / name, compress)
    target = data_file(path)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as refusal:
        read_case(case_of(path))
    message = str(refusal.value)
    assert str(path) in message and ("truncated" in message or "corrupt" in message), message


def test_a_nifti_whose_gzip_stream_is_whole_but_data_short_is_refused(tmp_path):
    path = write(ct_like(), tmp_path / "ct.nii")
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(path.read_bytes()[:-500]))
    with pytest.raises(InputError, match="short.nii.gz: truncated"):
        read_case(case_of(short))


def test_a_nifti_gzip_stream_corrupt_in_the_middle_is_refused(tmp_path):
    path = write(ct_like(size_xyz=(40, 30, 20)), tmp_path / "ct.nii.gz")
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):  # ITK would read this without a word
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="ct.nii.gz: truncated or corrupt gzip data"):
        read_case(case_of(path))


def test_a_nifti_in_several_gzip_members_or_very_compressible_is_read(tmp_path):
    raw = write(ct_like(size_xyz=(40, 30, 20)), tmp_path / "ct.nii").read_bytes()
    members = tmp_path / "members.nii.gz"  # as bgzip and concatenated gzip files are
    members.write_bytes(b"".join(gzip.compress(raw[i:i + 5000]) for i in range(0, len(raw), 5000)))
    image, _ = read_case(case_of(members))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct.nii"))))
    flat = sitk.Image(200, 200, 120, sitk.sitkInt16)  # 9.6 MB of zeros: ratio about 1000
    flat = write(flat, tmp_path / "flat.nii.gz")
    assert image_io.inflated_bytes(flat, 0, gzip_wrapper=True, output_bytes=1 << 20)[0] == (
        352 + 200 * 200 * 120 * 2)


def test_a_missing_mhd_data_file_is_refused(tmp_path):
    path = write(ct_like(), tmp_path / "ct.mhd")
    path.with_suffix(".raw").unlink()
    with pytest.raises(InputError, match="ct.raw is missing"):
        read_case(case_of(path))


@pytest.mark.parametrize("name,content,reason", [
    ("text.nii.gz", b"not gzip at all", "gzip"),
    ("text.nii", b"hello" * 100, "not a NIfTI file"),
    ("text.mha", b"hello" * 100, "not a MetaImage file"),
    ("text.nrrd", b"hello" * 100, "no image reader recognises"),
    ("empty.nii.gz", b"", "gzip|not a NIfTI"),
])
def test_a_file_that_is_no_image_is_refused(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=reason):
        read_case(case_of(path))


@pytest.mark.parametrize("make,reason", [
    (lambda: sitk.Image([30, 20], sitk.sitkInt16), "is a 2-D image"),
    (lambda: sitk.Image([30, 20, 10, 3], sitk.sitkInt16), "is a 4-D image"),
    (lambda: sitk.Image([30, 20, 1], sitk.sitkInt16), "one voxel thick"),
    (lambda: sitk.Image([30, 20, 10], sitk.sitkVectorUInt8, 3), "3 values per voxel"),
    (lambda: sitk.Image([30, 20, 10], sitk.sitkComplexFloat32), "2 values per voxel"),
])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_images_that_are_not_one_scalar_volume_are_refused(tmp_path, make, reason, suffix):
    path = write(make(), tmp_path / f"input{suffix}")
    with pytest.raises(InputError, match=reason) as refusal:
        read_case(case_of(path))
    assert str(path) in str(refusal.value)


def test_nan_voxels_are_refused(tmp_path):
    image = sitk.Cast(ct_like(), sitk.sitkFloat32)
    image[3, 4, 5] = float("nan")
    path = write(image, tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="1 voxels are NaN or infinite"):
        read_case(case_of(path))


def test_dicom_folders_with_several_series_none_or_a_broken_slice_are_refused(tmp_path):
    image = ct_like(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    two = tmp_path / "two"
    write_dicom_series(image, two / "a", "1.2.3.111")
    write_dicom_series(image, two / "b", "1.2.3.222")
    for path in (two / "b").iterdir():
        path.rename(two / "a" / f"b_{path.name}")
    with pytest.raises(InputError, match=r"2 DICOM series in one folder \('1.2.3.111', "
                                         r"'1.2.3.222'\)"):
        read_case(Case("a", two / "a", "dicom"))

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(InputError, match="no readable DICOM series"):
        read_case(Case("junk", junk, "dicom"))

    broken = write_dicom_series(image, tmp_path / "broken", "1.2.3.333")
    last = sorted(broken.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-300])  # truncated: GDCM would silently drop it
    with pytest.raises(InputError, match=f"could not be read.*{last.name}"):
        read_case(Case("broken", broken, "dicom"))

    gap = write_dicom_series(image, tmp_path / "gap", "1.2.3.444")
    sorted(gap.iterdir())[3].unlink()  # a missing slice would shift the ones after it
    with pytest.raises(InputError, match="not evenly spaced"):
        read_case(Case("gap", gap, "dicom"))


# ---------------------------------------------------------------------------------------------
# Warnings: still a result
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image,expected", [
    (ct_like(pixel=np.uint16, low=0, high=900), ["do not look like CT in HU"]),  # MR-like
    (ct_like(pixel=np.uint8, low=0, high=256), ["cannot hold CT's", "do not look like CT"]),
    (ct_like(pixel=np.uint16, low=0, high=60000), ["overflow int16", "no air"]),
    (ct_like(pixel=np.int32, low=-1024, high=40000), ["overflow int16"]),
    (ct_like(low=-1024, high=100), ["nothing dense"]),
    (ct_like(spacing=(1.0, 1.0, 1.0)), ["exactly 1 x 1 x 1 mm"]),
])
def test_suspicious_inputs_are_read_with_warnings_naming_the_file(tmp_path, image, expected):
    path = write(image, tmp_path / "odd.nrrd")
    read, warnings = read_case(case_of(path))
    assert read.GetSize() == image.GetSize()
    assert len(warnings) == len(expected), warnings
    for warning, phrase in zip(warnings, expected):
        assert warning.startswith(str(path)) and phrase in warning, warnings


def test_real_ct_raises_no_warning(shared_data):
    path = shared_data / "images" / "ts_example_0000.nii.gz"
    assert read_case(case_of(path))[1] == []  # int32 HU, 3 mm: nothing suspicious


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,files", [
    ("labels.nii.gz", ["labels.nii.gz"]), ("labels.nii", ["labels.nii"]),
    ("labels.mha", ["labels.mha"]), ("labels.mhd", ["labels.mhd", "labels.raw"]),
    ("labels.nrrd", ["labels.nrrd"])])
def test_labels_are_written_atomically_in_every_format(tmp_path, name, files):
    labels = sitk.Cast(ct_like(low=0, high=5), sitk.sitkUInt8)
    write_labels(labels, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary left
    back = sitk.ReadImage(str(tmp_path / name))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back),
                                  sitk.GetArrayViewFromImage(labels))


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "labels.nii.gz").mkdir()  # a folder where the file should go
    with pytest.raises(OSError):
        write_labels(sitk.Image([4, 4, 4], sitk.sitkUInt8), tmp_path / "labels.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]
    assert (tmp_path / "labels.nii.gz").is_dir()


# ---------------------------------------------------------------------------------------------
# The command: batch behaviour, formats, exit codes
# ---------------------------------------------------------------------------------------------


def thin_slab_case(seed, slices=5, spacing_mm=5.0, in_plane=64, spacing_xy=6.0):
    """A generated abdomen seen through a few thick slices (cheap to segment: a small crop)."""
    geometry = CaseGeometry((in_plane, in_plane, slices), (spacing_xy, spacing_xy, spacing_mm),
                            (-190.0, -200.0, -330.0))
    return generate_case(seed, geometry=geometry)


def test_a_batch_of_good_warned_and_broken_inputs(tmp_path, predictor, capsys):
    inputs, outputs, report = tmp_path / "in", tmp_path / "out", tmp_path / "report.jsonl"
    slab, _ = thin_slab_case(31)
    write(slab, inputs / "good.nii.gz")
    unit = sitk.Image(slab)
    unit.SetSpacing((1.0, 1.0, 1.0))
    write(unit, inputs / "unit.mha")  # 1x1x1 mm header: warned, segmented
    write(ct_like(), inputs / "cut.nii.gz")
    data = (inputs / "cut.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    write(sitk.Image([30, 20], sitk.sitkInt16), inputs / "flat.nrrd")
    write(sitk.Image([30, 20, 10, 3], sitk.sitkInt16), inputs / "series.nii")
    write(sitk.Image([30, 20, 10], sitk.sitkVectorUInt8, 3), inputs / "photo.mha")
    (inputs / "notes.nii").write_text("not an image")

    code = main([str(inputs), str(outputs), "--quiet", "--report", str(report)],
                predictor=predictor)
    captured = capsys.readouterr()
    assert code == 1
    failed_lines = [line for line in captured.err.splitlines() if ": FAILED: " in line]
    assert sorted(line.split(":")[0] for line in failed_lines) == [
        "cut", "flat", "notes", "photo", "series"]
    for line in failed_lines:  # one line each, naming the file
        name = line.split(":")[0]
        assert str(inputs / name) in line, line
    assert sorted(p.name for p in outputs.iterdir()) == ["good.nii.gz", "unit.nii.gz"]
    assert "unit: warning: " in captured.err and "1 x 1 x 1 mm" in captured.err
    assert captured.err.strip().splitlines()[-1] == (
        "2 ok, 5 failed (cut, flat, notes, photo, series); 1 with warnings")
    records = {r["case"]: r for r in map(json.loads, report.read_text().splitlines())}
    assert len(records) == 7
    assert "1 x 1 x 1 mm" in records["unit"]["warnings"][0]
    assert records["good"]["partial_field_of_view_axes"] == ["z"]
    for name in ("good", "unit"):
        output = sitk.ReadImage(str(outputs / f"{name}.nii.gz"))
        assert same_grid(output, slab if name == "good" else unit)


def test_the_1mm_spacing_option_segments_with_the_assumed_spacing_and_keeps_the_header(
        tmp_path, predictor, capsys):
    path = write(ct_like(size_xyz=(32, 32, 12), spacing=(1.0, 1.0, 1.0)),
                 tmp_path / "in" / "unit.nrrd")
    image, _ = read_case(case_of(path))
    report = tmp_path / "report.jsonl"
    code = main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet", "--report", str(report),
                 "--replace-1mm-spacing"], predictor=predictor)
    assert code == 0, capsys.readouterr().err
    record = json.loads(report.read_text())
    assert record["segmented_with_spacing_mm_xyz"] == [0.8145, 0.8145, 2.528]
    # 32 x 32 x 12 voxels of 0.8145 x 0.8145 x 2.528 mm: 26 x 26 x 30 mm, the whole image
    assert record["roi_mm"]["extent_xyz"] == pytest.approx([26.06, 26.06, 30.34], abs=0.01)
    # NIfTI output of an NRRD input: equal within NIfTI's float32 precision
    assert close_grid(sitk.ReadImage(str(tmp_path / "out" / "unit.nii.gz")), image)


def test_output_format_same_writes_each_input_format_on_its_grid(tmp_path, predictor, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    images = {}
    for index, name in enumerate(("a.nii", "b.mha", "c.mhd", "d.nrrd")):
        images[name] = ct_like(size_xyz=(20, 18, 6), seed=index)
        write(images[name], inputs / name)
    code = main([str(inputs), str(outputs), "--quiet", "--output-format", "same"],
                predictor=predictor)
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in outputs.iterdir()) == [
        "a.nii", "b.mha", "c.mhd", "c.raw", "d.nrrd"]
    for name, image in images.items():
        output = sitk.ReadImage(str(outputs / name))
        assert output.GetPixelID() == sitk.sitkUInt8 and output.GetSize() == image.GetSize()
        np.testing.assert_allclose(output.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(output.GetDirection(), image.GetDirection(), atol=1e-5)


def test_an_output_that_would_overwrite_its_input_fails_that_case(tmp_path, predictor, capsys):
    path = write(ct_like(), tmp_path / "ct.nii.gz")
    before = path.read_bytes()
    assert main([str(tmp_path), str(tmp_path), "--quiet"], predictor=predictor) == 2  # all failed
    assert "would overwrite the input" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_an_empty_input_folder_stops_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    assert "no images named" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_stops_before_any_work(tmp_path, capsys):
    write(ct_like(), tmp_path / "in" / "ct.nii.gz")
    (tmp_path / "taken").write_text("a file where the output folder should be")
    assert main([str(tmp_path / "in"), str(tmp_path / "taken" / "out"), "--quiet"]) == 2
    assert "output folder is not writable" in capsys.readouterr().err
    assert main([str(tmp_path / "in"), str(tmp_path / "taken"), "--quiet"]) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_stops_before_any_work(tmp_path, capsys):
    write(ct_like(), tmp_path / "in" / "ct.nii.gz")
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    try:
        assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 2
    finally:
        (tmp_path / "out").chmod(0o700)
    assert "not writable" in capsys.readouterr().err


def test_the_real_dicom_series_is_segmented_where_its_label_says(tmp_path, predictor,
                                                                 shared_data, capsys):
    """The label file stores y flipped: the comparison is made in physical space."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "ts_dicom").symlink_to(shared_data / "dicom" / "ts_dicom_slices")
    assert main([str(inputs), str(outputs), "--quiet"], predictor=predictor) == 0, \
        capsys.readouterr().err
    image, _ = read_case(Case("ts_dicom", inputs / "ts_dicom", "dicom"))
    output = sitk.ReadImage(str(outputs / "ts_dicom.nii.gz"))
    assert same_grid(output, image)
    label = sitk.ReadImage(str(shared_data / "dicom" / "ts_dicom.nii.gz"))
    reference = on_grid(label, output)
    labels = sitk.GetArrayViewFromImage(output)
    expected = sitk.GetArrayViewFromImage(reference)
    in_physical_space = dice(labels > 0, expected > 0)
    as_raw_arrays = dice(labels > 0, sitk.GetArrayViewFromImage(label) > 0)  # ignores the flip
    assert in_physical_space >= 1.5 * as_raw_arrays
    # issue 5's targets for this held-out slab; the shipped weights (SCN 31,500 iterations) with
    # the partial-field-of-view crop rules score liver 0.96, spleen 0.94
    assert dice(labels == 1, expected == 1) >= 0.90
    assert dice(labels == 3, expected == 3) >= 0.85
    # its pancreas (2.5 mL of tail at the slab's edge) scores 0.36, short of the 0.50;
    # the SCN of 20,000 iterations found none of it (0.00): this floor keeps it found
    assert dice(labels == 4, expected == 4) >= 0.2


# ---------------------------------------------------------------------------------------------
# GPU out of memory: that case again on the CPU
# ---------------------------------------------------------------------------------------------


class OutOfMemoryOnce:
    """The real Predictor, except that its first ``predict`` fails as a GPU out of memory would.

    Records the device scope of every call (TensorFlow's eager context, "" when none is set).
    """

    def __init__(self, predictor, error):
        self.predictor, self.error, self.devices = predictor, error, []

    def predict(self, image):
        from tensorflow.python.eager import context

        self.devices.append(context.context().device_name or "")
        if len(self.devices) == 1:
            raise self.error
        return self.predictor.predict(image)


def test_a_case_out_of_gpu_memory_is_segmented_on_the_cpu(tmp_path, predictor, capsys):
    slab, _ = thin_slab_case(32, slices=4)
    write(slab, tmp_path / "in" / "huge_0000.nii.gz")
    report = tmp_path / "report.jsonl"
    failing = OutOfMemoryOnce(predictor, tf.errors.ResourceExhaustedError(
        None, None, "OOM when allocating tensor with shape[1,160,128,160,32]"))
    code = main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet", "--report", str(report)],
                predictor=failing)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "huge: out of GPU memory (OOM when allocating" in err and "on the CPU" in err
    assert len(failing.devices) == 2 and "CPU:0" in failing.devices[1]
    assert json.loads(report.read_text())["device"].startswith("CPU")
    assert same_grid(sitk.ReadImage(str(tmp_path / "out" / "huge.nii.gz")), slab)


def test_other_errors_are_not_retried_and_fail_the_case(tmp_path, predictor, capsys):
    write(thin_slab_case(33, slices=4)[0], tmp_path / "in" / "case_0000.nii.gz")
    failing = OutOfMemoryOnce(predictor, ValueError("something else"))
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"],
                predictor=failing) == 2  # its only case failed
    assert "case: FAILED" in capsys.readouterr().err and len(failing.devices) == 1
    assert not (tmp_path / "out" / "case.nii.gz").exists()


def test_out_of_memory_errors_are_recognised_in_their_forms():
    assert is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM"))
    assert is_out_of_memory(tf.errors.InternalError(None, None, "RESOURCE_EXHAUSTED: XLA"))
    assert is_out_of_memory(tf.errors.UnknownError(None, None, "CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(tf.errors.InvalidArgumentError(None, None, "bad shape"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not TensorFlow's


def test_organ_volumes_are_counted_across_slice_blocks():
    labels = np.zeros((37, 5, 4), np.uint8)  # 37 slices: blocks of 16, 16 and 5
    labels[0:20, :, :2] = 1
    labels[15:17, 1, 1:3] = 2  # straddles the first block boundary
    labels[36, 4, 3] = 4
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.5, 2.0, 10.0))  # 10 mm^3 = 0.01 mL per voxel
    volumes = organ_volumes_ml(image, slices_per_block=16)
    expected = {organ: round(float((labels == label).sum()) * 0.01, 2)
                for label, organ in method.LABELS.items()}
    assert volumes == expected
    assert volumes["liver"] > 0 and volumes["pancreas"] == 0.01
