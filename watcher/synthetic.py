"""Synthetic DICOM studies for the demo, the tests and the benchmark.

Real DICOM Part 10 files (preamble, File Meta, explicit VR little endian),
built with pydicom, with small pixel data so that a study costs little disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

UID_ROOT = "1.2.826.0.1.3680043.10.1389."


@dataclass
class StudySpec:
    """What to generate: one study with `series` series of `instances` each."""

    patient_id: str = "SUBJ01"
    patient_name: str = "Doe^Jane"
    description: str = "SMITH^Memory"
    institution: str = "Princeton University"
    study_date: str = "20261125"
    series: int = 2
    instances: int = 5
    rows: int = 8
    columns: int = 8
    study_uid: str = field(default_factory=lambda: generate_uid(prefix=UID_ROOT))
    extra: dict[str, str] = field(default_factory=dict)


def make_dataset(**tags: object) -> Dataset:
    """A minimal valid MR instance; keyword arguments set or override tags."""
    rows = int(tags.pop("Rows", 8))  # type: ignore[call-overload]
    columns = int(tags.pop("Columns", 8))  # type: ignore[call-overload]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.StudyInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.Modality = "MR"
    ds.PatientID = "SUBJ01"
    ds.PatientName = "Doe^Jane"
    ds.StudyDate = "20261125"
    ds.StudyTime = "101500"
    ds.StudyDescription = "SMITH^Memory"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "T1_MPRAGE"
    ds.ProtocolName = "T1_MPRAGE"
    ds.InstanceNumber = 1
    ds.InstitutionName = "Princeton University"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    # Geometry, so that converters (dcm2niix) can stack the slices of a series.
    instance = int(tags.get("InstanceNumber", 1))  # type: ignore[call-overload]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(instance)]
    ds.SliceLocation = float(instance)
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.AcquisitionNumber = 1
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "PixelData" not in tags:
        seed = int(ds.SOPInstanceUID.rsplit(".", 1)[-1][-6:] or 0)
        ds.PixelData = bytes((seed + i) % 251 for i in range(rows * columns * 2))
    return ds


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def study_datasets(spec: StudySpec) -> Iterator[Dataset]:
    """The instances of one study, series by series."""
    for series_number in range(1, spec.series + 1):
        series_uid = generate_uid(prefix=UID_ROOT)
        description = ["T1_MPRAGE", "rfMRI_REST", "DWI_AP", "fmap_PA"][(series_number - 1) % 4]
        for instance_number in range(1, spec.instances + 1):
            yield make_dataset(
                PatientID=spec.patient_id,
                PatientName=spec.patient_name,
                StudyDescription=spec.description,
                InstitutionName=spec.institution,
                StudyDate=spec.study_date,
                StudyInstanceUID=spec.study_uid,
                SeriesInstanceUID=series_uid,
                SeriesNumber=series_number,
                SeriesDescription=description,
                ProtocolName=description,
                InstanceNumber=instance_number,
                Rows=spec.rows,
                Columns=spec.columns,
                **spec.extra,
            )


def write_study(spec: StudySpec, folder: str | os.PathLike[str]) -> list[Path]:
    """Write a study as storescp would in a flat inbox: `MR.<SOPInstanceUID>`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_dataset(ds, folder / f"MR.{ds.SOPInstanceUID}") for ds in study_datasets(spec)]
