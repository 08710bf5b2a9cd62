"""A picture of one study: midline Sagittal T2, a foramen slice of Sagittal T1, one axial slice, and
the grades the study carries (`lumbar-tf picture`). Shows no header fields, so it carries no PHI."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.ids import check_study_id
from lumbar_tf.data.dataset import read_index
from lumbar_tf.dicom.reader import DicomError, read_study
from lumbar_tf.preprocess import choose_slices, normalize_percentile
from lumbar_tf.report.heatmaps import save_png


def _slice_image(series, offset_mm: float) -> tuple[np.ndarray, int]:
    index = choose_slices(series, [offset_mm])[0]
    pixels = series.load_pixels([index])
    return normalize_percentile(pixels, 0.5, 99.5)[0], series.slices[index].instance_number


def save_study_picture(data_dir, study_id: str, out_path) -> Path:
    """Write a PNG of one study of an RSNA-layout folder with its grade table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = read_index(data_dir)
    sid = check_study_id(study_id, str(data_dir))
    study = read_study(index.images_dir / sid, index.descriptions.get(sid))
    for warning in study.warnings:  # e.g. a file dropped as unreadable: the picture lacks it
        print(f"warning: study {sid}: {warning}", file=sys.stderr)
    panels = []
    for desc, offset, title in (
        ("Sagittal T2/STIR", 0.0, "Sagittal T2/STIR, midline"),
        ("Sagittal T1", 22.0, "Sagittal T1, left foramen (+22 mm)"),
    ):
        series = study.series_by_description(desc)
        if series is not None:
            image, instance = _slice_image(series, offset)
            panels.append((image, f"{title}\ninstance {instance}", series, instance))
    axial = study.series_by_description("Axial T2")
    if axial is not None:
        # The slice nearest the middle of the stack sits at a disc level in the phantom.
        pick = len(axial.slices) * 3 // 4
        pixels = normalize_percentile(axial.load_pixels([pick]), 0.5, 99.5)[0]
        panels.append((pixels, f"Axial T2\ninstance {axial.slices[pick].instance_number}", axial, None))
    if not panels:
        raise DicomError(study.path, "no series to show")

    labels = index.studies.get(sid)
    fig = plt.figure(figsize=(4 * len(panels) + 4.5, 5))
    grid = fig.add_gridspec(1, len(panels) + 1, width_ratios=[1] * len(panels) + [1.2])
    for i, (image, title, series, instance) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        if labels is not None and instance is not None:
            for row in labels.coordinates:
                if row["series_id"] == series.series_id and row["instance_number"] == instance:
                    ax.plot(row["x"], row["y"], "r+", markersize=8)
                    if row["condition"] == "spinal_canal_stenosis":
                        ax.text(
                            row["x"] + 6, row["y"], L.LEVEL_TITLES[row["level"]], color="yellow", fontsize=7
                        )
    ax = fig.add_subplot(grid[0, -1])
    ax.axis("off")
    if labels is not None:
        short = {-1: "?", -2: "N/M", 0: "none", 1: "mild", 2: "MOD", 3: "SEV"}
        cells = [[short[int(g)] for g in labels.grades[ci]] for ci in range(L.N_CONDITIONS)]
        names = ["canal", "L foramen", "R foramen", "L subartic.", "R subartic."]
        table = ax.table(
            cells, rowLabels=names, colLabels=[L.LEVEL_TITLES[lv] for lv in L.LEVELS], loc="center"
        )
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        ax.set_title(f"grades of study {sid}", fontsize=9)
    fig.suptitle("phantom study (research use only)", fontsize=10)
    fig.tight_layout()
    out_path = save_png(fig, out_path, dpi=90)
    plt.close(fig)
    return out_path
