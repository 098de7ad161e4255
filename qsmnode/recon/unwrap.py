"""Phase unwrapping: quality-guided (ROMEO-style), temporal (template) and Laplacian.

Quality-guided spatial unwrapping follows ROMEO (Dymerska B et al. MRM 2021;85:2294-2308):
every pair of neighbouring voxels gets a reliability weight from phase coherence, the
agreement of the spatial phase gradient between two echoes, magnitude coherence and
magnitude; the region is grown from the most reliable voxel, always across the most reliable
edge that leaves it. Growing across the best edge first is Prim's algorithm, so the grown region
is the maximum-reliability spanning tree of the voxel graph; here that tree is computed with
SciPy's compiled minimum-spanning-tree on cost = 1 - weight and the 2 pi multiples are summed
along it by pointer jumping, all vectorised (no Python loop over voxels).

Temporal unwrapping (ROMEO's template idea) unwraps the other echoes voxel by voxel against a
spatially unwrapped template, assuming the phase offset has been removed (phase proportional to
TE, see :mod:`qsmnode.recon.phase`).

Laplacian unwrapping: Schofield MA, Zhu Y. Opt Lett 2003;28:1194-1196.

All unwrapping runs on the host: cupy arrays are accepted, copied to the host inside, and the
result is returned on the caller's backend. Phase in radians; arrays ``[i, j, k]`` (or
``[i, j, k, echo]``).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

from qsmnode.recon.backend import array_module, to_host

TWO_PI = np.float32(2.0 * np.pi)


def wrap(phase):
    """Wrap radians into [-pi, pi)."""
    xp = array_module(phase)
    return (phase + np.float32(np.pi)) % TWO_PI - np.float32(np.pi) if xp is np else \
        (phase + xp.float32(np.pi)) % xp.float32(TWO_PI) - xp.float32(np.pi)


def _pair(a, axis):
    """(a[..., :-1, ...], a[..., 1:, ...]) along ``axis``."""
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis] = slice(0, -1)
    hi[axis] = slice(1, None)
    return a[tuple(lo)], a[tuple(hi)]


def edge_weights(wrapped_phase, magnitude=None, *, second_phase=None, second_te_ratio=None,
                 magnitude_reference=None):
    """ROMEO-style reliability of every edge between neighbours, per axis (host numpy).

    wrapped_phase : [i, j, k] radians. magnitude : [i, j, k] (optional).
    second_phase : the wrapped phase of another echo and ``second_te_ratio`` = TE_first/TE_second
        (phase-gradient coherence: the spatial gradient must scale with TE).
    magnitude_reference : magnitude at which the magnitude weight saturates (default: half of
        the 90th percentile of the magnitude where it is > 0).
    Returns a list of three float32 arrays; ``w[a]`` has the shape of the volume minus one along
    axis ``a`` and holds a weight in [0, 1] (1 = reliable) for the edge (v, v + e_a).
    Weights (Dymerska 2021, eq. 2-6): phase coherence 1 - |wrap(d phi)|/pi, gradient coherence
    max(0, 1 - |wrap(d phi1) - wrap(d phi2) * ratio|), magnitude coherence (min/max)^2,
    magnitude weight min(1, min(m)/m_ref).
    """
    phase = np.asarray(wrapped_phase, dtype=np.float32)
    mag = None if magnitude is None else np.asarray(magnitude, dtype=np.float32)
    if mag is not None and magnitude_reference is None:
        positive = mag[mag > 0]
        magnitude_reference = 0.5 * float(np.percentile(positive, 90)) if positive.size else 1.0
    weights = []
    for axis in range(3):
        a, b = _pair(phase, axis)
        d1 = wrap(b - a)
        w = 1.0 - np.abs(d1) / np.float32(np.pi)
        if second_phase is not None:
            a2, b2 = _pair(np.asarray(second_phase, dtype=np.float32), axis)
            d2 = wrap(b2 - a2)
            w *= np.clip(1.0 - np.abs(d1 - d2 * np.float32(second_te_ratio)), 0.0, 1.0)
        if mag is not None:
            ma, mb = _pair(mag, axis)
            lo = np.minimum(ma, mb)
            hi = np.maximum(ma, mb)
            w *= np.where(hi > 0, (lo / np.where(hi > 0, hi, 1)) ** 2, 0.0)
            w *= np.clip(lo / np.float32(magnitude_reference), 0.0, 1.0)
        weights.append(w.astype(np.float32))
    return weights


def voxel_quality(weights, shape):
    """Per-voxel reliability in [0, 1]: mean weight of the voxel's (up to six) edges."""
    total = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.float32)
    for axis, w in enumerate(weights):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        total[tuple(lo)] += w
        total[tuple(hi)] += w
        count[tuple(lo)] += 1
        count[tuple(hi)] += 1
    return total / np.maximum(count, 1)


