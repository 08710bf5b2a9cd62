"""One error hierarchy for the whole package (no third-party imports).

``LumbarError`` is the base. ``BadInputError`` means the user's input is wrong (a file, a folder, an
option, a model path): the command line prints ``error: <where>: <reason>`` and exits 2. Anything else
is a failure of ours or of the environment (exit 1). ``ServingError`` is bad input only when the server
rejected the request itself, not when it could not be reached.
"""

from __future__ import annotations


class LumbarError(Exception):
    """Base of every error lumbar-tf raises on purpose."""


class BadInputError(LumbarError, ValueError):
    """Bad input: ``str(err) == f"{where}: {reason}"``.

    Args:
        where: the file, folder, option or item that is wrong; or the whole one-line message when
            ``reason`` is omitted (it is then split at the first ``": "``).
        reason: why it is wrong.
    """

    def __init__(self, where, reason: str | None = None):
        if reason is None:
            text = str(where)
            where, sep, rest = text.partition(": ")
            reason = rest if sep else text
            where = where if sep else ""
            message = text
        else:
            message = f"{where}: {reason}"
        self.where = str(where)
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):  # picklable across the process pool with both fields
        return (self.__class__, (self.where, self.reason) if self.where else (self.reason,))


class UsageError(BadInputError):
    """Options that do not fit together, found by the command line itself."""


class ConfigError(BadInputError):
    """A config key that does not exist or a value of the wrong type."""


class LabelError(BadInputError):
    """A label string or value that lumbar-tf does not know."""


class DicomError(BadInputError):
    """Bad DICOM input (unreadable file, series without pixels, impossible geometry)."""

    @property
    def path(self):
        from pathlib import Path

        return Path(self.where)


class DatasetError(BadInputError):
    """A dataset that cannot be used at all (one bad study is skipped instead)."""


class MetricsError(BadInputError):
    """Arrays whose shapes or values do not fit the metric."""


class ModelLoadError(BadInputError):
    """A model path that is missing, corrupt or not a lumbar-tf model."""


class WeightsError(BadInputError):
    """A backbone weights file that is missing or does not fit the backbone."""


class RunFolderError(BadInputError):
    """A run folder that cannot be used as asked (finished without --overwrite, ...)."""


class ExportError(BadInputError):
    """Export refused on bad input or a failed check; nothing is published then."""


class ServingError(LumbarError, RuntimeError):
    """A failed call to TF Serving, with a one-line message.

    Attributes:
        code: gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...), ``"HTTP 404"`` for REST, or
            ``"CLIENT"`` for a request or answer the client itself refused.
        target: the server address that was called.
    """

    # The server is down, slow or full: not the user's input being wrong.
    UNAVAILABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")

    def __init__(self, message: str, *, code: str = "UNKNOWN", target: str = ""):
        super().__init__(message)
        self.code = code
        self.target = target

    @property
    def bad_input(self) -> bool:
        return self.code not in self.UNAVAILABLE_CODES and not self.code.startswith("HTTP 5")

    def __reduce__(self):
        return (_rebuild_serving_error, (str(self), self.code, self.target))


def _rebuild_serving_error(message, code, target):
    return ServingError(message, code=code, target=target)


def is_bad_input(exc: BaseException) -> bool:
    """Exit status 2 (bad input) rather than 1 (failure)."""
    if isinstance(exc, ServingError):
        return exc.bad_input
    return isinstance(exc, BadInputError)


def one_line(exc: BaseException) -> str:
    """The first line of an error's message, or its class name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
