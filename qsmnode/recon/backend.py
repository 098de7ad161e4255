"""Array backend selection: numpy on the CPU, cupy on a CUDA GPU.

Every numerical function takes arrays of one backend and finds the module with
:func:`array_module`; host/device copies happen only at the job's edges (:func:`to_device`,
:func:`to_host`).
"""

from __future__ import annotations

import numpy as np

try:  # cupy is optional (extra "gpu")
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None


def gpu_available() -> bool:
    """True when cupy imports and at least one CUDA device answers."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``gpu`` when available else ``cpu``; ``gpu`` without CUDA raises."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise RuntimeError("device 'gpu' requested but CuPy or a CUDA device is not available")
    return device


def get_xp(device: str):
    """The array module for a resolved device name (``cpu`` or ``gpu``)."""
    return _cupy if device == "gpu" else np


def array_module(*arrays):
    """numpy or cupy, whichever the arrays belong to."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def to_device(array, xp):
    return xp.asarray(array)


def to_host(array) -> np.ndarray:
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def ndimage_module(xp):
    """``scipy.ndimage`` for numpy arrays, ``cupyx.scipy.ndimage`` (the same API) for cupy ones."""
    if xp is np:
        from scipy import ndimage

        return ndimage
    from cupyx.scipy import ndimage

    return ndimage
