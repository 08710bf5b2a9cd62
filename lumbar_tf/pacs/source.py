"""The source instances a DICOM result points at, and the research (de-identified) copy of their headers.

The SR and the overlay are the one place where the patient module is copied from the source study:
they go back to the PACS the study came from and must file under the same patient. `deidentified`
makes the headers of a research copy instead: the patient and study identifiers are replaced and
every UID is remapped the same way for the same source UID, so the research SR and overlay still
point at the research copy of the same study.
"""

from __future__ import annotations

import hashlib

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lumbar_tf.core.errors import DicomError

# Identifying attributes a research copy must not carry (PS3.15 basic profile, the ones an MR
# header of this kind holds). The UIDs are remapped, not removed.
_REMOVED = (
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MilitaryRank",
    "EthnicGroup",
    "PatientComments",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianAddress",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "IssuerOfPatientID",
    "RequestAttributesSequence",
    "AdmissionID",
)
_EMPTIED = ("PatientBirthDate", "ReferringPhysicianName", "AccessionNumber", "StudyID", "PatientSex")
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
RESEARCH_PATIENT_NAME = "RESEARCH^COPY"


def read_header(path) -> Dataset:
    """One source instance's header (no pixels)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise DicomError(path, f"cannot read header ({exc})") from None


def series_headers(series) -> dict[int, Dataset]:
    """``instance_number -> header`` for every slice of a `dicom.reader.Series`."""
    return {sl.instance_number: read_header(sl.path) for sl in series.slices}


def research_id(value: str) -> str:
    """A stable pseudonym for an identifier (same input, same pseudonym; not reversible)."""
    return "R" + hashlib.sha256(str(value).encode("utf-8")).hexdigest()[:15].upper()


def remap_uid(uid: str) -> str:
    """The research copy's UID for a source UID (deterministic, so references stay consistent)."""
    return generate_uid(entropy_srcs=["lumbar-tf research copy", str(uid)])


def deidentified(ds: Dataset) -> Dataset:
    """A copy of a source header with the patient/study identifiers replaced and the UIDs remapped."""
    out = Dataset()
    out.update(ds)
    out.file_meta = getattr(ds, "file_meta", Dataset())
    for keyword in _REMOVED:
        if keyword in out:
            delattr(out, keyword)
    for keyword in _EMPTIED:
        if keyword in out:
            setattr(out, keyword, "")
    out.PatientName = RESEARCH_PATIENT_NAME
    out.PatientID = research_id(ds.get("PatientID", ""))
    for keyword in _UIDS:
        if keyword in ds:
            setattr(out, keyword, remap_uid(getattr(ds, keyword)))
    return mark_deidentified(out)


def mark_deidentified(ds: Dataset) -> Dataset:
    """Say in the header that the identifiers were removed, and how (Patient Identity Removed)."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "lumbar-tf research copy: identifiers replaced, UIDs remapped"
    return ds
