"""DICOM Segmentation output: our uint8 labels as one binary DICOM SEG object over the source
series, so that a PACS viewer shows them on the CT they came from.

- ``source_datasets(files)``: the source series' headers (pydicom, no pixels), identifiers that
  an anonymiser emptied filled in where that can be done honestly (see its docstring).
- ``segmentation(labels, datasets, algorithm)``: the ``highdicom.seg.Segmentation``: one frame
  per source slice that holds an organ, one segment per organ present, coded with SNOMED CT, and
  the algorithm's identification (name, version, weights' provenance).
- ``write_dicom_seg(labels, files, path, provenance)``: written under a temporary name, read back
  and compared voxel for voxel (``labels_from_seg``), then renamed into place.

Frame order is not slice order: a frame is matched to its source slice by the slice's
ImagePositionPatient, mapped into ``labels``' grid, so series stored head first or feet first,
and oblique ones, give the same SEG. NumPy arrays are (z, y, x) as SimpleITK gives them; a DICOM
frame is (rows, columns) = (y, x).
"""

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import io as image_io
from app import method

ALGORITHM_NAME = "EfficientSCN"
MANUFACTURER = "efficientscn-flare"
# Segmented property of each label (SNOMED CT), in the category "Anatomical Structure" (CID 7150).
ORGAN_CODES = {1: "Liver", 2: "Kidney", 3: "Spleen", 4: "Pancreas"}  # pydicom's codes.SCT names
# Patient and study attributes a SEG copies from its source (DICOM type 2: present, may be
# empty); exports that leave them out get them empty.
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
SERIES_NUMBER_OFFSET = 9000  # the SEG's series number: the source's plus this, listed beside it
POSITION_TOLERANCE = 0.01  # of a voxel: a slice position must fall on a slice of the labels' grid
ORIENTATION_TOLERANCE = 1e-4  # of the cosines: ImageOrientationPatient is stored as text


def project_version():
    """This project's version (pyproject.toml, as installed), or "unknown" when not installed."""
    try:
        return metadata.version("efficientscn-flare")
    except metadata.PackageNotFoundError:
        return "unknown"


def algorithm_parameters(provenance, weights_dir=None):
    """The weights' provenance (weights.json) as a few short text parameters of the SEG's
    algorithm identification; the digest identifies the weights.json exactly."""
    parameters = {"labels": ", ".join(f"{k} {v}" for k, v in method.LABELS.items())}
    if weights_dir is not None:
        parameters["weights"] = Path(weights_dir).resolve().name
    if provenance:
        text = json.dumps(provenance, sort_keys=True).encode()
        parameters["weights_json_sha256"] = hashlib.sha256(text).hexdigest()[:16]
        for key in ("date", "license", "use_restrictions"):
            if provenance.get(key):
                parameters[f"weights_{key}"] = str(provenance[key])[:160]
        for network in method.NETWORKS:
            entry = provenance.get(network, {})
            for key in ("iterations", "origin"):
                if entry.get(key) is not None:
                    parameters[f"{network}_{key}"] = str(entry[key])[:60]
    return parameters


