"""A short-lived pool of worker processes for reading DICOM files in chunks.

The loader (:mod:`qsmnode.dicom.load`) reads, parses and classifies every file and decodes its
pixels; on a full-size series that is most of the load time and it is per file, so it is split
into chunks that worker processes handle while the parent waits, then assembles. This module is
the mechanics only: how many workers, which start method, and how the decoded pixels cross the
process boundary. It knows nothing about DICOM.

Start method (:func:`start_method`):

- ``fork`` on Linux when it is safe: no other Python thread is running (a forked child inherits
  every lock as it was, held ones included, but only the calling thread) and the CUDA driver has
  not been initialised in this process (CUDA does not support a child forked after ``cuInit``;
  the driver keeps ``/dev/nvidia*`` open from then on, which is what is checked, for cupy, torch
  and numba alike). Fork costs a few milliseconds per worker (about 20 ms for a pool of 2 here)
  and the workers start with numpy/pydicom/qsmnode already imported.
- ``forkserver`` otherwise: a clean server process (started once per process, then kept) that
  imported the loader before any CUDA or thread state existed; workers are forked from it.
  Costs about 0.4 s the first time, a few milliseconds per worker afterwards. Like every
  multiprocessing start method but fork, its workers import the caller's ``__main__`` module:
  a script needs the ``if __name__ == "__main__":`` guard (without it the pool fails and the
  loader reads serially).
- ``spawn`` where neither exists (not Linux).

A process that creates its CUDA context before it has files to load (a job process that warms
up its GPU while it waits for a job) should call :func:`prestart` before that: the workers are
forked then, from the clean process, and the load that follows uses them at no start cost.

What crosses the boundary: the parent sends each worker a list of plain ``(label, path)`` string
pairs; the worker returns ``(payload, arrays)`` from the chunk function, where ``payload`` is
small picklable Python (records, classification, a few header facts: no pydicom Dataset, whose
pickling costs about 0.4 ms each way) and ``arrays`` are the decoded pixel arrays. The arrays go
through one file per chunk that the worker writes once and the parent maps (no pickling, no
pipe copies; the parent unlinks it on receipt, the mapping lives as long as the arrays that view
it), in the first of :data:`TRANSFER_DIRS` with room for the whole input: ``/dev/shm``, else the
temporary folder (page cache; a container's /dev/shm is 64 MB unless ``--shm-size`` says more).
Only where neither can take them are they pickled through the pool's pipe: on the full-size
bench series that costs the parent about 2 s of CPU (copies and unpickling) against 0.1 s mapped.

Failure: any exception from the pool (a worker that died, a chunk function that raised, no
processes to be had) is raised to the caller as :class:`PoolFailed`; the loader then runs its
serial path, which gives the same answer (or the same error) the serial path always gives.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from qsmnode.child_process import die_with_parent

log = logging.getLogger(__name__)

#: at most this many worker processes when the caller does not say (the parent's assembly and
#: the disk, not the parsing, set the pace beyond that; other jobs share the host)
MAX_DEFAULT_WORKERS = 8
#: fewer files than this are read in the calling process: starting workers would cost more
MIN_FILES = 64
#: a worker gets at least this many files (fewer workers for inputs just above MIN_FILES)
MIN_FILES_PER_WORKER = 16
#: chunks per worker: small enough to balance uneven files, large enough to amortise a task
CHUNKS_PER_WORKER = 4

#: where the workers put the decoded pixels for the parent to map, in order of preference
TRANSFER_DIRS = [Path("/dev/shm"), Path(tempfile.gettempdir())]
_PREFIX = "qsmnode-load-"
#: free space left to others where the transfer files go
_HEADROOM = 64 << 20
_ALIGN = 64

#: modules the forkserver (and spawned workers) import before any task arrives
PRELOAD = ["qsmnode.forkserver_hook", "qsmnode.dicom.load"]  # the hook: the server dies with its parent


class PoolFailed(RuntimeError):
    """The pool could not read the files (a worker died, raised, or could not be started)."""


# --------------------------------------------------------------------------- sizing


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None, n_files: int) -> int:
    """How many worker processes to use for ``n_files`` files (1: read in the calling process).

    ``workers``: None = ``min(available CPUs, MAX_DEFAULT_WORKERS)``; 1 = no pool. Inputs of fewer
    than :data:`MIN_FILES` files are always read in the calling process, and every worker gets
    at least :data:`MIN_FILES_PER_WORKER` files.
    """
    if workers is None:
        workers = min(available_cpus(), MAX_DEFAULT_WORKERS)
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (or None for automatic), not {workers}")
    if n_files < MIN_FILES:
        return 1
    return max(1, min(workers, n_files // MIN_FILES_PER_WORKER))


def chunked(items: Sequence, workers: int) -> list[list]:
    """Contiguous chunks of ``items`` (order kept), about :data:`CHUNKS_PER_WORKER` per worker."""
    n = len(items)
    if n == 0:
        return []
    size = max(1, math.ceil(n / (workers * CHUNKS_PER_WORKER)))
    return [list(items[i : i + size]) for i in range(0, n, size)]


# --------------------------------------------------------------------------- start method


#: device files that a GPU driver keeps open once initialised (NVIDIA; AMD ROCm)
_GPU_DEVICE_PREFIXES = ("/dev/nvidia", "/dev/kfd")


def cuda_initialised() -> bool:
    """True when the CUDA driver has been initialised in this process (it keeps /dev/nvidia*
    open from ``cuInit`` on; ROCm's /dev/kfd alike). Where /proc cannot be read: True if a GPU
    library is imported at all."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return any(m in sys.modules for m in ("cupy", "torch", "numba.cuda", "pycuda", "jax"))
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(_GPU_DEVICE_PREFIXES):
                return True
        except OSError:
            continue
    return False


def fork_is_safe() -> bool:
    """Forking is safe here: Linux, one Python thread, CUDA not initialised (module docstring)."""
    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
        and not cuda_initialised()
    )


