"""Small helpers that write real DICOM series into temporary folders for the tests.

Not the phantom generator (that is ``lumbar_tf.synthetic.phantom``): these write tiny MR series whose
geometry, pixel values and encoding the tests choose exactly.

Geometry is LPS (+x left, +y posterior, +z head). A sagittal slice has rows running anterior ->
posterior (``row_dir = +y``) and columns running head -> feet (``col_dir = -z``), the usual RSNA
orientation; slices are spaced along patient x.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL_IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_lossless": JPEGLosslessSV1,
    "jpeg2000_lossless": JPEG2000Lossless,
}


@dataclass
class SeriesSpec:
    """What to write for one series; every field has a small, valid default."""

    description: str = "Sagittal T2/STIR"
    n_slices: int = 7
    rows: int = 40
    cols: int = 48
    pixel_spacing: tuple[float, float] = (0.9, 0.8)  # (between rows, between columns) mm
    slice_spacing: float = 4.0
    slice_offsets: tuple[float, ...] | None = None  # mm along the IOP normal; else even spacing
    iop: tuple[float, ...] = SAGITTAL_IOP
    center: tuple[float, float, float] = (2.0, -10.0, 30.0)  # LPS mm, centre of the middle slice
    bits_stored: int = 12
    slope: float | None = 2.0
    intercept: float | None = -100.0
    photometric: str = "MONOCHROME2"
    series_number: int = 1
    echo_time: float | None = None
    repetition_time: float | None = None
    seed: int = 0
    pixels: np.ndarray | None = None  # [n, rows, cols] stored values; random if None
    extra: dict = field(default_factory=dict)  # keyword -> value set on every slice


def oblique_sagittal_iop(yaw_deg: float, tilt_deg: float) -> tuple[float, ...]:
    """A sagittal IOP rotated by ``yaw_deg`` about z and then ``tilt_deg`` about x."""
    a, b = np.radians(yaw_deg), np.radians(tilt_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    row, col = np.array(SAGITTAL_IOP[:3]), np.array(SAGITTAL_IOP[3:])
    return tuple(float(v) for v in np.concatenate([rx @ rz @ row, rx @ rz @ col]))


def iop_vectors(iop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row_dir = np.asarray(iop[:3], dtype=np.float64)
    col_dir = np.asarray(iop[3:], dtype=np.float64)
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def slice_positions(spec: SeriesSpec) -> list[np.ndarray]:
    """ImagePositionPatient of each slice, in acquisition (normal) order."""
    row_dir, col_dir, normal = iop_vectors(spec.iop)
    center = np.asarray(spec.center, dtype=np.float64)
    # IPP is the centre of the first pixel; the slice centre is half the FOV away.
    first = (
        center
        - row_dir * spec.pixel_spacing[1] * (spec.cols - 1) / 2
        - col_dir * spec.pixel_spacing[0] * (spec.rows - 1) / 2
    )
    if spec.slice_offsets is not None:
        offsets = np.asarray(spec.slice_offsets, dtype=np.float64)
    else:
        offsets = (np.arange(spec.n_slices) - (spec.n_slices - 1) / 2) * spec.slice_spacing
    return [first + normal * o for o in offsets]


def stored_pixels(spec: SeriesSpec) -> np.ndarray:
    if spec.pixels is not None:
        return np.asarray(spec.pixels).astype(np.uint16)
    rng = np.random.default_rng(spec.seed)
    return rng.integers(0, 2**spec.bits_stored, (spec.n_slices, spec.rows, spec.cols)).astype(np.uint16)


def make_dataset(
    spec: SeriesSpec,
    pixels: np.ndarray,
    position: np.ndarray,
    instance_number: int,
    study_uid: str,
    series_uid: str,
) -> Dataset:
    """One MR slice, uncompressed explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = "phantom"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.description
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in spec.iop]
    ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
    ds.SliceThickness = float(spec.slice_spacing)
    if spec.echo_time is not None:
        ds.EchoTime = spec.echo_time
    if spec.repetition_time is not None:
        ds.RepetitionTime = spec.repetition_time
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    if spec.slope is not None:
        ds.RescaleSlope = spec.slope
        ds.RescaleIntercept = spec.intercept if spec.intercept is not None else 0.0
        ds.RescaleType = "US"
    for key, value in spec.extra.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_series(
    folder: str | Path,
    spec: SeriesSpec | None = None,
    *,
    transfer_syntax: str = "explicit",
    shuffle_names: bool = False,
    scramble_instances: bool = False,
    study_uid: str | None = None,
) -> tuple[list[Path], np.ndarray]:
    """Write ``spec`` as ``folder/{instance_number}.dcm``.

    Returns (paths in slice order along the IOP normal, stored pixels ``[n, rows, cols]`` in that
    order). ``shuffle_names`` writes slice k under a random file name; ``scramble_instances``
    gives instance numbers that do not follow the slice order.
    """
    spec = spec or SeriesSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    pixels = stored_pixels(spec)
    positions = slice_positions(spec)
    instances = list(range(1, spec.n_slices + 1))
    if scramble_instances:
        rng.shuffle(instances)
    names = [f"{i}.dcm" for i in instances]
    if shuffle_names:
        names = [f"{n}.dcm" for n in rng.sample(range(1000, 9999), spec.n_slices)]
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for k in range(spec.n_slices):
        ds = make_dataset(spec, pixels[k], positions[k], instances[k], study_uid, series_uid)
        path = folder / names[k]
        save(ds, path, transfer_syntax)
        paths.append(path)
    return paths, pixels


