"""Deterministic DICOM UIDs for every output object.

An output's UIDs are a pure function of (source series UIDs, software version, output kind
[, instance number]), so re-processing the same acquisition with the same software replaces the
objects already in PACS instead of duplicating them, and a new software version produces new
series beside the old ones.

UIDs are in the ``2.25`` arc (ISO/IEC 9834-8 / ITU-T X.667: a UUID written as one decimal
integer), so no organisational root is needed: the 128-bit integer is the first 16 bytes of a
SHA-256 over the inputs, with the UUID version (8, "custom") and variant bits set. Length is at
most 44 characters (DICOM allows 64).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

_NAMESPACE = "qsmnode-output-uid-v1"


def deterministic_uid(*parts: object) -> str:
    """A ``2.25.<decimal>`` UID derived from ``parts`` (each converted with ``str``).

    Equal inputs give equal UIDs; any change in any part gives an unrelated UID.
    """
    text = "\x1f".join([_NAMESPACE, *(str(p) for p in parts)])
    digest = bytearray(hashlib.sha256(text.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # UUID version 8 (custom)
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return "2.25." + str(int.from_bytes(bytes(digest), "big"))


def _source_key(source_series_uids: Iterable[str]) -> str:
    """Order-independent key for the set of source series."""
    return "+".join(sorted(set(str(u) for u in source_series_uids)))


def series_uid(source_series_uids: Iterable[str], software_version: str, kind: str) -> str:
    """SeriesInstanceUID of output ``kind`` (e.g. ``QSM``, ``SWI``, ``QSM_PM``, ``SR``)."""
    return deterministic_uid(_source_key(source_series_uids), software_version, kind, "series")


def instance_uid(
    source_series_uids: Iterable[str], software_version: str, kind: str, instance_number: int
) -> str:
    """SOPInstanceUID of instance ``instance_number`` (1-based) of output ``kind``."""
    return deterministic_uid(
        _source_key(source_series_uids), software_version, kind, "instance", int(instance_number)
    )
