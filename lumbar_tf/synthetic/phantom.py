"""Phantom lumbar-spine MRI studies written as real DICOM in the RSNA 2024 layout.

Why a phantom: tests, demos and CPU smoke-training need studies whose grades are *known*, whose grades
are readable only from anatomy, and whose DICOM exercises every reader path (tilted axial stacks,
shuffled instance numbers, rescale slope/intercept, signed and unsigned pixels, varying matrices and
spacings) -- without shipping patient data.

How it works
------------
The anatomy lives in *spine coordinates* ``(s, d, l)``, millimetres:

* ``s`` arc length along the lordotic curve of the vertebral-body centre line, head -> feet;
* ``d`` distance from that centre line towards posterior (``d = D`` is the posterior body wall);
* ``l`` lateral offset from the spine's midline, patient left positive (= patient +x, LPS).

The centre line (`Centreline`: thoracic kyphosis, lumbar lordosis growing towards L5/S1, sacral
kyphosis) lies in the sagittal (y, z) plane; a point's (s, d) is the foot of its perpendicular on the
curve. Every series samples the same `Phantom` at its own pixel centres, so Sagittal T1, Sagittal
T2/STIR and the tilted Axial T2 show one anatomy, and every label point is an exact anatomical point
mapped through the DICOM geometry.

Shapes are signed-distance functions (negative inside) turned into soft occupancies one pixel wide and
painted back to front; a cell's latent severity (`sample_grades`; its label is the latent plus a
reader's noise, cut into grades) changes only the geometry a radiologist reads:

* spinal canal stenosis at a disc: disc bulge + ligamentum flavum close the CSF column from the front and
  the back (remaining antero-posterior fraction ~1.0 / 0.72 / 0.48 / 0.20 for grades 0-3), strongest in
  the midline, a little at the lateral recesses;
* subarticular stenosis: that side's lateral recess (``l = +-RECESS_OFFSET_MM``) closes the same way
  (narrowing ~0.03 / 0.30 / 0.55 / 0.85), seen on the paramedian sagittal slice and the axial slices;
* foraminal narrowing: that side's foramen (``l = +-FORAMEN_OFFSET_MM``) shrinks towards its exiting root
  (scale ~1.0 / 0.8 / 0.6 / 0.4) and the dark tissue left behind replaces the fat around the root.

Study-to-study nuisance (body size, lordosis, position, series matrices/spacings/slice counts, T2 or
STIR contrast, tissue contrast, gain, bias field, texture, Rician noise, rescale slope/intercept) is
drawn independently of the grades.

Acquisition (`ACQUISITIONS`): "realistic" plans every series on its own as RSNA 2024 studies were
scanned (0.5-0.9 mm pixels, 320-640 matrices, fields holding the lower thoracic spine with the lumbar
spine down to the lower half, rotated off-midline stacks, repeats, missing series, JPEG Lossless for a
share; README "Phantom studies" gives the fact behind each choice); "centred" is the earlier coarse,
spine-centred acquisition the pipeline was built on.

Public API: `synthesize_dataset` writes a dataset (with ``train_latent.csv``, read by `read_latent`);
`iter_studies` yields the same studies in memory with their ground truth
(`SyntheticStudy.phantom.landmark` gives each label's anatomical point in patient mm);
`synthesize_study` + `write_study` make and write one study; `sample_grades` draws grades only;
`FAKE_PHI` / `phi_values` name the fake identifiers written into the headers.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import math
import multiprocessing
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

from lumbar_tf.core.labels import (
    CONDITION_TITLES,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    N_CONDITIONS,
    N_LEVELS,
    UNKNOWN,
    grade_to_rsna,
)

__all__ = [
    "ACQUISITIONS",
    "AXIAL_T2",
    "FAKE_PHI",
    "GRADE_CUTS",
    "LATENT_FILE",
    "READER_NOISE_SD",
    "FORAMEN_OFFSET_MM",
    "RECESS_OFFSET_MM",
    "SAGITTAL_T1",
    "SAGITTAL_T2",
    "SERIES_DESCRIPTIONS",
    "Centreline",
    "GradeDraw",
    "Phantom",
    "SeriesGeometry",
    "SyntheticSeries",
    "SyntheticStudy",
    "iter_studies",
    "nearest_slice",
    "phi_values",
    "read_latent",
    "read_on",
    "sample_grades",
    "synthesize_dataset",
    "synthesize_study",
    "write_study",
]

SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2 = "Sagittal T1", "Sagittal T2/STIR", "Axial T2"
SERIES_DESCRIPTIONS = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)

# Nominal lateral centres (mm from the spine midline, before the per-study body-size scale).
# Real lumbar anatomy: the canal is ~20-25 mm wide with its lateral recesses at ~8-9 mm from the midline;
# RSNA foraminal points lie 2-4 sagittal slices (~8-16 mm) from the midline slice.
RECESS_OFFSET_MM = 8.5
FORAMEN_OFFSET_MM = 15.0

# Fake identifiers written into the PHI tags; ``{study_id}`` is replaced per study so a de-identification
# test can grep any output for `phi_values(study_id)`.
FAKE_PHI = {
    "PatientName": "PHANTOM^PATIENT^S{study_id}",
    "PatientID": "PHI-{study_id}",
    "OtherPatientIDs": "PHI-OTHER-{study_id}",
    "PatientBirthDate": "19000101",
    "PatientAddress": "1 PHANTOM STREET PHI-TOWN {study_id}",
    "InstitutionName": "PHANTOM GENERAL HOSPITAL {study_id}",
    "InstitutionAddress": "2 PHANTOM AVENUE PHI-CITY {study_id}",
    "ReferringPhysicianName": "PHANTOM^REFERRER^S{study_id}",
    "PerformingPhysicianName": "PHANTOM^RADIOGRAPHER^S{study_id}",
    "OperatorsName": "PHANTOM^OPERATOR^S{study_id}",
    "AccessionNumber": "ACC{study_id}",
    "StudyID": "SID{study_id}",
    "StationName": "PHANTOM-STN",
    "DeviceSerialNumber": "PHSN-{study_id}",
}


def phi_values(study_id: int) -> list[str]:
    """Every fake identifier string written into the headers of `study_id`'s files."""
    return [template.format(study_id=int(study_id)) for template in FAKE_PHI.values()]


# ---------------------------------------------------------------------------------------------------
# Grades
# ---------------------------------------------------------------------------------------------------

UNKNOWN_FRACTION = 0.02
# Ordinal probit: latent severity = study degeneration + level factor (+ side factor) + cell factor; the
# label is the latent plus the reader's noise, cut at these thresholds. Calibrated on 200k draws to none
# 47%, mild 32%, moderate 14.5%, severe 6.5% overall, with L4/L5 and L5/S1 about five times as often
# moderate/severe as L1/L2. The anatomy follows the latent severity, the label follows latent + noise:
# the reader noise is what keeps a perfect score out of reach (`lumbar_tf.training.metrics.
# bayes_optimal_threshold_probs` is the best any model can do).
_LEVEL_MU = np.array([-0.95, -0.6, -0.2, 0.35, 0.2])
_CONDITION_MU = np.array([0.0, 0.0, 0.0, 0.1, 0.1])
GRADE_CUTS = (-0.283, 0.706, 1.487)
READER_NOISE_SD = 0.25
_CELL_SD = math.sqrt(0.5**2 - READER_NOISE_SD**2)  # cell factor + reader noise keep the old 0.5 spread
_STUDY_WEIGHT, _LEVEL_SD, _SIDE_SD = 0.6, 0.55, 0.35
# Subarticular cells keep only this share of the deviation the shared factors give them and get the rest
# from an own factor of the same variance (`_subarticular_own`), so their marginal -- and their grade
# distribution -- is unchanged while their correlation with the canal and the same-side foramen drops
# from ~0.65 / ~0.72 to ~0.45: real sagittal-only models grade subarticular far worse than the canal
# (RSNA 2024 6th place, cross-validated: spinal 0.26, subarticular 0.54) and every strong solution reads
# it on the axial series (README "Phantom studies"; issue 11). The old, stronger correlation was a
# design choice, not a measurement; the shared share is assumed, not measured.
SUBARTICULAR_SHARED = 0.6
_SHARED_VAR = _STUDY_WEIGHT**2 + _LEVEL_SD**2 + _SIDE_SD**2 + _CELL_SD**2
_SUBARTICULAR_STREAM = 0x5AB  # spawn-key word of the subarticular stream (any constant)


class GradeDraw(NamedTuple):
    """One study's grades as drawn by `sample_grades`."""

    grades: np.ndarray  # [condition, level] int 0-3: the label (latent + reader noise, cut)
    known: np.ndarray  # [condition, level] bool: False = written as unknown (empty) in the CSVs
    degeneration: np.ndarray  # [level] 0..1: disc desiccation and height loss
    latent: np.ndarray  # [condition, level] latent severity: what the anatomy shows


def _subarticular_own(rng: np.random.Generator, shared: float) -> np.ndarray:
    """The subarticular cells' own factors [2 sides, level] (variance ``1 - shared**2`` of the shared
    deviation's), from a stream of their own (a child of ``rng``'s seed, ``rng`` untouched) so every
    other draw of a seed stays what it was."""
    seed = rng.bit_generator.seed_seq
    child = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, _SUBARTICULAR_STREAM))
    sd = math.sqrt((1.0 - shared**2) * _SHARED_VAR)
    return sd * np.random.default_rng(child).normal(size=(2, N_LEVELS))


def sample_grades(rng: np.random.Generator, subarticular_shared: float = SUBARTICULAR_SHARED) -> GradeDraw:
    """Draw one study's 25 grades; neighbouring cells correlate through shared study/level/side factors,
    the subarticular cells only with the share ``subarticular_shared`` (1.0: the draw before issue 11,
    for `benchmarks/axial_ablation_labels.py`)."""
    if not 0.0 <= subarticular_shared <= 1.0:
        raise ValueError(f"subarticular_shared must be in [0, 1], not {subarticular_shared}")
    study = rng.normal()
    level = _LEVEL_MU + _LEVEL_SD * rng.normal(size=N_LEVELS)
    side = _SIDE_SD * rng.normal(size=(2, N_LEVELS))  # left, right: shared by foramen and recess
    latent = (
        _STUDY_WEIGHT * study
        + level
        + _CONDITION_MU[:, None]
        + _CELL_SD * rng.normal(size=(N_CONDITIONS, N_LEVELS))
    )
    latent[[1, 3]] += side[0]
    latent[[2, 4]] += side[1]
    mean = _LEVEL_MU + _CONDITION_MU[[3, 4], None]
    own = _subarticular_own(rng, subarticular_shared)
    latent[[3, 4]] = mean + subarticular_shared * (latent[[3, 4]] - mean) + own
    read = latent + READER_NOISE_SD * rng.normal(size=(N_CONDITIONS, N_LEVELS))
    grades = np.digitize(read, GRADE_CUTS).astype(np.int64)
    known = rng.random((N_CONDITIONS, N_LEVELS)) >= UNKNOWN_FRACTION
    # Discs dry out (dark on T2) and lose height with the same latent degeneration, not with a grade.
    degeneration = 1.0 / (
        1.0 + np.exp(-2.2 * (_STUDY_WEIGHT * study + level - 0.1 + 0.3 * rng.normal(size=N_LEVELS)))
    )
    return GradeDraw(grades, known, degeneration, latent)