def save(ds: Dataset, path: str | Path, transfer_syntax: str = "explicit") -> None:
    """Write ``ds`` (uncompressed) to ``path`` in one of `TRANSFER_SYNTAXES`."""
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
    elif transfer_syntax == "jpeg2000_lossless":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif transfer_syntax == "jpeg_lossless":
        ds.PixelData = encapsulate([encode_jpeg_lossless_sv1(ds)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    elif transfer_syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid


def encode_jpeg_lossless_sv1(ds: Dataset) -> bytes:
    """JPEG Lossless, Non-Hierarchical, First-Order Prediction (process 14, selection value 1).

    pydicom has no encoder for this transfer syntax; imagecodecs' libjpeg-turbo 3 writes it
    (SOF3, predictor 1, point transform 0). Test-only dependency.
    """
    import imagecodecs

    pixels = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    data = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
    assert data[:2] == b"\xff\xd8" and b"\xff\xc3" in data  # SOI, SOF3 (lossless Huffman)
    return bytes(data)


def rewrite(src: str | Path, dst: str | Path, transfer_syntax: str) -> None:
    """Copy an uncompressed file into another transfer syntax."""
    ds = pydicom.dcmread(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save(ds, dst, transfer_syntax)


def write_study(
    root: str | Path,
    study_id: str = "1001",
    specs: dict[str, SeriesSpec] | None = None,
    **kwargs,
) -> Path:
    """Write ``root/{study_id}/{series_id}/*.dcm`` for each ``series_id -> spec``.

    Default: a Sagittal T2/STIR, a Sagittal T1 and an Axial T2 series.
    """
    if specs is None:
        specs = {
            "11": SeriesSpec("Sagittal T2/STIR", series_number=11, seed=1),
            "12": SeriesSpec("Sagittal T1", series_number=12, seed=2, n_slices=9),
            "13": SeriesSpec(
                "Axial T2", series_number=13, seed=3, n_slices=5, iop=AXIAL_IOP, slice_spacing=5.0
            ),
        }
    study_dir = Path(root) / study_id
    study_uid = generate_uid()
    for series_id, spec in specs.items():
        write_series(study_dir / series_id, spec, study_uid=study_uid, **kwargs)
    return study_dir


def tilted_axial_iop(tilt_deg: float) -> tuple[float, ...]:
    """An axial IOP rotated by ``tilt_deg`` about patient x (as a stack angled along a disc)."""
    b = np.radians(tilt_deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(b)), float(np.sin(b)))


def write_stacks(
    folder: str | Path,
    stacks: list[SeriesSpec],
    *,
    descending_instances: bool = False,
    study_uid: str | None = None,
) -> tuple[list[Path], list[np.ndarray]]:
    """Write several stacks (each its own IOP, centre and slice count) as ONE series in ``folder``.

    Series-level fields (description, size, spacing, number, rescale) come from ``stacks[0]``.
    Instance numbers run over the stacks in order, ascending along each stack's normal, or
    descending with ``descending_instances`` (the reversed order some scanners write).
    Returns (paths, ImagePositionPatient of every slice), both in writing order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = stacks[0]
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    slices = []
    for spec in stacks:
        spec = replace(
            first,
            iop=spec.iop,
            center=spec.center,
            n_slices=spec.n_slices,
            slice_spacing=spec.slice_spacing,
            slice_offsets=spec.slice_offsets,
            pixels=spec.pixels,
            seed=spec.seed,
        )
        slices.extend(zip([spec] * spec.n_slices, stored_pixels(spec), slice_positions(spec)))
    total = len(slices)
    paths, positions = [], []
    for k, (spec, pixels, position) in enumerate(slices):
        instance = total - k if descending_instances else k + 1
        ds = make_dataset(spec, pixels, position, instance, study_uid, series_uid)
        path = folder / f"{instance}.dcm"
        save(ds, path)
        paths.append(path)
        positions.append(position)
    return paths, positions
