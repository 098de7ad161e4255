"""Exceptions that carry a reason a person can act on.

Every refusal names what was wrong and what the sender can do. The node turns these into
job-failure messages, DICOM statuses and audit lines; the CLI prints them as one line.
"""


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
