"""DICOM SEG output (app/dicom_seg.py and --output-format dicom-seg): read back with highdicom
and, independently of our frame placement, with pydicom from each frame's own plane position,
the segments equal our labels on the source grid voxel for voxel."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from app import dicom_seg
from app import io as image_io
from app.cli import main
from app.weights import DEFAULT_WEIGHTS_DIR, read_provenance
from tests.dicom_files import write_ct_series

# SNOMED CT code -> label: liver, kidney, spleen, pancreas
SNOMED = {"10200004": 1, "64033007": 2, "78961009": 3, "15776009": 4}
ANGLE = np.radians(8.0)
# rotated about z and then about x: oblique in every plane
OBLIQUE = tuple((np.array([[1, 0, 0], [0, np.cos(ANGLE), -np.sin(ANGLE)],
                           [0, np.sin(ANGLE), np.cos(ANGLE)]])
                 @ np.array([[np.cos(ANGLE), -np.sin(ANGLE), 0], [np.sin(ANGLE), np.cos(ANGLE), 0],
                             [0, 0, 1]])).ravel())
# slices stored feet first: the image's z runs against the slice normal (row x column)
REVERSED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def ct(direction, size_xyz=(20, 16, 9), spacing=(1.5, 1.25, 2.5), origin=(-14.0, 20.0, -310.0)):
    values = np.random.default_rng(1).integers(-1000, 1200, tuple(reversed(size_xyz)))
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def known_labels(grid):
    """Labels 0-4 in a pattern that differs along every axis; slice 1 empty (an omitted frame)."""
    z, y, x = np.indices(tuple(reversed(grid.GetSize())))
    array = ((x + 2 * y * y + 3 * z) % 7).astype(np.uint8)
    array[array > 4] = 0
    array[1] = 0
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(grid)
    return labels


def labels_from_frame_positions(path, grid):
    """The label array (z, y, x) a SEG file holds, placed by each frame's PlanePosition (pydicom
    only: no code of app/dicom_seg.py)."""
    seg = pydicom.dcmread(path)
    organ = {int(item.SegmentNumber): SNOMED[item.SegmentedPropertyTypeCodeSequence[0].CodeValue]
             for item in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0]
                   .PlaneOrientationSequence[0].ImageOrientationPatient]
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    assert np.allclose(orientation, [*direction[:, 0], *direction[:, 1]], atol=1e-6)
    volume = np.zeros(tuple(reversed(grid.GetSize())), np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        index = np.array(grid.TransformPhysicalPointToContinuousIndex(position))
        assert np.allclose(index, np.round(index), atol=1e-3)
        assert np.allclose(index[:2], 0, atol=1e-3)
        z = int(round(index[2]))
        assert not np.any(volume[z][frame > 0])  # binary segments do not overlap here
        volume[z][frame > 0] = organ[number]
    return seg, volume


def source_uids(files):
    return {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
            for f in files}


def check_seg(path, labels, files):
    """Everything a viewer relies on: voxels, references, codes, algorithm."""
    seg, volume = labels_from_frame_positions(path, labels)
    assert np.array_equal(volume, sitk.GetArrayViewFromImage(labels))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.SegmentationType == "BINARY"
    referenced = {item.ReferencedSOPInstanceUID
                  for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == source_uids(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v)
    assert [SNOMED[s.SegmentedPropertyTypeCodeSequence[0].CodeValue]
            for s in seg.SegmentSequence] == present
    assert all(s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
               for s in seg.SegmentSequence)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "EfficientSCN"
    assert algorithm.AlgorithmVersion
    return seg


@pytest.mark.parametrize("direction", [OBLIQUE, REVERSED_Z], ids=["oblique", "feet_first"])
def test_a_generated_series_round_trips_voxel_for_voxel_in_any_file_order(tmp_path, direction):
    files = write_ct_series(ct(direction), tmp_path / "series")
    image, _ = image_io.read_dicom_series(tmp_path / "series")
    if direction == REVERSED_Z:  # read back in the normal's order: the grid flips, physically equal
        assert image.GetDirection()[8] == pytest.approx(1.0)
    labels = known_labels(image)
    provenance = read_provenance(DEFAULT_WEIGHTS_DIR)
    for name, order in (("sorted", image_io.dicom_series_files(tmp_path / "series")),
                        ("reversed", list(reversed(files))), ("shuffled", [files[i] for i in
                         np.random.default_rng(3).permutation(len(files))])):
        path = tmp_path / f"{name}.dcm"
        dicom_seg.write_dicom_seg(labels, order, path, provenance, DEFAULT_WEIGHTS_DIR)
        seg = check_seg(path, labels, files)
        assert seg.NumberOfFrames < len(files) * len(seg.SegmentSequence)  # empty frames omitted
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "reversed.dcm", "series", "shuffled.dcm", "sorted.dcm"]  # no temporary file left


def test_the_real_series_with_its_reference_labels_round_trips(tmp_path, shared_data):
    folder = shared_data / "dicom" / "ts_dicom_slices"
    image, _ = image_io.read_dicom_series(folder)
    reference = sitk.ReadImage(str(shared_data / "dicom" / "ts_dicom.nii.gz"))
    labels = sitk.Resample(reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    files = image_io.dicom_series_files(folder)
    notes = dicom_seg.write_dicom_seg(labels, files, tmp_path / "ts.dcm",
                                      read_provenance(DEFAULT_WEIGHTS_DIR), DEFAULT_WEIGHTS_DIR)
    seg = check_seg(tmp_path / "ts.dcm", labels, files)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "pancreas"]
    # the anonymised series lacks Study/Series UIDs: derived, and said so
    assert any("StudyInstanceUID" in note for note in notes)
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "weights_json_sha256" in parameters.AlgorithmParameters
    # highdicom's own reading agrees
    import highdicom as hd

    datasets, _ = dicom_seg.source_datasets(files)
    assert np.array_equal(dicom_seg.labels_from_seg(hd.seg.segread(tmp_path / "ts.dcm"),
                                                    datasets, labels),
                          sitk.GetArrayViewFromImage(labels))


def test_labels_on_another_grid_are_refused_and_nothing_is_left(tmp_path):
    files = write_ct_series(ct(OBLIQUE), tmp_path / "series")
    image, _ = image_io.read_dicom_series(tmp_path / "series")
    shifted = known_labels(image)
    shifted.SetOrigin(tuple(np.array(image.GetOrigin()) + 0.4))
    with pytest.raises(image_io.OutputError, match=r"out\.dcm: cannot be written as DICOM SEG: "
                                                   r"slice .* is not a slice of the labels"):
        dicom_seg.write_dicom_seg(shifted, files, tmp_path / "out.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_the_folder_command_writes_a_seg_for_dicom_and_fails_other_inputs(tmp_path, predictor,
                                                                          shared_data, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "ts").symlink_to(shared_data / "dicom" / "ts_dicom_slices")
    sitk.WriteImage(ct(OBLIQUE), str(inputs / "small_0000.nii.gz"))
    assert main([str(inputs), str(outputs), "--output-format", "dicom-seg", "--quiet"],
                predictor=predictor) == 1
    err = capsys.readouterr().err
    assert "small: FAILED: " in err and "--output-format dicom-seg needs a DICOM series" in err
    assert sorted(p.name for p in outputs.iterdir()) == ["ts.dcm"]
    image, _ = image_io.read_dicom_series(inputs / "ts")
    labels = predictor.predict(image).labels
    check_seg(outputs / "ts.dcm", labels, image_io.dicom_series_files(inputs / "ts"))
    # --skip-existing keeps a SEG that verifies
    assert main([str(inputs), str(outputs), "--output-format", "dicom-seg", "--skip-existing",
                 "--quiet"], predictor=predictor) == 1
    assert "ts: kept the existing" in capsys.readouterr().out
