"""DICOM films as a modality sends them (CR / DX, with patient, study and series), for the node's
tests. Unlike ``synthetic.write_dicom`` (a bare Secondary Capture), these carry the study a
result must go back into."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"


def film_dataset(pixels: "np.ndarray | None", *, sop_class: str = DX, study_uid: str | None = None,
                 sop_uid: str | None = None, patient_id: str = "CXR-TEST-1", transfer_syntax: str | None = None,
                 **tags):
    """A CR/DX dataset holding uint16 ``pixels`` (12 bits stored), with file meta."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Film"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR" if sop_class == CR else "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def write_film(path: "str | Path", pixels: "np.ndarray | None", **kw) -> Path:
    ds = film_dataset(pixels, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def chest_pixels(seed: int = 0, size: int = 96) -> np.ndarray:
    """uint16 film with a chest-like layout (synthetic.chest_like), 12-bit."""
    from synthetic import chest_like

    return chest_like(np.random.default_rng(seed), size).astype(np.uint16) * 16
