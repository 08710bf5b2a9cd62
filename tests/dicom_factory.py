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


# === A drawn lumbar spine =======================================================================

LEVEL_NAMES = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")


@dataclass
class Spine:
    """A simple drawn spine in patient mm: enough anatomy for finding it, not for grading.

    Vertebral bodies and discs stacked along z (lumbar 25 + 10 mm, thoracic 20 + 6 mm, up to the
    top of any field), the canal behind them, spinous processes behind that, and below L5/S1 the
    sacrum: one fused block tilted ``sacral_tilt_deg`` back from vertical, the canal ending 40 mm
    down it. ``l5s1`` is the (y, z) of the L5/S1 canal point; ``x_mid`` the midline.
    """

    l5s1: tuple[float, float] = (0.0, -60.0)
    x_mid: float = 0.0
    sacral_tilt_deg: float = 40.0
    contrast: str = "T2"  # "T2": bright CSF and discs; "T1": dark CSF, dark discs, bright marrow

    CANAL_D = 26.0  # canal centre behind the body centre line (mm)

    def canal_points(self) -> np.ndarray:
        """``[5, 3]`` patient (x, y, z) of the canal points L1/L2 .. L5/S1."""
        y0, z0 = self.l5s1
        return np.array([[self.x_mid, y0, z0 + 35.0 * (4 - k)] for k in range(5)])

    def foramen_points(self, side: int) -> np.ndarray:
        """``[5, 3]`` foramen points, 15 mm to the patient's left (side 0) or right (side 1)."""
        pts = self.canal_points()
        pts[:, 0] += 15.0 * (1 - 2 * side)
        pts[:, 1] -= 4.0
        return pts

    def render(self, x, y, z) -> np.ndarray:
        """Signal 0..1 at patient points (arrays of one shape)."""
        t2 = self.contrast == "T2"
        tissue = {
            "soft": 0.3,
            "body": 0.45 if t2 else 0.7,
            "disc": 0.75 if t2 else 0.3,
            "csf": 0.95 if t2 else 0.12,
            "bone": 0.35 if t2 else 0.55,
        }
        lat = np.abs(x - self.x_mid)
        d = y - (self.l5s1[0] - self.CANAL_D)  # posterior distance from the body centre line
        s = z - self.l5s1[1]  # mm above the L5/S1 disc centre
        img = np.full(np.broadcast(x, y, z).shape, tissue["soft"], np.float32)
        # Above L5/S1: lumbar segments of 35 mm (disc centred at s = 35 k), thoracic of 26 mm above L1.
        lumbar = s < 4 * 35.0 + 17.5
        seg = np.where(lumbar, 35.0, 26.0)
        base = np.where(lumbar, 0.0, 4 * 35.0 + 17.5 - 13.0)
        phase = np.mod(s - base + seg / 2, seg) - seg / 2  # 0 at a disc centre
        disc_half = np.where(lumbar, 5.0, 3.0)
        above = s > -5.0
        # Elliptic cross-sections, so neighbouring sagittal slices change smoothly.
        column = above & ((d / 17.0) ** 2 + (lat / 25.0) ** 2 < 1.0)
        img[column] = np.where(np.abs(phase[column]) < disc_half[column], tissue["disc"], tissue["body"])
        canal = above & (((d - self.CANAL_D) / 7.0) ** 2 + (lat / 10.0) ** 2 < 1.0)
        img[canal] = tissue["csf"]
        spinous = above & (d > 38.0) & (d < 70.0) & (lat < 5.0) & (np.abs(phase - seg * 0.35) < seg * 0.25)
        img[spinous] = tissue["bone"]
        # The sacrum: a block tilted back from vertical, starting under the L5/S1 disc.
        a = np.radians(self.sacral_tilt_deg)
        down = np.array([np.sin(a), -np.cos(a)])  # (y, z) unit vector along the sacrum, feet-ward
        rel_y, rel_z = d, s + 5.0
        along = rel_y * down[0] + rel_z * down[1]
        across = rel_y * -down[1] + rel_z * down[0]  # posterior across the sacrum
        depth = 17.0 - 0.1 * along
        sacrum = (along > 0) & (along < 100.0) & ((across / depth) ** 2 + (lat / 30.0) ** 2 < 1.0)
        img[sacrum] = tissue["body"]
        sac_canal = (along > 0) & (along < 40.0) & (np.abs(across - self.CANAL_D) < 5.0) & (lat < 8.0)
        img[sac_canal] = tissue["csf"]
        return img


