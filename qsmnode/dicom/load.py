"""Vendor-aware loading of multi-echo GRE DICOM into :class:`qsmnode.acquisition.Acquisition`.

Steps (one pass over the headers, then one decode of the pixels that are used):

1. read every file once with large elements deferred (pixel data, vendor blobs are read only
   when used); classify each instance (:func:`qsmnode.dicom.classify.classify_instance`);
2. group images into acquisitions by ``acquisition_key`` (frame of reference, orientation,
   pixel spacing, matrix, acquisition timing) and then by slice position and echo time, never by
   series/study UIDs or descriptions: magnitude and phase series, real and imaginary images and
   vendor exports with a study UID per volume come together (:mod:`qsmnode.dicom.grouping`,
   which also accounts for every series that is not used, with the reason);
3. check completeness (every slice x echo x component exactly once, ImagesInAcquisition, slice
   spacing, collinear slices) and refuse with a reason otherwise;
4. decode pixels, apply the vendor rules (rescale, phase scaling to radians, phase sign,
   GE alternate-slice pi offset) and return the complex signal on the array axes of DESIGN.md.

Parallel reading (``workers``): step 1 and the pixel decoding are per file, and most of the time
on a full-size series. With many files (:data:`qsmnode.dicom.readpool.MIN_FILES` or more, paths
rather than Datasets) they run in worker processes over contiguous chunks of the sorted file list
(:mod:`qsmnode.dicom.readpool`: start method, shared-memory pixel transport); each worker sends
back, per instance, the classification, the image records, a few header facts and the decoded
stored pixels, not the Dataset. The parent deduplicates in file order, groups and assembles
exactly as the serial path does; the one or two Datasets the assembler reads beyond those facts
(the first instance, the header's reference instance) are read again from their files. A pixel
decode that fails in a worker is redone in the parent, so the refusal is the serial one; a pool
that fails as a whole (a worker died) falls back to the serial path. Results are identical to
``workers=1``: same arrays bit for bit, header, provenance, warnings and refusals.

Memory layout: ``Acquisition.signal`` is complex64 ``[i, j, k, echo]`` in Fortran order (a view
of ``[echo, k, j, i]`` planes), so each echo volume ``signal[..., e]`` is one contiguous block and
``signal[:, :, k, e] == pixel_array.T`` without copies. Use ``np.ascontiguousarray`` where a
C-ordered array is required.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from qsmnode.acquisition import Acquisition, SourceReference, b0_tesla_from_frequency
from qsmnode.dicom import classify, frames, geometry, grouping, readpool, vendors
from qsmnode.errors import InputRefused, plain

log = logging.getLogger(__name__)

#: elements larger than this are read from disk only when used (pixel data, CSA headers)
DEFER_SIZE_BYTES = 2048

_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
_HEADER_SKIP = {
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
}


class _Instance:
    """One usable instance: classification, image records, header (``ds``) and stored pixels.

    An instance read by a worker process arrives without its Dataset (pickling one costs more
    than parsing it) and reads its file again when ``ds`` is first used: the assembler does that
    for one or two instances per acquisition. What grouping and assembly read for every instance
    are the cached properties in :attr:`FACTS`, which the worker computes before it drops the
    Dataset (one that raises is left to the parent, where it raises as in the serial path).
    """

    FACTS = ("series_label", "acquisition_time", "matrix", "sop_class_uid", "enhanced")

    def __init__(
        self,
        label: str,
        ds: Dataset | None,
        info: classify.InstanceInfo,
        records: list[frames.ImageRecord],
        path: Path | None = None,
    ):
        self.label = label
        self._ds = ds
        self.path = path
        self.info = info
        self.records = records
        self.pixels: np.ndarray | None = None  # stored values (frames, rows, cols), decoded once

    def __getstate__(self):  # to the parent: no Dataset, pixels travel separately
        state = self.__dict__.copy()
        state["_ds"] = None
        state["pixels"] = None
        return state

    @property
    def ds(self) -> Dataset:
        if self._ds is None:
            ds = _read(self.path) if self.path is not None else None
            if ds is None or str(ds.get("SOPInstanceUID", "") or "") != self.info.sop_instance_uid:
                raise InputRefused(
                    f"{self.label} changed or disappeared while the series was being loaded",
                    "send the series again and leave its files alone until it is processed",
                )
            self._ds = ds
        return self._ds

    @cached_property
    def series_label(self) -> str:
        ds = self.ds
        return f"series {ds.get('SeriesNumber', '?')} '{ds.get('SeriesDescription', '') or ''}'"

    @cached_property
    def acquisition_time(self) -> str:
        ds = self.ds
        return str(ds.get("AcquisitionDateTime", "") or "") or (
            str(ds.get("AcquisitionDate", "") or "") + str(ds.get("AcquisitionTime", "") or "")
        )

    @cached_property
    def matrix(self) -> tuple[int, int]:
        return int(self.ds.Rows), int(self.ds.Columns)

    @cached_property
    def sop_class_uid(self) -> str:
        return str(self.ds.SOPClassUID)

    @cached_property
    def enhanced(self) -> bool:
        return frames.is_enhanced(self.ds)


# --------------------------------------------------------------------------- reading


def _iter_sources(sources) -> Iterable[tuple[str, object]]:
    if isinstance(sources, (str, os.PathLike, Dataset)):
        sources = [sources]
    for src in sources:
        if isinstance(src, Dataset):
            yield str(src.get("SOPInstanceUID", "dataset")), src
            continue
        path = Path(src)
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                yield str(sub), sub
        elif path.is_file():
            yield str(path), path
        else:
            raise InputRefused(
                f"no such file or folder: {path}", "give existing DICOM files or folders"
            )


def _read(path: Path) -> Dataset | None:
    if path.name.upper() == "DICOMDIR":
        return None
    try:
        return pydicom.dcmread(path, defer_size=DEFER_SIZE_BYTES)
    except (InvalidDicomError, EOFError, IsADirectoryError):
        return None
    except Exception:  # truncated or corrupt file: not DICOM we can use
        return None


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """Stored pixel values ``(frames, rows, cols)`` without any rescale (decoded once)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    meta = getattr(ds, "file_meta", None)
    ts = (
        str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
        if meta is not None
        else "1.2.840.10008.1.2"
    )
    bits_alloc = int(ds.get("BitsAllocated", 16))
    bits_stored = int(ds.get("BitsStored", bits_alloc))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if (
        ts in _NATIVE_LITTLE_ENDIAN
        and bits_alloc in (8, 16, 32)
        and "PixelData" in ds
        and not (signed and bits_stored < bits_alloc)
        and int(ds.get("SamplesPerPixel", 1)) == 1
    ):
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_alloc // 8}")
        data = ds.PixelData or b""
        if len(data) < rows * cols * n * dtype.itemsize:
            raise InputRefused(
                f"pixel data of {ds.get('SOPInstanceUID', '?')} is truncated ({len(data)} of "
                f"{rows * cols * n * dtype.itemsize} bytes)",
                "send the series again: a file is incomplete",
            )
        arr = np.frombuffer(data, dtype=dtype, count=rows * cols * n)
        return arr.reshape(n, rows, cols)
    try:
        arr = ds.pixel_array
    except Exception as err:
        raise InputRefused(
            f"pixel data of {ds.get('SOPInstanceUID', '?')} cannot be decoded ({type(err).__name__}: {err})",
            "send the series uncompressed or with a lossless transfer syntax this node reads",
        ) from err
    return np.asarray(arr).reshape(n, rows, cols)