def source_datasets(files):
    """The headers (pydicom Datasets, no pixel data) of a series' files, in the given order, and
    notes on what had to be filled in.

    Anonymisers sometimes empty SOP Class/Instance UIDs (the file meta still holds them: used)
    and Study/Series Instance UIDs (none known: derived deterministically from the frame of
    reference and the instances, so a rerun writes the same ones; the note says a viewer cannot
    file the SEG with the original study then); absent patient and study attributes of type 2
    (``TYPE_2_COPIED``) are set empty, as DICOM allows. Raises ``InputError`` naming the file
    otherwise.
    """
    import pydicom
    from pydicom.uid import generate_uid

    datasets, notes = [], []
    for name in files:
        try:
            dataset = pydicom.dcmread(str(name), stop_before_pixels=True)
        except Exception as error:  # pydicom raises several kinds for a broken file
            raise image_io.InputError(f"{name}: not a readable DICOM file ({error})") from None
        meta = getattr(dataset, "file_meta", None)
        for attribute, meta_attribute in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                          ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not dataset.get(attribute) and meta is not None and meta.get(meta_attribute):
                setattr(dataset, attribute, meta[meta_attribute].value)
        for attribute in ("SOPClassUID", "SOPInstanceUID", "FrameOfReferenceUID",
                          "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if not dataset.get(attribute):
                raise image_io.InputError(f"{name}: no {attribute}: a DICOM SEG cannot reference "
                                          "this slice")
        for attribute in TYPE_2_COPIED:  # required in the SEG, may be empty: absent -> empty
            if attribute not in dataset:
                setattr(dataset, attribute, "")
        datasets.append(dataset)
    seed = [datasets[0].FrameOfReferenceUID, *sorted(d.SOPInstanceUID for d in datasets)]
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not datasets[0].get(attribute):
            uid = generate_uid(entropy_srcs=[attribute, *seed])
            for dataset in datasets:
                setattr(dataset, attribute, uid)
            notes.append(f"the source series has no {attribute}; the SEG references the derived "
                         f"{uid} (a viewer cannot file it with the original study)")
    return datasets, notes


def frame_slices(labels, datasets):
    """For each source dataset, the index z of its slice in ``labels`` (NumPy axis 0).

    Raises ``ValueError`` when a slice does not lie on ``labels``' grid: another orientation,
    another in-plane size, or a position between slices.
    """
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    size_x, size_y, size_z = labels.GetSize()
    slices = []
    for dataset in datasets:
        cosines = np.array([float(v) for v in dataset.ImageOrientationPatient])
        if not (np.allclose(cosines[:3], direction[:, 0], atol=ORIENTATION_TOLERANCE)
                and np.allclose(cosines[3:], direction[:, 1], atol=ORIENTATION_TOLERANCE)):
            raise ValueError(f"slice {dataset.SOPInstanceUID}: its orientation "
                             f"{cosines.round(5).tolist()} is not the labels' grid's")
        if (int(dataset.Rows), int(dataset.Columns)) != (size_y, size_x):
            raise ValueError(f"slice {dataset.SOPInstanceUID}: {dataset.Rows} x "
                             f"{dataset.Columns} pixels, the labels have {size_y} x {size_x}")
        position = [float(v) for v in dataset.ImagePositionPatient]
        index = np.array(labels.TransformPhysicalPointToContinuousIndex(position))
        nearest = np.round(index)
        if np.any(np.abs(index - nearest) > POSITION_TOLERANCE) or np.any(nearest[:2] != 0) \
                or not 0 <= nearest[2] < size_z:
            raise ValueError(f"slice {dataset.SOPInstanceUID}: its position {position} is not "
                             "a slice of the labels' grid")
        slices.append(int(nearest[2]))
    if len(set(slices)) != len(slices) or len(slices) != size_z:
        raise ValueError(f"the {len(slices)} source slices do not cover the labels' {size_z} "
                         "slices once each")
    return slices


def segment_descriptions(present, algorithm):
    """One ``SegmentDescription`` per label value in ``present`` (sorted), numbered 1, 2, ..."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=method.LABELS[label],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=getattr(codes.SCT, ORGAN_CODES[label]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
        for number, label in enumerate(present, start=1)]


def algorithm_identification(provenance, weights_dir=None):
    """The SEG's algorithm identification: name, version, family AI, weights' provenance."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=project_version(),
        family=codes.cid7162.ArtificialIntelligence,
        source="two-stage SpatialConfiguration-Net, Thaler et al., FLARE 2021",
        parameters=algorithm_parameters(provenance, weights_dir))


