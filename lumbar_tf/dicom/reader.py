"""Reading lumbar MRI studies from DICOM (pydicom; never TensorFlow).

A study folder holds one sub-folder per series (the RSNA layout
``{study_id}/{series_id}/{instance_number}.dcm``). `read_study` reads only the headers of every
instance to learn the geometry; `Series.load_pixels` decodes just the slices a caller asks for.
Headers go through `lumbar_tf.dicom.header_scan` (a fast walk over the first kilobytes, enough for the
common uncompressed file, whose pixels are then read straight from their offset) and otherwise
through pydicom (``stop_before_pixels``), which also checks and words every bad-file error.

Geometry is DICOM patient coordinates, LPS (+x patient left, +y posterior, +z head). For slice
``k`` with ImagePositionPatient ``P`` (centre of the first pixel), ImageOrientationPatient
``(row_dir, col_dir)`` and PixelSpacing ``(row_mm, col_mm)``, pixel ``(x, y) = (column, row)``
(pixel centres at integers) lies at ``P + x * col_mm * row_dir + y * row_mm * col_dir``.
(DICOM naming: ``row_dir`` is the direction along a row, i.e. of increasing column index;
``PixelSpacing[0]`` is the spacing between rows.)

Series types: the RSNA descriptions CSV wins; where a series is not in it, the type comes from the
slice orientation (sagittal / axial from the slice normal) and the SeriesDescription text ("T1",
"T2", "STIR"/"TIRM"), falling back on echo/inversion times. It maps onto the canonical names
`SAGITTAL_T1`, `SAGITTAL_T2`, `AXIAL_T2`. Where two series claim one name, the one the caller prefers
(in training: the series the coordinates file names) wins, else the one covering most (lateral extent
of the stack, then field area, then slice count; ties: the first in series-id order); the other goes to
`Study.extra` with a warning naming both. Unusable series are set aside the same way, with a warning:
a series whose slices do not lie in the plane its description names, or with a single slice. Within a
series, a slice of another size than most is resampled onto the series' matrix where it covers the same
field (`_resampled_header`; its geometry stays exact), else dropped; slices at a duplicated position are
dropped (warned). A file whose header is refused (corrupt, over a `ReadLimits` limit, degenerate
geometry) is dropped from its series with a warning naming it, and each series records what reading
it cost as `Series.issues` codes (`SERIES_ISSUES`), which flag the cells it feeds in predictions.json;
only a study with no readable file at all is refused, naming its first bad file.
Warnings name series ids and files relative to the study folder (never header text): they end up in
predictions.json.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from lumbar_tf.core.errors import DicomError, one_line
from lumbar_tf.dicom.header_scan import WANTED_KEYWORDS, ScannedHeader, scan_header

SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
CANONICAL_DESCRIPTIONS = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)

PLANES = ("sagittal", "coronal", "axial")  # by the dominant axis of the slice normal (x, y, z)

# Files in a study that are considered DICOM instances (others, hidden files and DICOMDIR are
# ignored): RSNA uses .dcm; many exports have no suffix.
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}

# What reading a series cost (`Series.issues`); predictions.json flags the cells a series feeds with them.
SERIES_ISSUES = {
    "files_dropped": "a file of the series could not be read and was left out",
    "duplicates_dropped": "slices at a duplicated position were left out",
    "slices_dropped": "slices of another matrix and field were left out",
    "slices_resampled": "slices of another matrix were resampled onto the series' matrix",
}
MAX_NAMED_DROPS = 3  # unreadable files named in one warning; the rest are counted

_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float / Double Float Pixel Data
_ITEM, _SEQ_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


# === Resource limits ===


@dataclass(frozen=True)
class ReadLimits:
    """What a study may cost, checked before the memory or time is spent (issue 14: a PACS export
    or a USB stick may hold a 65535 x 65535 header over a sparse file, or a deflate bomb).

    Every limit is far above any real lumbar MR series (a 1024 x 1024 16-bit slice is 2 MiB, a
    series a few hundred files). A file over a limit is refused with a DicomError naming it;
    change the limits for a process with `set_read_limits`.
    """

    max_file_bytes: int = 128 * 2**20  # one DICOM file on disk
    max_image_bytes: int = 64 * 2**20  # Rows x Columns x frames x samples x bytes per pixel
    max_inflated_bytes: int = 128 * 2**20  # a deflated data set once inflated
    max_fragments: int = 65536  # items of encapsulated pixel data in one file
    max_slices_per_series: int = 2000  # DICOM files in one series folder
    max_series_per_study: int = 200  # series folders in one study
    max_files_per_study: int = 20000  # DICOM files in one study, all series

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ReadLimits.{name} must be a positive integer, got {value!r}")


_limits = ReadLimits()


def read_limits() -> ReadLimits:
    """The limits this process reads DICOM with."""
    return _limits


def set_read_limits(limits: ReadLimits) -> ReadLimits:
    """Read DICOM with ``limits`` from now on (this process only); returns the previous ones."""
    global _limits
    previous, _limits = _limits, limits
    return previous


def _why(exc: BaseException) -> str:
    """A library's exception in one line (pydicom's plugin errors run over several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def _check_file_size(path: Path, size: int) -> None:
    if size > _limits.max_file_bytes:
        raise DicomError(path, f"file is {_mib(size)}, over the {_mib(_limits.max_file_bytes)} limit")


# === Headers ===


@dataclass(frozen=True)
class ModalityMap:
    """Stored pixel value -> displayed modality value: Rescale Slope/Intercept (as pydicom's
    ``apply_modality_lut``), then for MONOCHROME1 an inversion over the stored range, so that
    higher values are always brighter."""

    slope: float | None  # None: no rescale tags, values stay as stored
    intercept: float = 0.0
    invert_sum: float | None = None  # MONOCHROME1: value = invert_sum - rescaled

    def apply(self, stored) -> np.ndarray:
        """Stored values (any shape) -> float32 modality values."""
        stored = np.asarray(stored)
        if self.slope is None:
            out = stored.astype(np.float32)
        else:
            out = (stored.astype(np.float64) * self.slope + self.intercept).astype(np.float32)
        if self.invert_sum is not None:
            out = np.float32(self.invert_sum) - out
        return out


@dataclass(frozen=True)
class NativePixels:
    """Where an uncompressed little-endian slice keeps its pixels, to read them without pydicom."""

    offset: int  # byte offset of the Pixel Data value
    dtype: str  # numpy dtype of the stored words ("<u2", "<i2", "u1", "i1")
    bits_stored: int
    modality: ModalityMap