def spine_pixels(spec: SeriesSpec, spine: Spine, noise: float = 0.03) -> np.ndarray:
    """Stored values ``[n, rows, cols]`` of ``spec``'s slices through ``spine`` (12-bit)."""
    row_dir, col_dir, _ = iop_vectors(spec.iop)
    cols = np.arange(spec.cols, dtype=np.float64)[None, :, None] * spec.pixel_spacing[1]
    rows = np.arange(spec.rows, dtype=np.float64)[:, None, None] * spec.pixel_spacing[0]
    rng = np.random.default_rng(spec.seed)
    out = []
    for ipp in slice_positions(spec):
        pts = ipp + cols * row_dir + rows * col_dir  # [rows, cols, 3]
        img = spine.render(pts[..., 0], pts[..., 1], pts[..., 2])
        img = img + rng.normal(0.0, noise, img.shape)
        out.append(np.clip(img * 3000 + 200, 0, 4095))
    return np.stack(out).astype(np.uint16)


def halve_matrix(path: str | Path) -> Dataset:
    """Rewrite the slice at ``path`` at half its matrix over the same field (2x2 means, PixelSpacing
    doubled, ImagePositionPatient moved to the centre of the new first pixel): a slice of another size
    than its series, as some archives hold. Returns the rewritten dataset."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    rows, cols = ds.Rows // 2, ds.Columns // 2
    halved = pixels[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2).mean(axis=(1, 3)).round()
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = halved.astype("<u2").tobytes()
    spacing = [float(v) for v in ds.PixelSpacing]
    row_dir, col_dir, _ = iop_vectors([float(v) for v in ds.ImageOrientationPatient])
    shift = 0.5 * (spacing[1] * row_dir + spacing[0] * col_dir)  # half an old pixel along both
    ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array(ds.ImagePositionPatient, float) + shift]
    ds.PixelSpacing = [2 * v for v in spacing]
    ds.save_as(path)
    return ds


def file_px(ds: Dataset, point) -> tuple[float, float]:
    """(column, row) of a patient point ([3] mm, in the slice's plane) in the pixels of the file ``ds``:
    what a reader clicking on that file records."""
    row_dir, col_dir, _ = iop_vectors([float(v) for v in ds.ImageOrientationPatient])
    rel = np.asarray(point, dtype=np.float64) - np.array(ds.ImagePositionPatient, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    return float(rel @ row_dir / col_mm), float(rel @ col_dir / row_mm)


def file_px_to_patient(ds: Dataset, xy) -> np.ndarray:
    """Pixel (column, row) ``[..., 2]`` of the file ``ds`` -> patient mm ``[..., 3]``, from its own header."""
    row_dir, col_dir, _ = iop_vectors([float(v) for v in ds.ImageOrientationPatient])
    xy = np.asarray(xy, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    ipp = np.array(ds.ImagePositionPatient, dtype=np.float64)
    return ipp + xy[..., :1] * col_mm * row_dir + xy[..., 1:2] * row_mm * col_dir


def spine_series(spine: Spine, description: str = "Sagittal T2/STIR", **kwargs) -> SeriesSpec:
    """A SeriesSpec (``kwargs`` set its geometry) with pixels drawn from ``spine``."""
    spec = SeriesSpec(description, slope=None, intercept=None, **kwargs)
    spec.pixels = spine_pixels(spec, spine)
    return spec


def label_rows(study_id: str, series_id: str, spec: SeriesSpec, points: np.ndarray, condition: str) -> list:
    """train_label_coordinates.csv rows of ``points`` ([5, 3] patient mm) on the slice of ``spec``
    nearest to each (the instance a reader would click on)."""
    row_dir, col_dir, normal = iop_vectors(spec.iop)
    positions = slice_positions(spec)
    out = []
    for level, p in zip(LEVEL_NAMES, points):
        k = int(np.argmin([abs((p - q) @ normal) for q in positions]))
        rel = p - positions[k]
        x, y = rel @ row_dir / spec.pixel_spacing[1], rel @ col_dir / spec.pixel_spacing[0]
        out.append([study_id, series_id, k + 1, condition, level, round(float(x), 3), round(float(y), 3)])
    return out