def _latent_of_grades(grades: np.ndarray) -> np.ndarray:
    """The latent severity at the middle of each grade's interval (for studies drawn with given grades)."""
    cuts = np.asarray(GRADE_CUTS)
    centres = np.concatenate([[cuts[0] - 0.5], 0.5 * (cuts[1:] + cuts[:-1]), [cuts[-1] + 0.5]])
    return centres[np.asarray(grades)]


# Latent severity -> geometry: each table holds the geometry at the middle of grade 0..3's latent
# interval (`_latent_of_grades`), interpolated in between, flat below grade 0 and extrapolated one
# latent unit above grade 3 (then clamped).
_CANAL_NARROWING = np.array([0.03, 0.28, 0.52, 0.80])
_RECESS_NARROWING = np.array([0.03, 0.30, 0.55, 0.85])
_FORAMEN_SCALE = np.array([1.0, 0.80, 0.60, 0.40])


def _latent_effect(table, latent):
    knots = _latent_of_grades(np.arange(4))
    slope = (table[3] - table[2]) / (knots[3] - knots[2])
    return np.interp(latent, [*knots, knots[3] + 1.0], [*table, table[3] + slope])


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Centreline:
    """The curve through the vertebral-body centres in the sagittal (y, z) plane, tabulated every 1 mm.

    ``theta(s)`` is the angle of the feet-ward unit tangent T = (sin theta, -cos theta) from -z towards
    +y; the posterior unit normal is N = (cos theta, sin theta). A spine point (s, d, l) sits at patient
    ``(x_mid + l, C(s) + d N(s))``. Lordosis makes theta grow down the lumbar spine (kyphosis shrink it).
    Lines of constant s are straight (the normals), so an axial plane spanned by x and N(s) is exactly
    the set {s = const}.
    """

    grid: np.ndarray  # s of the table rows (1 mm apart)
    y: np.ndarray
    z: np.ndarray
    theta: np.ndarray

    @classmethod
    def from_angles(cls, grid: np.ndarray, theta: np.ndarray) -> Centreline:
        """Integrate the tangent angle along s (C(0) = origin)."""
        mid = 0.5 * (theta[1:] + theta[:-1])
        step = np.diff(grid)
        y = np.concatenate([[0.0], np.cumsum(np.sin(mid) * step)])
        z = np.concatenate([[0.0], np.cumsum(-np.cos(mid) * step)])
        at0 = np.interp(0.0, grid, np.arange(len(grid)))
        y -= np.interp(at0, np.arange(len(grid)), y)
        z -= np.interp(at0, np.arange(len(grid)), z)
        return cls(grid, y, z, theta)

    def shifted(self, dy: float, dz: float) -> Centreline:
        return dataclasses.replace(self, y=self.y + dy, z=self.z + dz)

    def point(self, s) -> np.ndarray:
        return np.array([np.interp(s, self.grid, self.y), np.interp(s, self.grid, self.z)])

    def posterior(self, s) -> np.ndarray:
        """Unit (y, z) normal towards posterior at s."""
        theta = float(np.interp(s, self.grid, self.theta))
        return np.array([math.cos(theta), math.sin(theta)])

    def to_patient(self, s, d):
        """(y, z) of spine point (s, d)."""
        theta = np.interp(s, self.grid, self.theta)
        return (
            np.interp(s, self.grid, self.y) + d * np.cos(theta),
            np.interp(s, self.grid, self.z) + d * np.sin(theta),
        )

    @functools.cached_property
    def _table(self) -> np.ndarray:
        """Rows of (y, z, T_y, T_z, curvature) on the 1 mm grid, for `_lookup`."""
        kappa = np.gradient(self.theta, self.grid)
        return np.stack([self.y, self.z, np.sin(self.theta), -np.cos(self.theta), kappa], axis=1).astype(
            np.float32
        )

    def to_local(self, y, z, iterations: int = 4):
        """(s, d) of patient (y, z): the foot of the perpendicular on the curve, by Newton's method.

        Starts from the projection on the chord; each step solves (P - C(s)) . T(s) = 0 including the
        curvature term, so a few steps reach float32 precision wherever |d| is below the local radius
        of curvature (everything drawn; farther points only need a sensible answer).
        """
        y = np.asarray(y, np.float32)
        z = np.asarray(z, np.float32)
        g0, g1 = float(self.grid[0]), float(self.grid[-1])
        chord = np.array([self.y[-1] - self.y[0], self.z[-1] - self.z[0]])
        gain = (g1 - g0) / float(chord @ chord)
        s = g0 + ((y - self.y[0]) * (chord[0] * gain) + (z - self.z[0]) * (chord[1] * gain))
        for step in range(iterations + 1):
            s = np.clip(s, g0, g1).astype(np.float32)
            cy, cz, ty, tz, kappa = _lookup(self._table, g0, 1.0, s)
            ry, rz = y - cy, z - cz
            d = rz * ty - ry * tz  # (P - C) . N with N = (-T_z, T_y)
            if step == iterations:
                return s, d
            s = s + (ry * ty + rz * tz) / np.maximum(1.0 - kappa * d, 0.25)
        raise AssertionError("unreachable")