@dataclass(frozen=True)
class JpegPixels:
    """Where a JPEG Lossless slice keeps its one frame, to decode it with libjpeg-turbo (imagecodecs)
    without a pydicom parse: ~5x faster than pydicom's pylibjpeg-libjpeg plugin, the same values."""

    fragments: tuple[tuple[int, int], ...]  # (byte offset, length) of each fragment of the frame
    dtype: str  # numpy dtype of the stored words ("<u2", "u1"; unsigned only)
    bits_stored: int
    modality: ModalityMap


def _rescale_px(xy, from_shape: tuple[int, int], to_shape: tuple[int, int]) -> np.ndarray:
    """(column, row) ``[..., 2]`` on a ``from_shape`` (rows, cols) matrix -> on a ``to_shape`` matrix over
    the same field (pixel centres: the corner of pixel (0, 0) stays where it is)."""
    scale = np.array([to_shape[1] / from_shape[1], to_shape[0] / from_shape[0]])
    return (np.asarray(xy, dtype=np.float64) + 0.5) * scale - 0.5


@dataclass
class SliceHeader:
    """Geometry of one instance, read without its pixels."""

    path: Path
    instance_number: int
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm, centre of pixel (0, 0)
    row_dir: np.ndarray  # (3,) unit, direction of increasing column index
    col_dir: np.ndarray  # (3,) unit, direction of increasing row index
    pixel_spacing: tuple[float, float]  # (row_mm, col_mm) = PixelSpacing (between rows, columns)
    rows: int
    cols: int
    native: NativePixels | None = None  # set where the fast header scan located native pixels
    jpeg: JpegPixels | None = None  # set where it located a JPEG Lossless frame
    # (rows, cols) in the file where decoding resamples the slice to (rows, cols) (another size than
    # its series, same field: `_resampled_header`); the geometry above is then the resampled one.
    file_shape: tuple[int, int] | None = None

    @functools.cached_property
    def normal(self) -> np.ndarray:
        (a1, a2, a3), (b1, b2, b3) = self.row_dir, self.col_dir  # cross product (np.cross is slow here)
        return np.array([a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1])

    @property
    def center(self) -> np.ndarray:
        """Patient position of the centre of the field of view."""
        return self.pixel_to_patient(((self.cols - 1) / 2, (self.rows - 1) / 2))

    def file_px_to_px(self, xy) -> np.ndarray:
        """(column, row) in the file's own matrix ``[..., 2]`` (label coordinates) -> in this header's
        (they differ only for a resampled slice, `file_shape`)."""
        if self.file_shape is None:
            return np.asarray(xy, dtype=np.float64)
        return _rescale_px(xy, self.file_shape, (self.rows, self.cols))

    def px_to_file_px(self, xy) -> np.ndarray:
        """(column, row) in this header's matrix ``[..., 2]`` -> in the file's own (the inverse of
        `file_px_to_px`): what outputs that name the file's pixels (predictions.json) report."""
        if self.file_shape is None:
            return np.asarray(xy, dtype=np.float64)
        return _rescale_px(xy, (self.rows, self.cols), self.file_shape)

    def pixel_to_patient(self, xy) -> np.ndarray:
        """(column, row) pixel coordinates ``[..., 2]`` -> LPS mm ``[..., 3]``."""
        xy = np.asarray(xy, dtype=np.float64)
        row_mm, col_mm = self.pixel_spacing
        return self.position + xy[..., :1] * (col_mm * self.row_dir) + xy[..., 1:2] * (row_mm * self.col_dir)

    def patient_to_pixel(self, xyz) -> np.ndarray:
        """LPS mm ``[..., 3]`` -> (column, row) ``[..., 2]`` of its projection onto the slice."""
        d = np.asarray(xyz, dtype=np.float64) - self.position
        row_mm, col_mm = self.pixel_spacing
        return np.stack([d @ self.row_dir / col_mm, d @ self.col_dir / row_mm], axis=-1)


@dataclass
class Series:
    """One series: slices ordered by position along `normal` (ascending).

    ``normal`` is the unit slice normal, signed so that its dominant component is positive: for a
    sagittal series it points to patient left (+x), for an axial one to the head (+z).
    """

    series_id: str
    description: str
    slices: list[SliceHeader]
    normal: np.ndarray
    dicom_description: str = ""  # SeriesDescription as written in the files
    warnings: list[str] = field(default_factory=list)  # what reading it dropped (odd sizes, duplicates)
    issues: set[str] = field(default_factory=set)  # the same as `SERIES_ISSUES` codes
    # Slices decoded while `keeping_decoded` is active, by index (read-only arrays).
    _kept: dict | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def plane(self) -> str:
        return plane_of_normal(self.normal)

    @property
    def path(self) -> Path:
        return self.slices[0].path.parent

    @property
    def instance_numbers(self) -> list[int]:
        return [s.instance_number for s in self.slices]

    def positions_mm(self) -> np.ndarray:
        """Each slice's position along `normal` (absolute, mm)."""
        return np.array([s.position @ self.normal for s in self.slices], dtype=np.float64)

    def lateral_positions_mm(self) -> np.ndarray:
        """Each slice's position along the normal relative to the stack centre (mean), in mm.

        Sagittal: + = patient left; axial: + = head (the sign of `normal`).
        """
        pos = self.positions_mm()
        return pos - pos.mean()

    def index_of_instance(self, instance_number: int) -> int:
        for i, s in enumerate(self.slices):
            if s.instance_number == int(instance_number):
                return i
        raise KeyError(f"series {self.series_id} has no instance {instance_number}")

    def pixel_to_patient(self, index: int, xy) -> np.ndarray:
        """(column, row) pixel coordinates of slice ``index`` ``[..., 2]`` -> LPS mm ``[..., 3]``."""
        return self.slices[index].pixel_to_patient(xy)

    def patient_to_pixel(self, index: int, xyz) -> np.ndarray:
        """LPS mm ``[..., 3]`` -> (column, row) ``[..., 2]`` in slice ``index`` (projected)."""
        return self.slices[index].patient_to_pixel(xyz)

    def load_pixels(self, indices) -> np.ndarray:
        """Decode only slices ``indices`` -> float32 ``[k, rows, cols]``.

        Modality LUT applied (Rescale Slope/Intercept); MONOCHROME1 inverted so that higher
        values are brighter.
        """
        decoded = self.load_stored(indices)
        out = np.empty((len(decoded), self.slices[0].rows, self.slices[0].cols), np.float32)
        for k, (values, modality) in enumerate(decoded):
            out[k] = values if modality is None else modality.apply(values)
        return out

    def load_stored(self, indices) -> list[tuple[np.ndarray, ModalityMap | None]]:
        """Decode only slices ``indices`` -> per slice (values ``[rows, cols]``, modality map).

        The values are the stored integers and the map turns them into what `load_pixels`
        returns; where that is no affine map (a Modality LUT Sequence) the values are already
        float32 modality values and the map is None. Lets preprocessing work on the integers.
        """
        indices = [int(indices)] if np.isscalar(indices) else [int(i) for i in indices]
        kept = self._kept
        if kept is None:
            return [decode_stored(self.slices[i]) for i in indices]
        for i in indices:
            if i not in kept:
                values, modality = decode_stored(self.slices[i])
                values.flags.writeable = False  # shared by every later reader of this slice
                kept[i] = values, modality
        return [kept[i] for i in indices]

    @contextlib.contextmanager
    def keeping_decoded(self):
        """Decode each slice once while inside: the spine finder and the views read some of the same
        slices (`preprocess.build_views`). The decoded slices are let go on leaving."""
        outer = self._kept is not None
        if not outer:
            self._kept = {}
        try:
            yield self
        finally:
            if not outer:
                self._kept = None