def segmentation(labels, datasets, algorithm):
    """A binary ``highdicom.seg.Segmentation`` of ``labels`` (uint8, on the series' grid) that
    references ``datasets`` (see ``source_datasets``); one segment per organ present (segment
    numbers 1.. in label order, each coded with SNOMED CT), frames without any organ omitted."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    array = sitk.GetArrayViewFromImage(labels)  # (z, y, x)
    present = [label for label in method.LABELS if np.any(array == label)]
    renumber = np.zeros(256, np.uint8)
    for number, label in enumerate(present, start=1):
        renumber[label] = number
    slices = frame_slices(labels, datasets)
    frames = renumber[array[slices]]  # frame i: the slice of datasets[i], as segment numbers
    series_number = SERIES_NUMBER_OFFSET + int(datasets[0].get("SeriesNumber") or 0)
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(present, algorithm),
        series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=ALGORITHM_NAME,
        software_versions=project_version(), device_serial_number="none",
        series_description=f"{ALGORITHM_NAME} organs"[:64],
        content_label="ORGANS", content_description="liver, kidneys, spleen, pancreas")


def labels_from_seg(seg, datasets, labels_grid):
    """The uint8 label array (z, y, x) on ``labels_grid`` (an image with the series' geometry)
    that a SEG object holds for the slices of ``datasets``: each segment's organ read from its
    coded property type, each frame placed by its source slice's position."""
    by_meaning = {name: label for label, name in ORGAN_CODES.items()}
    segment_label = {}
    for description in seg.SegmentSequence:
        meaning = description.SegmentedPropertyTypeCodeSequence[0].CodeMeaning
        code = description.SegmentedPropertyTypeCodeSequence[0].CodeValue
        label = by_meaning.get(meaning)
        if label is None or code != _code_value(label):
            raise ValueError(f"segment {description.SegmentNumber}: {meaning} ({code}) is not "
                             "one of our organs")
        segment_label[int(description.SegmentNumber)] = label
    size_x, size_y, size_z = labels_grid.GetSize()
    volume = np.zeros((size_z, size_y, size_x), np.uint8)
    if not segment_label:
        return volume
    uids = [d.SOPInstanceUID for d in datasets]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=sorted(segment_label),
        combine_segments=False, assert_missing_frames_are_empty=True)  # (frames, y, x, segments)
    for z, frame in zip(frame_slices(labels_grid, datasets), pixels):
        for channel, number in enumerate(sorted(segment_label)):
            mask = frame[..., channel] > 0
            if np.any(volume[z][mask]):
                raise ValueError(f"segments overlap in slice {z}")
            volume[z][mask] = segment_label[number]
    return volume


def _code_value(label):
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, ORGAN_CODES[label]).value


def write_dicom_seg(labels, source_files, path, provenance=None, weights_dir=None):
    """Write ``labels`` (uint8, on the grid of the DICOM series ``source_files``) as one DICOM SEG
    file at ``path``, atomically: a temporary name beside it, flushed, read back with highdicom
    and compared voxel for voxel, then renamed. Returns notes (identifiers filled in).

    Raises ``OutputError`` (an OSError) naming the file and the reason; nothing is left behind.
    """
    import highdicom as hd

    path = Path(path)
    staged = path.parent / f"{image_io.partial_name()}.dcm"
    try:
        datasets, notes = source_datasets(source_files)
        seg = segmentation(labels, datasets, algorithm_identification(provenance, weights_dir))
        seg.save_as(str(staged))
        image_io.sync(staged)
        back = hd.seg.segread(str(staged))
        if not np.array_equal(labels_from_seg(back, datasets, labels),
                              sitk.GetArrayViewFromImage(labels)):
            raise image_io.OutputError("it reads back with other voxel values")
        os.replace(staged, path)
        return notes
    except (OSError, ValueError, AttributeError, KeyError) as error:
        raise image_io.OutputError(f"{path}: cannot be written as DICOM SEG: {error}") from None
    finally:
        staged.unlink(missing_ok=True)


def existing_seg_problem(path, source_files, labels_grid):
    """None if ``path`` is a DICOM SEG that reads whole, references every slice of the series
    ``source_files`` and lies on ``labels_grid``; else why not."""
    import highdicom as hd

    if not Path(path).is_file():
        return f"{Path(path).name} missing"
    try:
        datasets, _ = source_datasets(source_files)
        labels_from_seg(hd.seg.segread(str(path)), datasets, labels_grid)
    except Exception as error:  # any failure to read it back means: segment again
        return f"unreadable as a DICOM SEG over this series ({error})"
    return None