@dataclasses.dataclass
class SeriesGeometry:
    """Per-slice DICOM geometry.

    Pixel (column c, row r) of slice k is at ``ipp[k] + c * pixel_spacing[1] * iop[k, :3]
    + r * pixel_spacing[0] * iop[k, 3:]`` (pixel centres at integers, as in DICOM).
    """

    ipp: np.ndarray  # [n, 3] ImagePositionPatient (mm, already rounded as written)
    iop: np.ndarray  # [n, 6] ImageOrientationPatient (row direction, column direction)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) = DICOM PixelSpacing
    rows: int
    cols: int
    thickness: float
    spacing: float

    @property
    def n(self) -> int:
        return len(self.ipp)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient x, y, z of every pixel centre, as arrays broadcastable to [n, rows, cols].

        A coordinate that does not change along an axis keeps size 1 there (a sagittal slice has one x,
        an axial row direction is pure x), which keeps the rendering cost near one pass per pixel.
        """
        c = np.arange(self.cols, dtype=np.float64) * self.pixel_spacing[1]
        r = np.arange(self.rows, dtype=np.float64) * self.pixel_spacing[0]

        def per_slice(values):  # [n] -> [n, 1, 1], or [1, 1, 1] when every slice shares the value
            return values[:1, None, None] if np.all(values == values[0]) else values[:, None, None]

        out = []
        for a in range(3):
            v = per_slice(self.ipp[:, a])
            if np.any(self.iop[:, a]):
                v = v + per_slice(self.iop[:, a]) * c[None, None, :]
            if np.any(self.iop[:, 3 + a]):
                v = v + per_slice(self.iop[:, 3 + a]) * r[None, :, None]
            out.append(v)
        return tuple(out)

    def resampled(self, rows: int, cols: int) -> SeriesGeometry:
        """The same field on a rows x cols grid (pixel edges coincide, as cv2.resize maps them)."""
        ps = (self.pixel_spacing[0] * self.rows / rows, self.pixel_spacing[1] * self.cols / cols)
        shift = 0.5 * (ps[1] - self.pixel_spacing[1]) * self.iop[:, :3]
        shift = shift + 0.5 * (ps[0] - self.pixel_spacing[0]) * self.iop[:, 3:]
        return dataclasses.replace(self, ipp=self.ipp + shift, pixel_spacing=ps, rows=rows, cols=cols)

    def patient_to_pixel(self, k: int, point) -> tuple[float, float, float]:
        """(column, row, signed distance from the slice plane in mm) of a patient point on slice k."""
        rel = np.asarray(point, np.float64) - self.ipp[k]
        row_dir, col_dir = self.iop[k, :3], self.iop[k, 3:]
        return (
            float(rel @ row_dir / self.pixel_spacing[1]),
            float(rel @ col_dir / self.pixel_spacing[0]),
            float(rel @ np.cross(row_dir, col_dir)),
        )


# ---------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------

# name, body height, AP semi-axis (= posterior wall d), lateral semi-axis, disc height below; mm, before
# the body-size scale. Discs j = 3..7 (below L1 .. below L5) are the five RSNA levels; the sacral
# "discs" are fused remnants drawn as bone.
_VERTEBRAE = (
    ("T7", 17.5, 12.0, 18.0, 4.0),
    ("T8", 18.0, 12.5, 19.0, 4.5),
    ("T9", 18.5, 13.0, 20.0, 4.5),
    ("T10", 19.0, 13.5, 21.0, 5.0),
    ("T11", 20.0, 14.0, 22.0, 5.5),
    ("T12", 21.0, 14.5, 23.0, 6.5),
    ("L1", 23.0, 15.0, 24.5, 8.0),
    ("L2", 24.0, 15.5, 25.5, 9.0),
    ("L3", 25.0, 16.0, 26.5, 10.0),
    ("L4", 25.0, 16.5, 27.0, 11.0),
    ("L5", 25.0, 16.5, 27.5, 10.0),
    ("S1", 27.0, 15.5, 27.0, 2.5),
    ("S2", 21.0, 12.0, 20.0, 2.0),
    ("S3", 17.0, 9.0, 15.0, 0.0),
)
_L1 = 6  # index of L1; disc j lies below vertebra j, so RSNA level k is disc _L1 + k
_S1 = 11
# Canal size relative to the lumbar canal along the column (thoracic and sacral canals are smaller).
_CANAL_SCALE = (0.8, 0.82, 0.84, 0.85, 0.88, 0.92, 0.96, 1.0, 1.0, 1.0, 1.0, 0.9, 0.75, 0.6)

# Tissue signal (T1, T2, STIR), 0..1 before gain, bias and noise.
_TISSUES = {
    "fat": (1.0, 0.75, 0.06),
    "muscle": (0.36, 0.2, 0.22),
    "viscera": (0.42, 0.5, 0.45),
    "vessel": (0.05, 0.04, 0.04),
    "marrow": (0.72, 0.42, 0.16),
    "cortex": (0.07, 0.05, 0.05),
    "annulus": (0.3, 0.16, 0.2),
    "nucleus": (0.36, 0.88, 0.9),
    "nucleus_dry": (0.3, 0.2, 0.22),
    "ligament": (0.14, 0.1, 0.1),
    "csf": (0.16, 1.0, 1.0),
    "neural": (0.42, 0.3, 0.3),
    "joint": (0.2, 0.75, 0.8),
}
_CONTRASTS = ("T1", "T2", "STIR")


def _occ(sdf, edge):
    """Soft occupancy of a shape from its signed distance (mm, negative inside); `edge` = blur width."""
    return np.clip(0.5 - sdf * (1.0 / edge), 0.0, 1.0)


def _paint(img, occ, value):
    img += occ * (value - img)


def _ellipse(u, v, a, b):
    """Approximate signed distance to the ellipse (u/a)^2 + (v/b)^2 = 1 (exact on the axes)."""
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * np.minimum(a, b)


def _max(*sdfs):
    """Intersection of shapes (broadcasting maximum of their signed distances)."""
    return functools.reduce(np.maximum, sdfs)


def _unless(mask):
    """Signed distance that removes a shape wherever `mask` is False."""
    return np.where(mask, np.float32(-1e3), np.float32(1e3))


def _slab(x, lo, hi):
    """Signed distance to the interval lo <= x <= hi."""
    return np.maximum(lo - x, x - hi)


@dataclasses.dataclass
class Phantom:
    """One patient's lumbar spine in spine coordinates (see the module docstring); all lengths in mm."""

    scale: float
    centreline: Centreline
    x_mid: float  # patient x of the spine midline
    top: np.ndarray  # [vertebra] s of the upper endplate
    height: np.ndarray  # [vertebra] body height
    depth: np.ndarray  # [vertebra] AP semi-axis = posterior wall
    width: np.ndarray  # [vertebra] lateral semi-axis
    disc_height: np.ndarray  # [disc] (disc j below vertebra j)
    dryness: np.ndarray  # [disc] 0 hydrated .. 1 desiccated nucleus
    canal_ap: float  # midline AP depth of the normal lumbar canal
    canal_halfwidth: float
    recess_ap: float
    recess_halfwidth: float
    fat_thickness: float  # posterior epidural fat
    canal_narrowing: np.ndarray  # [level] 0..1 of the midline CSF column closed at that disc
    recess_narrowing: np.ndarray  # [side (left, right), level]
    foramen_scale: np.ndarray  # [side, disc] 1 = normal foramen
    foramen_halfheight: np.ndarray  # [disc]
    foramen_halfap: float
    conus_tip: float  # s where the cord ends
    spinous_length: float
    body_d0: float  # outline ellipse centre (d), semi-axes and subcutaneous fat thickness
    body_ap: float
    body_lat: float
    subcut: float

    # -- derived geometry (cheap, recomputed on use) --
    @property
    def bottom(self):
        return self.top + self.height

    @property
    def centre(self):
        return self.top + 0.5 * self.height

    @property
    def disc_centre(self):
        return self.bottom[:-1] + 0.5 * self.disc_height

    @property
    def recess_offset(self):
        return RECESS_OFFSET_MM * self.scale

    @property
    def foramen_offset(self):
        return FORAMEN_OFFSET_MM * self.scale

    def canal_depth(self, al):
        """AP depth of the normal canal at |l| = al: a central ellipse plus two lateral-recess lobes."""
        central = self.canal_ap * np.sqrt(np.clip(1.0 - (al / self.canal_halfwidth) ** 2, 0.0, 1.0))
        lobe = (al - self.recess_offset) / self.recess_halfwidth
        recess = self.recess_ap * np.sqrt(np.clip(1.0 - lobe * lobe, 0.0, 1.0))
        return np.maximum(central, recess)

    def _posterior_wall(self, s):
        return np.interp(s, self.centre, self.depth).astype(np.float32)

    def _foramen_geometry(self):
        """Per disc: foramen centre s, centre d, exiting-root s (the root runs in the upper foramen)."""
        below_upper_pedicle = self.top[:-1] + 0.59 * self.height[:-1]
        above_lower_pedicle = self.top[1:] + 0.11 * self.height[1:]
        s_f = 0.5 * (below_upper_pedicle + above_lower_pedicle)
        d_f = 0.9 * 0.5 * (self.depth[:-1] + self.depth[1:]) + self.foramen_halfap
        s_root = s_f - 0.45 * self.foramen_halfheight
        return s_f, d_f, s_root

    # -- label points --
    def canal_point(self, k: int) -> tuple[float, float, float]:
        """(s, d, l) of the canal centre at RSNA level k (midline, mid-depth of the normal canal)."""
        j = _L1 + k
        s = float(self.disc_centre[j])
        canal = float(np.interp(s, self.centre, _CANAL_SCALE)) * self.canal_ap
        return s, float(self._posterior_wall(s)) + 0.5 * canal, 0.0

    def foramen_point(self, k: int, side: int) -> tuple[float, float, float]:
        """(s, d, l) of the normal foramen centre at level k; side 0 = left (+l), 1 = right."""
        s_f, d_f, _ = self._foramen_geometry()
        j = _L1 + k
        return float(s_f[j]), float(d_f[j]), self.foramen_offset * (1 - 2 * side)

    def recess_point(self, k: int, side: int) -> tuple[float, float, float]:
        """(s, d, l) of the lateral-recess centre at the level-k disc; side 0 = left, 1 = right."""
        s = float(self.disc_centre[_L1 + k])
        return s, float(self._posterior_wall(s)) + 0.5 * self.recess_ap, self.recess_offset * (1 - 2 * side)

    def to_patient(self, point) -> np.ndarray:
        s, d, lat = point
        y, z = self.centreline.to_patient(s, d)
        return np.array([self.x_mid + lat, float(y), float(z)])

    def landmark(self, condition: str, level: str) -> np.ndarray:
        """Patient (x, y, z) mm of the anatomical point labelled for one (condition, level) cell."""
        k = LEVELS.index(level)
        if condition == "spinal_canal_stenosis":
            return self.to_patient(self.canal_point(k))
        side = 0 if condition.startswith("left") else 1
        if "foraminal" in condition:
            return self.to_patient(self.foramen_point(k, side))
        return self.to_patient(self.recess_point(k, side))

    # -- rendering --
    def render(self, x, y, z, tissue: dict, edge: float, fine: bool) -> np.ndarray:
        """Signal (0..~1) at patient points x, y, z (3-D arrays broadcastable to one shape).

        `tissue` maps tissue name -> signal for the series' contrast; `edge` is the blur width (about a
        pixel); `fine` adds structures thinner than a sagittal slice (cauda equina roots).

        Each layer is evaluated only inside the bounding box of its lateral (l) and depth (d) range, as
        views into the full arrays: a sagittal stack keeps x per slice and (y, z) per pixel, so a
        structure a few mm wide costs one or two slices, not the whole stack.
        """
        s, d = _to_local_smooth(self.centreline, y, z)
        lat = (x - self.x_mid).astype(np.float32)
        shape = np.broadcast_shapes(s.shape, d.shape, lat.shape)
        img = np.zeros(shape, np.float32)
        f = _Fields(s=s, d=d, l=lat, al=np.abs(lat))
        # The body wall is drawn about the straight chord L1-S1 so the back stays straight whatever the
        # lordosis: d_wall is the distance behind that chord.
        c0, c1 = self.centreline.point(self.top[_L1]), self.centreline.point(self.top[_S1])
        chord = (c1 - c0) / np.linalg.norm(c1 - c0)
        f.d_wall = ((y - c0[0]) * -chord[1] + (z - c0[1]) * chord[0]).astype(np.float32)
        f.wall, f.width, f.canal_scale, *f.narrowing = self._profiles(s)
        f.jd = np.clip(np.searchsorted(self.centre, s) - 1, 0, len(self.disc_height) - 1)  # disc below
        f.iv = np.searchsorted(self.disc_centre, s)  # nearest vertebra

        sc, e = self.scale, edge
        d_lo, d_hi = float(self.depth.min()), float(self.depth.max())
        front = -float(self.depth[_L1:_S1].mean())  # anterior surface of the lumbar bodies
        back = d_hi + 3.0 * sc + self.canal_ap + 8.0 * sc  # behind the laminae
        column = float(self.width.max()) + 2.0 + e
        side_lo = min(8.0 * sc, self.foramen_offset - 5.5) - e  # facets, pedicles, foramina
        side_hi = max(19.5 * sc, self.foramen_offset + 5.5) + e
        psoas = float(self.width[_L1:_S1].mean()) + 10.0 * sc
        # Trunk: muscle everywhere, then subcutaneous fat and air only near the skin.
        img[...] = tissue["muscle"]
        l_max = float(f.al.max())
        reach = self.body_ap * math.sqrt(max(1.0 - (l_max / self.body_lat) ** 2, 0.0))
        layers = (
            (self._skin, (("d_wall", self.body_d0 + reach - self.subcut - 2 * e, 1e4),)),
            (self._skin, (("d_wall", -1e4, self.body_d0 - reach + self.subcut + 2 * e),)),
            (self._bowel, (("d_wall", -1e4, front - 20.0 * sc), ("l", -80.0 * sc, 80.0 * sc))),
            (
                self._psoas,
                (("l", psoas - 20.0 * sc, psoas + 20.0 * sc), ("d", 0.2 * front - 25.0 * sc, 25.0 * sc)),
            ),
            (
                self._psoas,
                (("l", -psoas - 20.0 * sc, -psoas + 20.0 * sc), ("d", 0.2 * front - 25.0 * sc, 25.0 * sc)),
            ),
            (self._vessels, (("l", -50.0 * sc, 50.0 * sc), ("d", front - 40.0 * sc, front + 12.0 * sc))),
            (self._back, (("l", 5.0 * sc, 60.0 * sc), ("d", d_hi + 10.0 * sc, d_hi + 70.0 * sc))),
            (self._back, (("l", -60.0 * sc, -5.0 * sc), ("d", d_hi + 10.0 * sc, d_hi + 70.0 * sc))),
            (self._column, (("l", -column, column), ("d", -d_hi - 3.0, d_hi + 3.0))),
            (self._canal, (("l", -self._canal_reach - e, self._canal_reach + e), ("d", d_lo - 2.0, back))),
            (
                self._spinous,
                (
                    ("l", -4.0 * sc - e, 4.0 * sc + e),
                    ("d", back - 12.0 * sc, back + self.spinous_length + 6.0 * sc),
                ),
            ),
            (self._lateral, (("l", side_lo, side_hi), ("d", 0.4 * d_lo - 2.0, d_hi + 24.0 * sc))),
            (self._lateral, (("l", -side_hi, -side_lo), ("d", 0.4 * d_lo - 2.0, d_hi + 24.0 * sc))),
        )
        for draw, constraints in layers:
            box = _box(shape, [(getattr(f, name), lo, hi) for name, lo, hi in constraints])
            if box is not None:
                draw(img[box], f.crop(box), tissue, e, fine)
        return img

    @property
    def _canal_reach(self) -> float:
        """Half width of the canal envelope and laminae."""
        return self.canal_halfwidth + 5.5 * self.scale

    def _profiles(self, s):
        """Functions of s only, read from one table: posterior wall d, body half-width, canal scale and
        the fraction of canal depth closed centrally / at the left / at the right recess."""
        grid = np.arange(self.top[0] - 20.0, self.bottom[-1] + 20.0, 0.5)
        sd = self.disc_centre[_L1 : _L1 + N_LEVELS]
        spread = 0.5 * self.disc_height[_L1 : _L1 + N_LEVELS] + 3.0
        bumps = np.exp(-(((grid[:, None] - sd) / spread) ** 2))  # [grid, level], one bump per disc
        table = np.stack(
            [
                np.interp(grid, self.centre, self.depth),
                np.interp(grid, self.centre, self.width),
                np.interp(grid, self.centre, _CANAL_SCALE),
                bumps @ self.canal_narrowing,
                bumps @ self.recess_narrowing[0],
                bumps @ self.recess_narrowing[1],
            ],
            axis=1,
        ).astype(np.float32)
        return _lookup(table, grid[0], 0.5, s)

    def _skin(self, img, f, tissue, edge, fine):
        """Subcutaneous fat and air outside the trunk (an ellipse about the straight chord)."""
        outline = _ellipse(f.d_wall - self.body_d0, f.l, self.body_ap, self.body_lat)
        _paint(img, _occ(-outline - self.subcut, edge), tissue["fat"])
        _paint(img, _occ(-outline, edge), 0.0)

    def _bowel(self, img, f, tissue, edge, fine):
        sc = self.scale
        front = -float(self.depth[_L1:_S1].mean())
        _paint(
            img,
            _occ(_ellipse(f.d_wall - front + 85.0 * sc, f.l, 60.0 * sc, 75.0 * sc), edge),
            tissue["viscera"],
        )

    def _psoas(self, img, f, tissue, edge, fine):
        """A psoas muscle beside the column, outlined by a fat plane."""
        sc = self.scale
        front = -float(self.depth[_L1:_S1].mean())
        psoas = _ellipse(
            f.d - 0.2 * front, f.al - (float(self.width[_L1:_S1].mean()) + 10.0 * sc), 19.0 * sc, 14.0 * sc
        )
        _paint(img, _occ(psoas - 1.5, edge), tissue["fat"])
        _paint(img, _occ(psoas, edge), tissue["muscle"])

    def _vessels(self, img, f, tissue, edge, fine):
        """Retroperitoneal fat in front of the column holding the aorta (left, ends at L4) and the IVC."""
        sc, d, lat = self.scale, f.d, f.l
        front = -float(self.depth[_L1:_S1].mean())
        _paint(img, _occ(_ellipse(d - front + 14.0 * sc, lat, 22.0 * sc, 45.0 * sc), edge), tissue["fat"])
        aorta = np.maximum(
            np.hypot(d - front + 13.0 * sc, lat - 12.0 * sc) - 9.0 * sc, f.s - self.centre[_L1 + 3]
        )
        _paint(img, _occ(aorta, edge), tissue["vessel"])
        ivc = _ellipse(d - front + 11.0 * sc, lat + 16.0 * sc, 6.0 * sc, 11.0 * sc)
        _paint(img, _occ(ivc, edge), tissue["vessel"])

    def _back(self, img, f, tissue, edge, fine):
        """A fat plane between multifidus (medial) and erector spinae (lateral) on each side."""
        sc = self.scale
        plane = _ellipse(f.d - (float(self.depth.max()) + 40.0 * sc), f.al - 30.0 * sc, 26.0 * sc, 20.0 * sc)
        medial = np.clip((32.0 * sc - f.al) * (1.0 / 4.0), 0.0, 1.0)  # the medial border of erector spinae
        _paint(img, _occ(np.abs(plane) - 0.5, edge) * medial, tissue["fat"])

    def _column(self, img, f, tissue, edge, fine):
        """Vertebral bodies (cortex, marrow) and discs (annulus, nucleus; fused sacral discs are bone)."""
        s, jd = f.s, f.jd
        bounds = np.stack([self.top, self.bottom], axis=1).ravel()
        seg = np.clip(np.searchsorted(bounds, s, side="right") - 1, 0, len(bounds) - 2)
        m = np.minimum(s - bounds[seg], bounds[seg + 1] - s)
        body_s = np.where(seg % 2 == 0, -m, m)  # signed distance along s to the bodies
        q = f.d / f.wall
        e = f.l / f.width
        e2 = e * e
        # |e|^6 keeps the posterior wall flat and the lateral body full (foraminal slices cut through it).
        xsec = (np.sqrt(q * q + e2 * e2 * e2) - 1.0) * f.wall
        fused = jd >= _S1
        _paint(
            img,
            _occ(np.maximum(xsec - 1.0, -body_s), edge),
            np.where(fused, tissue["cortex"], tissue["annulus"]),
        )
        dry = self.dryness[jd]
        nucleus_value = (1.0 - dry) * tissue["nucleus"] + dry * tissue["nucleus_dry"]
        nucleus = np.maximum(
            (np.sqrt(((q - 0.1) * (1.0 / 0.62)) ** 2 + (e * (1.0 / 0.68)) ** 2) - 1.0) * 0.6 * f.wall,
            np.abs(s - self.disc_centre[jd]) - 0.3 * self.disc_height[jd],
        )
        _paint(img, _occ(np.maximum(nucleus, _unless(~fused)), edge), nucleus_value)
        self._bone(img, np.maximum(xsec, body_s), tissue, edge)

    def _canal(self, img, f, tissue, edge, fine):
        """Canal envelope lined by ligament, epidural fat, CSF, cord/roots, laminae.

        The open part is closed by the grade-driven narrowing, half from the front (disc bulge) and
        half from the back (ligamentum flavum, facet hypertrophy), so its centre stays put.
        """
        sc, s, d, lat, al, wall, cs = self.scale, f.s, f.d, f.l, f.al, f.wall, f.canal_scale
        dep = self.canal_depth(al) * cs
        central, left, right = f.narrowing
        # Recess closure ~2.8 mm wide each side of its centre (was 3.9): clear on the axial slices
        # through the disc, on a paramedian sagittal slice only when it falls within ~2.5 mm of the
        # recess, as in patients (benchmarks/axial_ablation_results.md, issue 11).
        ro, rw = self.recess_offset, 2.8 * sc
        closed_frac = (
            central * np.exp(-((lat * (1.0 / (8.0 * sc))) ** 4))  # reaches the recesses a little (~0.2)
            + left * np.exp(-(((lat - ro) * (1.0 / rw)) ** 6))
            + right * np.exp(-(((lat + ro) * (1.0 / rw)) ** 6))
        )
        closed = dep * np.minimum(closed_frac, 1.0)
        ant = wall + 0.5 * closed
        post = wall + dep - 0.5 * closed
        # The bony canal (laminae in front, ligamentum flavum lining it) arches behind the open part.
        arch = self.canal_halfwidth + 4.5 * sc
        lamina = wall + 3.0 * sc + self.canal_ap * cs * np.sqrt(np.clip(1.0 - (lat / arch) ** 2, 0.0025, 1.0))
        _paint(img, _occ(np.maximum(_slab(d, wall - 0.5, lamina), al - arch), edge), tissue["ligament"])
        # Open part: thin layers fade with their thickness instead of showing a half-bright edge.
        _paint(img, _occ(_slab(d, ant, post), edge) * np.clip((post - ant) / edge, 0.0, 1.0), tissue["fat"])
        fat = (
            self.fat_thickness
            * (1.0 - np.minimum(closed_frac, 1.0))
            * np.clip(1.0 - (lat / (7.0 * sc)) ** 2, 0.0, 1.0)
        )
        csf_post = post - fat
        sac = np.clip((self.top[_S1 + 1] + 4.0 - s) * (1.0 / 6.0), 0.0, 1.0)  # the dural sac ends at S2
        csf = _occ(_slab(d, ant, csf_post), edge) * np.clip((csf_post - ant) * (1.0 / edge), 0.0, 1.0) * sac
        _paint(img, csf, tissue["csf"])
        cord_r = 4.2 * sc * np.sqrt(np.clip((self.conus_tip - s) * (1.0 / 15.0), 0.0, 1.0))
        cord_d = wall + 0.45 * self.canal_ap * cs
        _paint(img, _occ(np.hypot(d - cord_d, lat) - cord_r, edge) * (cord_r > 0) * csf, tissue["neural"])
        traversing = np.hypot(d - (wall + 2.8 * sc), al - (ro + 0.5 * sc)) - 1.4 * sc
        _paint(img, _occ(traversing, edge) * csf, tissue["neural"])
        if fine:  # cauda equina: thin roots in the dorsal sac below the conus
            below_conus = s > self.conus_tip - 6.0
            for lr, fr in ((1.2, 0.8), (3.0, 0.72), (5.0, 0.6), (6.5, 0.42)):
                for sign in (1.0, -1.0):
                    root = np.hypot(d - (wall + fr * dep), lat - sign * lr * sc) - 0.8 * sc
                    _paint(img, _occ(root, edge) * csf * below_conus, tissue["neural"])
        # Laminae: the lower part of the vertebra above reaches down past its disc, the upper part of the
        # vertebra below starts a little under its top (the gap between is the interlaminar window).
        jd = f.jd
        upper = _slab(s, self.centre[jd], self.top[jd + 1] + 1.0)
        lower = _slab(s, self.top[jd + 1] + 0.25 * self.height[jd + 1], self.centre[jd + 1])
        lam = _max(np.minimum(upper, lower), _slab(d, lamina, lamina + 6.0 * sc), al - self._canal_reach)
        self._bone(img, lam, tissue, edge)

    def _spinous(self, img, f, tissue, edge, fine):
        """Hatchet-shaped spinous processes level with the lower body and disc, slanting slightly caudally
        (sheared so each stays within its own vertebra's share of s)."""
        sc = self.scale
        u = f.d - (f.wall + 3.0 * sc + self.canal_ap * f.canal_scale + 4.0 * sc)  # behind the lamina
        s_sheared = f.s - 0.15 * u
        iv = np.searchsorted(self.disc_centre, s_sheared)
        height = self.height[iv]
        half = 0.34 * height * (1.0 - 0.25 * np.clip(u / self.spinous_length, 0.0, 1.0))
        spinous = _max(
            np.abs(s_sheared - (self.top[iv] + 0.72 * height)) - half,
            _slab(u, -4.0, self.spinous_length),
            f.al - 3.2 * sc,
            _unless(iv <= _S1),
        )
        self._bone(img, spinous, tissue, edge)

    def _lateral(self, img, f, tissue, edge, fine):
        """One side's pedicles, facet joints and neural foramina (with the exiting root)."""
        sc, s, d, al, iv, jd = self.scale, f.s, f.d, f.al, f.iv, f.jd
        # Pedicles: the upper part of each body, from inside the body back to the facets.
        height = self.height[iv]
        front, back = 0.45 * self.depth[iv], self.depth[iv] + 10.0 * sc
        pedicle = _max(
            _ellipse(
                s - (self.top[iv] + 0.35 * height),
                d - 0.5 * (front + back),
                0.24 * height,
                0.5 * (back - front),
            ),
            _slab(al, self.foramen_offset - 5.5, self.foramen_offset + 4.5),
            _unless(iv <= _S1),
        )
        self._bone(img, pedicle, tissue, edge)
        has_facet = jd < _S1
        facet_s = self.disc_centre[jd] - 0.1 * self.disc_height[jd]
        facet_half = 0.21 * (self.height[jd] + self.height[jd + 1])
        fd, fl = d - (f.wall + 13.0 * sc), al - 14.0 * sc
        facet = np.sqrt(
            ((s - facet_s) / facet_half) ** 2
            + (fd * (1.0 / (9.0 * sc))) ** 2
            + (fl * (1.0 / (5.5 * sc))) ** 2
        )
        facet = np.maximum((facet - 1.0) * 5.5 * sc, _unless(has_facet))
        self._bone(img, facet, tissue, edge)
        # The joint space runs from antero-medial to postero-lateral.
        joint = np.maximum(facet + 1.5, np.abs(fl - 0.7 * fd) * (1.0 / 1.22) - 0.5)
        _paint(img, _occ(joint, edge), tissue["joint"])

        # Foramen: the normal-size foramen as dark soft tissue, the grade-scaled part as fat, the root.
        s_f, d_f, s_root = (a[jd] for a in self._foramen_geometry())
        side = 0 if float(f.l.flat[0]) > 0 else 1  # a lateral box never spans the midline
        g = self.foramen_scale[side][jd]
        half_h = self.foramen_halfheight[jd]
        across = (al - (self.foramen_offset + 0.25)) * (1.0 / 5.25)
        taper = (0.85 - 0.3 * np.clip((s - s_f) / half_h, -1.0, 1.0)) * np.clip(1.0 - across**8, 0.0, 1.0)
        half_ap = self.foramen_halfap * taper  # teardrop (wide at the root), closing at its lateral ends
        foramen = _max(
            _ellipse(s - s_f, d - d_f, half_h, half_ap + 1e-3),
            _slab(al, self.foramen_offset - 5.0, self.foramen_offset + 5.5),
            _unless(has_facet),
        )
        _paint(img, _occ(foramen, edge), tissue["ligament"])
        s_g = s_root + (s_f - s_root) * g  # shrinks towards the root
        shrunk = np.maximum(_ellipse(s - s_g, d - d_f, half_h * g, half_ap * g + 1e-3), foramen)
        _paint(img, _occ(shrunk, edge), tissue["fat"])
        root = np.maximum(np.hypot(s - s_root, d - d_f) - 2.6 * sc, shrunk - 0.8)
        _paint(img, _occ(root, edge), tissue["neural"])

    def _bone(self, img, sdf, tissue, edge):
        """Cortex 1.2 mm thick around marrow."""
        _paint(img, _occ(sdf, edge), tissue["cortex"])
        _paint(img, _occ(sdf + 1.2, edge), tissue["marrow"])


