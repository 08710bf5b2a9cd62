"""The per-disc overlay (`report.heatmaps.levels_figure`) as a DICOM Secondary Capture image.

A viewer shows it as one more series of the study: the midline sagittal slice with the disc levels
marked in their worst severity's colour and labelled with grade and probability, the model name and
the intended-use line burned in. It references the source slice (Source Image Sequence) and copies
the patient and study modules from it, so it files with the study it came from.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.report.heatmaps import levels_figure

MANUFACTURER = "lumbar-tf"
SC_SERIES_DESCRIPTION = "lumbar-tf disc levels (overlay)"
SC_SERIES_NUMBER = 9902


def figure_rgb(fig, dpi: int = 100) -> np.ndarray:
    """A matplotlib Figure rendered to RGB uint8 ``[H, W, 3]`` (Agg, no window, no file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    fig.set_facecolor("white")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def overlay_rgb(predictions: dict, midline_image: np.ndarray) -> np.ndarray:
    """The per-disc overlay picture as RGB pixels (what `levels.png` shows)."""
    return figure_rgb(levels_figure(predictions, midline_image))


def _orientation_letter(direction) -> str:
    """The patient-orientation letter (LPS) of a unit direction's main axis."""
    axis = int(np.argmax(np.abs(direction)))
    positive = ("L", "P", "H")[axis]
    negative = ("R", "A", "F")[axis]
    return positive if direction[axis] > 0 else negative


def build_overlay(
    rgb: np.ndarray,
    source: Dataset,
    *,
    row_dir=None,
    col_dir=None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
) -> hd.sc.SCImage:
    """A Secondary Capture of ``rgb`` filed with ``source``'s patient and study.

    Args:
        rgb: ``[H, W, 3]`` uint8 picture.
        source: header of the source slice the picture shows (the midline slice; pass a
            `source.deidentified` copy for a research file).
        row_dir, col_dir: the source slice's direction of increasing column / row index (LPS), for
            the Patient Orientation a viewer prints at the image edges.
    """
    orientation = None
    if row_dir is not None and col_dir is not None:
        orientation = (_orientation_letter(row_dir), _orientation_letter(col_dir))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.asarray(rgb, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("P", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    sc.ImageComments = INTENDED_USE
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "lumbar-tf per-disc overlay of the midline sagittal slice"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
