"""Durable writing of output objects: temp file, fsync, atomic rename, directory fsync.

Layout under ``output_dir``: ``<KIND>/<InstanceNumber:04d>.dcm`` with KIND one of ``QSM``,
``SWI``, ``MINIP``, ``R2STAR`` (classic MR series, from ImageType[2]), ``QSM_PM`` (Parametric
Map), ``SR`` (structured report), ``SUMMARY`` (secondary capture), or ``<Modality>_<SeriesNumber>``
for anything else. A reader finds every output by its kind; a crash leaves either the complete
old file or the complete new one, never a partial file under the final name.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from qsmnode.durable import fsync_dir

_SOP_KIND = {
    "1.2.840.10008.5.1.4.1.1.30": "QSM_PM",  # Parametric Map Storage
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.7": "SUMMARY",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4": "SUMMARY",  # Multi-frame True Color SC
}


def output_kind(ds: Dataset) -> str:
    """The directory name an output object is written under (see the module doc)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _SOP_KIND:
        return _SOP_KIND[sop_class]
    image_type = ds.get("ImageType")
    if image_type is not None and len(image_type) >= 3 and str(image_type[2]).strip():
        return "".join(c for c in str(image_type[2]).upper() if c.isalnum() or c == "_")
    return f"{ds.get('Modality', 'OT')}_{ds.get('SeriesNumber', 0)}"


def _write_one(ds: Dataset, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        pydicom.dcmwrite(handle, ds, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_datasets(datasets, output_dir, *, workers: int = 4) -> list[Path]:
    """Write every dataset durably under ``output_dir``; return the paths in input order.

    Each file is written to a temporary name in its final directory, flushed and fsynced, then
    renamed over the final name (atomic on POSIX); the directories are fsynced at the end so the
    renames survive a crash. ``workers`` threads overlap the fsyncs (they release the GIL).
    Raises ``ValueError`` if two datasets would get the same file name.
    """
    root = Path(output_dir)
    targets: list[Path] = []
    seen: set[Path] = set()
    for ds in datasets:
        number = int(ds.get("InstanceNumber", 0) or 0)
        path = root / output_kind(ds) / f"{number:04d}.dcm"
        if path in seen:
            raise ValueError(
                f"two output objects would both be written as {path} (same kind and "
                f"InstanceNumber {number}); give each instance its own InstanceNumber")
        seen.add(path)
        targets.append(path)
    directories = sorted({p.parent for p in targets})
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(targets) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_one, datasets, targets))
    else:
        for ds, path in zip(datasets, targets):
            _write_one(ds, path)
    for directory in [*directories, root]:
        fsync_dir(directory)
    return targets