def _to_local_smooth(line: Centreline, y, z, step: int = 4):
    """`Centreline.to_local` of a stack of pixel grids, solved on every `step`-th pixel and
    interpolated bilinearly in between: (s, d) are smooth in (y, z) (error ~ step^2 * curvature, well
    under 0.1 mm), and the Newton solve is the costliest part of a render when slices do not share
    one (y, z) grid (rotated sagittal stacks, tilted axial stacks)."""
    y, z = np.broadcast_arrays(np.asarray(y, np.float32), np.asarray(z, np.float32))
    if y.ndim != 3 or min(y.shape[1:]) < 8 * step:
        return line.to_local(y, z)
    rows = np.unique(np.r_[0 : y.shape[1] : step, y.shape[1] - 1])
    cols = np.unique(np.r_[0 : y.shape[2] : step, y.shape[2] - 1])
    coarse = line.to_local(y[:, rows][:, :, cols], z[:, rows][:, :, cols])
    jr, wr = _segments(rows, y.shape[1])
    jc, wc = _segments(cols, y.shape[2])
    out = []
    for a in coarse:
        a = a[:, jr] * (1 - wr)[None, :, None] + a[:, jr + 1] * wr[None, :, None]
        out.append((a[:, :, jc] * (1 - wc) + a[:, :, jc + 1] * wc).astype(np.float32))
    return tuple(out)


