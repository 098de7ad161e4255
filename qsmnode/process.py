"""The one load -> reconstruct -> write chain, used by ``qsmnode process`` and by the node's worker."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass
class ProcessOutcome:
    """What one acquisition produced: the output files and a short summary for people and logs."""

    output_paths: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


def process_paths(
    input_paths: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    device: str = "auto",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    parametric_map: bool = True,
    summary_image: bool = True,
) -> ProcessOutcome:
    """Load one acquisition from DICOM files, reconstruct it and write every output into ``output_dir``.

    Raises :class:`qsmnode.errors.InputRefused` / ``ReconstructionError`` with a reason when the
    input cannot be processed; writes nothing in that case.
    """
    raise NotImplementedError("wired at integration")
