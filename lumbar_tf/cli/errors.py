"""The one error handler of both commands (`lumbar-tf`, `lumbar-tf-edge`).

DESIGN.md's contract: one line on stderr, ``error: <file or item>: <reason>``; exit 2 for bad input,
1 for other failures, 130 when interrupted; no traceback unless ``--debug``.
"""

from __future__ import annotations

import sys

from lumbar_tf.core.errors import is_bad_input, one_line


def _os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` for an OS error (permission, full disk, a file where a folder should be)."""
    reason = exc.strerror or one_line(exc)
    path = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {reason}" if path else reason


def run_command(func, args, *, debug: bool = False) -> int:
    """Run ``func(args)`` and turn any exception into the one-line contract."""
    if debug:
        return int(func(args) or 0)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the user gave that cannot be read or written: bad input
        if exc.filename is None:
            print(f"error: {exc.__class__.__name__}: {one_line(exc)}", file=sys.stderr)
            return 1
        print(f"error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001  (one line, no traceback: the contract of DESIGN.md)
        if is_bad_input(exc):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        print(f"error: {exc.__class__.__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