@dataclass
class Study:
    """A study folder: canonical series keyed by description, plus what was set aside."""

    study_id: str
    path: Path
    series: dict[str, Series]
    extra: list[Series] = field(default_factory=list)  # unassigned or duplicate series
    warnings: list[str] = field(default_factory=list)
    # Canonical descriptions claimed (in the CSV or the header text) by a series set aside as unusable.
    set_aside: set[str] = field(default_factory=set)

    def series_by_description(self, desc: str) -> Series | None:
        if desc in self.series:
            return self.series[desc]
        key = _norm_text(desc)
        for name, series in self.series.items():
            if _norm_text(name) == key:
                return series
        return None

    def sagittal_series(self) -> list[Series]:
        """Sagittal series, Sagittal T2/STIR first, then Sagittal T1, then the others (set-aside
        repeats and untyped sagittal series with at least two slices)."""
        order = {SAGITTAL_T2: 0, SAGITTAL_T1: 1}
        found = [s for s in self.series.values() if s.plane == "sagittal"]
        found.sort(key=lambda s: order.get(s.description, 2))
        return found + [s for s in self.extra if s.plane == "sagittal" and len(s.slices) > 1]


def _norm_text(text: str) -> str:
    return " ".join(str(text).casefold().split())


def plane_of_normal(normal) -> str:
    return PLANES[int(np.argmax(np.abs(np.asarray(normal))))]


def _float_list(ds, keyword: str, n: int, path) -> list[float]:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomError(path, f"missing required tag {keyword}")
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DicomError(path, f"bad {keyword} value {value!r}") from None
    if len(floats) != n or not all(map(math.isfinite, floats)):
        raise DicomError(path, f"bad {keyword} value {value!r} (expected {n} numbers)")
    return floats


