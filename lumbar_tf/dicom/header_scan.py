"""Fast header scan for the common DICOM file: a few tags and where the native pixels start.

`lumbar_tf.dicom.reader` needs about twenty tags from every instance of a series (geometry, series
identity, pixel format) and, for the few slices a view uses, the pixels. pydicom builds a full
Dataset for that, which costs about 0.25 ms a file: more than decoding an uncompressed slice, and
with ~36 sagittal files a study it was most of the data pipeline's time. This module walks the
element headers of the first few kilobytes with `struct` and keeps only the wanted values (about
a tenth of the cost).

It handles the files that scanners and the RSNA data actually write: a "DICM" preamble, explicit
or implicit VR little endian, native (uncompressed) pixel data with a defined length, sequences of
defined or undefined length before it; and JPEG Lossless (process 14, explicit VR little endian),
where it locates the frame's fragments so that the reader can hand them to libjpeg-turbo without
pydicom (a JPEG Lossless header cost ~5 ms in pydicom, a twentieth of a study's time). Anything
else (deflate, big endian, other encapsulated syntaxes, non-ASCII text in a wanted tag, a
truncated or odd file) returns None and the caller reads the file with pydicom, which also words
the error for a bad file. So this is only ever a shortcut,
never a second opinion: `tests/dicom/test_dicom_scan.py` checks it against pydicom.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
# JPEG Lossless, Non-Hierarchical (process 14), and its first-order-prediction subset (SV1).
JPEG_LOSSLESS = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
# More fragments than this for one frame: left to pydicom (and its fragment limit).
_MAX_FRAGMENTS = 64

# Bytes read per try: a typical header fits in the first 4 kB (copying more from the page cache
# is measurable at ~36 files a study); large private tags need the second; the rest of the file
# is the last resort.
_READ_SIZES = (4096, 65536)

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs whose length is 4 bytes after 2 reserved bytes (PS3.5 7.1.2), and the others.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH"}
    | {b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)

# Wanted tags: keyword and how to read the value. "us": one unsigned short; "text": one string;
# "number": one DS/IS string; "numbers": a backslash-separated list; "present": only whether the
# element exists.
_WANTED = {
    0x0008103E: ("SeriesDescription", "text"),
    0x00180080: ("RepetitionTime", "number"),
    0x00180081: ("EchoTime", "number"),
    0x00180082: ("InversionTime", "number"),
    0x0020000E: ("SeriesInstanceUID", "text"),
    0x00200011: ("SeriesNumber", "number"),
    0x00200013: ("InstanceNumber", "number"),
    0x00200032: ("ImagePositionPatient", "numbers"),
    0x00200037: ("ImageOrientationPatient", "numbers"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280004: ("PhotometricInterpretation", "text"),
    0x00280008: ("NumberOfFrames", "number"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00280030: ("PixelSpacing", "numbers"),
    0x00280100: ("BitsAllocated", "us"),
    0x00280101: ("BitsStored", "us"),
    0x00280102: ("HighBit", "us"),
    0x00280103: ("PixelRepresentation", "us"),
    0x00281052: ("RescaleIntercept", "number"),
    0x00281053: ("RescaleSlope", "number"),
    0x00283000: ("ModalityLUTSequence", "present"),
}
WANTED_KEYWORDS = tuple(keyword for keyword, _ in _WANTED.values())

# Element headers: explicit VR (group, element, VR, 2-byte length; long VRs then have a 4-byte
# length after it) and implicit VR (group, element, 4-byte length; the "VR" slot is empty).
_EXPLICIT_HEADER = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEADER = struct.Struct("<HH0sL").unpack_from
_LENGTH = struct.Struct("<L").unpack_from


@dataclass(frozen=True)
class ScannedHeader:
    """The wanted tags of one file and where its native pixel data lies."""

    values: dict  # keyword -> int ("us"), str ("text"/"number"), list[str] ("numbers"), True ("present")
    pixel_offset: int  # byte offset of the (native, complete) Pixel Data value in the file
    # JPEG Lossless: (offset, length) of each fragment of the one frame, in file order (the basic
    # offset table left out); the pixel data's items are complete. None: native pixel data.
    fragments: tuple[tuple[int, int], ...] | None = None

    def get(self, keyword: str, default=None):
        return self.values.get(keyword, default)


class _Unsupported(Exception):
    """Leave this file to pydicom."""


class _NeedMore(Exception):
    """The walk ran past the bytes read so far."""


def scan_header(path: str | os.PathLike) -> ScannedHeader | None:
    """The wanted tags and the native pixel data position, or None to fall back on pydicom.

    A returned header has complete native pixel data: the file holds at least
    ``Rows * Columns * BitsAllocated / 8`` bytes of it; or, for JPEG Lossless, complete items
    (offset table, fragments, sequence delimiter), which decoding may still find corrupt.
    """
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            buf = b""
            for chunk in (*_READ_SIZES, -1):
                buf += handle.read(chunk - len(buf) if chunk > 0 else -1)
                try:
                    return _scan(buf, size, handle.fileno())
                except _NeedMore:
                    if len(buf) >= size:
                        return None  # truncated inside the header
    except (OSError, _Unsupported, _NeedMore, struct.error, ValueError):
        return None


def _scan(buf: bytes, size: int, fd: int) -> ScannedHeader:
    if buf[128:132] != b"DICM":
        raise _Unsupported
    pos, meta = _walk(buf, 132, explicit=True, wanted={0x00020010: ("TransferSyntaxUID", "text")}, group=2)
    syntax = meta.get("TransferSyntaxUID")
    jpeg = syntax in JPEG_LOSSLESS
    if syntax not in (EXPLICIT_LITTLE, IMPLICIT_LITTLE) and not jpeg:
        raise _Unsupported  # deflated, big endian or other compressed (encapsulated) pixel data
    explicit = syntax != IMPLICIT_LITTLE
    pixel_pos, values = _walk(buf, pos, explicit=explicit, wanted=_WANTED)
    header_len = 12 if explicit else 8
    if pixel_pos + header_len > len(buf):
        raise _NeedMore
    if explicit:
        if buf[pixel_pos + 4 : pixel_pos + 6] not in (b"OB", b"OW"):
            raise _Unsupported
        (length,) = _LENGTH(buf, pixel_pos + 8)
    else:
        (length,) = _LENGTH(buf, pixel_pos + 4)
    offset = pixel_pos + header_len
    if jpeg:
        if length != _UNDEFINED:
            raise _Unsupported  # native pixel data under a compressed syntax: pydicom's to word
        return ScannedHeader(values=values, pixel_offset=offset, fragments=_fragments(fd, offset, size))
    if length == _UNDEFINED or length == 0 or offset + length > size:
        raise _Unsupported  # encapsulated, empty or truncated
    try:
        n = values["Rows"] * values["Columns"] * values.get("SamplesPerPixel", 1)
        expected = (n * values["BitsAllocated"] + 7) // 8
    except KeyError:
        raise _Unsupported from None
    if length < expected:
        raise _Unsupported
    return ScannedHeader(values=values, pixel_offset=offset)


def _fragments(fd: int, pos: int, size: int) -> tuple[tuple[int, int], ...]:
    """(offset, length) of the fragments of encapsulated pixel data starting at ``pos`` (the basic
    offset table item, then one frame's fragments, then the sequence delimiter), read item header
    by item header; anything incomplete or out of place is left to pydicom."""
    items = []
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise _Unsupported  # no sequence delimiter: truncated
        g, e, _, length = _IMPLICIT_HEADER(head, 0)
        tag = g << 16 | e
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > size or len(items) > _MAX_FRAGMENTS:
            raise _Unsupported
        items.append((pos + 8, length))
        pos += 8 + length
    if len(items) < 2 or any(length == 0 for _, length in items[1:]):
        raise _Unsupported  # no fragment (pydicom: "no pixel data")
    return tuple(items[1:])


def _walk(buf: bytes, pos: int, *, explicit: bool, wanted: dict, group: int | None = None, in_item=False):
    """Walk data elements from ``pos``.

    Top level: returns (position of the Pixel Data element, values); running out of bytes
    before it raises _NeedMore (the caller reads more, or gives up at the end of the file).
    ``group``: stop before the first element of another group (the file meta information).
    ``in_item``: walk one sequence item of undefined length; returns (position after its
    delimiter, {}).
    """
    values: dict = {}
    end = len(buf)
    # One unpack per element header (this loop is most of the scan's time).
    unpack_header = _EXPLICIT_HEADER if explicit else _IMPLICIT_HEADER
    while True:
        if pos + 8 > end:
            if pos == end and group is not None:
                return pos, values
            raise _NeedMore
        g, e, vr, length = unpack_header(buf, pos)
        if g != group and group is not None:
            return pos, values
        tag = g << 16 | e
        if g >= 0x7FE0 or g == 0xFFFE:
            if tag == _PIXEL_DATA and not in_item:
                return pos, values
            if tag == _ITEM_END and in_item:
                return pos + 8, values
            raise _Unsupported  # float pixel data, or an item tag out of place
        value_pos = pos + 8
        if explicit and vr not in _SHORT_VRS:
            if vr not in _LONG_VRS:
                raise _Unsupported  # not a VR: a corrupt file, for pydicom to word
            if pos + 12 > end:
                raise _NeedMore
            (length,) = _LENGTH(buf, pos + 8)
            value_pos = pos + 12
        spec = wanted.get(tag) if not in_item else None
        if length == _UNDEFINED:
            if vr != b"SQ" and (explicit or not _is_sequence(tag)):
                raise _Unsupported  # e.g. UN of undefined length (implicit VR inside)
            pos = _skip_sequence(buf, value_pos, explicit)
            if spec is not None:
                values[spec[0]] = _decode(spec, vr, b"")
            continue
        pos = value_pos + length
        if pos > end:
            raise _NeedMore
        if spec is not None:
            values[spec[0]] = _decode(spec, vr if explicit else None, buf[value_pos:pos])


def _is_sequence(tag: int) -> bool:
    """Implicit VR: is ``tag`` a sequence in the data dictionary (as pydicom reads it)?"""
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _skip_sequence(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip the items of a sequence of undefined length; returns the position after it."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise _NeedMore
        g, e, _, length = _IMPLICIT_HEADER(buf, pos)  # item headers have no VR in either encoding
        tag = g << 16 | e
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported
        if length == _UNDEFINED:
            pos, _ = _walk(buf, pos, explicit=explicit, wanted={}, in_item=True)
        else:
            pos += length


def _decode(spec: tuple[str, str], vr: bytes | None, raw: bytes):
    kind = spec[1]
    if kind == "present":
        return True
    if kind == "us":
        if (vr is not None and vr != b"US") or len(raw) != 2:
            raise _Unsupported
        return struct.unpack("<H", raw)[0]
    if not raw.isascii():
        raise _Unsupported  # character sets are pydicom's business
    text = raw.decode("ascii").rstrip("\x00 ").lstrip(" ")
    if kind == "numbers":
        return [part.strip() for part in text.split("\\")]
    if "\\" in text:
        raise _Unsupported  # several values where one is expected: pydicom words the error
    return text.strip() if kind == "number" else text  # numbers: any whitespace, as pydicom
