"""Study and series identifiers: plain integers, so an id from a CSV can never name a path outside
the data folder or start a spreadsheet formula in a submission row."""

from __future__ import annotations

import re

from lumbar_tf.core.errors import DatasetError

_PLAIN_INTEGER = re.compile(r"^[0-9]{1,20}$")


def check_study_id(study_id, where: str) -> str:
    """``study_id`` as text, or DatasetError naming ``where`` when it is not a plain integer."""
    text = str(study_id).strip()
    if not _PLAIN_INTEGER.match(text):
        raise DatasetError(f"{where}: study_id {study_id!r} is not a plain integer")
    return text


def is_plain_id(value) -> bool:
    return bool(_PLAIN_INTEGER.match(str(value).strip()))


def study_sort_key(study_id: str):
    """Numeric ids in numeric order, anything else after them."""
    return (0, int(study_id), "") if study_id.isdigit() else (1, 0, study_id)