# --------------------------------------------------------------------------- public API


@dataclass
class LoadResult:
    """What the loader made of its inputs: the usable ``acquisitions``, the input series it
    ``refused`` (:class:`qsmnode.dicom.grouping.Refused`, with the reason), and ``series``: the
    label (``series 5 'gre_qsm'``) of every DICOM series found, by Series Instance UID."""

    acquisitions: list[Acquisition]
    refused: list[grouping.Refused]
    series: dict[str, str]


def load_acquisitions(sources, workers: int | None = None) -> list[Acquisition]:
    """Load every usable multi-echo GRE acquisition from ``sources``.

    ``sources``: iterable of file paths, folders (searched recursively) or pydicom Datasets.
    Returns the acquisitions found (complex signal ``[i, j, k, echo]``, echo times in s, B0 in T
    from ImagingFrequency, LPS affine in mm). Raises :class:`InputRefused` naming every reason
    when none is usable; acquisitions that are refused next to usable ones are skipped.

    ``workers``: processes that read and decode the files: None = as many as there are CPUs, at
    most :data:`qsmnode.dicom.readpool.MAX_DEFAULT_WORKERS`; 1 = in this process only. Fewer than
    :data:`qsmnode.dicom.readpool.MIN_FILES` files, or Datasets among the sources, are always
    read in this process. The result does not depend on it (module docstring).
    """
    loaded = _load(sources, workers)
    if not loaded.acquisitions:
        raise InputRefused(
            "no usable multi-echo GRE acquisition: "
            + ("; ".join(str(r) for r in loaded.refused) or "no DICOM images found"),
            "send the complete multi-echo GRE magnitude and phase (or real and imaginary) series",
        )
    return loaded.acquisitions