def unwrap_quality_guided(wrapped_phase, mask, magnitude=None, *, second_phase=None,
                          second_te_ratio=None, weights=None, center=True):
    """Spatially unwrap one 3D phase by quality-guided region growing (ROMEO-style).

    wrapped_phase : [i, j, k] radians. mask : [i, j, k] bool, voxels to unwrap (unwrapping
    follows edges inside the mask only). magnitude, second_phase, second_te_ratio : see
    :func:`edge_weights`; ``weights`` overrides them (three edge-weight arrays).
    center : subtract the multiple of 2 pi that brings the median of the result in the mask
    closest to 0 (each disconnected piece of the mask separately); otherwise each piece keeps
    the wrapped value of its most reliable voxel.

    Returns float32 [i, j, k]: unwrapped phase (equal to the input modulo 2 pi) in the mask,
    0 outside. Host computation (cupy input is copied to the host; the result goes back).
    Reference: Dymerska B et al. MRM 2021;85:2294 (ROMEO); growing along the best edge is
    Prim's maximum spanning tree.
    """
    xp = array_module(wrapped_phase)
    phase = to_host(wrapped_phase).astype(np.float32, copy=False)
    mask_h = to_host(mask).astype(bool, copy=False)
    if phase.ndim != 3 or mask_h.shape != phase.shape:
        raise ValueError(f"wrapped_phase and mask must be 3D of one shape, got {phase.shape} "
                         f"and {mask_h.shape}")
    if weights is None:
        weights = edge_weights(
            phase, None if magnitude is None else to_host(magnitude),
            second_phase=None if second_phase is None else to_host(second_phase),
            second_te_ratio=second_te_ratio)
    shape = phase.shape
    n_vox = int(mask_h.sum())
    out = np.zeros(shape, np.float32)
    if n_vox == 0:
        return xp.asarray(out)
    index = np.full(shape, -1, dtype=np.int64)
    index[mask_h] = np.arange(n_vox)
    rows, cols, costs = [], [], []
    for axis, w in enumerate(weights):
        ia, ib = _pair(index, axis)
        both = (ia >= 0) & (ib >= 0)
        rows.append(ia[both])
        cols.append(ib[both])
        # cost > 0 everywhere (SciPy drops explicit zeros); most reliable edge = cheapest
        costs.append(1.0001 - np.asarray(w[both], dtype=np.float64))
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    costs = np.concatenate(costs)
    graph = coo_matrix((costs, (rows, cols)), shape=(n_vox, n_vox)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()

    values = phase[mask_h]
    node_quality = voxel_quality(weights, shape)[mask_h]
    # one root per connected piece: its most reliable voxel, joined to a virtual super-root
    n_pieces, piece = connected_components(tree, directed=False)
    order = np.lexsort((-node_quality, piece))
    first = np.ones(order.size, bool)
    first[1:] = piece[order[1:]] != piece[order[:-1]]
    roots = order[first]
    super_root = n_vox
    t_rows = np.concatenate([tree.row, np.full(roots.size, super_root)])
    t_cols = np.concatenate([tree.col, roots])
    t_data = np.ones(t_rows.size)
    forest = coo_matrix((t_data, (t_rows, t_cols)), shape=(n_vox + 1, n_vox + 1)).tocsr()
    _, pred = breadth_first_order(forest, super_root, directed=False, return_predecessors=True)
    pred = pred.astype(np.int64)
    pred[super_root] = super_root
    pred[roots] = super_root

    # k[n] = k[parent] + round((phi[parent] - phi[n]) / 2 pi), summed by pointer jumping
    values_ext = np.concatenate([values, [0.0]]).astype(np.float64)
    steps = np.rint((values_ext[pred] - values_ext) / (2.0 * np.pi)).astype(np.int64)
    steps[roots] = 0
    steps[super_root] = 0
    nxt = pred
    while True:
        steps = steps + steps[nxt]
        nxt = nxt[nxt]
        if np.all(nxt == super_root):
            break
    unwrapped = values + TWO_PI * steps[:n_vox].astype(np.float32)
    if center:
        for p in range(n_pieces):
            sel = piece == p
            shift = np.rint(np.median(unwrapped[sel]) / TWO_PI) if sel.sum() > 1 else 0.0
            if shift:
                unwrapped[sel] -= TWO_PI * np.float32(shift)
    out[mask_h] = unwrapped
    return xp.asarray(out)


def unwrap_temporal(wrapped_phase, echo_times_s, template_phase, template_te_s, mask=None,
                    magnitude=None):
    """Unwrap every echo voxel by voxel against an unwrapped template (ROMEO template idea).

    wrapped_phase : [i, j, k, echo] radians, phase offset already removed (phase = 2 pi f TE).
    echo_times_s : (n_echo,) s. template_phase : [i, j, k] unwrapped phase at ``template_te_s``
    (e.g. the spatially unwrapped phase difference of echoes 1 and 2 at TE2 - TE1).
    magnitude : [i, j, k, echo] optional; when given, echoes are unwrapped in order of TE and the
    prediction for each echo uses the magnitude^2 TE^2 weighted fit of the template and the
    echoes already unwrapped (so late echoes are predicted from the least noisy estimate).
    Returns float32 [i, j, k, echo] on the caller's backend, 0 outside ``mask``. Reference:
    Dymerska B et al. MRM 2021;85:2294; Eckstein K et al. MRM 2018;79:2996.
    """
    xp = array_module(wrapped_phase)
    phase = to_host(wrapped_phase).astype(np.float32, copy=False)
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    if phase.ndim != 4 or phase.shape[3] != te.size:
        raise ValueError(f"wrapped_phase must be [i, j, k, echo] with {te.size} echoes, "
                         f"got shape {phase.shape}")
    template = to_host(template_phase).astype(np.float32)
    mag = None if magnitude is None else to_host(magnitude).astype(np.float32)
    omega = template / np.float32(template_te_s)  # rad/s
    num = omega * 0.0
    den = np.zeros_like(omega)
    out = np.empty_like(phase)
    for e in np.argsort(te):
        predicted = omega * np.float32(te[e])
        out[..., e] = phase[..., e] + TWO_PI * np.rint((predicted - phase[..., e]) / TWO_PI)
        if mag is not None:
            w = mag[..., e] ** 2 * np.float32(te[e]) ** 2
            num += w * out[..., e] / np.float32(te[e])
            den += w
            omega = np.where(den > 0, num / np.where(den > 0, den, 1), omega)
    if mask is not None:
        out *= to_host(mask).astype(bool)[..., None]
    return xp.asarray(out)


def laplacian_unwrap(wrapped_phase, voxel_size_mm=(1.0, 1.0, 1.0), *, mask=None,
                     congruent=False, pad=8):
    """Laplacian phase unwrapping (Schofield MA, Zhu Y. Opt Lett 2003;28:1194).

    phi = invlap[cos(phi_w) lap(sin(phi_w)) - sin(phi_w) lap(cos(phi_w))], with the Laplacian
    and its inverse evaluated by FFT on a grid padded by ``pad`` voxels. The result is smooth but
    not congruent with the input (it differs by more than 2 pi multiples; its mean is arbitrary);
    ``congruent=True`` rounds it to the nearest phase congruent with the input
    (phi_w + 2 pi round((phi_lap - phi_w) / 2 pi)).
    wrapped_phase : [i, j, k] radians; voxel_size_mm : (3,) mm. Returns float32 [i, j, k] on the
    caller's backend (computed on the same backend; FFTs only), 0 outside ``mask`` if given.
    """
    xp = array_module(wrapped_phase)
    phase = xp.asarray(wrapped_phase, dtype=xp.float32)
    shape = phase.shape
    padded = xp.pad(phase, pad, mode="reflect") if pad else phase
    ps = padded.shape
    freqs = [xp.fft.fftfreq(n, d=float(v)).astype(xp.float32) for n, v in zip(ps, voxel_size_mm)]
    ki, kj, kk = xp.meshgrid(*freqs, indexing="ij")
    k2 = (ki * ki + kj * kj + kk * kk) * xp.float32(4.0 * np.pi**2)  # -laplacian symbol
    k2_inv = xp.where(k2 > 0, 1.0 / xp.where(k2 > 0, k2, 1), 0).astype(xp.float32)
    s, c = xp.sin(padded), xp.cos(padded)
    lap = lambda a: xp.real(xp.fft.ifftn(-k2 * xp.fft.fftn(a)))  # noqa: E731
    rhs = c * lap(s) - s * lap(c)
    result = xp.real(xp.fft.ifftn(-k2_inv * xp.fft.fftn(rhs))).astype(xp.float32)
    if pad:
        result = result[pad:pad + shape[0], pad:pad + shape[1], pad:pad + shape[2]]
    if congruent:
        result = phase + xp.float32(TWO_PI) * xp.rint((result - phase) / xp.float32(TWO_PI))
    if mask is not None:
        result = result * xp.asarray(mask).astype(xp.float32)
    return result.astype(xp.float32)


def unwrap_phase(wrapped_phase, mask, magnitude=None, *, method="romeo", voxel_size_mm=None):
    """Spatially unwrap a 3D phase (radians) in ``mask`` with the chosen method.

    method : ``romeo`` (quality-guided, :func:`unwrap_quality_guided`), ``laplacian``
    (:func:`laplacian_unwrap`, made congruent), or ``skimage`` (Abdul-Rahman HS et al. Appl Opt
    2007;46:6623 via ``skimage.restoration.unwrap_phase``, needs scikit-image).
    Returns float32 [i, j, k], 0 outside the mask, on the caller's backend.
    """
    if method == "romeo":
        return unwrap_quality_guided(wrapped_phase, mask, magnitude)
    if method == "laplacian":
        return laplacian_unwrap(wrapped_phase, voxel_size_mm or (1.0, 1.0, 1.0), mask=mask,
                                congruent=True)
    if method == "skimage":
        xp = array_module(wrapped_phase)
        from skimage.restoration import unwrap_phase as sk_unwrap

        phase = to_host(wrapped_phase).astype(np.float64)
        m = to_host(mask).astype(bool)
        result = sk_unwrap(np.ma.masked_array(phase, mask=~m))
        out = np.where(m, np.ma.getdata(result), 0.0).astype(np.float32)
        return xp.asarray(out)
    raise ValueError(f"unknown unwrapping method {method!r}; use romeo, laplacian or skimage")


__all__ = [
    "wrap", "edge_weights", "voxel_quality", "unwrap_quality_guided", "unwrap_temporal",
    "laplacian_unwrap", "unwrap_phase",
]