def _segments(knots: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every index 0..n-1: the knot segment it lies in and its weight towards the upper knot."""
    i = np.arange(n)
    j = np.clip(np.searchsorted(knots, i, side="right") - 1, 0, len(knots) - 2)
    return j, ((i - knots[j]) / (knots[j + 1] - knots[j])).astype(np.float32)


class _Fields:
    """Per-point arrays of one render, croppable to a box (a tuple of slices) as views."""

    def __init__(self, **arrays):
        self.__dict__.update(arrays)

    def crop(self, box) -> _Fields:
        out = _Fields()
        for name, value in self.__dict__.items():
            if isinstance(value, list):
                out.__dict__[name] = [_crop(v, box) for v in value]
            else:
                out.__dict__[name] = _crop(value, box)
        return out


def _crop(a, box):
    return a[tuple(sl if n > 1 else slice(None) for sl, n in zip(box, a.shape, strict=True))]


def _box(shape, constraints):
    """Bounding box (tuple of slices over `shape`) of the points where every (array, lo, hi) holds,
    each array broadcastable to `shape`; None when empty. Conservative: the true set lies inside."""
    start, stop = [0] * len(shape), list(shape)
    for arr, lo, hi in constraints:
        ok = (arr >= lo) & (arr <= hi)
        if not ok.any():
            return None
        for axis, n in enumerate(arr.shape):
            if n == 1:
                continue
            hit = np.flatnonzero(ok.any(axis=tuple(a for a in range(arr.ndim) if a != axis)))
            if len(hit) == 0:
                return None
            start[axis], stop[axis] = max(start[axis], int(hit[0])), min(stop[axis], int(hit[-1]) + 1)
            if start[axis] >= stop[axis]:
                return None
    return tuple(slice(a, b) for a, b in zip(start, stop, strict=True))


def _lookup(table: np.ndarray, start: float, step: float, s: np.ndarray) -> list[np.ndarray]:
    """Linear interpolation of every column of `table` (rows at start + i * step) at s, clamped."""
    u = np.clip((s - start) * (1.0 / step), 0.0, len(table) - 1.001)
    i = u.astype(np.intp)
    frac = (u - i)[..., None]
    rows = table[i] * (1.0 - frac) + table[i + 1] * frac
    return [rows[..., k] for k in range(table.shape[1])]


def _sample_phantom(rng: np.random.Generator, draw: GradeDraw) -> Phantom:
    """Anatomy for one study, centred at the origin of patient coordinates (see `_place`)."""
    sc = rng.uniform(0.9, 1.1)
    names, heights, depths, widths, discs = zip(*_VERTEBRAE, strict=True)
    height = np.array(heights) * sc * rng.uniform(0.95, 1.05, len(names))
    depth = np.array(depths) * sc * rng.uniform(0.96, 1.04, len(names))
    width = np.array(widths) * sc * rng.uniform(0.96, 1.04, len(names))
    disc = np.array(discs[:-1]) * sc * rng.uniform(0.92, 1.08, len(names) - 1)
    dryness = rng.uniform(0.0, 0.25, len(disc))
    levels = slice(_L1, _L1 + N_LEVELS)
    dryness[levels] = np.clip(draw.degeneration + rng.uniform(-0.1, 0.1, N_LEVELS), 0.0, 1.0)
    disc[levels] *= 1.0 - 0.35 * dryness[levels]  # degenerated discs lose height
    top = np.concatenate([[0.0], np.cumsum(height[:-1] + disc)])

    z = draw.latent
    foramen_scale = rng.uniform(0.95, 1.05, (2, len(disc)))
    foramen_scale[:, levels] = np.clip(_latent_effect(_FORAMEN_SCALE, z[[1, 2]]), 0.25, 1.0)
    canal_narrowing = np.clip(_latent_effect(_CANAL_NARROWING, z[0]), 0.0, 0.95)
    recess_narrowing = np.clip(_latent_effect(_RECESS_NARROWING, z[[3, 4]]), 0.0, 0.95)

    # Sagittal curve as tangent angles: thoracic kyphosis (15-28 degrees over T7-L1), lumbar lordosis
    # of 20-45 degrees with curvature growing towards L5/S1, sacral kyphosis; a few degrees of patient
    # tilt. The curvature stays below ~1/120 mm so the posterior elements keep a unique foot on the curve.
    s_l1, s_s1, s_end = top[_L1], top[_S1], top[-1] + height[-1]
    lordosis = math.radians(rng.uniform(20.0, 45.0))
    grid = np.arange(-250.0, s_end + 250.0, 1.0)
    x_l = np.clip((grid - s_l1) / (s_s1 - s_l1), 0.0, 1.0)
    theta = lordosis * (0.5 * x_l + 0.5 * x_l * x_l)
    theta -= math.radians(rng.uniform(15.0, 28.0)) * np.clip((grid - top[0]) / (s_l1 - top[0]), 0.0, 1.0)
    theta -= math.radians(rng.uniform(10.0, 25.0)) * np.clip((grid - s_s1) / (s_end - s_s1), 0.0, 1.0)
    theta -= np.interp(top[_L1 + 2], grid, theta) + math.radians(rng.uniform(-6.0, 6.0))  # L3 ~ vertical
    obesity = rng.uniform(0.0, 1.0)
    d_mean = depth[_L1:_S1].mean()
    body_ap = (115.0 + 25.0 * obesity) * sc
    post_skin = d_mean + (70.0 + 30.0 * obesity) * sc
    phantom = Phantom(
        scale=sc,
        centreline=Centreline.from_angles(grid, theta),
        x_mid=0.0,
        top=top,
        height=height,
        depth=depth,
        width=width,
        disc_height=disc,
        dryness=dryness,
        canal_ap=14.0 * sc * rng.uniform(0.93, 1.07),
        canal_halfwidth=8.5 * sc,
        recess_ap=7.0 * sc * rng.uniform(0.93, 1.07),
        recess_halfwidth=3.6 * sc,
        fat_thickness=3.0 * sc,
        canal_narrowing=canal_narrowing,
        recess_narrowing=recess_narrowing,
        foramen_scale=foramen_scale,
        foramen_halfheight=0.5 * (0.41 * height[:-1] + disc + 0.11 * height[1:]) * rng.uniform(0.94, 1.06),
        foramen_halfap=4.8 * sc * rng.uniform(0.94, 1.06),
        conus_tip=rng.uniform(top[_L1] + 0.3 * height[_L1], top[_L1 + 1] - 0.5 * disc[_L1]),
        spinous_length=rng.uniform(25.0, 38.0) * sc,
        body_d0=post_skin - body_ap,
        body_ap=body_ap,
        body_lat=(140.0 + 30.0 * obesity) * sc,
        subcut=(8.0 + 22.0 * obesity) * sc,
    )
    return phantom


# ---------------------------------------------------------------------------------------------------
# Series
# ---------------------------------------------------------------------------------------------------

_SAGITTAL_IOP = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])

# How the phantoms are acquired: "realistic" imitates RSNA 2024 studies (see `_sagittal_realistic`,
# `_axial_realistic`, `_series_plan`); "centred" is the earlier acquisition (coarse pixels, every field
# centred on the lumbar spine, one series of each description) that the pipeline was first built on.
ACQUISITIONS = ("realistic", "centred")
# Sagittal matrix (columns) mix: most 320-384, a share 512-640; a fifth are taller than wide.
_SAGITTAL_COLS = ((320, 0.65), (384, 0.23), (512, 0.07), (640, 0.05))
_TALL_SHARE = 0.2
# Sagittal slice counts 13-25, most 15-17 as in RSNA studies.
_SLICE_COUNTS = np.arange(13, 26)
_SLICE_WEIGHTS = np.array([2, 4, 20, 18, 16, 8, 8, 5, 5, 3, 3, 2, 6], float)
_RENDER_MM = (1.25, 1.5)  # acquired pixel size: the scanner interpolates to the written matrix
_AXIAL_RENDER_MM = (1.1, 1.35)
JPEG_LOSSLESS_SHARE = 0.6  # studies whose files are JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)
REPEAT_SHARE = 0.15  # studies with a second series of one description
MISSING_SHARE = 0.09  # studies lacking one series


def _rotation(yaw: float, tilt: float) -> np.ndarray:
    """Rotation about z (yaw, radians) after one about y (coronal tilt)."""
    cz, sz, cy, sy = math.cos(yaw), math.sin(yaw), math.cos(tilt), math.sin(tilt)
    rz = np.array([[cz, sz, 0.0], [-sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, -sy], [0.0, 1.0, 0.0], [sy, 0.0, cy]])
    return rz @ ry


def _canal_yz(phantom: Phantom) -> np.ndarray:
    """[level, (y, z)] of the five canal label points."""
    return np.array([phantom.to_patient(phantom.canal_point(k))[1:] for k in range(N_LEVELS)])


def _sagittal_realistic(rng, phantom: Phantom) -> SeriesGeometry:
    """A sagittal stack planned on its own, as a radiographer plans each series.

    Pixels 0.5-0.9 mm, matrices 320-640 (some taller than wide, e.g. 540 x 384), fields 220-340 mm
    whose upper part holds the lower thoracic spine: the lumbar spine sits anywhere from the field's
    centre to its lower half (RSNA 4003253: L5/S1 at row 484 of 512). 13-25 slices 3-4.8 mm apart, the
    stack a few mm off the midline and, in half of the series, rotated by up to 4 degrees.
    """
    options, weights = zip(*_SAGITTAL_COLS, strict=True)
    cols = int(rng.choice(options, p=np.asarray(weights) / sum(weights)))
    rows = cols
    if cols < 640 and rng.random() < _TALL_SHARE:
        rows = min(640, int(round(cols * rng.uniform(1.25, 1.45) / 2) * 2))
    ps = round(rng.uniform(max(0.5, 220.0 / rows), min(0.9, 340.0 / rows)), 4)
    height, width = rows * ps, cols * ps
    canal = _canal_yz(phantom)
    mid = 0.5 * (canal.min(axis=0) + canal.max(axis=0))
    # Field centre above the spine (+z = head): spine centre from 0 to 45% of the half height below it,
    # every canal point at least 15 mm inside the field.
    z_c = mid[1] + rng.uniform(0.0, 0.45) * height / 2
    z_c = float(np.clip(z_c, canal[0, 1] - height / 2 + 15.0, canal[-1, 1] + height / 2 - 15.0))
    y_c = mid[0] + rng.uniform(-30.0, 5.0)  # fields centre on the bodies, in front of the canal
    y_c = float(np.clip(y_c, canal[:, 0].max() - width / 2 + 20.0, canal[:, 0].min() + width / 2 - 20.0))
    n = int(rng.choice(_SLICE_COUNTS, p=_SLICE_WEIGHTS / _SLICE_WEIGHTS.sum()))
    spacing = round(rng.uniform(3.0, 4.8), 2)
    rotated = rng.random() < 0.5
    yaw, tilt = (math.radians(rng.uniform(-4.0, 4.0)) for _ in range(2))
    r = _rotation(yaw, tilt) if rotated else np.eye(3)
    row_dir, col_dir, across = r @ [0.0, 1.0, 0.0], r @ [0.0, 0.0, -1.0], r @ [1.0, 0.0, 0.0]
    row_dir, col_dir = np.round(row_dir, 6), np.round(col_dir, 6)
    centre = np.array([phantom.x_mid + rng.uniform(-6.0, 6.0), y_c, z_c])
    t = (np.arange(n) - (n - 1) / 2) * spacing
    ipp = centre + t[:, None] * across - (cols - 1) / 2 * ps * row_dir - (rows - 1) / 2 * ps * col_dir
    return SeriesGeometry(
        ipp=np.round(ipp, 4),
        iop=np.tile(np.concatenate([row_dir, col_dir]), (n, 1)),
        pixel_spacing=(ps, ps),
        rows=rows,
        cols=cols,
        thickness=round(spacing * rng.uniform(0.8, 1.0), 2),
        spacing=spacing,
    )


def _axial_realistic(rng, phantom: Phantom) -> SeriesGeometry:
    """3-5 slices through each RSNA disc, each stack tilted to its disc; 320 or 384 pixels of 0.5-0.72 mm."""
    size = int(rng.choice([320, 384], p=[0.9, 0.1]))
    ps = round(rng.uniform(max(0.5, 160.0 / size), min(0.9, 230.0 / size)), 4)
    per_disc = int(rng.choice([3, 4, 5], p=[0.65, 0.25, 0.1]))
    spacing = round(rng.uniform(3.0, 4.5), 2)
    return _axial_stacks(rng, phantom, size, ps, per_disc, spacing, x_jitter=5.0)


def _axial_stacks(rng, phantom, size, ps, per_disc, spacing, x_jitter) -> SeriesGeometry:
    x0 = phantom.x_mid + rng.uniform(-x_jitter, x_jitter) - (size - 1) / 2 * ps  # one x grid for all
    ipp, iop = [], []
    t = (np.arange(per_disc) - (per_disc - 1) / 2) * spacing
    for k in range(N_LEVELS):
        s, d, _ = phantom.canal_point(k)
        post = phantom.centreline.posterior(s)
        feet = np.array([post[1], -post[0]])
        centre_yz = np.array(phantom.centreline.to_patient(s, d + rng.uniform(-8, 8)))  # near the canal
        for offset in t:
            yz = centre_yz + offset * feet - (size - 1) / 2 * ps * post
            ipp.append([x0, *yz])
            iop.append([1.0, 0.0, 0.0, 0.0, post[0], post[1]])
    return SeriesGeometry(
        ipp=np.round(np.array(ipp), 4),
        iop=np.round(np.array(iop), 6),
        pixel_spacing=(ps, ps),
        rows=size,
        cols=size,
        thickness=round(spacing * rng.uniform(0.85, 1.0), 2),
        spacing=spacing,
    )


def _place(phantom: Phantom, rng: np.random.Generator) -> tuple[Phantom, np.ndarray]:
    """Put the phantom at a random table position; returns it and its spine centre (patient x, y, z).

    The spine centre is the middle of the box around the five canal label points, so a 200 mm square
    around any sagittal FOV centre within +-15 mm of it holds L1/L2..L5/S1 with margin.
    """
    line = phantom.centreline
    pts = np.array([line.to_patient(*phantom.canal_point(k)[:2]) for k in range(N_LEVELS)])
    mid = 0.5 * (pts.min(axis=0) + pts.max(axis=0))
    table = np.array([rng.uniform(-20, 20), rng.uniform(-40, 40), rng.uniform(-200, 150)])
    line = line.shifted(float(table[1] - mid[0]), float(table[2] - mid[1]))
    return dataclasses.replace(phantom, centreline=line, x_mid=float(table[0])), table


def _sagittal_centred(rng, phantom: Phantom, spine_centre: np.ndarray) -> SeriesGeometry:
    """The "centred" acquisition: FOV centre within +-15 mm of the spine centre, midline within +-2 mm
    of the stack centre, 15-21 slices 3.0-4.5 mm apart, 1.0-1.4 mm pixels, FOV at least ~224 mm tall."""
    n = int(rng.integers(15, 22))
    spacing = round(rng.uniform(3.0, 4.5), 2)
    ps = round(rng.uniform(1.0, 1.4), 4)
    rows = int(np.clip(round(rng.uniform(225.0, 270.0) / ps / 2) * 2, 160, 224))
    cols = (
        rows
        if rng.random() < 0.6
        else max(int(round(rows * rng.uniform(0.85, 0.95) / 2) * 2), int(math.ceil(200 / ps)))
    )
    fov_y = spine_centre[1] + rng.uniform(-15, 15)
    fov_z = spine_centre[2] + rng.uniform(-15, 15)
    stack_x = phantom.x_mid + rng.uniform(-2, 2)
    x = stack_x + (np.arange(n) - (n - 1) / 2) * spacing
    ipp = np.stack(
        [x, np.full(n, fov_y - (cols - 1) / 2 * ps), np.full(n, fov_z + (rows - 1) / 2 * ps)], axis=1
    )
    return SeriesGeometry(
        ipp=np.round(ipp, 4),
        iop=np.tile(_SAGITTAL_IOP, (n, 1)),
        pixel_spacing=(ps, ps),
        rows=rows,
        cols=cols,
        thickness=round(spacing * rng.uniform(0.8, 1.0), 2),
        spacing=spacing,
    )


def _axial_centred(rng, phantom: Phantom) -> SeriesGeometry:
    """The "centred" acquisition: three slices through each RSNA disc, 128-160 pixels of 0.9-1.4 mm."""
    spacing = round(rng.uniform(3.5, 4.5), 2)
    ps = round(rng.uniform(0.9, 1.4), 4)
    size = int(np.clip(round(rng.uniform(150.0, 190.0) / ps / 2) * 2, 128, 160))
    return _axial_stacks(rng, phantom, size, ps, 3, spacing, x_jitter=5.0)


@dataclasses.dataclass
class SyntheticSeries:
    """One rendered series, pixels as stored in the DICOM files."""

    series_id: int
    description: str
    contrast: str  # "T1", "T2" or "STIR"
    geometry: SeriesGeometry
    pixels: np.ndarray  # [n, rows, cols] stored 12-bit values (uint16, or int16 when signed)
    instance_numbers: np.ndarray  # [n], slice k is written as instance_numbers[k]
    slope: float
    intercept: float
    window: tuple[float, float]  # WindowCenter, WindowWidth in rescaled units
    series_number: int
    labelled: bool = True  # the coordinates file names this series (one per description)
    transfer_syntax: str = ExplicitVRLittleEndian


def _render_series(
    rng,
    phantom: Phantom,
    geometry: SeriesGeometry,
    contrast: str,
    axial: bool,
    render_mm: float | None = None,
    signed_ok: bool = True,
):
    """Sample the phantom on the series' pixel centres, then add the scanner's nuisance.

    With `render_mm` the phantom is sampled, and noise added, on the acquired grid of that pixel size
    over the same field, then interpolated to the written matrix, as scanners interpolate (zero-fill)
    their acquired matrix to 512 or more: the noise comes out spatially correlated, as in real scans.
    Axial slices average three planes across the slice thickness (partial volume), so a slice that
    grazes an endplate shows it blurred rather than as a black cortex sheet; they also draw the thin
    cauda equina roots that a thick sagittal slice would average away.
    """
    acquired = geometry
    if render_mm is not None:
        fov = (geometry.rows * geometry.pixel_spacing[0], geometry.cols * geometry.pixel_spacing[1])
        shape = [min(n, int(round(size / render_mm))) for n, size in zip((geometry.rows, geometry.cols), fov)]
        acquired = geometry.resampled(*shape)
    column = _CONTRASTS.index(contrast)
    tissue = {name: values[column] * rng.uniform(0.9, 1.1) for name, values in _TISSUES.items()}
    edge = max(acquired.pixel_spacing)
    normal = np.cross(acquired.iop[:, :3], acquired.iop[:, 3:])
    offsets = (-acquired.thickness / 3, 0.0, acquired.thickness / 3) if axial else (0.0,)
    signal = sum(
        phantom.render(
            *dataclasses.replace(acquired, ipp=acquired.ipp + o * normal).coords(), tissue, edge, fine=axial
        )
        for o in offsets
    ) * (1.0 / len(offsets))
    x, y, z = acquired.coords()

    # Smooth multiplicative fields in patient mm (coherent across slices): the receive coil's bias
    # (brighter posteriorly) and a few long waves of tissue texture. cos(a + b) is expanded so each
    # factor is computed on the small per-axis grids and only the products are full size.
    xc, yc, zc = (float(np.mean(v)) for v in (x, y, z))
    yn, zn, xn = (y - yc) / 100.0, (z - zc) / 100.0, (x - xc) / 100.0
    bias_yz = np.exp(
        rng.uniform(0.1, 0.5) * yn + rng.uniform(-0.2, 0.2) * zn + rng.uniform(-0.2, 0.2) * yn * yn
    )
    gain = rng.uniform(300.0, 2500.0)
    field = (gain * bias_yz).astype(np.float32) * np.exp(rng.uniform(-0.1, 0.1) * xn).astype(np.float32)
    texture = np.ones(1, np.float32)
    for _ in range(3):
        k = rng.normal(size=3)
        k *= 2 * math.pi / (np.linalg.norm(k) * rng.uniform(15.0, 60.0))
        a = (k[0] * x).astype(np.float32)
        b = (k[1] * y + k[2] * z + rng.uniform(0, 2 * math.pi)).astype(np.float32)
        texture = texture + rng.uniform(0.02, 0.05) * (np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b))
    clean = signal * (field * texture)
    sigma = np.float32(rng.uniform(0.015, 0.045) * gain)
    noise = rng.standard_normal((2, *clean.shape), dtype=np.float32) * sigma
    value = np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    value = np.broadcast_to(value, (acquired.n, acquired.rows, acquired.cols))
    if acquired is not geometry:
        size = (geometry.cols, geometry.rows)
        value = np.stack([cv2.resize(v, size, interpolation=cv2.INTER_CUBIC) for v in value])
        np.maximum(value, 0.0, out=value)

    # 12-bit stored values (BitsStored 12), scaled to use most of the range.
    signed = signed_ok and bool(rng.random() < 0.3)
    top = float(np.percentile(value[:, ::4, ::4], 99.9))
    if signed:
        intercept = round(float(rng.uniform(0.0, 0.3 * top)), 2)
        slope = max((top - intercept) / rng.uniform(1500.0, 2000.0), intercept / 2000.0)
        dtype, lo_hi = np.int16, (-2048, 2047)
    else:
        intercept = -round(float(rng.uniform(0.0, 300.0)), 2)
        slope = (top - intercept) / rng.uniform(2500.0, 4000.0)
        dtype, lo_hi = np.uint16, (0, 4095)
    slope = max(round(float(slope), 4), 1e-4)
    stored = np.clip(np.rint((value - intercept) / slope), *lo_hi).astype(dtype)
    lo, hi = np.percentile(stored[:, ::4, ::4], [1.0, 99.5]) * slope + intercept
    n = geometry.n
    instances = int(rng.integers(1, 60)) + rng.permutation(n)
    return stored, instances, slope, intercept, (round(float((lo + hi) / 2), 1), round(float(hi - lo), 1))


@dataclasses.dataclass
class SyntheticStudy:
    """One rendered study with its ground truth: grades, the phantom (label points in patient mm)."""

    study_id: int
    grades: np.ndarray  # [condition, level] 0-3, the label drawn
    known: np.ndarray  # [condition, level] bool; unknown cells are written empty
    phantom: Phantom
    series: list[SyntheticSeries]  # in writing order; repeats share a description
    coordinates: list[tuple]  # train_label_coordinates.csv rows (without the header)
    uid_token: int  # seeds the study's DICOM UIDs
    study_datetime: datetime.datetime
    latent: np.ndarray  # [condition, level] latent severity the anatomy shows (`GradeDraw.latent`)

    def series_by_description(self, description: str) -> SyntheticSeries:
        """The series of that description that the labels name (KeyError when the study lacks it)."""
        for se in self.series:
            if se.description == description and se.labelled:
                return se
        raise KeyError(description)


_READ_ON = {"spinal": SAGITTAL_T2, "foraminal": SAGITTAL_T1, "subarticular": AXIAL_T2}


def read_on(condition: str) -> str:
    """The series description each condition is labelled on (as in the RSNA coordinates file)."""
    return next(description for key, description in _READ_ON.items() if key in condition)


def nearest_slice(geometry: SeriesGeometry, point) -> int:
    """The slice whose plane passes nearest a patient point (the instance a reader labels it on)."""
    normal = np.cross(geometry.iop[:, :3], geometry.iop[:, 3:])
    return int(np.argmin(np.abs(np.einsum("ij,ij->i", np.asarray(point) - geometry.ipp, normal))))


def _label_rows(study_id, draw: GradeDraw, phantom: Phantom, series: list[SyntheticSeries]) -> list[tuple]:
    """Coordinates rows: each cell's point on the labelled series it is read on, at its nearest slice;
    none for a series the study lacks."""
    labelled = {se.description: se for se in series if se.labelled}
    rows = []
    for c, condition in enumerate(CONDITIONS):
        se = labelled.get(read_on(condition))
        for k, level in enumerate(LEVELS):
            if not draw.known[c, k] or se is None:
                continue
            point = phantom.landmark(condition, level)
            idx = nearest_slice(se.geometry, point)
            col, row, _ = se.geometry.patient_to_pixel(idx, point)
            rows.append(
                (
                    study_id,
                    se.series_id,
                    int(se.instance_numbers[idx]),
                    CONDITION_TITLES[condition],
                    LEVEL_TITLES[level],
                    round(col, 3),
                    round(row, 3),
                )
            )
    return rows


def _t2_contrast(rng) -> str:
    return "STIR" if rng.random() < 0.25 else "T2"


def _realistic_plans(rng, phantom: Phantom) -> list[tuple]:
    """(description, contrast, geometry, render mm, labelled) per series: each series planned on its
    own; some studies lack one description, some hold two series of one (the labels name one)."""
    descriptions = list(SERIES_DESCRIPTIONS)
    if rng.random() < MISSING_SHARE:
        descriptions.remove(descriptions[int(rng.choice(3, p=[0.45, 0.35, 0.2]))])
    repeat = None
    if rng.random() < REPEAT_SHARE:
        repeat = descriptions[int(rng.integers(len(descriptions)))]
    plans = []
    for description in descriptions:
        copies = 2 if description == repeat else 1
        labelled_copy = int(rng.integers(copies))
        for copy in range(copies):
            if description == AXIAL_T2:
                contrast, geometry, mm = "T2", _axial_realistic(rng, phantom), _AXIAL_RENDER_MM
            else:
                contrast = "T1" if description == SAGITTAL_T1 else _t2_contrast(rng)
                geometry, mm = _sagittal_realistic(rng, phantom), _RENDER_MM
            plans.append((description, contrast, geometry, rng.uniform(*mm), copy == labelled_copy))
    return plans


def synthesize_study(
    rng: np.random.Generator,
    study_id: int,
    series_ids=None,
    *,
    grades: np.ndarray | None = None,
    acquisition: str = "realistic",
) -> SyntheticStudy:
    """Draw and render one phantom study (pixels in memory; `write_study` writes it).

    The grades are the first draws from `rng`, so `sample_grades(rng)` on an identically seeded
    generator reproduces them without rendering. `grades` forces the labels (every cell known), with
    the anatomy at the middle of each grade.
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {ACQUISITIONS}, not {acquisition!r}")
    draw = sample_grades(rng)
    if grades is not None:
        grades = np.asarray(grades, np.int64)
        draw = draw._replace(
            grades=grades.copy(), known=np.ones(grades.shape, bool), latent=_latent_of_grades(grades)
        )
    phantom, spine_centre = _place(_sample_phantom(rng, draw), rng)
    if acquisition == "centred":
        plans = [
            (SAGITTAL_T1, "T1", _sagittal_centred(rng, phantom, spine_centre), None, True),
            (SAGITTAL_T2, _t2_contrast(rng), _sagittal_centred(rng, phantom, spine_centre), None, True),
            (AXIAL_T2, "T2", _axial_centred(rng, phantom), None, True),
        ]
        compressed = False
    else:
        plans = _realistic_plans(rng, phantom)
        compressed = bool(rng.random() < JPEG_LOSSLESS_SHARE)
    if series_ids is None:
        series_ids = [study_id + 1 + i for i in range(len(plans))]
    series_numbers = rng.choice(np.arange(1, 20), len(plans), replace=False)
    series = []
    for (description, contrast, geometry, render_mm, labelled), series_id, number in zip(
        plans, series_ids, series_numbers, strict=False
    ):
        pixels, instances, slope, intercept, window = _render_series(
            rng, phantom, geometry, contrast, description == AXIAL_T2, render_mm, signed_ok=not compressed
        )
        series.append(
            SyntheticSeries(
                int(series_id),
                description,
                contrast,
                geometry,
                pixels,
                instances,
                slope,
                intercept,
                window,
                int(number),
                labelled,
                JPEGLosslessSV1 if compressed else ExplicitVRLittleEndian,
            )
        )
    when = datetime.datetime(2015, 1, 1) + datetime.timedelta(
        days=int(rng.integers(0, 3000)), seconds=int(rng.integers(7 * 3600, 20 * 3600))
    )
    return SyntheticStudy(
        study_id=int(study_id),
        grades=draw.grades,
        known=draw.known,
        phantom=phantom,
        series=series,
        coordinates=_label_rows(int(study_id), draw, phantom, series),
        uid_token=int(rng.integers(0, 2**62)),
        study_datetime=when,
        latent=draw.latent,
    )


# ---------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------

# contrast -> (ScanningSequence, SequenceVariant, RepetitionTime range, EchoTime range, InversionTime)
_SEQUENCE = {
    "T1": ("SE", "SK", (450.0, 700.0), (8.0, 14.0), None),
    "T2": ("SE", "SK", (2800.0, 4500.0), (85.0, 115.0), None),
    "STIR": ("IR", "SK", (3000.0, 5000.0), (40.0, 70.0), 150.0),
}


def _ds(value: float) -> str:
    """A decimal string short enough for the DS VR (16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def _uid(study: SyntheticStudy, *parts) -> str:
    """A valid, reproducible UID. (pydicom's `prefix=None` would ignore the entropy and be random; it
    also joins the sources without a separator, hence the single "|"-joined source.)"""
    return generate_uid(
        entropy_srcs=["|".join(["lumbar-tf-synthetic", str(study.uid_token), *map(str, parts)])]
    )


def _series_template(study: SyntheticStudy, se: SyntheticSeries, rng: np.random.Generator) -> Dataset:
    """Everything that one series' instances share; `write_study` fills the per-instance elements."""
    ds = Dataset()
    for keyword, value in zip(FAKE_PHI, phi_values(study.study_id), strict=True):
        setattr(ds, keyword, value)
    date, time = study.study_datetime.strftime("%Y%m%d"), study.study_datetime.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.Modality = "MR"
    ds.Manufacturer = "LUMBAR-TF PHANTOM"
    ds.ManufacturerModelName = "SYNTHETIC"
    ds.StudyDescription = "MRI LUMBAR SPINE"
    ds.SeriesDescription = se.description
    ds.PatientSex = "O"
    ds.BodyPartExamined = "LSPINE"
    scanning, variant, tr, te, ti = _SEQUENCE[se.contrast]
    ds.ScanningSequence, ds.SequenceVariant = scanning, variant
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = _ds(round(rng.uniform(*tr), 1))
    ds.EchoTime = _ds(round(rng.uniform(*te), 1))
    if ti is not None:
        ds.InversionTime = _ds(ti)
    ds.MagneticFieldStrength = _ds(float(rng.choice([1.5, 3.0])))
    ds.SliceThickness = _ds(se.geometry.thickness)
    ds.SpacingBetweenSlices = _ds(se.geometry.spacing)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(study, "study")
    ds.SeriesInstanceUID = _uid(study, "series", se.series_id)
    ds.FrameOfReferenceUID = _uid(study, "frame")  # one patient frame for all series of a study
    ds.SeriesNumber = se.series_number
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = se.geometry.rows, se.geometry.cols
    ds.PixelSpacing = [_ds(v) for v in se.geometry.pixel_spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if se.pixels.dtype == np.int16 else 0
    ds.WindowCenter, ds.WindowWidth = _ds(se.window[0]), _ds(se.window[1])
    ds.RescaleIntercept, ds.RescaleSlope = _ds(se.intercept), _ds(se.slope)
    ds.RescaleType = "US"
    return ds


# Elements that change from instance to instance; everything else is encoded once per series.
_PER_INSTANCE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00200037, 0x7FE00010)
_IMPLEMENTATION_VERSION = "LUMBAR_TF_SYNTH"


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian data element, padded to even length as DICOM requires."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    if vr in ("OB", "OW"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _jpeg_lossless(frame: np.ndarray) -> bytes:
    """One 12-bit frame as a JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14,
    selection value 1) stream: libjpeg-turbo through imagecodecs writes it, pylibjpeg-libjpeg reads it."""
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, bitspersample=12))