def _int_tag(ds, keyword: str, path) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomError(path, f"missing required tag {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(path, f"bad {keyword} value {value!r}") from None


def _read_dataset_header(path: Path):
    """dcmread without pixel data; checks that pixel data exists and is complete."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomError(path, f"cannot read file ({exc.strerror})") from None
    if size == 0:
        raise DicomError(path, "empty file (truncated DICOM)")
    _check_file_size(path, size)
    try:
        with open(path, "rb") as fp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # pydicom inflates a deflated data set whole on opening: measure it in bounded steps first.
            meta = read_file_meta_info(path)
            deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
            if deflated:
                _check_deflate_stream(fp, meta, path)
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            tell = fp.tell()
            _check_image_size(ds, path)
            if deflated:
                ds = pydicom.dcmread(fp.name)  # inflated in memory (under the limit); pixels not decoded
            elif tell < size:
                _check_pixel_element(fp, ds, tell, size, path)
    except DicomError:
        raise
    except InvalidDicomError:
        raise DicomError(path, "not a DICOM file (no DICM preamble)") from None
    except OSError as exc:
        raise DicomError(path, f"cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # pydicom raises many kinds on corrupt input
        raise DicomError(path, f"truncated or corrupt DICOM ({_why(exc)})") from None
    for w in caught:
        if "end of file" in str(w.message).lower():
            raise DicomError(path, f"truncated DICOM ({w.message})")
    try:
        if deflated:
            if "PixelData" not in ds:
                raise DicomError(path, "no pixel data")
            expected = _expected_native_bytes(ds)
            if expected is not None and len(ds.PixelData) < expected:
                raise DicomError(path, f"truncated pixel data ({len(ds.PixelData)} of {expected} bytes)")
        elif tell >= size:
            _check_complete_without_pixels(ds, size, path)
            raise DicomError(path, "no pixel data")
    except DicomError:
        raise
    except Exception as exc:  # pydicom converts values lazily: a corrupt one fails here
        raise DicomError(path, f"truncated or corrupt DICOM ({_why(exc)})") from None
    return ds


def _tags_by_pydicom(path: Path) -> dict:
    """The tags `read_instance_header` and `read_series` use, converted now: pydicom converts a
    value when it is first read, and a corrupt one (an unknown VR, say) must fail here, as a
    DicomError, not later in the caller."""
    ds = _read_dataset_header(path)
    try:
        return {keyword: ds.get(keyword) for keyword in WANTED_KEYWORDS}
    except Exception as exc:  # pydicom raises many kinds on corrupt values
        raise DicomError(path, f"corrupt DICOM ({_why(exc)})") from None


def _check_deflate_stream(fp, meta, path: Path) -> None:
    """A deflated data set must end with the end of its zlib stream (else: truncated) and inflate to
    no more than the limit: inflated in bounded steps and thrown away, never held whole."""
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise DicomError(path, "deflated data set without FileMetaInformationGroupLength")
    fp.seek(128 + 4 + 12 + int(group_length))  # preamble, "DICM", group length element
    cap = _limits.max_inflated_bytes
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof and (chunk := inflater.unconsumed_tail or fp.read(1 << 16)):
            total += len(inflater.decompress(chunk, 1 << 20))
            if total > cap:
                raise DicomError(path, f"deflated data set inflates past the {_mib(cap)} limit")
    except zlib.error as exc:
        raise DicomError(path, f"corrupt deflated data set ({_why(exc)})") from None
    if not inflater.eof:
        raise DicomError(path, "truncated DICOM (deflated data set cut short)")


def _optional_int(tags, keyword: str, default: int, path) -> int:
    value = tags.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(path, f"bad {keyword} value {value!r} (expected an integer)") from None


def _check_image_size(tags, path) -> None:
    """Rows x Columns x frames x samples x bytes per pixel under the limit, before any pixel is read."""
    rows, cols = _optional_int(tags, "Rows", 0, path), _optional_int(tags, "Columns", 0, path)
    frames = _optional_int(tags, "NumberOfFrames", 1, path)
    samples = _optional_int(tags, "SamplesPerPixel", 1, path)
    bits = _optional_int(tags, "BitsAllocated", 16, path)
    if min(rows, cols, frames, samples, bits) < 0:
        raise DicomError(path, "negative Rows/Columns/NumberOfFrames/SamplesPerPixel/BitsAllocated")
    size = rows * cols * frames * samples * ((bits + 7) // 8)
    if size > _limits.max_image_bytes:
        raise DicomError(
            path,
            f"image of {rows} x {cols} x {frames} frames x {samples} x {bits} bits is {_mib(size)}, "
            f"over the {_mib(_limits.max_image_bytes)} limit",
        )


def _expected_native_bytes(ds) -> int | None:
    try:
        bits = int(ds.BitsAllocated)
        n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        n *= int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (n * bits + 7) // 8


def _check_pixel_element(fp, ds, tell: int, size: int, path: Path) -> None:
    """``fp`` is at the pixel data element that stop_before_pixels stopped at: is it complete?"""
    implicit, little = ds.original_encoding
    endian = "<" if little else ">"
    fp.seek(tell)
    head = fp.read(8)
    if len(head) < 8:
        raise DicomError(path, "truncated DICOM (inside the pixel data header)")
    group, elem = struct.unpack(endian + "HH", head[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        raise DicomError(path, f"corrupt DICOM (unexpected tag ({group:04X},{elem:04X}))")
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
    else:
        ext = fp.read(4)
        if len(ext) < 4:
            raise DicomError(path, "truncated DICOM (inside the pixel data header)")
        (length,) = struct.unpack(endian + "L", ext)
    start = fp.tell()
    if length != 0xFFFFFFFF:  # native
        if start + length > size:
            raise DicomError(path, f"truncated pixel data ({size - start} of {length} bytes present)")
        expected = _expected_native_bytes(ds)
        if length == 0:
            raise DicomError(path, "no pixel data (empty Pixel Data element)")
        if expected is not None and length < expected:
            raise DicomError(path, f"truncated pixel data ({length} of {expected} bytes)")
        return
    # Encapsulated: walk the items by their lengths (seeks only) to the sequence delimiter.
    pos, items = start, 0
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            raise DicomError(path, "truncated pixel data (encapsulated, no sequence delimiter)")
        group, elem, length = struct.unpack(endian + "HHL", item)
        tag = group << 16 | elem
        if tag == _SEQ_DELIMITER:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise DicomError(path, "corrupt encapsulated pixel data")
        pos += 8 + length
        if pos > size:
            raise DicomError(path, "truncated pixel data (encapsulated fragment cut short)")
        items += 1
        if items > _limits.max_fragments:
            raise DicomError(path, f"more than {_limits.max_fragments} encapsulated fragments")
    if items < 2:  # the basic offset table item plus at least one fragment
        raise DicomError(path, "no pixel data (no encapsulated fragments)")


def _check_complete_without_pixels(ds, size: int, path: Path) -> None:
    """No pixel data element was found: tell a truncated file from one without pixel data."""
    last = None
    for elem in ds.elements():  # raw (unconverted) elements in tag order
        tell = getattr(elem, "value_tell", None)
        if tell is None or (last is not None and tell < last.value_tell):
            continue
        last = elem
    if last is None:
        raise DicomError(path, "truncated DICOM (no data set after the file meta information)")
    if last.length != 0xFFFFFFFF:
        if last.value is not None and len(last.value) < last.length:
            raise DicomError(path, f"truncated DICOM (inside element {last.tag})")
        if last.value_tell + last.length < size:
            raise DicomError(path, "truncated DICOM (inside an element header)")


# Plausible geometry (issue 14): outside these a header is wrong, not an unusual scanner.
PLAUSIBLE_SPACING_MM = (0.1, 10.0)
MAX_POSITION_MM = 10_000.0  # 10 m from the scanner's origin


def _check_geometry(position, spacing, tags, path: Path) -> None:
    """Header values that would be graded silently into nonsense: refuse them, naming the file."""
    low, high = PLAUSIBLE_SPACING_MM
    if not all(low <= v <= high for v in spacing):
        raise DicomError(path, f"implausible PixelSpacing {spacing} mm (outside {low:g}-{high:g} mm)")
    if max(abs(v) for v in position) > MAX_POSITION_MM:
        raise DicomError(path, f"implausible ImagePositionPatient {position} (beyond 10 m)")
    if tags.get("RescaleSlope") not in (None, "") and _float_list(tags, "RescaleSlope", 1, path)[0] == 0:
        raise DicomError(path, "RescaleSlope 0 (every pixel would have the same value)")


def read_instance_header(path: str | Path) -> tuple[SliceHeader, ScannedHeader | dict]:
    """Header (no pixels) of one single-frame grayscale instance -> (SliceHeader, tags).

    ``tags`` answers ``.get(keyword)`` for the series-level tags (SeriesInstanceUID,
    SeriesNumber, SeriesDescription, echo/repetition/inversion times): a `ScannedHeader` from
    the fast scan, else a dict of the same keywords read by pydicom.
    """
    path = Path(path)
    try:
        _check_file_size(path, path.stat().st_size)
    except OSError as exc:
        raise DicomError(path, f"cannot read file ({exc.strerror or exc})") from None
    scanned = scan_header(path)
    tags = scanned if scanned is not None else _tags_by_pydicom(path)
    _check_image_size(tags, path)
    frames = _optional_int(tags, "NumberOfFrames", 1, path) or 1
    if frames != 1:
        raise DicomError(path, f"multi-frame instance ({frames} frames) not supported")
    if (_optional_int(tags, "SamplesPerPixel", 1, path) or 1) != 1:
        raise DicomError(path, "not a grayscale image (SamplesPerPixel != 1)")
    position = _float_list(tags, "ImagePositionPatient", 3, path)
    iop = _float_list(tags, "ImageOrientationPatient", 6, path)
    spacing = _float_list(tags, "PixelSpacing", 2, path)
    rows, cols = _int_tag(tags, "Rows", path), _int_tag(tags, "Columns", path)
    _check_geometry(position, spacing, tags, path)
    # Plain floats, not numpy, for these few numbers: this runs for every file of a study.
    row_dir, col_dir = iop[:3], iop[3:]
    norms = math.hypot(*row_dir), math.hypot(*col_dir)
    if min(norms) < 1e-3 or abs(sum(a * b for a, b in zip(row_dir, col_dir))) / (norms[0] * norms[1]) > 1e-2:
        raise DicomError(path, f"bad ImageOrientationPatient {iop}")
    if min(spacing) <= 0 or rows < 1 or cols < 1:
        raise DicomError(path, "bad PixelSpacing/Rows/Columns")
    if tags.get("InstanceNumber") not in (None, ""):
        instance = _int_tag(tags, "InstanceNumber", path)
    elif path.stem.isdigit():
        instance = int(path.stem)
    else:
        raise DicomError(path, "missing required tag InstanceNumber")
    header = SliceHeader(
        path=path,
        instance_number=instance,
        position=np.array(position),
        row_dir=np.array(row_dir) / norms[0],
        col_dir=np.array(col_dir) / norms[1],
        pixel_spacing=(spacing[0], spacing[1]),
        rows=rows,
        cols=cols,
        native=None if scanned is None or scanned.fragments is not None else _native_pixels(scanned, path),
        jpeg=None if scanned is None or scanned.fragments is None else _jpeg_pixels(scanned, path),
    )
    return header, tags


# === Pixels ===


def _modality_map(tags, path: Path) -> ModalityMap:
    """The stored -> modality map of an instance without a Modality LUT Sequence."""
    slope = intercept = None
    if tags.get("RescaleSlope") is not None and tags.get("RescaleIntercept") is not None:
        slope, intercept = (_float_list(tags, k, 1, path)[0] for k in ("RescaleSlope", "RescaleIntercept"))
    if str(tags.get("PhotometricInterpretation", "")).strip() != "MONOCHROME1":
        return ModalityMap(slope, intercept or 0.0)
    mapped = _stored_range(tags).astype(np.float64)
    if slope is not None:
        mapped = mapped * slope + intercept
    return ModalityMap(slope, intercept or 0.0, float(mapped.min()) + float(mapped.max()))


def _stored_range(tags) -> np.ndarray:
    """Smallest and largest value the stored bits can hold (the MONOCHROME1 inversion range)."""
    bits = int(tags.get("BitsStored", tags.get("BitsAllocated", 16)))
    if int(tags.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return np.array([0, 2**bits - 1])


# Tags pydicom needs to decode native pixel data.
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)


def _native_pixels(scanned, path: Path) -> NativePixels | None:
    """Where to read the pixels straight from the file, or None to decode them with pydicom.

    Only the layouts whose stored values are plain words: 8 or 16 bits allocated, stored bits
    in the low bits (HighBit = BitsStored - 1), MONOCHROME1/2 and no Modality LUT Sequence.
    """
    if any(scanned.get(keyword) is None for keyword in _PIXEL_MODULE):
        return None  # pydicom refuses to decode without them; let it say so
    allocated, stored = scanned.get("BitsAllocated"), scanned.get("BitsStored")
    representation = scanned.get("PixelRepresentation")
    if (
        allocated not in (8, 16)
        or not 1 <= stored <= allocated
        or scanned.get("HighBit", stored - 1) != stored - 1
        or representation not in (0, 1)
        or scanned.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
        or scanned.get("ModalityLUTSequence")
    ):
        return None
    try:
        modality = _modality_map(scanned, path)
    except DicomError:
        return None  # a bad rescale value: decoding this slice will say so, as for any other file
    dtype = ("i" if representation == 1 else "u") + str(allocated // 8)
    return NativePixels(
        offset=scanned.pixel_offset,
        dtype="<" + dtype if allocated > 8 else dtype,
        bits_stored=stored,
        modality=modality,
    )


def _jpeg_pixels(scanned, path: Path) -> JpegPixels | None:
    """Where to read a JPEG Lossless frame, or None to decode it with pydicom: unsigned 8/16-bit
    words, stored bits in the low bits, MONOCHROME1/2, no Modality LUT Sequence (as `_native_pixels`)."""
    native = _native_pixels(scanned, path)
    if native is None or native.dtype not in ("<u2", "u1"):
        return None
    return JpegPixels(scanned.fragments, native.dtype, native.bits_stored, native.modality)


def _read_jpeg(header: SliceHeader) -> np.ndarray | None:
    """Stored values of a JPEG Lossless slice by libjpeg-turbo, or None where pydicom should decode
    it instead (no imagecodecs, a stream libjpeg-turbo refuses, another shape, or values above
    BitsStored, which pydicom would keep as they are: only plain frames take this path)."""
    jpeg = header.jpeg
    try:
        from imagecodecs import jpeg8_decode

        with open(header.path, "rb", buffering=0) as handle:
            stream = b"".join(os.pread(handle.fileno(), n, offset) for offset, n in jpeg.fragments)
        values = jpeg8_decode(stream)
    except Exception:  # noqa: BLE001  (pydicom decodes it, or words why it cannot)
        return None
    if values.shape != (header.file_shape or (header.rows, header.cols)) or values.dtype.kind != "u":
        return None
    dtype = np.dtype(jpeg.dtype)
    if values.dtype.itemsize > dtype.itemsize or int(values.max(initial=0)) >> jpeg.bits_stored:
        return None
    return values.astype(dtype, copy=False)


def _read_native(header: SliceHeader) -> np.ndarray:
    """Stored values of an uncompressed slice, read from their offset (as pydicom decodes them:
    bits above BitsStored dropped, signed values sign-extended)."""
    native, path = header.native, header.path
    rows, cols = header.file_shape or (header.rows, header.cols)
    count = rows * cols
    try:
        words = np.fromfile(path, dtype=native.dtype, count=count, offset=native.offset)
    except OSError as exc:
        raise DicomError(path, f"cannot read file ({exc.strerror or exc})") from None
    if words.size != count:
        raise DicomError(path, f"truncated pixel data ({words.size} of {count} pixels)")
    bits = words.dtype.itemsize * 8
    if native.bits_stored < bits:
        unsigned = words.view(words.dtype.str.replace("i", "u"))
        low = unsigned & np.array((1 << native.bits_stored) - 1, unsigned.dtype)
        if words.dtype.kind == "i":
            sign = np.array(1 << (native.bits_stored - 1), unsigned.dtype)
            words = ((low ^ sign).astype(np.int32) - int(sign)).astype(words.dtype)
        else:
            words = low
    return words.reshape(rows, cols)


def decode_stored(header: SliceHeader) -> tuple[np.ndarray, ModalityMap | None]:
    """Decode one instance -> (stored values ``[rows, cols]``, their modality map).

    Where the instance has a Modality LUT Sequence the values are already float32 modality
    values (MONOCHROME1 inverted) and the map is None.
    """
    if header.native is not None:
        return _resample(_read_native(header), header), header.native.modality
    if header.jpeg is not None:
        values = _read_jpeg(header)
        if values is not None:
            return _resample(values, header), header.jpeg.modality
    path = header.path
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomError(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as exc:
        raise DicomError(path, f"truncated or corrupt DICOM ({_why(exc)})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(path, "no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts = ds.file_meta.get("TransferSyntaxUID", "?")
        name = getattr(ts, "name", ts)
        raise DicomError(path, f"cannot decode pixel data ({name}): {_why(exc)}") from None
    expected = header.file_shape or (header.rows, header.cols)
    if arr.shape != expected:
        raise DicomError(path, f"decoded shape {arr.shape} != {expected}")
    try:
        if "ModalityLUTSequence" not in ds:
            return _resample(arr, header), _modality_map(ds, path)
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            mapped = apply_modality_lut(_stored_range(ds), ds)
            out = np.float32(float(np.min(mapped)) + float(np.max(mapped))) - out
        return _resample(out, header), None
    except DicomError:
        raise
    except Exception as exc:  # a corrupt rescale or LUT value
        raise DicomError(path, f"corrupt modality LUT ({_why(exc)})") from None


def _resample(values: np.ndarray, header: SliceHeader) -> np.ndarray:
    """A slice's values on its header's matrix: unchanged unless it is resampled (`file_shape`).

    Field edges aligned (pixel centres at half-pixel offsets, cv2's convention); linear up, area
    average down. Stored integers stay integers: the modality maps are affine, so resampling them
    first gives the modality values' resampling (to a rounding)."""
    if header.file_shape is None:
        return values
    shrink = header.rows * header.cols < values.size
    flags = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    if values.dtype in (np.uint8, np.uint16, np.int16, np.float32):
        return cv2.resize(values, (header.cols, header.rows), interpolation=flags)
    out = cv2.resize(values.astype(np.float32), (header.cols, header.rows), interpolation=flags)
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(values.dtype)


def decode_instance(header: SliceHeader) -> np.ndarray:
    """Decode one instance -> float32 ``[rows, cols]`` (modality LUT, MONOCHROME1 inverted)."""
    values, modality = decode_stored(header)
    return values if modality is None else modality.apply(values)


# === Series types ===


def _has(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


def infer_description(dicom_description: str, plane: str, ds=None) -> str | None:
    """Canonical series name from SeriesDescription text and orientation, or None.

    T2 / STIR (also Siemens "TIRM") is checked before T1; without either word the echo,
    repetition and inversion times decide where present (TI -> STIR; TE >= 60 ms -> T2;
    TE < 30 ms and TR < 1000 ms -> T1).
    """
    text = str(dicom_description or "").upper()
    weighting = None
    if _has(r"STIR|TIRM", text) or _has(r"T2(?!\d)", text):
        weighting = "T2"
    elif _has(r"T1(?!\d)", text):
        weighting = "T1"
    elif ds is not None:
        te = _maybe_float(ds.get("EchoTime"))
        tr = _maybe_float(ds.get("RepetitionTime"))
        ti = _maybe_float(ds.get("InversionTime"))
        if (ti is not None and ti > 0) or (te is not None and te >= 60):
            weighting = "T2"
        elif te is not None and tr is not None and te < 30 and tr < 1000:
            weighting = "T1"
    if plane == "sagittal":
        return {"T2": SAGITTAL_T2, "T1": SAGITTAL_T1}.get(weighting)
    if plane == "axial" and weighting == "T2":
        return AXIAL_T2
    return None


def _maybe_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# === Studies ===


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _candidate_files(folder: Path, root: Path | None = None, warn: list[str] | None = None) -> list[Path]:
    """The DICOM files of ``folder``: at most `ReadLimits.max_slices_per_series` (counted while
    listing, so a folder of millions of files costs no more than the limit); a symbolic link that
    leaves ``root`` (the study folder) is not followed."""
    root = (root or folder).resolve()
    files, links = [], 0
    for p in folder.iterdir():
        if p.name.startswith(".") or p.name.upper() == "DICOMDIR" or p.suffix.lower() not in _DICOM_SUFFIXES:
            continue
        if p.is_dir():
            continue  # series folders are read on their own
        if p.is_symlink() and not _inside(p, root):
            links += 1
            continue
        if not p.is_file():
            continue
        files.append(p)
        if len(files) > _limits.max_slices_per_series:
            raise DicomError(folder, f"more than {_limits.max_slices_per_series} files in one series")
    if links:
        # No paths in warnings: they end up in predictions.json.
        _warn(warn, f"{links} symbolic link(s) leaving the study folder not followed")
    return sorted(files)


def _warn(warn: list[str] | None, message: str) -> None:
    if warn is None:
        warnings.warn(message, stacklevel=3)
    else:
        warn.append(message)


def _series_folders(study_dir: Path, warn: list[str]) -> list[Path]:
    """The sub-folders of a study (series), within `ReadLimits`; links leaving it not followed."""
    root = study_dir.resolve()
    folders, links = [], 0
    for p in study_dir.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink() and not _inside(p, root):
            links += 1
            continue
        folders.append(p)
        if len(folders) > _limits.max_series_per_study:
            raise DicomError(study_dir, f"more than {_limits.max_series_per_study} series folders")
    if links:
        warn.append(f"{links} symbolic link(s) leaving the study folder not followed")
    return sorted(folders)


def _build_series(series_id: str, headers: list[SliceHeader], dicom_description: str) -> Series:
    """Headers of one series -> Series ordered along the normal.

    A slice of another size than most (ties: the larger matrix) is resampled onto that matrix where
    it covers the same field (`_resampled_header`), else dropped; of slices at one position the
    lower instance number is kept. Each is warned.
    """
    notes: list[str] = []
    issues: set[str] = set()
    sizes = {(h.rows, h.cols) for h in headers}
    if len(sizes) > 1:
        counts = {s: sum((h.rows, h.cols) == s for h in headers) for s in sizes}
        common = max(sorted(sizes), key=lambda s: (counts[s], s[0] * s[1]))
        usual = [h for h in headers if (h.rows, h.cols) == common]
        kept, resampled, odd = [], [], []
        for h in headers:
            if (h.rows, h.cols) == common:
                kept.append(h)
                continue
            fitted = _resampled_header(h, usual)
            (odd if fitted is None else resampled).append(h)
            if fitted is not None:
                kept.append(fitted)
        headers = kept
        for verb, group, how in (
            ("resampled", resampled, ", the same field of view"),
            ("dropped", odd, ""),
        ):
            if group:
                issues.add(f"slices_{verb}")
                shapes = ", ".join(sorted({f"{h.rows}x{h.cols}" for h in group}))
                notes.append(
                    f"series {series_id}: {verb} {len(group)} slice(s) of {shapes} "
                    f"(the series' slices are {common[0]}x{common[1]}{how})"
                )
    normals = np.array([h.normal for h in headers])
    normals *= np.sign(normals @ normals[0])[:, None]  # align signs before averaging
    normal = normals.mean(axis=0)
    normal /= np.linalg.norm(normal)
    if normal[np.argmax(np.abs(normal))] < 0:
        normal = -normal
    normal = normal + 0.0  # no negative zeros
    order = sorted(
        range(len(headers)), key=lambda i: (headers[i].position @ normal, headers[i].instance_number)
    )
    ordered = [headers[i] for i in order]
    kept = _drop_duplicate_positions(ordered)
    if len(kept) < len(ordered):
        issues.add("duplicates_dropped")
        notes.append(
            f"series {series_id}: dropped {len(ordered) - len(kept)} slice(s) at duplicated positions"
        )
    return Series(
        series_id=series_id,
        description="",
        slices=kept,
        normal=normal,
        dicom_description=dicom_description,
        warnings=notes,
        issues=issues,
    )


# A slice of another matrix is resampled only where it covers its series' field: the field size
# (PixelSpacing x matrix) and its corner within this share of the field (at least 1 mm), and the
# same orientation within this cosine (about 1 degree).
FIELD_TOLERANCE = 0.01
ORIENTATION_COS = 0.9998


def _resampled_header(h: SliceHeader, usual: list[SliceHeader]) -> SliceHeader | None:
    """``h`` resampled onto the matrix of ``usual`` (its series' slices), or None where it covers
    another field. The new geometry is exact: the slice's own field (its own PixelSpacing x matrix)
    cut into the series' matrix, so a point lands where it did in the file."""
    ref = min(usual, key=lambda u: abs((h.position - u.position) @ u.normal))
    if min(h.row_dir @ ref.row_dir, h.col_dir @ ref.col_dir) < ORIENTATION_COS:
        return None
    (h_row_mm, h_col_mm), (r_row_mm, r_col_mm) = h.pixel_spacing, ref.pixel_spacing
    height, width = h.rows * h_row_mm, h.cols * h_col_mm
    tol = max(1.0, FIELD_TOLERANCE * max(height, width))
    if abs(height - ref.rows * r_row_mm) > tol or abs(width - ref.cols * r_col_mm) > tol:
        return None
    corner = h.position - 0.5 * (h_col_mm * h.row_dir + h_row_mm * h.col_dir)
    ref_corner = ref.position - 0.5 * (r_col_mm * ref.row_dir + r_row_mm * ref.col_dir)
    offset = corner - ref_corner
    if np.linalg.norm(offset - (offset @ ref.normal) * ref.normal) > tol:
        return None
    spacing = (height / ref.rows, width / ref.cols)
    return SliceHeader(
        path=h.path,
        instance_number=h.instance_number,
        position=corner + 0.5 * (spacing[1] * h.row_dir + spacing[0] * h.col_dir),
        row_dir=h.row_dir,
        col_dir=h.col_dir,
        pixel_spacing=spacing,
        rows=ref.rows,
        cols=ref.cols,
        native=h.native,
        jpeg=h.jpeg,  # keeps the fast decode; it checks the frame against file_shape
        file_shape=(h.rows, h.cols),
    )


def _drop_duplicate_positions(ordered: list[SliceHeader]) -> list[SliceHeader]:
    """Keep the first slice of each run at one position (within 0.05 mm, the same in-plane origin)."""
    kept = ordered[:1]
    for h in ordered[1:]:
        if np.linalg.norm(h.position - kept[-1].position) < 0.05:
            continue
        kept.append(h)
    return kept


def read_series(
    folder: str | Path,
    series_id: str | None = None,
    *,
    root: Path | None = None,
    warn: list[str] | None = None,
    refused: list[DicomError] | None = None,
) -> list[Series]:
    """Read the headers in one folder -> one Series per SeriesInstanceUID found there.

    ``root``: the study folder (links leaving it are not followed; default ``folder``);
    ``warn``: where warnings go (links not followed); default: Python warnings. Slices dropped
    while building a series (duplicated positions, another size) are in ``Series.warnings``.
    A file whose header is refused is left out of its series (warned there, ``files_dropped``);
    the refusals are appended to ``refused`` (`read_study` names the first when nothing was readable).
    """
    folder = Path(folder)
    root_dir = Path(root) if root is not None else folder
    groups: dict[str, list[tuple[SliceHeader, pydicom.Dataset]]] = {}
    bad: list[DicomError] = []
    for path in _candidate_files(folder, root, warn):
        try:
            header, ds = read_instance_header(path)
        except DicomError as exc:
            bad.append(exc)
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((header, ds))
    if refused is not None:
        refused.extend(bad)
    out = []
    for uid, items in groups.items():
        ds0 = items[0][1]
        if len(groups) == 1 and series_id is not None:
            sid = series_id
        else:
            sid = str(ds0.get("SeriesNumber", "") or uid or folder.name)
        series = _build_series(sid, [h for h, _ in items], str(ds0.get("SeriesDescription", "")))
        series.description = infer_description(series.dicom_description, series.plane, ds0) or ""
        if bad:  # a folder is one series in every layout we read; its bad files are that series'
            series.issues.add("files_dropped")
            series.warnings.insert(0, f"series {sid}: {_dropped_files(bad, root_dir)}")
        out.append(series)
    if bad and not out:
        dropped = _dropped_files(bad, root_dir)
        _warn(warn, f"series folder {folder.name}: no readable file, {dropped}; skipped")
    return out


def _dropped_files(bad: list[DicomError], root: Path) -> str:
    """ "dropped unreadable file 12/3.dcm (reason)[, ... and N more]": files relative to the study folder."""
    named = []
    for exc in bad[:MAX_NAMED_DROPS]:
        path = Path(exc.path)
        with contextlib.suppress(ValueError):
            path = path.relative_to(root)
        named.append(f"{path.as_posix()} ({exc.reason})")
    more = f" and {len(bad) - MAX_NAMED_DROPS} more" if len(bad) > MAX_NAMED_DROPS else ""
    return f"dropped unreadable file{'s' if len(bad) > 1 else ''} {', '.join(named)}{more}"


def read_study(
    study_dir: str | Path,
    descriptions: dict[str, str] | None = None,
    only: Iterable[str] | None = None,
    prefer: Iterable[str] | None = None,
) -> Study:
    """Read every series' headers in ``study_dir`` (no pixels).

    Args:
        study_dir: ``.../{study_id}``, with one sub-folder per series (files directly in it are
            grouped by SeriesInstanceUID).
        descriptions: ``series_id -> series description`` for this study (from the RSNA CSV,
            see `read_series_descriptions`); series not in it are typed from their headers.
        only: series descriptions wanted; a series folder that the CSV types as something else is
            not opened at all (saves reading e.g. the axial headers when only sagittal views are
            needed). Folders the CSV does not know are always read.
        prefer: series ids that win where several series share a description (training passes
            the series the coordinates file names, so its labels are never lost).

    A missing series is not an error: the Study just lacks it.
    """
    study_dir = Path(study_dir)
    if not study_dir.exists():
        raise DicomError(study_dir, "study folder not found")
    if not study_dir.is_dir():
        raise DicomError(study_dir, "not a folder")
    descriptions = {str(k): str(v) for k, v in (descriptions or {}).items()}
    preferred = {str(p) for p in prefer or ()}
    found: list[Series] = []
    warn: list[str] = []
    refused: list[DicomError] = []
    folders = [study_dir] + _series_folders(study_dir, warn)
    n_files = sum(len(_candidate_files(p, study_dir, [])) for p in folders)
    if n_files > _limits.max_files_per_study:
        raise DicomError(study_dir, f"{n_files} DICOM files, over the limit of {_limits.max_files_per_study}")
    wanted = set(only) if only is not None else None
    for folder in sorted(folders, key=lambda p: _series_sort_key(p.name)):
        known = descriptions.get(folder.name)
        if wanted is not None and folder != study_dir and known is not None and known not in wanted:
            continue
        before = len(refused)
        series_list = read_series(
            folder, None if folder == study_dir else folder.name, root=study_dir, warn=warn, refused=refused
        )
        if not series_list and folder != study_dir and len(refused) == before:
            warn.append(f"series folder {folder.name}: no DICOM files; ignored")
        found.extend(series_list)
    if not found and refused:
        first = refused[0]
        more = f" (and {len(refused) - 1} more unreadable file(s))" if len(refused) > 1 else ""
        raise DicomError(first.path, f"{first.reason}{more}")
    if not found:
        raise DicomError(study_dir, "empty study folder (no DICOM files)")
    study = Study(study_id=study_dir.name, path=study_dir, series={}, warnings=warn)
    candidates: dict[str, list[Series]] = {}
    for series in found:
        study.warnings.extend(series.warnings)
        claimed = series.description
        if series.series_id in descriptions:
            series.description = claimed = descriptions[series.series_id]
        elif (named := _text_plane(series.dicom_description)) not in (None, series.plane):
            # The header text names another plane than the slices lie in: typed by orientation.
            claimed = infer_description(series.dicom_description, named) or ""
            study.warnings.append(
                f"series {series.series_id}: SeriesDescription names a {named} series but its slices "
                f"are {series.plane}; typed as {series.description or 'unknown'!r}"
            )
        reason = _unusable(series)
        if reason is not None:
            study.set_aside.update(d for d in CANONICAL_DESCRIPTIONS if _norm_text(d) == _norm_text(claimed))
            study.extra.append(series)
            study.warnings.append(f"series {series.series_id} {reason}; skipped")
            continue
        candidates.setdefault(series.description, []).append(series)
    for description, group in candidates.items():
        keep, why = _choose_series(group, preferred)
        study.series[description] = keep
        for drop in group:
            if drop is keep:
                continue
            study.extra.append(drop)
            study.warnings.append(
                f"series {keep.series_id} and {drop.series_id} are both {description!r}; "
                f"used {keep.series_id} ({why})"
            )
    return study


def _text_plane(text: str) -> str | None:
    """The plane a SeriesDescription names ("SAG", "AX", "COR" words), or None."""
    words = re.findall(r"[A-Z]+", str(text).upper())
    for plane, prefix in (("sagittal", "SAG"), ("axial", "AX"), ("coronal", "COR")):
        if any(w.startswith(prefix) for w in words):
            return plane
    return None


def _unusable(series: Series) -> str | None:
    """Why a series cannot stand for its description (worded for a warning), or None."""
    if not series.description:
        return f"({series.plane}) is not {'/'.join(CANONICAL_DESCRIPTIONS)}"
    wanted_plane = next((p for p in PLANES if _norm_text(series.description).startswith(p)), None)
    if wanted_plane is not None and series.plane != wanted_plane:
        return f"is described as {series.description!r} but its slices are {series.plane}"
    if len(series.slices) < 2:
        return "has a single slice"
    return None


def _coverage(series: Series) -> tuple[float, float, int]:
    """(lateral extent of the stack mm, field area cm2, slices), each rounded so near-ties stay ties."""
    pos = series.positions_mm()
    extent = float(pos.max() - pos.min()) if len(pos) > 1 else 0.0
    first = series.slices[0]
    area = first.rows * first.pixel_spacing[0] * first.cols * first.pixel_spacing[1] / 100.0
    return round(extent), round(area), len(series.slices)


def _choose_series(group: list[Series], preferred: set[str]) -> tuple[Series, str]:
    """The series that stands for one description, and why (for the warning)."""
    named = [s for s in group if s.series_id in preferred]
    if named:
        return named[0], "named by the labels"
    if len(group) == 1:
        return group[0], ""
    best = max(group, key=_coverage)  # max keeps the first of equals (series-id order)
    others = [_coverage(s) for s in group if s is not best]
    return best, "first in series-id order" if _coverage(best) in others else "covers most"


def _series_sort_key(name: str):
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def read_series_descriptions(csv_path: str | Path) -> dict[str, dict[str, str]]:
    """``train_series_descriptions.csv`` -> ``{study_id: {series_id: description}}``."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # Excel's BOM, CRLF: fine
            reader = csv.DictReader(fh)
            needed = {"study_id", "series_id", "series_description"}
            missing = needed - set(reader.fieldnames or ())
            if missing:
                raise DicomError(csv_path, f"missing column(s) {', '.join(sorted(missing))}")
            out: dict[str, dict[str, str]] = {}
            for row in reader:
                study, series = str(row["study_id"]).strip(), str(row["series_id"]).strip()
                if not study or not series:
                    continue
                out.setdefault(study, {})[series] = str(row["series_description"]).strip()
    except OSError as exc:
        raise DicomError(csv_path, f"cannot read ({exc.strerror or exc})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DicomError(csv_path, f"not a valid CSV ({one_line(exc)})") from None
    return out


__all__ = [
    "AXIAL_T2",
    "CANONICAL_DESCRIPTIONS",
    "DicomError",
    "SAGITTAL_T1",
    "SAGITTAL_T2",
    "SERIES_ISSUES",
    "Series",
    "SliceHeader",
    "Study",
    "ModalityMap",
    "JpegPixels",
    "NativePixels",
    "ReadLimits",
    "decode_instance",
    "decode_stored",
    "infer_description",
    "plane_of_normal",
    "read_instance_header",
    "read_limits",
    "read_series",
    "read_series_descriptions",
    "read_study",
    "set_read_limits",
]
