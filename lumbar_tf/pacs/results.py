"""One study's DICOM results: the SR and the overlay Secondary Capture, built from a `StudyResult`.

    result = predict_study(predictor, study_dir)
    paths = write_dicom_results(result, "dicom_out")          # for the PACS the study came from
    paths = write_dicom_results(result, "research", deidentify=True)

Both files carry the source's Study Instance UID (each in a new series) and reference the source
instances, so a viewer lists them with the study. With ``deidentify`` they carry no identifiers
(`source.deidentified`) and point at the research copy's remapped UIDs instead.
"""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from lumbar_tf.core.errors import DicomError
from lumbar_tf.core.io import write_bytes_atomic
from lumbar_tf.pacs import overlay as sc_overlay
from lumbar_tf.pacs import source as src
from lumbar_tf.pacs import sr as sr_module

SR_FILE = "sr.dcm"
OVERLAY_FILE = "overlay_sc.dcm"


def build_dicom_results(result, *, deidentify: bool = False) -> dict[str, Dataset]:
    """``{"sr": Dataset, "overlay": Dataset}`` for a `runtime.predictor.StudyResult`; the overlay is
    left out when the study has no midline slice to draw it on.

    Raises:
        DicomError: the levels lie on no readable source series.
    """
    from lumbar_tf.report.heatmaps import midline_image

    midline = result.midline()
    series = midline[0] if midline else None
    if series is None:
        raise DicomError(result.study.path, "no midline sagittal slice holds the level positions; no SR")
    headers = src.series_headers(series)
    model = result.predictions.get("model") or {}
    # A Keras run has no exported version: the SR and the overlay both name it `sr.DEV_VERSION`.
    predictions = {**result.predictions, "model": {**model, "version": sr_module.model_version(model)}}
    if deidentify:
        headers = {n: src.deidentified(ds) for n, ds in headers.items()}
        predictions = copy.deepcopy(predictions)
        predictions["study_id"] = src.research_id(predictions["study_id"])
    out = {"sr": sr_module.build_sr(predictions, headers)}
    image = midline_image(result)
    instance = next(lv["instance_number"] for lv in predictions["levels"] if lv.get("instance_number"))
    if image is not None:
        sl = series.slices[series.index_of_instance(int(instance))]
        out["overlay"] = sc_overlay.build_overlay(
            sc_overlay.overlay_rgb(predictions, image),
            headers[int(instance)],
            row_dir=sl.row_dir,
            col_dir=sl.col_dir,
        )
    if deidentify:
        for ds in out.values():
            src.mark_deidentified(ds)
    return out


def dataset_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM file (preamble, file meta) in memory."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom_results(result, out_dir, *, deidentify: bool = False) -> list[Path]:
    """Write ``sr.dcm`` and ``overlay_sc.dcm`` of one study into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    names = {"sr": SR_FILE, "overlay": OVERLAY_FILE}
    return [
        write_bytes_atomic(out / names[key], dataset_bytes(ds))
        for key, ds in build_dicom_results(result, deidentify=deidentify).items()
    ]
