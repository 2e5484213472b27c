"""DICOM files for tests, written with pydicom: CT series of any geometry (oblique, head first or
feet first), localizers, dose reports and MR series, as a PACS exports them."""

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"  # how a CT dose report often arrives
X_RAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


def _file_meta(sop_class, sop_instance):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _base(sop_class, study_uid, series_uid, modality, patient_id):
    dataset = Dataset()
    dataset.file_meta = _file_meta(sop_class, generate_uid())
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = modality
    dataset.PatientID = patient_id
    dataset.PatientName = "Test^Patient"
    dataset.StudyDate = "20260101"
    dataset.SeriesNumber = 1
    return dataset


def write_ct_series(image, folder, series_uid=None, study_uid=None, frame_uid=None,
                    patient_id="P1", modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                    description="abdomen 3.0", file_order=None, prefix="IM", sop_class=None):
    """One file per slice of ``image`` (int16 HU), positions and orientation from its geometry.

    ``file_order``: the slice index each file number holds (default 0, 1, ...; reversed for a
    series stored the other way); files are named PREFIX00000 etc., without a suffix, as archives
    name them. ``sop_class``: another SOP class than CT's (MR's for modality MR). Returns the
    file paths in file-number order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    voxels = sitk.GetArrayFromImage(image).astype(np.int16)  # (z, y, x)
    order = list(file_order) if file_order is not None else list(range(voxels.shape[0]))
    sop_class = sop_class or (MR_IMAGE if modality == "MR" else CT_IMAGE)
    paths = []
    for number, z in enumerate(order):
        dataset = _base(sop_class, study_uid, series_uid, modality, patient_id)
        dataset.FrameOfReferenceUID = frame_uid
        dataset.ImageType = list(image_type)
        dataset.SeriesDescription = description
        dataset.Manufacturer = "TESTCO"
        dataset.ManufacturerModelName = "Scanner 9"
        dataset.InstanceNumber = number + 1
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in
                                        image.TransformIndexToPhysicalPoint((0, 0, int(z)))]
        dataset.ImageOrientationPatient = [f"{v:.8f}" for v in
                                           (*direction[:, 0], *direction[:, 1])]
        dataset.PixelSpacing = [f"{image.GetSpacing()[1]:g}", f"{image.GetSpacing()[0]:g}"]
        dataset.SliceThickness = f"{image.GetSpacing()[2]:g}"
        dataset.Rows, dataset.Columns = voxels.shape[1], voxels.shape[2]
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = 1
        dataset.RescaleIntercept, dataset.RescaleSlope = "0", "1"
        dataset.PixelData = np.ascontiguousarray(voxels[int(z)]).tobytes()
        path = folder / f"{prefix}{number:05d}"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dose_report(path, study_uid, patient_id="P1"):
    """A structured report (no pixels) as a CT dose report arrives in an export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = _base(X_RAY_DOSE_SR, study_uid, generate_uid(), "SR", patient_id)
    dataset.SeriesDescription = "Dose Report"
    dataset.save_as(path, enforce_file_format=True)
    return path


def read_back(path):
    return pydicom.dcmread(path)
