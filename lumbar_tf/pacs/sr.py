"""predictions.json as a DICOM Comprehensive 3D SR (TID 1500 measurement report), written with highdicom.

One TID 1410 group per disc level: the level's position as a SCOORD POINT on the midline sagittal
source instance, finding site the SNOMED CT disc of that level, and per condition the predicted
grade (a qualitative evaluation) and the four grade probabilities (measurements, unit "1"). Each
group names the model (algorithm name and version) and carries the intended-use text as an algorithm
parameter, so a reporting system that shows the SR shows both. `read_sr` reads such a file back
to the numbers of predictions.json (the tests compare them).

Codes: grades and disc levels are SNOMED CT; the conditions and the probability concepts have no
standard code and use the private scheme `SCHEME` (declared in the file's Coding Scheme
Identification Sequence).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import INTENDED_USE

SCHEME = "99LUMBARTF"
SCHEME_NAME = "lumbar-tf local codes"
MANUFACTURER = "lumbar-tf"
SR_SERIES_NUMBER = 9901
# The version of a model that has no exported one (a Keras run folder or .keras file).
DEV_VERSION = "dev"

_GRADE_CODES = (codes.SCT.Absent, codes.SCT.Mild, codes.SCT.Moderate, codes.SCT.Severe)
# The disc below each lumbar vertebra (SNOMED CT), meaning without the "(body structure)" suffix that
# would pass the 64 characters a code meaning may hold.
_DISC_CODES = {
    level: CodedConcept(code.value, code.scheme_designator, code.meaning.replace(" (body structure)", ""))
    for level, code in zip(
        L.LEVELS,
        (
            codes.SCT.IntervertebralDiscStructureOfFirstLumbarVertebra,
            codes.SCT.IntervertebralDiscStructureOfSecondLumbarVertebra,
            codes.SCT.IntervertebralDiscStructureOfThirdLumbarVertebra,
            codes.SCT.IntervertebralDiscStructureOfFourthLumbarVertebra,
            codes.SCT.IntervertebralDiscStructureOfFifthLumbarVertebra,
        ),
        strict=True,
    )
}
_UNIT = CodedConcept("1", "UCUM", "no units")
_PROCEDURE = CodedConcept("MRLSPINE", SCHEME, "MR lumbar spine degeneration grading")
_FINDING = CodedConcept("DISCLEVEL", SCHEME, "Intervertebral disc level")


def condition_code(condition: str) -> CodedConcept:
    return CodedConcept(condition.upper(), SCHEME, L.CONDITION_TITLES[condition])


def probability_code(condition: str, grade: int) -> CodedConcept:
    return CodedConcept(
        f"{condition.upper()}_P{grade}", SCHEME, f"P({L.GRADES[grade]}) {L.CONDITION_TITLES[condition]}"[:64]
    )


def result_series_description(model: dict) -> str:
    """The SR series' description, naming model and version: how a PACS node recognises a study
    that this model version has graded already."""
    name, version = model_label({"model": model})
    return f"lumbar-tf {name} v{version} SR"[:64]


def model_version(model: dict) -> str:
    """The version a result names: the exported version, or ``DEV_VERSION`` for a model that has
    none (a Keras run), so no SR, overlay or node key reads ``vNone``."""
    version = model.get("version")
    return DEV_VERSION if version in (None, "") else str(version)


def model_label(predictions: dict) -> tuple[str, str]:
    """``(name, version)`` of the model behind a predictions dict, as text."""
    model = predictions.get("model") or {}
    return str(model.get("name", "")), model_version(model)


def _algorithm(predictions: dict) -> hd.sr.AlgorithmIdentification:
    name, version = model_label(predictions)
    return hd.sr.AlgorithmIdentification(name=name, version=version, parameters=[INTENDED_USE])


def _level_group(predictions: dict, level: str, point, source: Dataset | None):
    cells = {c["condition"]: c for c in predictions["cells"] if c["level"] == level}
    evaluations, measurements = [], []
    for condition in L.CONDITIONS:
        cell = cells[condition]
        grade = _GRADE_CODES[int(cell["grade"])]
        evaluations.append(hd.sr.QualitativeEvaluation(name=condition_code(condition), value=grade))
        for grade, p in enumerate(cell["grade_probs"]):
            measurements.append(
                hd.sr.Measurement(name=probability_code(condition, grade), value=float(p), unit=_UNIT)
            )
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=L.LEVEL_TITLES[level]),
        finding_type=_FINDING,
        finding_sites=[hd.sr.FindingSite(anatomic_location=_DISC_CODES[level])],
        algorithm_id=_algorithm(predictions),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    if source is None or point is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.asarray([point], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def build_sr(
    predictions: dict,
    source_headers: dict[int, Dataset],
    *,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The SR of one study's predictions.

    Args:
        predictions: the predictions.json dict.
        source_headers: ``instance_number -> header`` of the series the levels lie on (the midline
            Sagittal T2/STIR); their patient and study modules are copied into the SR (pass
            `source.deidentified` copies for a research file). At least one header is needed.
        series_instance_uid: the SR series (default: a new UID).
    """
    if not source_headers:
        raise ValueError("build_sr: no source headers")
    name, version = model_label(predictions)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, name, version]),
        name=f"{name} {version}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=name[:64] or MANUFACTURER,
        serial_number=version[:64] or None,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    groups = []
    referenced = []
    for entry in predictions["levels"]:
        instance = entry.get("instance_number")
        source = source_headers.get(int(instance)) if instance is not None else None
        point = None
        if source is not None and entry.get("x") is not None and entry.get("y") is not None:
            point = (float(entry["x"]), float(entry["y"]))
            if source not in referenced:
                referenced.append(source)
        groups.append(_level_group(predictions, entry["level"], point, source))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
    )
    evidence = referenced or [next(iter(source_headers.values()))]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=result_series_description(predictions.get("model") or {}),
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _algorithm_items(group) -> dict[str, str]:
    """TEXT items of a group's algorithm identification (TID 4019), by DCM code value."""
    items = {}
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT":
            items[item.ConceptNameCodeSequence[0].CodeValue] = str(item.TextValue)
    return items


