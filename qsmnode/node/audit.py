"""Append-only audit log: one JSON object per line, one line per hop of every study.

Each line has ``ts`` (UTC, ISO 8601 with milliseconds), ``event`` (received, completed,
processed, sent, rejected, failed, dispatch_retry, ...) and the caller's fields (ids, timings in
seconds, reasons). Patient identifiers never appear in clear: any field named like a PHI
attribute (PatientName, PatientID, PatientBirthDate, AccessionNumber, ..., in DICOM keyword or
snake_case spelling, at any nesting depth) is replaced by a salted HMAC-SHA256 digest
``"h:<16 hex>"``, the same for the same value within one node (so a person with the salt's
owner's help can still follow one patient through the log), useless without the salt.
UIDs are not treated as PHI and stay in clear.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

#: DICOM keywords (PS3.15 Annex E basic profile, the patient/visit part) treated as PHI.
PHI_KEYWORDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientAge", "PatientSex", "PatientSize",
    "PatientWeight", "AccessionNumber", "IssuerOfPatientID", "MedicalRecordLocator",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "RequestingPhysician",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "StudyID", "AdmissionID",
    "MilitaryRank", "EthnicGroup", "PatientReligiousPreference", "PatientComments",
    "AdditionalPatientHistory", "InstitutionName", "InstitutionAddress", "StationName",
    "DeviceSerialNumber", "RequestAttributesSequence",
})


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


_PHI_NORMALISED = frozenset(_norm(k) for k in PHI_KEYWORDS)


def is_phi_field(name: str) -> bool:
    """True when a field called ``name`` (DICOM keyword or snake_case) holds a patient identifier."""
    return _norm(name) in _PHI_NORMALISED


class AuditLog:
    """Thread-safe JSON-lines audit log at ``path`` (parent folders are created).

    ``salt``: secret bytes for the PHI digests. Without it the salt is read from
    ``<path>.salt`` or, the first time, drawn at random and written there with mode 0600, so
    digests stay comparable across restarts. ``fsync``: force each line to disk (slower; the
    default flushes to the OS after each line).
    """

    def __init__(self, path: str | os.PathLike, *, salt: bytes | None = None, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._salt = salt if salt is not None else self._load_or_create_salt()
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _load_or_create_salt(self) -> bytes:
        salt_path = self.path.with_name(self.path.name + ".salt")
        try:
            return bytes.fromhex(salt_path.read_text().strip())
        except FileNotFoundError:
            salt = secrets.token_bytes(32)
            fd = os.open(salt_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(salt.hex() + "\n")
            return salt
        except ValueError as err:
            raise ValueError(f"audit salt file {salt_path} is not hex ({err}); "
                             "restore it or delete it to start a new salt") from err

    def pseudonym(self, value: Any) -> str:
        """Salted digest ``"h:<16 hex>"`` of ``value`` (its ``str``, whitespace-trimmed)."""
        digest = hmac.new(self._salt, str(value).strip().encode("utf-8"), hashlib.sha256)
        return "h:" + digest.hexdigest()[:16]

    def _scrub(self, value: Any, phi: bool = False) -> Any:
        if isinstance(value, dict):
            return {str(k): self._scrub(v, phi or is_phi_field(str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._scrub(v, phi) for v in value]
        if phi:
            return None if value is None or value == "" else self.pseudonym(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if hasattr(value, "item") and callable(value.item):  # numpy scalars
            try:
                return value.item()
            except (TypeError, ValueError):
                pass
        return str(value)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line ``{"ts", "event", **fields}`` with PHI fields pseudonymised; returns it."""
        if not event or not isinstance(event, str):
            raise ValueError("audit event must be a non-empty string such as 'received' or 'sent'")
        ts = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = {"ts": ts, "event": event}
        for key, value in fields.items():
            if key in ("ts", "event"):
                key = f"{key}_"
            line[key] = self._scrub(value, is_phi_field(key))
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh.closed:
                raise ValueError(f"audit log {self.path} is closed")
            self._fh.write(text)
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())
        return line

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