def load_inputs(sources, workers: int | None = None) -> LoadResult:
    """Every usable acquisition in ``sources`` and what became of every other input series;
    raises only for sources that do not exist. ``sources`` and ``workers`` as for
    :func:`load_acquisitions`."""
    return _load(sources, workers)


def prestart_workers(workers: int | None = None) -> str:
    """Start the reader processes of the next :func:`load_acquisitions` now; call it before the
    process initialises CUDA (a job process that warms up its GPU context) so that they are
    forked cheaply from the clean process. Returns the start method
    (:func:`qsmnode.dicom.readpool.prestart`)."""
    return readpool.prestart(workers)


def load_acquisition(sources, workers: int | None = None) -> Acquisition:
    """Exactly one usable acquisition from ``sources``, else :class:`InputRefused` saying what
    was found. ``workers`` as for :func:`load_acquisitions`."""
    acquisitions = load_acquisitions(sources, workers)
    if len(acquisitions) > 1:
        found = "; ".join(
            f"{a.header.get('SeriesDescription', '?')} ({a.n_echoes} echoes, "
            f"{'x'.join(str(s) for s in a.shape)}, series {', '.join(a.source_series_uids)})"
            for a in acquisitions
        )
        raise InputRefused(
            f"{len(acquisitions)} acquisitions found where one was expected: {found}",
            "send the series of one acquisition at a time",
        )
    return acquisitions[0]


# --------------------------------------------------------------------------- grouping


def _usable(ds: Dataset | None) -> bool:
    return ds is not None and ("SOPClassUID" in ds or "Modality" in ds)


def _uid(ds: Dataset, label: str) -> str:
    return str(ds.get("SOPInstanceUID", "")) or label


def _classified(label: str, ds: Dataset, path: Path | None) -> _Instance:
    vendor = vendors.vendor_from_manufacturer(ds.get("Manufacturer"))
    try:
        records = frames.image_records(ds, vendor)
    except Exception as err:  # a broken functional group: refused below with the reason
        records = []
        info = classify.classify_records(
            ds,
            vendor,
            [],
            broken=(f"unreadable image header ({type(err).__name__}: {err}); re-export the series"),
        )
    else:
        info = classify.classify_records(ds, vendor, records)
    return _Instance(label, ds, info, records, path)


def _read_serial(labelled: list[tuple[str, object]]) -> list[_Instance]:
    instances: list[_Instance] = []
    seen: set[str] = set()
    for label, src in labelled:
        ds = src if isinstance(src, Dataset) else _read(src)
        if not _usable(ds):
            continue
        uid = _uid(ds, label)
        if uid in seen:
            continue  # the same instance twice (e.g. two copies): use it once
        seen.add(uid)
        instances.append(_classified(label, ds, None if isinstance(src, Dataset) else src))
    return instances


def _read_chunk(chunk: list[tuple[str, str]]):
    """In a worker process: ``_read_serial`` for one chunk of ``(label, path)``, plus the stored
    pixels of every instance that is not refused. Returns ``([(uid, instance)], [pixels])``;
    the instances pickle without their Dataset. Pixels that fail to decode are None: the parent
    decodes them again, so the refusal (or error) is exactly the serial one."""
    out: list[tuple[str, _Instance]] = []
    arrays: list[np.ndarray | None] = []
    seen: set[str] = set()
    for label, name in chunk:
        path = Path(name)
        ds = _read(path)
        if not _usable(ds):
            continue
        uid = _uid(ds, label)
        if uid in seen:
            continue
        seen.add(uid)
        inst = _classified(label, ds, path)
        pixels = None
        if not inst.info.refusal and inst.records:
            try:
                pixels = _stored_pixels(ds)
            except Exception:  # noqa: BLE001 - redone in the parent, which reports it
                pixels = None
        for fact in _Instance.FACTS:
            try:
                getattr(inst, fact)
            except Exception:  # noqa: BLE001 - computed (and raised) in the parent if needed
                pass
        out.append((uid, inst))
        arrays.append(pixels)
    return out, arrays