def _encapsulated(frame: bytes) -> bytes:
    """Encapsulated Pixel Data: undefined length, an empty offset table, one fragment, the delimiter."""
    if len(frame) % 2:
        frame += b"\0"
    return b"".join(
        [
            struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF),
            struct.pack("<HHI", 0xFFFE, 0xE000, 0),
            struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)),
            frame,
            struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
        ]
    )


class _SeriesWriter:
    """Writes one series' instances fast: pydicom encodes the shared elements once, in the gaps between
    the per-instance tags (DICOM wants ascending tags), and each file splices in its own UID, number,
    position, orientation and pixels. The bytes equal `pydicom.dcmwrite(..., enforce_file_format=True)`
    of the full dataset (tests check this), at a fraction of its cost per file."""

    def __init__(self, study: SyntheticStudy, series: SyntheticSeries, template: Dataset):
        self.study, self.series = study, series
        bounds = (-1, *_PER_INSTANCE_TAGS, 0x100000000)
        self.segments = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = Dataset()
            for elem in template:
                if lo < elem.tag < hi:
                    part.add(elem)
            self.segments.append(_encode(part))

    def instance_bytes(self, k: int) -> bytes:
        se, seg = self.series, self.segments
        if se.transfer_syntax == JPEGLosslessSV1:
            pixel_element = _encapsulated(_jpeg_lossless(se.pixels[k]))
        else:
            pixels = se.pixels[k].astype(se.pixels.dtype.newbyteorder("<"), copy=False).tobytes()
            pixel_element = _element(0x7FE00010, "OW", pixels)
        uid = _uid(self.study, "instance", se.series_id, int(se.instance_numbers[k])).encode()
        meta = b"".join(
            [
                _element(0x00020001, "OB", b"\0\1"),
                _element(0x00020002, "UI", MRImageStorage.encode()),
                _element(0x00020003, "UI", uid),
                _element(0x00020010, "UI", se.transfer_syntax.encode()),
                _element(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode()),
                _element(0x00020013, "SH", _IMPLEMENTATION_VERSION.encode()),
            ]
        )
        return b"".join(
            [
                b"\0" * 128 + b"DICM",
                _element(0x00020000, "UL", struct.pack("<I", len(meta))),
                meta,
                seg[0],
                _element(0x00080018, "UI", uid),
                seg[1],
                _element(0x00200013, "IS", str(int(se.instance_numbers[k])).encode()),
                seg[2],
                _element(0x00200032, "DS", "\\".join(_ds(v) for v in se.geometry.ipp[k]).encode()),
                seg[3],
                _element(0x00200037, "DS", "\\".join(_ds(v) for v in se.geometry.iop[k]).encode()),
                seg[4],
                pixel_element,
                seg[5],
            ]
        )


