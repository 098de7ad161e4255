"""Exceptions that carry a reason a person can act on.

Every refusal names what was wrong and what the sender can do. The node turns these into
job-failure messages, DICOM statuses and audit lines; the CLI prints them as one line.
Values quoted in a reason are written for people with :func:`plain` (``0, 1, -0.5``), never as
a Python repr (``[np.float64(0.0), ...]``, ``['2D']``).
"""

from numbers import Number


def plain(values, digits: int = 6) -> str:
    """``values`` (numbers of any kind: Python, numpy, DICOM DS/IS; or text) as a person writes
    them: comma-separated, numbers with at most ``digits`` significant digits and no ``-0``.
    One value (not a list) is written alone."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]
    return ", ".join(_plain_value(v, digits) for v in values)


def _plain_value(value, digits: int) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, Number) or hasattr(value, "dtype"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return str(value)
        return f"{number:.{digits}g}" if number != 0 else "0"
    return str(value)


class QsmNodeError(Exception):
    """Base class. ``str(err)`` is a complete, one-line message for a person."""

    def __init__(self, reason: str, hint: str | None = None):
        self.reason = reason
        self.hint = hint
        super().__init__(reason if not hint else f"{reason} ({hint})")


class InputRefused(QsmNodeError):
    """The DICOM input cannot be reconstructed (wrong kind of series, missing data, ...)."""


class ReconstructionError(QsmNodeError):
    """The arrays handed to the reconstruction are unusable (NaNs, one slice, bad echo times, ...)."""


class ConfigError(QsmNodeError):
    """The node configuration is invalid."""
