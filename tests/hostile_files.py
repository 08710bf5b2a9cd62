"""Hostile DICOM files, crafted at test time (never committed): bombs, sparse giants, bad values.

Each writer starts from a small valid file of `tests.dicom_factory` and changes one thing.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tests.dicom_factory import SeriesSpec, make_dataset, save, stored_pixels


def valid_file(path, spec: SeriesSpec | None = None, transfer_syntax: str = "explicit") -> Path:
    """One valid 40 x 48 sagittal slice."""
    spec = spec or SeriesSpec(n_slices=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = make_dataset(spec, stored_pixels(spec)[0], np.array(spec.center), 1, "1.2.3", "1.2.3.4")
    save(ds, path, transfer_syntax)
    return path


def with_raw_value(path, tag: int, vr: str, raw: bytes) -> Path:
    """Rewrite ``path`` with element ``tag`` holding ``raw`` as written (no validation)."""
    ds = pydicom.dcmread(path)
    ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
    ds.save_as(path)
    return path


def deflate_bomb(path, inflated_bytes: int) -> Path:
    """A deflated file whose data set inflates to more than ``inflated_bytes``: a valid slice followed
    by a private element of zeros (after Pixel Data, as tag order wants), a few hundred kB on disk."""
    path = valid_file(path, transfer_syntax="deflated")
    data = path.read_bytes()
    (group_length,) = struct.unpack_from("<L", data, 140)
    start = 132 + 12 + group_length
    inflated = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)  # fast: ~0.5 s for 256 MiB
    out = [data[:start], packer.compress(inflated)]
    out.append(packer.compress(struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, inflated_bytes)))
    zeros = bytes(16 << 20)
    for _ in range(inflated_bytes >> 24):
        out.append(packer.compress(zeros))
    out.append(packer.flush())
    path.write_bytes(b"".join(out))
    return path


def sparse_giant(path, rows: int, cols: int, bits: int = 8) -> Path:
    """A real header claiming ``rows x cols`` pixels over a sparse payload of that size."""
    path = valid_file(path)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, bits, bits, bits - 1
    ds.save_as(path)
    length = rows * cols * (bits // 8)
    with open(path, "ab") as handle:
        handle.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB" if bits == 8 else b"OW", 0, length))
        handle.truncate(handle.tell() + length)  # a hole: no disk blocks, no memory
    return path


def padded(path, file_bytes: int) -> Path:
    """A valid slice followed by a sparse tail: a file of ``file_bytes`` behind a real header."""
    path = valid_file(path)
    with open(path, "r+b") as handle:
        handle.truncate(file_bytes)
    return path
