"""What the gRPC and REST clients share: view checks, retries with back-off, one-line messages."""

from __future__ import annotations

import json
import time

import numpy as np

from lumbar_tf.core.contract import METADATA_SIGNATURE
from lumbar_tf.core.errors import ServingError

# The request of one study is ~0.9 MB at 192 px; batches of studies can pass gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# An answer is a few kB a study (grades and five level positions): 64 MiB is thousands of studies,
# and a broken or hostile server cannot make a client hold gigabytes.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_MAX_DETAIL_CHARS = 400


def one_line(text, limit: int = _MAX_DETAIL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# === Input checks shared by both clients ===


def prepare_views(views: dict, level_inputs=()) -> dict[str, np.ndarray]:
    """Views ``{name: [H,W,3] or [B,H,W,3]}`` -> float32 ``[B,H,W,3]`` arrays with one shared batch size.

    ``level_inputs``: names of per-level inputs (an axial model's ``ax_t2``), ``[5,S,S,C]`` or
    ``[B,5,S,S,C]``. Only the array layout is checked here; which names and sizes the model wants is
    the server's call (its error comes back as a `ServingError`).
    """
    if not isinstance(views, dict) or not views:
        raise ServingError("views: expected a non-empty dict {input name: array}", code="CLIENT")
    out = {}
    batch = None
    for name, value in views.items():
        arr = np.asarray(value)
        per_level = name in level_inputs
        if arr.ndim == (4 if per_level else 3):
            arr = arr[None]
        if per_level and arr.ndim != 5:
            raise ServingError(
                f"views[{name!r}]: expected shape [5,S,S,C] or [B,5,S,S,C], got {list(np.shape(value))}",
                code="CLIENT",
            )
        if not per_level and (arr.ndim != 4 or arr.shape[-1] != 3):
            raise ServingError(
                f"views[{name!r}]: expected shape [H,W,3] or [B,H,W,3], got {list(np.shape(value))}",
                code="CLIENT",
            )
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ServingError(f"views[{name!r}]: expected numbers, got dtype {arr.dtype}", code="CLIENT")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise ServingError(f"views[{name!r}]: contains NaN or infinite values", code="CLIENT")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise ServingError(
                f"views: batch sizes differ ({name!r} has {arr.shape[0]}, expected {batch})", code="CLIENT"
            )
        out[str(name)] = arr
    return out


def try_timeout(timeout_s: float, deadline: float | None) -> float:
    """Seconds one try may take: ``timeout_s``, cut to what is left of ``deadline`` (a
    ``time.monotonic()`` instant shared by the calls of one study); TimeoutError once it has passed."""
    if deadline is None:
        return timeout_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline exceeded")
    return min(timeout_s, left)


def retry(call, *, tries: int, backoff_s: float, transient) -> object:
    """Run ``call()``; on a transient exception sleep ``backoff_s * 2**k`` and try again, ``tries`` in all."""
    tries = max(1, int(tries))
    for attempt in range(tries):
        try:
            return call()
        except Exception as exc:
            if not transient(exc) or attempt == tries - 1:
                raise
            time.sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable")


# === The served model's own metadata ===


def parse_served_metadata(values, target: str, model_ref: str) -> dict:
    """The ``metadata`` signature's answer (one JSON string per row) -> the metadata dict."""
    first = np.asarray(values, dtype=object).ravel()
    text = first[0] if first.size else None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("preprocess"), dict):
        raise ServingError(
            f"TF Serving at {target}: {model_ref} answered '{METADATA_SIGNATURE}' without a metadata.json "
            "holding 'preprocess'",
            code="CLIENT",
            target=target,
        )
    return meta


def no_metadata_signature(target: str, model_ref: str, detail: str) -> ServingError:
    return ServingError(
        f"TF Serving at {target}: {model_ref} has no '{METADATA_SIGNATURE}' signature (exported by an "
        f"older lumbar-tf?): pass the export's metadata.json ({one_line(detail, 120)})",
        code="CLIENT",
        target=target,
    )