def _read_parallel(
    labelled: list[tuple[str, object]], workers: int, automatic: bool
) -> list[_Instance] | None:
    """The instances of ``labelled`` (paths only) read by ``workers`` processes, in the order and
    with the deduplication of :func:`_read_serial`; None when the pool failed."""
    items = [(label, str(src)) for label, src in labelled]
    try:
        size = sum(os.stat(src).st_size for _, src in labelled)  # about the pixels' size
    except OSError:
        size = 0
    try:
        results = readpool.map_chunks(
            _read_chunk, items, workers, automatic=automatic, size_hint=size
        )
    except readpool.PoolFailed as err:
        log.warning(
            "reading %d files in %d worker processes failed (%s); reading them in this process",
            len(labelled),
            workers,
            err,
        )
        return None
    instances: list[_Instance] = []
    seen: set[str] = set()
    for payload, arrays in results:
        for (uid, inst), pixels in zip(payload, arrays):
            if uid in seen:
                continue  # the same instance in two chunks: the first one, as in file order
            seen.add(uid)
            inst.pixels = pixels
            instances.append(inst)
    return instances


def _load(sources, workers: int | None = None) -> LoadResult:
    labelled = list(_iter_sources(sources))
    n_workers = readpool.resolve_workers(workers, len(labelled))
    instances = None
    if n_workers > 1 and not any(isinstance(src, Dataset) for _, src in labelled):
        instances = _read_parallel(labelled, n_workers, automatic=workers is None)
    if instances is None:
        instances = _read_serial(labelled)
    series = {inst.info.series_instance_uid: inst.series_label for inst in instances}

    groups, refused_by_key = grouping.group_instances(instances)
    acquisitions, refused = [], []
    for key in refused_by_key:
        if key not in groups:
            refused.extend(grouping.merge_refusals(refused_by_key[key]))
    for key, group in groups.items():
        # refused series next to usable ones (an SWI of the same scan): named too
        refused.extend(grouping.merge_refusals(refused_by_key.get(key, [])))
        for sub in grouping.split_repeats(group):
            try:
                acquisition = _assemble(sub, threads=n_workers)
            except InputRefused as err:
                refused.append(grouping.refused_group(sub, str(err)))  # with the advice
                continue
            acquisitions.append(acquisition)
            unused = grouping.unused_series(sub, acquisition.source_series_uids)
            if unused is not None:
                refused.append(unused)
    return LoadResult(acquisitions, refused, series)


# --------------------------------------------------------------------------- assembly


