"""Atomic file writing, one rule for the whole package.

Every output is written to a temporary file in the target folder and renamed into place, so a
reader (TF Serving, a PACS watcher, a second process) never sees half a file and a full disk never
leaves a truncated one. The file gets the permissions a plain ``open()`` would give (0666 less the
umask: 0644 under the usual umask, readable by a TF Serving container running as another user).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from lumbar_tf.core.contract import INTENDED_USE


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as exc:  # a full disk names no file, a rename the temporary one: name the target
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _plain(obj, digits: int | None):
    """JSON-ready values: numpy scalars and arrays as Python, paths as strings, NaN/inf as None."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return round(obj, digits) if digits is not None else obj
    if isinstance(obj, np.generic):
        return _plain(obj.item(), digits)
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), digits)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, digits) for v in obj]
    return obj


def write_json_atomic(path, value, *, indent: int = 1, digits: int | None = None) -> Path:
    """Write ``value`` as JSON (floats rounded to ``digits`` when given; NaN written as null)."""
    text = json.dumps(_plain(value, digits), indent=indent, allow_nan=False)
    return write_text_atomic(path, text + "\n")


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell) -> str:
    """A CSV cell a spreadsheet will show as text: formula-like text gets a leading apostrophe.

    Numbers are left alone (``-0.5`` is a number, not a formula).
    """
    text = str(cell)
    if text.startswith(_FORMULA_STARTS):
        try:
            float(text)
        except ValueError:
            text = "'" + text
    # A bare CR is not quoted by the csv writer (our line end is LF) and would split the row.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def write_csv_atomic(path, header, rows) -> Path:
    """Write a CSV (header + rows) atomically; every text cell is made spreadsheet-safe."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spreadsheet_safe(c) for c in header])
    for row in rows:
        writer.writerow([c if isinstance(c, (int, float)) else spreadsheet_safe(c) for c in row])
    return write_text_atomic(path, buffer.getvalue())


# Only these text chunks go into a PNG: nothing from a DICOM header ever reaches a picture.
PNG_METADATA = {"Software": "lumbar-tf", "Description": INTENDED_USE}


def save_png(fig, path, dpi: int = 100) -> Path:
    """Save a matplotlib Figure as PNG (atomically) with only `PNG_METADATA` as text chunks."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png", metadata=dict(PNG_METADATA), facecolor="white")
    return write_bytes_atomic(path, buffer.getvalue())
