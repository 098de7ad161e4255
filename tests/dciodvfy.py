"""Run dicom3tools' ``dciodvfy`` on a DICOM file and judge its report.

API for every test in the project:

- ``validate(path) -> (errors, warnings)``: the ``Error`` and ``Warning`` lines dciodvfy prints
  (prefix stripped), everything else dropped.
- ``assert_valid(path)``: fails on any error, or on any warning that is not in ``ALLOWED_WARNINGS``.
- ``AVAILABLE``: whether ``/usr/bin/dciodvfy`` exists (tests skip without it).

``ALLOWED_WARNINGS`` maps a regular expression (searched in the warning text) to the reason the
warning is accepted. Add an entry only with a reason a reviewer can check.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

DCIODVFY = "/usr/bin/dciodvfy"
AVAILABLE = os.path.exists(DCIODVFY)

ALLOWED_WARNINGS: dict[str, str] = {
    # DESIGN.md stores R2* as integers x 10 with RescaleSlope 0.1, and QSM with an explicit
    # identity rescale (slope 1, intercept 0) so viewers that apply a Modality LUT show ppb.
    # The classic MR Image IOD has no Modality LUT module, so dciodvfy calls the instances
    # "Standard Extended"; every major MR vendor writes these attributes in classic MR images
    # and PACS viewers honour them.
    r"Attribute is not present in standard DICOM IOD - \(0x0028,0x105[23]\) DS Rescale":
        "RescaleSlope/RescaleIntercept carry the QSM ppb / R2* 1/s x 10 scaling (DESIGN.md)",
    r"Non-identity Modality LUT Module \(RescaleSlope and RescaleIntercept\) not expected "
    r"to be present in standard MR IOD":
        "R2STAR RescaleSlope 0.1 is the DESIGN.md encoding of R2* in 1/s",
    r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
    r"Standard Extended SOP Class":
        "consequence of the Rescale attributes above (nothing else is extra)",
    # ImageType value 3 is the output KIND (DESIGN.md: DERIVED\SECONDARY\<KIND>); value 3 is
    # implementation-defined for MR derived images, so any term is legal but unknown to dciodvfy.
    r"Unrecognized defined term <(QSM|SWI|MINIP|R2STAR|SUMMARY)> for value 3 of attribute "
    r"<Image Type>":
        "ImageType value 3 is the DESIGN.md output kind",
    # Parametric Map ImageType/FrameType value 4 QUANTITY is written by highdicom and listed in
    # PS3.3 C.8.32.3 (Derived Pixel Contrast); this dciodvfy build predates the term.
    r"Unrecognized defined term <QUANTITY> for value 4 of attribute <(Image|Frame) Type>":
        "QUANTITY is a PS3.3 Parametric Map defined term newer than this dciodvfy",
    # SR concepts without a standard code use a private coding scheme; PS3.3 8.2 (Code Value)
    # reserves designators beginning with "99" for local schemes, and the SR declares it in the
    # Coding Scheme Identification Sequence.
    r"Unrecognized defined term <99QSMNODE> for value 1 of attribute <Coding Scheme Designator>":
        "99QSMNODE is a declared private coding scheme (PS3.3 8.2 '99' prefix)",
}


def validate(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Run dciodvfy on ``path``; return its error lines and warning lines (without prefix)."""
    proc = subprocess.run([DCIODVFY, str(Path(path))], capture_output=True,
                          text=True, errors="replace", timeout=120)
    errors: list[str] = []
    warnings: list[str] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        line = line.strip()
        if line.startswith("Error"):
            errors.append(line.split(" - ", 1)[-1] if " - " in line else line)
        elif line.startswith("Warning"):
            warnings.append(line.split(" - ", 1)[-1] if " - " in line else line)
    return errors, warnings


def unexpected_warnings(warnings: list[str]) -> list[str]:
    """The warnings that no ``ALLOWED_WARNINGS`` pattern accepts."""
    return [w for w in warnings
            if not any(re.search(p, w) for p in ALLOWED_WARNINGS)]


def assert_valid(path: str | os.PathLike) -> None:
    """Fail (AssertionError) on any dciodvfy error or non-allow-listed warning for ``path``."""
    errors, warnings = validate(path)
    bad = unexpected_warnings(warnings)
    problems = [f"error: {e}" for e in errors] + [f"warning: {w}" for w in bad]
    assert not problems, f"dciodvfy on {path}:\n  " + "\n  ".join(problems)