def _cluster(values: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted cluster centres of 1D ``values`` (gap > tol starts a new cluster) and the index of
    each value's cluster."""
    order = np.argsort(values, kind="stable")
    sorted_v = values[order]
    new = np.concatenate([[True], np.diff(sorted_v) > tol])
    ids_sorted = np.cumsum(new) - 1
    ids = np.empty_like(ids_sorted)
    ids[order] = ids_sorted
    centres = np.array([sorted_v[ids_sorted == c].mean() for c in range(ids_sorted[-1] + 1)])
    return centres, ids


def _per_echo(fn, n_echoes: int, threads: int) -> list:
    """``[fn(e) for e in range(n_echoes)]``, in up to ``threads`` threads (numpy releases the GIL
    in the array operations; every echo writes its own block, so the result is the same)."""
    if threads <= 1 or n_echoes <= 1:
        return [fn(e) for e in range(n_echoes)]
    with ThreadPoolExecutor(max_workers=min(threads, n_echoes)) as pool:
        return list(pool.map(fn, range(n_echoes)))


def _assemble(group: grouping.Group, threads: int = 1) -> Acquisition:
    """The Acquisition of one group (checks, then pixels); ``threads`` for the per-echo array
    work (1: this thread only)."""
    items = group.items
    first_inst, first_rec = items[0]
    vendor = first_inst.info.vendor
    provenance: list[str] = []
    warnings: list[str] = []

    # --- geometry of the stack
    row, col, normal = geometry.orientation_axes(first_rec.orientation)
    for inst, rec in items:
        if geometry.orientation_key(rec.orientation) != geometry.orientation_key(
            first_rec.orientation
        ):
            raise InputRefused(
                "inconsistent geometry: frames with different orientations in one stack",
                "send one acquisition with one slab orientation",
            )
    if any(rec.echo_time_ms is None for _, rec in items):
        raise InputRefused(
            "images without an echo time (EchoTime / EffectiveEchoTime)",
            "send the original scanner images; the echo time is required",
        )
    positions = np.array([rec.position for _, rec in items], dtype=np.float64)
    dist = positions @ normal
    slice_d, slice_idx = _cluster(dist, 0.01)
    te_values, echo_idx = _cluster(np.array([rec.echo_time_ms for _, rec in items]), 0.005)
    n_slices, n_echoes = len(slice_d), len(te_values)
    if np.any(te_values <= 0):
        raise InputRefused(
            f"echo times ({plain(te_values)} ms) include a non-positive value",
            "send the original scanner images",
        )

    comps = [rec.component for _, rec in items]
    present = {c for c in comps}
    if None in present:
        raise InputRefused(
            "cannot tell magnitude from phase for some images (no ImageType M/P, ComplexImageComponent "
            "or vendor tag)",
            "send the original scanner images, which carry the image type",
        )
    counts = {c: np.zeros((n_slices, n_echoes), dtype=np.int32) for c in present}
    for (inst, rec), k, e in zip(items, slice_idx, echo_idx):
        counts[rec.component][k, e] += 1

    def complete(c):
        return c in counts and np.all(counts[c] == 1)

    if {"real", "imaginary"} <= present and complete("real") and complete("imaginary"):
        pair = ("real", "imaginary")
        provenance.append(
            f"{vendor}: real and imaginary images used (preferred over magnitude/phase)"
        )
    elif {"magnitude", "phase"} <= present:
        pair = ("magnitude", "phase")
    elif {"real", "imaginary"} <= present:
        pair = ("real", "imaginary")
    elif "magnitude" in present and "phase" not in present:
        raise InputRefused(
            f"magnitude without phase ({n_echoes} echo(es), {n_slices} slices, no phase images)",
            "QSM needs the phase: enable phase (or real/imaginary) image export on the scanner and "
            "send both series",
        )
    elif "phase" in present:
        raise InputRefused(
            "phase without magnitude", "send the magnitude series together with the phase series"
        )
    else:
        raise InputRefused(
            f"no magnitude/phase or real/imaginary pair (found {plain(sorted(present))})",
            "send the original multi-echo GRE magnitude and phase series",
        )

    # phase-difference field maps: phase at one echo only, magnitude at several (Siemens fm)
    if pair == ("magnitude", "phase"):
        mag_echoes = np.nonzero(counts["magnitude"].sum(axis=0))[0]
        ph_echoes = np.nonzero(counts["phase"].sum(axis=0))[0]
        if len(ph_echoes) == 1 and len(mag_echoes) >= 2:
            raise InputRefused(classify.REFUSAL_PHASE_DIFFERENCE)

    problems = []
    for c in pair:
        cnt = counts.get(c, np.zeros((n_slices, n_echoes), np.int32))
        if np.any(cnt > 1):
            k, e = np.argwhere(cnt > 1)[0]
            raise InputRefused(
                f"{int(cnt.max())} different {c} images for one slice ({slice_d[k]:.2f} mm) and echo "
                f"(TE {te_values[e]:g} ms): two acquisitions with identical geometry",
                "send one acquisition (one magnitude and one phase series)",
            )
        for e in range(n_echoes):
            missing = np.nonzero(cnt[:, e] == 0)[0]
            if missing.size == n_slices:
                problems.append(f"echo {e + 1} (TE {te_values[e]:g} ms) has no {c} images")
            elif missing.size:
                where = ", ".join(f"{slice_d[k]:.2f}" for k in missing[:6])
                problems.append(
                    f"echo {e + 1} (TE {te_values[e]:g} ms) {c}: {missing.size} of "
                    f"{n_slices} slices missing (at {where}{' ...' if missing.size > 6 else ''} mm)"
                )
    if problems:
        raise InputRefused(
            "incomplete acquisition: " + "; ".join(problems),
            "send every slice of every echo (wait until the series is complete)",
        )

    attrs = frames.acquisition_attributes(first_inst.ds)
    sorted_positions = np.zeros((n_slices, 3))
    for (inst, rec), k in zip(items, slice_idx):
        sorted_positions[k] = rec.position
    geometry.check_collinear(sorted_positions, normal, first_rec.pixel_spacing)
    spacing = geometry.check_slice_spacing(
        slice_d,
        slice_thickness_mm=attrs["slice_thickness_mm"],
        acquisition_type=attrs["acquisition_type"],
    )
    # --- completeness against what the headers announce
    used = [(inst, rec) for inst, rec in items if rec.component in pair]
    per_series: dict[str, list[_Instance]] = defaultdict(list)
    for inst in {id(i): i for i, _ in used}.values():
        per_series[inst.info.series_instance_uid].append(inst)
    for series_uid, insts in per_series.items():
        expected = insts[0].info.expected_in_series
        if expected and not insts[0].enhanced:
            all_in_series = sum(
                1
                for i, _ in {id(i): (i, 0) for i, _ in items}.values()
                if i.info.series_instance_uid == series_uid
            )
            if all_in_series < expected:
                raise InputRefused(
                    f"{insts[0].series_label} holds {all_in_series} of the {expected} images its "
                    f"header announces (ImagesInAcquisition): missing slices or echoes",
                    "send the complete series",
                )
    if vendor == "philips":
        n_sl = frames.private_value(first_inst.ds, 0x2001, "Philips Imaging DD 001", 0x18)
        n_ec = frames.private_value(first_inst.ds, 0x2001, "Philips Imaging DD 001", 0x14)
        try:
            if n_sl is not None and int(n_sl) > n_slices:
                raise InputRefused(
                    f"{int(n_sl) - n_slices} slice(s) missing: the header announces "
                    f"{int(n_sl)} slices, {n_slices} received",
                    "send the complete series",
                )
            if n_ec is not None and int(n_ec) > n_echoes:
                raise InputRefused(
                    f"echo(es) missing: the header announces {int(n_ec)} echoes, "
                    f"{n_echoes} received",
                    "send the complete series",
                )
        except (TypeError, ValueError):
            pass

    thickness = attrs["slice_thickness_mm"]
    between = first_inst.ds.get("SpacingBetweenSlices")
    single_spacing = float(between) if between not in (None, "") else (thickness or 1.0)
    affine = geometry.stack_affine(
        first_rec.orientation,
        sorted_positions[0],
        sorted_positions[-1],
        n_slices,
        first_rec.pixel_spacing,
        slice_spacing_mm=spacing if n_slices > 1 else single_spacing,
    )
    provenance.append(
        f"geometry: {n_slices} slices sorted along the normal ({plain(normal, 4)}), "
        f"slice spacing {spacing if n_slices > 1 else single_spacing:.4g} mm from "
        + (
            "ImagePositionPatient"
            if n_slices > 1
            else "SpacingBetweenSlices/SliceThickness (one slice)"
        )
    )

    # --- pixels: planes are written contiguously as [echo, slice, row, col]; the returned
    # signal is the (Fortran-ordered) view [col=i, row=j, slice=k, echo], so vol[:, :, k] ==
    # pixel_array.T without a copy and every echo volume is one contiguous block.
    rows, cols = first_inst.matrix
    mag_phase = pair == ("magnitude", "phase")
    shape = (n_echoes, n_slices, rows, cols)
    raw: dict[str, np.ndarray] = (
        {}
    )  # stored values, as stored (every plane is written: complete grid)
    slopes = {c: np.ones((n_echoes, n_slices)) for c in pair}
    intercepts = {c: np.zeros((n_echoes, n_slices)) for c in pair}
    for (inst, rec), k, e in zip(items, slice_idx, echo_idx):
        if rec.component not in pair:
            continue
        if inst.matrix != (rows, cols):
            raise InputRefused(
                "inconsistent geometry: images of different matrix sizes in one acquisition",
                "send one acquisition",
            )
        if inst.pixels is None:
            inst.pixels = _stored_pixels(inst.ds)
        frame = inst.pixels[rec.frame or 0]
        target = raw.get(rec.component)
        if target is None:
            dtype = (
                frame.dtype
                if frame.dtype.kind in "ui" and frame.dtype.itemsize <= 2
                else np.float32
            )
            target = raw[rec.component] = np.empty(shape, dtype=dtype)
        elif not np.can_cast(frame.dtype, target.dtype, "safe"):
            target = raw[rec.component] = target.astype(np.float32)
        target[e, k] = frame
        slopes[rec.component][e, k] = rec.slope
        intercepts[rec.component][e, k] = rec.intercept
        if rec.frame is None or rec.frame == len(inst.records) - 1:
            inst.pixels = None  # release as soon as the instance is used up
    for inst, _ in items:
        inst.pixels = None

    def rescaled(c: str, e: int) -> np.ndarray:
        """Rescaled values (float32 [slice, row, col]) of component ``c`` at echo ``e``."""
        out = raw[c][e].astype(np.float32)
        s_e, i_e = slopes[c][e], intercepts[c][e]
        if np.all(s_e == s_e[0]) and np.all(i_e == i_e[0]):
            if s_e[0] != 1.0:
                out *= np.float32(s_e[0])
            if i_e[0] != 0.0:
                out += np.float32(i_e[0])
            return out
        return out * s_e[:, None, None].astype(np.float32) + i_e[:, None, None].astype(np.float32)

    signal_ekrc = np.empty(shape, dtype=np.complex64)
    if mag_phase:
        bits = int(first_inst.ds.get("BitsStored", 12))
        pixrep = int(first_inst.ds.get("PixelRepresentation", 0))
        ph_raw = raw["phase"]
        lo, hi = float(ph_raw.min()), float(ph_raw.max())
        scales = {}
        for slope, intercept in set(zip(slopes["phase"].ravel(), intercepts["phase"].ravel())):
            observed = tuple(sorted((lo * slope + intercept, hi * slope + intercept)))
            scales[(slope, intercept)] = vendors.phase_scale(
                vendor, slope, intercept, bits, pixrep, observed
            )
        provenance.extend(sorted({rule for _, _, rule in scales.values()}))
        use_lut = len(scales) == 1 and ph_raw.dtype.kind in "ui"
        if use_lut:
            (slope, intercept), (ca, cb, _) = next(iter(scales.items()))
            base = int(min(lo, 0))
            rad = (np.arange(base, int(hi) + 1, dtype=np.float64) * slope + intercept) * ca + cb
            lut = np.exp(1j * rad).astype(np.complex64)

        def mag_phase_echo(e: int) -> bool:
            """signal_ekrc[e] from magnitude and phase; True when the magnitude had negatives."""
            mag = rescaled("magnitude", e)
            negative = float(mag.min()) < 0
            if negative:
                np.abs(mag, out=mag)
            if use_lut:
                index = ph_raw[e] if base == 0 else ph_raw[e].astype(np.int32) - base
                # gathered straight into the output, then scaled in place: no temporaries; the
                # index is inside the table by construction (lo..hi), so 'clip' clips nothing
                # and spares numpy's buffered bounds check; (a+bi)*(m+0i) == (m+0i)*(a+bi)
                # bit for bit, since the zero products are exact
                np.take(lut, index, out=signal_ekrc[e], mode="clip")
                np.multiply(signal_ekrc[e], mag, out=signal_ekrc[e])
            else:
                v = rescaled("phase", e)
                a_k = np.array(
                    [
                        scales[(sl, ic)][0]
                        for sl, ic in zip(slopes["phase"][e], intercepts["phase"][e])
                    ],
                    dtype=np.float32,
                )[:, None, None]
                b_k = np.array(
                    [
                        scales[(sl, ic)][1]
                        for sl, ic in zip(slopes["phase"][e], intercepts["phase"][e])
                    ],
                    dtype=np.float32,
                )[:, None, None]
                phase = v * a_k + b_k
                signal_ekrc[e].real = mag * np.cos(phase)
                signal_ekrc[e].imag = mag * np.sin(phase)
            return negative

        negative = any(_per_echo(mag_phase_echo, n_echoes, threads))  # bounded temporaries
        if negative:
            warnings.append("negative magnitude values found; taken as absolute values")
    else:

        def real_imaginary_echo(e: int) -> None:
            signal_ekrc[e].real = rescaled(pair[0], e)
            signal_ekrc[e].imag = rescaled(pair[1], e)

        _per_echo(real_imaginary_echo, n_echoes, threads)
    del raw
    signal = signal_ekrc.transpose(3, 2, 1, 0)

    if vendor == "philips":
        provenance.append(
            "philips: display rescale (RescaleSlope/Intercept, per frame when enhanced) "
            "used for magnitude and phase; private scale slope (2005,100E) not applied"
        )
    comp_rules = sorted({rec.component_rule for _, rec in used if rec.component_rule})
    provenance.extend(comp_rules[:4])
    if vendors.phase_sign_factor(vendor) < 0:
        np.conjugate(signal, out=signal)
    provenance.append(vendors.phase_sign_provenance(vendor))
    validated = vendors.phase_sign_validated(vendor)
    if not validated:
        warnings.append(
            f"phase sign of vendor '{vendor}' ({first_inst.ds.get('Manufacturer', '')}) is not "
            "validated: paramagnetic and diamagnetic may be swapped; check a known vein or "
            "calcification before reading the susceptibility sign"
        )
    if vendor == "ge":
        if vendors.alternate_slice_pi_offset(signal):
            signal[:, :, 1::2, :] *= -1
            provenance.append("ge: pi phase offset on alternate slices detected and removed")
        else:
            provenance.append("ge: no alternate-slice pi phase offset detected")

    # --- field strength
    freq = frames.imaging_frequency_mhz(first_inst.ds)
    if freq:
        b0 = b0_tesla_from_frequency(freq)
        provenance.append(f"B0 = {b0:.5f} T from ImagingFrequency {freq:.6g} MHz")
        label = first_inst.ds.get("MagneticFieldStrength")
        if label not in (None, ""):
            provenance.append(f"MagneticFieldStrength label {float(label):g} T not used")
    else:
        label = first_inst.ds.get("MagneticFieldStrength")
        if label in (None, ""):
            raise InputRefused(
                "neither ImagingFrequency nor MagneticFieldStrength in the header",
                "send the original scanner images: the field strength is required",
            )
        b0 = float(label)
        warnings.append(
            f"no ImagingFrequency: B0 taken from the nominal MagneticFieldStrength {b0:g} T "
            "(susceptibility scale may be off by a few percent)"
        )
        provenance.append(f"B0 = {b0:g} T from MagneticFieldStrength (no ImagingFrequency)")

    te_s = te_values / 1000.0
    provenance.append("echo times (ms): " + ", ".join(f"{t:g}" for t in te_values))

    # --- bookkeeping
    series_uids: list[str] = []
    source_instances: list[list[SourceReference]] = [[] for _ in range(n_slices)]
    seen_per_slice: list[set] = [set() for _ in range(n_slices)]
    for (inst, rec), k in zip(items, slice_idx):
        if rec.component not in pair:
            continue
        uid = inst.info.series_instance_uid
        if uid not in series_uids:
            series_uids.append(uid)
        if inst.info.sop_instance_uid not in seen_per_slice[k]:
            seen_per_slice[k].add(inst.info.sop_instance_uid)
            source_instances[k].append(
                SourceReference(inst.sop_class_uid, inst.info.sop_instance_uid, uid)
            )
    provenance.insert(
        0,
        f"vendor {vendor}: {len({id(i) for i, _ in used})} instances from "
        f"{len(series_uids)} series grouped by frame of reference, orientation, slice "
        f"positions and echo times ({pair[0]}/{pair[1]})",
    )
    reference = next(
        inst for (inst, rec), e in zip(items, echo_idx) if rec.component == pair[0] and e == 0
    )
    header = _header(reference.ds, freq)
    return Acquisition(
        signal=signal,
        echo_times_s=te_s.astype(np.float64),
        b0_tesla=float(b0),
        affine=affine,
        vendor=vendor,
        phase_sign_validated=validated,
        header=header,
        source_series_uids=tuple(series_uids),
        source_instances=source_instances,
        provenance=provenance,
        warnings=warnings,
    )


def _header(ds: Dataset, freq: float | None) -> Dataset:
    """Patient, study, equipment, series and frame-of-reference attributes (public tags, no pixel
    data, no functional groups) of the reference instance."""
    header = Dataset()
    for elem in ds:
        if (
            elem.tag.is_private
            or elem.keyword in _HEADER_SKIP
            or elem.tag.group in (0x7FE0, 0xFFFE)
        ):
            continue
        header.add(copy.deepcopy(elem))
    if "ImagingFrequency" not in header and freq:
        header.ImagingFrequency = f"{freq:.6f}"
    if getattr(ds, "file_meta", None) is not None:
        header.file_meta = copy.deepcopy(ds.file_meta)
    return header