def read_sr(ds: Dataset) -> dict:
    """Read an SR written by `build_sr` back to predictions.json numbers.

    Returns ``{"model": {"name", "version"}, "intended_use", "cells": {(condition, level): {"grade",
    "grade_probs"}}, "levels": {level: {"sop_instance_uid", "x", "y"}}}``.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    grade_by_code = {code.value: g for g, code in enumerate(_GRADE_CODES)}
    level_by_title = {L.LEVEL_TITLES[lv]: lv for lv in L.LEVELS}
    out = {"model": {}, "intended_use": None, "cells": {}, "levels": {}}
    groups = list(sr.content.get_planar_roi_measurement_groups()) or []
    groups += [
        g
        for g in sr.content.get_image_measurement_groups()
        if not isinstance(g, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
    ]
    for group in groups:
        level = level_by_title[group.tracking_identifier]
        algorithm = _algorithm_items(group)
        out["model"] = {"name": algorithm.get("111001"), "version": algorithm.get("111003")}
        out["intended_use"] = algorithm.get("111002")
        grades = {}
        for evaluation in group.get_qualitative_evaluations():
            grades[evaluation.name.value] = grade_by_code[evaluation.value.value]
        probs: dict[str, list] = {}
        for measurement in group.get_measurements():
            condition_code_value, grade = measurement.name.value.rsplit("_P", 1)
            probs.setdefault(condition_code_value, [None] * L.N_GRADES)[int(grade)] = float(measurement.value)
        for condition in L.CONDITIONS:
            out["cells"][(condition, level)] = {
                "grade": grades[condition.upper()],
                "grade_probs": probs[condition.upper()],
            }
        region = getattr(group, "roi", None)
        if region is not None:
            x, y = (float(v) for v in region.value[0])
            ref = region.ContentSequence[0].ReferencedSOPSequence[0]
            out["levels"][level] = {"sop_instance_uid": ref.ReferencedSOPInstanceUID, "x": x, "y": y}
    return out