def start_method() -> str:
    """``fork`` when :func:`fork_is_safe`, else ``forkserver``, else ``spawn``."""
    if fork_is_safe():
        return "fork"
    if "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return "spawn"


def _context(method: str):
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server first starts
    return ctx


def _worker_init() -> None:
    """In each worker: die with the parent, so that a killed job leaves no readers."""
    die_with_parent()


# --------------------------------------------------------------------------- pixel transport


def _free_bytes(folder: Path | str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def transfer_dir(size_hint: int = 0) -> Path | None:
    """A fresh per-call folder for the transfer files in the first of :data:`TRANSFER_DIRS` that
    is writable and has ``size_hint`` bytes free beyond a headroom (stale folders of dead
    processes there are removed first), or None: pickle through the pipe."""
    for root in TRANSFER_DIRS:
        try:
            if not root.is_dir() or not os.access(root, os.W_OK):
                continue
            for stale in root.glob(_PREFIX + "*"):
                try:
                    os.kill(int(stale.name[len(_PREFIX) :].split("-", 1)[0]), 0)
                except ProcessLookupError:
                    shutil.rmtree(stale, ignore_errors=True)
                except (ValueError, OSError):
                    continue
            if _free_bytes(root) < size_hint + _HEADROOM:
                continue
            return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
        except OSError:
            continue
    return None


def _pack(arrays: list[np.ndarray | None], folder: str | None, name: str):
    """In the worker: the arrays in one file in ``folder`` for the parent to map, or in-band
    (pickled) when that is not possible."""
    present = [a for a in arrays if a is not None]
    if folder is None or not present or not any(a.nbytes for a in present):
        return ("inline", arrays)
    layout, offset = [], 0
    for a in arrays:
        if a is None:
            layout.append(None)
            continue
        layout.append((offset, a.dtype.str, a.shape))
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    path = os.path.join(folder, name)
    try:
        if _free_bytes(folder) < offset + _HEADROOM:
            return ("inline", arrays)
        with open(path, "xb", buffering=0) as f:
            f.truncate(offset)
            for a, where in zip(arrays, layout):
                if a is not None:
                    f.seek(where[0])
                    f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    except OSError:  # full, gone or not writable: in-band instead
        try:
            os.unlink(path)
        except OSError:
            pass
        return ("inline", arrays)
    return ("file", path, offset, layout)


def _unpack(packed) -> list[np.ndarray | None]:
    """In the parent: views of the worker's arrays (the file is unlinked at once)."""
    if packed[0] == "inline":
        return packed[1]
    _, path, size, layout = packed
    with open(path, "rb") as f:
        try:
            # MAP_POPULATE: map every page now, in one call, instead of one fault per page later
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.unlink(path)
    out: list[np.ndarray | None] = []
    for where in layout:
        if where is None:
            out.append(None)
            continue
        offset, dtype, shape = where
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out.append(np.frombuffer(mm, dtype=dt, count=count, offset=offset).reshape(shape))
    return out


def _run_chunk(fn: Callable, chunk: list, folder: str | None, index: int):
    payload, arrays = fn(chunk)
    return payload, _pack(arrays, folder, f"{index:05d}")


# --------------------------------------------------------------------------- prestart

_prestarted_lock = threading.Lock()
_prestarted: tuple[ProcessPoolExecutor, int, str] | None = None  # (pool, workers, method)


def _noop() -> None:
    return None


def prestart(workers: int | None = None) -> str:
    """Start the worker processes of the next parallel read now, while starting them is cheap and
    safe, so that the read does not pay for it. Returns the start method used.

    For a process that is about to initialise CUDA (the node's job process warms up its GPU
    context before it has a job): called before that, the workers are forked from the clean
    process (a few ms) instead of coming from a forkserver after it (~0.4 s, module docstring).
    Where fork is not safe any more, the forkserver is started instead. The pool is used by the
    next :func:`map_chunks` call whose ``workers`` matches (or is automatic) and then shut down;
    ``workers``: None = ``min(available CPUs, MAX_DEFAULT_WORKERS)``.
    """
    global _prestarted
    size = resolve_workers(workers, 1 << 30)
    method = start_method()
    with _prestarted_lock:
        if _prestarted is not None:
            return _prestarted[2]
        if method == "fork":
            pool = ProcessPoolExecutor(
                max_workers=size, mp_context=_context(method), initializer=_worker_init
            )
            pool.submit(_noop).result()  # fork launches every worker at the first submit
            _prestarted = (pool, size, method)
        elif method == "forkserver":
            from multiprocessing import forkserver

            _context(method)
            forkserver.ensure_running()
    return method


def _take_prestarted(workers: int | None) -> tuple[ProcessPoolExecutor, int] | None:
    global _prestarted
    with _prestarted_lock:
        if _prestarted is None:
            return None
        pool, size, _ = _prestarted
        if workers is not None and workers != size:
            return None
        _prestarted = None
    return pool, size


def shutdown_prestarted() -> None:
    """Stop a pool started by :func:`prestart` that was not used."""
    taken = _take_prestarted(None)
    if taken is not None:
        taken[0].shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- map


def map_chunks(
    fn: Callable[[list], tuple[Any, list[np.ndarray | None]]],
    items: Sequence,
    workers: int,
    *,
    automatic: bool = False,
    method: str | None = None,
    size_hint: int = 0,
) -> list[tuple[Any, list[np.ndarray | None]]]:
    """``fn(chunk)`` for contiguous chunks of ``items`` (:func:`chunked`) in ``workers``
    processes; returns ``(payload, arrays)`` per chunk, in order. ``fn`` must be a module-level
    function; ``items`` and ``payload`` plain picklable data; ``arrays`` numpy arrays (or None),
    which come back as read-only views of mapped files (:func:`transfer_dir`; ``size_hint``: about
    how many bytes they take in all). A pool from :func:`prestart` is used when its size is ``workers``, or any
    size when ``automatic`` (the caller did not ask for a number).

    Raises :class:`PoolFailed` when the pool cannot do the work (see module docstring).
    """
    taken = _take_prestarted(None if automatic else workers) if method is None else None
    if taken is not None:
        pool, workers = taken
    else:
        pool = None
        method = method or start_method()
    chunks = chunked(items, workers)
    folder = transfer_dir(size_hint)
    results = []
    try:
        if pool is None:
            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=_context(method), initializer=_worker_init
            )
        futures = [
            pool.submit(_run_chunk, fn, chunk, str(folder) if folder else None, i)
            for i, chunk in enumerate(chunks)
        ]
        for future in futures:
            payload, packed = future.result()
            results.append((payload, _unpack(packed)))
    except Exception as err:  # noqa: BLE001 - any pool failure: the caller reads serially
        raise PoolFailed(f"{type(err).__name__}: {err}") from err
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return results