def write_study(study: SyntheticStudy, images_dir, rng: np.random.Generator) -> None:
    """Write `images_dir/{study_id}/{series_id}/{instance_number}.dcm` for every slice, in random order
    (so nothing about slice order or grades can be read from file creation order)."""
    writers = [_SeriesWriter(study, se, _series_template(study, se, rng)) for se in study.series]
    folders = [Path(images_dir) / str(study.study_id) / str(se.series_id) for se in study.series]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i, se in enumerate(study.series) for k in range(se.geometry.n)]
    for job in rng.permutation(len(jobs)):
        i, k = jobs[job]
        path = folders[i] / f"{int(study.series[i].instance_numbers[k])}.dcm"
        path.write_bytes(writers[i].instance_bytes(k))


# ---------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------

_SPLITS = {"train": 0, "test": 1}
_IDS_PER_STUDY = 5  # the study and up to four series
LATENT_FILE = "train_latent.csv"
_NOISE_COLUMNS = ("reader_noise_sd", "cut_mild", "cut_moderate", "cut_severe")


def _plan(n_studies: int, seed: int, split: str):
    """Study ids, series ids and one independent seed per study. train and test of one seed differ,
    so they never share patients; per-study seeds keep a study identical however the work is split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if n_studies < 0:
        raise ValueError("n_studies must be >= 0")
    root = np.random.SeedSequence([int(seed), _SPLITS[split]])
    master = np.random.default_rng(root)
    ids: dict[int, None] = {}
    per = _IDS_PER_STUDY
    while len(ids) < per * n_studies:  # 8-10 digit ids, unique over studies and series
        ids.setdefault(int(master.integers(10_000_000, 4_300_000_000)), None)
    ids_list = list(ids)
    return [
        (ids_list[per * i], tuple(ids_list[per * i + 1 : per * (i + 1)]), child)
        for i, child in enumerate(root.spawn(n_studies))
    ]


def iter_studies(
    n_studies: int, seed: int = 0, split: str = "train", acquisition: str = "realistic"
) -> Iterator[tuple[SyntheticStudy, np.random.Generator]]:
    """The studies `synthesize_dataset` writes, in order, each with the generator that writes its files."""
    for study_id, series_ids, child in _plan(n_studies, seed, split):
        rng = np.random.default_rng(child)
        yield synthesize_study(rng, study_id, series_ids, acquisition=acquisition), rng


def _make_study(job) -> dict:
    """Render and write one study (a pool task); returns its CSV rows."""
    study_id, series_ids, child, images, acquisition = job
    rng = np.random.default_rng(child)
    study = synthesize_study(rng, study_id, series_ids, acquisition=acquisition)
    write_study(study, images, rng)
    codes = np.where(study.known, study.grades, UNKNOWN).ravel()  # condition-major = LABEL_COLUMNS order
    return {
        "labels": (study.study_id, *(grade_to_rsna(int(c)) for c in codes)),
        "grades": (study.study_id, *("" if c == UNKNOWN else int(c) for c in codes)),
        "latent": (study.study_id, *_noise_row(), *(round(float(v), 5) for v in study.latent.ravel())),
        "coordinates": study.coordinates,
        "descriptions": [(study.study_id, se.series_id, se.description) for se in study.series],
    }


def _noise_row() -> tuple[float, ...]:
    return (READER_NOISE_SD, *GRADE_CUTS)


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def synthesize_dataset(
    out_dir,
    n_studies: int,
    seed: int = 0,
    *,
    progress: bool = False,
    split: str = "train",
    acquisition: str = "realistic",
    workers: int | None = None,
    fine_grades: bool = True,
) -> Path:
    """Write `n_studies` phantom studies in the RSNA layout under `out_dir`; returns `out_dir`.

    train: ``train_images/``, ``train.csv``, ``train_grades.csv``, ``train_label_coordinates.csv``,
    ``train_series_descriptions.csv`` and ``train_latent.csv`` (each cell's latent severity and the
    reader-noise model, for `lumbar_tf.training.metrics.bayes_optimal_threshold_probs`). test:
    ``test_images/`` and ``test_series_descriptions.csv``. The same (n_studies, seed, split,
    acquisition) gives byte-identical files, whatever the number of `workers` (default: one per core).
    ``fine_grades=False``: no ``train_grades.csv``, the competition's labels alone (Normal/Mild leaves
    grade >= 1 unknown).
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {ACQUISITIONS}, not {acquisition!r}")
    out = Path(out_dir)
    images = out / f"{split}_images"
    images.mkdir(parents=True, exist_ok=True)
    jobs = [(sid, series, child, images, acquisition) for sid, series, child in _plan(n_studies, seed, split)]
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("forkserver").Pool(workers)
        results = pool.imap(_make_study, jobs)
    else:
        results = map(_make_study, jobs)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=n_studies, desc="synth", unit="study")
    try:
        done = list(results)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    rows = {key: [r[key] for r in done] for key in ("labels", "grades", "latent")}
    coordinates = [row for r in done for row in r["coordinates"]]
    descriptions = [row for r in done for row in r["descriptions"]]
    header = ("study_id", *LABEL_COLUMNS)
    _write_csv(
        out / f"{split}_series_descriptions.csv",
        ("study_id", "series_id", "series_description"),
        sorted(descriptions),
    )
    if split == "train":
        _write_csv(out / "train.csv", header, sorted(rows["labels"]))
        if fine_grades:
            _write_csv(out / "train_grades.csv", header, sorted(rows["grades"]))
        coordinates.sort(key=lambda row: row[0])  # stable: (condition, level) order within a study
        _write_csv(
            out / "train_label_coordinates.csv",
            ("study_id", "series_id", "instance_number", "condition", "level", "x", "y"),
            coordinates,
        )
        _write_csv(out / LATENT_FILE, ("study_id", *_NOISE_COLUMNS, *LABEL_COLUMNS), sorted(rows["latent"]))
    return out


def read_latent(path) -> tuple[dict[str, np.ndarray], dict]:
    """`train_latent.csv` -> ({study_id: latent [5, 5]}, {"sd": reader noise sd, "cuts": (3 cuts)})."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    latent = {
        r["study_id"]: np.array([float(r[c]) for c in LABEL_COLUMNS]).reshape(N_CONDITIONS, N_LEVELS)
        for r in rows
    }
    first = rows[0] if rows else dict(zip(_NOISE_COLUMNS, map(str, _noise_row()), strict=True))
    noise = {
        "sd": float(first["reader_noise_sd"]),
        "cuts": tuple(float(first[c]) for c in _NOISE_COLUMNS[1:]),
    }
    return latent, noise
