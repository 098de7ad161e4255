"""Input validation for the reconstruction: refuse unusable arrays with a reason a person can act on.

Every check raises :class:`qsmnode.errors.ReconstructionError` naming what is wrong and what the
sender can do. A single echo is not an error: it is reconstructed through the single-echo path
(phase / (2 pi TE), no echo combination, no R2* fit), and :func:`check_inputs` says so in the
notes it returns, which the pipeline copies into the result's warnings and step record.
"""

from __future__ import annotations

import numpy as np

from qsmnode.errors import ReconstructionError, plain

SINGLE_ECHO_NOTE = (
    "single echo: field = phase / (2 pi TE) without echo combination; R2*/T2* not fitted "
    "(needs >= 2 echoes); receive-phase offset cannot be separated from the field"
)


def check_inputs(signal, echo_times_s, b0_tesla, voxel_size_mm, b0_direction) -> list[str]:
    """Validate the inputs of :func:`qsmnode.recon.pipeline.reconstruct`.

    signal : complex ``[i, j, k, echo]`` (or ``[i, j, k]`` with exactly one echo time);
    echo_times_s : (n_echo,) seconds, strictly increasing, > 0;
    b0_tesla : field strength in T; voxel_size_mm : (3,) mm; b0_direction : (3,) array axes.

    Returns a list of notes (e.g. the single-echo note). Raises ``ReconstructionError``.
    Works on host (numpy) arrays or on any array with ``shape``/``ndim`` and numpy conversion.
    """
    notes: list[str] = []
    shape = tuple(int(n) for n in np.shape(signal))
    te = np.atleast_1d(np.asarray(echo_times_s, dtype=np.float64))

    if len(shape) not in (3, 4):
        raise ReconstructionError(
            f"signal has {len(shape)} dimensions (shape {shape}); expected [i, j, k, echo]",
            "send one 3D multi-echo GRE volume with every slice and echo",
        )
    if len(shape) == 3:
        if te.size != 1:
            raise ReconstructionError(
                f"signal is a single 3D volume but {te.size} echo times were given",
                "stack the echoes on a last axis: signal[i, j, k, echo]",
            )
        shape = shape + (1,)
    if min(shape[:3]) < 1:
        raise ReconstructionError(f"signal is empty (shape {shape})", "send a series with pixel data")
    if shape[2] < 2:
        raise ReconstructionError(
            f"only {shape[2]} slice along k (shape {shape[:3]}); one slice is not a volume and "
            "susceptibility cannot be inverted from it",
            "send the complete 3D acquisition (every slice of the slab)",
        )
    if shape[0] < 2 or shape[1] < 2:
        raise ReconstructionError(
            f"in-plane matrix {shape[0]}x{shape[1]} is too small to be an image",
            "send the complete 3D acquisition",
        )

    # echo times
    if te.ndim != 1 or te.size != shape[3]:
        raise ReconstructionError(
            f"{te.size} echo times for {shape[3]} echoes in the signal",
            "give one echo time per echo, in seconds, in the order of the last signal axis",
        )
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise ReconstructionError(
            f"echo times must be finite and positive (got {plain(te)} s)",
            "check EchoTime (0018,0081) of every echo",
        )
    if te.size > 1:
        steps = np.diff(te)
        if np.any(steps == 0):
            dup = sorted(set(te[1:][steps == 0].tolist()))
            raise ReconstructionError(
                f"duplicate echo times {dup} s",
                "each echo must have its own EchoTime; remove repeated or mixed-in series",
            )
        if np.any(steps < 0):
            raise ReconstructionError(
                f"echo times are not sorted ({plain(te)} s)",
                "order the echoes by increasing EchoTime along the last signal axis",
            )
    if te.max() > 1.0:
        raise ReconstructionError(
            f"echo time {te.max()} s is longer than 1 s; echo times are expected in seconds",
            "convert EchoTime from ms to s",
        )

    # field and geometry
    b0 = float(np.asarray(b0_tesla, dtype=np.float64))
    if not np.isfinite(b0) or b0 <= 0:
        raise ReconstructionError(
            f"field strength {b0_tesla!r} T is not a positive number",
            "check ImagingFrequency (0018,0084) of the series",
        )
    vox = np.asarray(voxel_size_mm, dtype=np.float64).ravel()
    if vox.size != 3:
        raise ReconstructionError(f"voxel size needs 3 values, got {plain(vox)}", "give (di, dj, dk) in mm")
    if not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise ReconstructionError(
            f"voxel size {plain(vox)} mm is not finite and positive",
            "check PixelSpacing and the slice positions of the series",
        )
    b0dir = np.asarray(b0_direction, dtype=np.float64).ravel()
    if b0dir.size != 3 or not np.all(np.isfinite(b0dir)):
        raise ReconstructionError(
            f"B0 direction {plain(b0dir)} is not a finite 3-vector", "check ImageOrientationPatient"
        )
    if np.linalg.norm(b0dir) < 1e-6:
        raise ReconstructionError(
            "B0 direction has zero length", "check ImageOrientationPatient (it must not be all zero)"
        )

    # values: NaN / inf, all-zero magnitude (checked per slab of slices to bound memory)
    host = np.asarray(signal) if not hasattr(signal, "get") else signal.get()
    if host.ndim == 3:
        host = host[..., None]
    n_bad = 0
    peak = 0.0
    for k0 in range(0, shape[2], 16):
        block = host[:, :, k0 : k0 + 16]
        finite = np.isfinite(block)
        n_bad += int(finite.size - np.count_nonzero(finite))
        if n_bad == 0:
            peak = max(peak, float(np.abs(block).max()))
    if n_bad:
        raise ReconstructionError(
            f"signal contains {n_bad} NaN or infinite values",
            "the series is corrupt or was decoded wrongly; resend it from the scanner",
        )
    if peak == 0.0:
        raise ReconstructionError(
            "the magnitude is zero everywhere", "the series holds no image data; resend it from the scanner"
        )
    echo_peaks = [float(np.abs(host[..., e]).max()) for e in range(shape[3])]
    empty = [e for e, p in enumerate(echo_peaks) if p == 0.0]
    if empty:
        raise ReconstructionError(
            f"echo(es) {empty} have zero magnitude everywhere",
            "the series is incomplete or corrupt; resend it from the scanner",
        )

    if shape[3] == 1:
        notes.append(SINGLE_ECHO_NOTE)
    return notes
