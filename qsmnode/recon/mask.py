"""Brain mask from GRE magnitude, with optional phase-quality masking.

Method (a morphological brain extraction for GRE; the threshold / erode / largest-component /
dilate / fill-holes chain used by many QSM pipelines, e.g. QSMxT: Stewart AW et al. MRM
2022;87:1289, and Smith SM, Hum Brain Mapp 2002;17:143 for the idea of separating brain from
scalp through the dark skull):

1. magnitude: root-sum-of-squares over echoes (or the single volume given);
2. receive-bias correction: divide by a smooth bias estimate, the Gaussian normalised
   convolution (``bias_sigma_mm``) of the magnitude over the head, so a 7 T centre brightening
   does not move the threshold;
3. threshold at ``threshold`` x the median of the normalised head signal, and drop the outer
   ``scalp_mm`` of the head (depth below its air boundary; the faces of the field of view are
   not air, so a slab through the brain keeps its cut faces);
4. erode by ``erosion_mm`` (removes the rest of the scalp and breaks thin bridges through the
   skull), keep the largest connected piece, dilate back by ``erosion_mm`` within the
   thresholded voxels; a closing by the same radius gives back tissue above a dark lesion near
   the surface, which the opening cut into a notch;
5. fill holes (dark veins, bleeds, calcifications inside the brain stay in the mask), and keep
   compact dark lesions at the edge (:func:`restore_dark_lesions`);
6. with multi-echo magnitude, drop edge tissue whose apparent R2* is above
   ``r2star_max_per_s`` (muscle, marrow and soft tissue at the skull base, next to bone and
   air: brain parenchyma is 15-35 /s at 3 T, deep grey nuclei up to ~50 /s; Yao B et al.
   NeuroImage 2009;44:1259), keeping the largest piece and refilling holes. This is what takes
   the face and neck off a real whole-head scan, where the thin skull base does not separate them;
7. optional phase quality: drop voxels whose reliability (e.g. ROMEO voxel quality, or a field
   noise turned into [0, 1]) is below ``quality_threshold``, keep the largest piece, refill
   holes — so unreliable phase at the edge (near sinuses, at the skull) leaves the mask while
   interior veins stay (the inversion down-weights them through the field noise).

Choice of CSF: the mask is the intracranial content that gives signal: brain and the CSF of
sulci and ventricles, and the CSF layer around the brain where it is thick enough to keep its
signal. CSF beside the inner table (partial volume with bone) leaves with the threshold.

Runs on the host (cupy input is copied; the result is returned on the caller's backend).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmnode.errors import ReconstructionError
from qsmnode.recon.backend import array_module, ndimage_module, to_host

#: bias-normalised magnitude (fraction of the head's median) below which a dropped voxel may be a
#: lesion's signal void rather than edge tissue
DARK_LESION_LEVEL = 0.6
#: fraction of a restored lesion's boundary that must touch the mask it is restored to
MIN_RIM_ON_MASK = 0.3


def _bounding_box(mask, margin):
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return tuple(slice(0, n) for n in mask.shape)
        box.append(slice(max(0, int(hit[0]) - margin),
                         min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
    return tuple(box)


def _largest_component(mask):
    """The largest connected piece of ``mask`` (numpy or cupy, on the same backend)."""
    xp = array_module(mask)
    labels, n = ndimage_module(xp).label(mask)
    if int(n) <= 1:
        return mask
    sizes = xp.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(xp.argmax(sizes))


def _block_mean(a, factors):
    """Mean over blocks of ``factors`` voxels (the array is zero-padded to whole blocks)."""
    pads = [(0, (-n) % f) for n, f in zip(a.shape, factors)]
    a = np.pad(a, pads)
    s = a.shape
    return a.reshape(s[0] // factors[0], factors[0], s[1] // factors[1], factors[1],
                     s[2] // factors[2], factors[2]).mean(axis=(1, 3, 5))


def receive_bias_estimate(magnitude, support, voxel_size_mm, sigma_mm=25.0):
    """Smooth multiplicative bias of a magnitude image (host numpy, float32 [i, j, k]).

    Gaussian normalised convolution of ``magnitude`` over ``support`` (bool), sigma in mm:
    B = G*(m s) / G*(s). Tissue contrast on scales below ``sigma_mm`` stays in m / B.
    Computed on a grid coarsened by about sigma/3 (block means) and interpolated back
    (trilinear): the bias is smooth on that scale, and this is ~50x faster at 256x256x176.
    """
    sigma_vox = [float(sigma_mm) / float(v) for v in voxel_size_mm]
    factors = [max(1, int(s // 3)) for s in sigma_vox]
    s = support.astype(np.float32)
    num = _block_mean(magnitude * s, factors)
    den = _block_mean(s, factors)
    sigma_coarse = [sv / f for sv, f in zip(sigma_vox, factors)]
    num = ndimage.gaussian_filter(num, sigma_coarse, mode="constant")
    den = ndimage.gaussian_filter(den, sigma_coarse, mode="constant")
    floor = np.float32(1e-6) * max(float(num.max()), 1e-30)
    coarse = np.where(den > 1e-3, num / np.maximum(den, 1e-3), floor).astype(np.float32)
    if all(f == 1 for f in factors):
        return coarse
    # block centres sit at (f - 1) / 2 + f * n in fine voxels: map fine voxels onto them
    coords = [(np.arange(n, dtype=np.float32) - (f - 1) / 2.0) / f
              for n, f in zip(magnitude.shape, factors)]
    grid = np.meshgrid(*coords, indexing="ij", sparse=True)
    full = [np.broadcast_to(g, magnitude.shape) for g in grid]
    return ndimage.map_coordinates(coarse, full, order=1, mode="nearest").astype(np.float32)


def _morph_mm(mask, radius_mm, voxel_size_mm, dilate=False):
    """Erode (or dilate) by a ball of ``radius_mm``, approximated by alternating 6- and
    26-neighbour steps (an octagon-like ball), per axis as many steps as the radius needs in
    that axis's voxel size (rounded up: a 4 mm radius is 2 steps of 3 mm, so a 3 mm scan still
    cuts a scalp of two voxels). Much faster than a Euclidean distance transform at 256^3."""
    steps = [int(np.ceil(float(radius_mm) / float(v) - 0.25)) for v in voxel_size_mm]
    out = mask
    def op(a, structure):
        if dilate:
            return ndimage.binary_dilation(a, structure=structure)
        # the field of view's faces are not the head's edge: a slab is not eroded from its cut faces
        return ndimage.binary_erosion(a, structure=structure, border_value=1)

    for s in range(1, max(steps) + 1):
        active = [s <= n for n in steps]
        structure = np.zeros((3, 3, 3), bool)
        structure[1, 1, 1] = True
        full = s % 2 == 0 and all(active)
        for a in range(3):
            if active[a]:
                idx = [1, 1, 1]
                for v in (0, 2):
                    idx[a] = v
                    structure[tuple(idx)] = True
        if full:
            structure[:] = True
        out = op(out, structure=structure)
    return out


def brain_mask(magnitude, voxel_size_mm, *, phase_quality=None, threshold=0.3, erosion_mm=4.0,
               bias_sigma_mm=25.0, quality_threshold=0.3, fill_holes=True, scalp_mm=6.0,
               echo_times_s=None, r2star_max_per_s=60.0, return_signal_voids=False):
    """Brain mask (bool [i, j, k]) from GRE magnitude, robust to receive bias.

    magnitude : [i, j, k] or [i, j, k, echo] (RSS over echoes). voxel_size_mm : (3,) mm.
    threshold : fraction of the median bias-normalised head signal below which a voxel is
        background (skull, air, sinus); 0.3 by default.
    erosion_mm : erosion/dilation radius in mm that separates brain from scalp (larger than
        half the scalp thickness, smaller than half the brain stem width); 4 mm by default.
    bias_sigma_mm : Gaussian width (mm) of the receive-bias estimate; 25 mm by default.
    phase_quality : optional [i, j, k] reliability in [0, 1] (1 = good); voxels below
        ``quality_threshold`` are dropped from the edge of the mask (see module docstring).
    fill_holes : fill enclosed holes (3D).
    scalp_mm : depth (mm) below the head's outer surface that is never brain (the outer scalp).
    echo_times_s, r2star_max_per_s : with multi-echo magnitude, edge voxels whose apparent R2*
        (1/s) exceeds the limit leave the mask (muscle, marrow and tissue at bone and air).
    return_signal_voids : also return the signal voids (bool [i, j, k]: magnitude below
        :data:`DARK_LESION_LEVEL` of the head's level), for :func:`refine_brain_mask` later.
    Returns bool [i, j, k] on the caller's backend (and the voids, when asked).
    """
    xp = array_module(magnitude)
    mag = to_host(magnitude).astype(np.float32, copy=False)
    if mag.ndim == 4:
        mag = np.sqrt(np.sum(mag * mag, axis=3))
    if mag.ndim != 3:
        raise ReconstructionError(f"magnitude must be 3D or 4D, got shape {mag.shape}",
                                  "pass [i, j, k] or [i, j, k, echo] magnitude")
    if not np.all(np.isfinite(mag)):
        raise ReconstructionError("magnitude contains NaN or infinite values",
                                  "check the pixel data and rescale of the magnitude series")
    vox = [float(v) for v in voxel_size_mm]
    top = float(np.percentile(mag, 99.0))
    if top <= 0:
        raise ReconstructionError("magnitude is zero everywhere", "send a series with signal")
    head = mag > 0.1 * top
    # everything below runs on the head's bounding box (exact: nothing outside it is signal)
    margin = int(np.ceil(erosion_mm / min(vox))) + 2
    box = _bounding_box(head, margin)
    full_shape = mag.shape
    mag, head = mag[box], head[box]
    bias = receive_bias_estimate(mag, head, vox, bias_sigma_mm)
    normalised = mag / np.maximum(bias, np.float32(1e-6 * top))
    level = float(np.median(normalised[head])) if head.any() else 1.0
    foreground = normalised > threshold * level
    # the outer scalp is never brain: drop what lies within scalp_mm of the air around the head
    head_inside = ndimage.distance_transform_edt(ndimage.binary_fill_holes(head), sampling=vox) > scalp_mm
    foreground &= head_inside

    core = _morph_mm(foreground, erosion_mm, vox)
    if not core.any():
        core = foreground
    core = _largest_component(core)
    grown = _morph_mm(core, erosion_mm, vox, dilate=True)
    mask = _largest_component(grown & foreground)
    # the opening leaves a notch where a dark lesion sits near the surface (the tissue above it is
    # farther than erosion_mm from the core): a closing gives that tissue back, then the lesion
    closed = _morph_mm(_morph_mm(mask, erosion_mm, vox, dilate=True), erosion_mm, vox)
    mask |= closed & foreground
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    mask = restore_dark_lesions(mask, head_inside & ~mask, vox)
    dark = normalised < DARK_LESION_LEVEL * level
    if echo_times_s is not None and magnitude.ndim == 4 and magnitude.shape[3] >= 2:
        decay = apparent_r2star_per_s(to_host(magnitude)[box], echo_times_s, vox)
        mask = _keep_reliable(mask, decay <= r2star_max_per_s, vox, fill_holes, open_first=True, dark=dark)

    if phase_quality is not None:
        quality = to_host(phase_quality)
        if quality.shape != full_shape:
            raise ReconstructionError(
                f"phase_quality {quality.shape} and magnitude {full_shape} differ in shape",
                "pass a quality map of the same matrix")
        mask = _refine(mask, quality[box], quality_threshold, fill_holes, vox, dark=dark)
    mask = _uncrop(mask, box, full_shape)
    if not mask.any():
        raise ReconstructionError("the brain mask is empty",
                                  "check that the series covers the head, or lower the threshold")
    if return_signal_voids:
        return xp.asarray(mask), xp.asarray(_uncrop(dark, box, full_shape))
    return xp.asarray(mask)


def _uncrop(a, box, shape):
    full = np.zeros(shape, a.dtype)
    full[box] = a
    return full


def _refine(mask, quality, quality_threshold, fill_holes, voxel_size_mm, dark=None):
    quality = np.asarray(quality, dtype=np.float32)
    if quality.shape != mask.shape:
        raise ReconstructionError(
            f"phase_quality {quality.shape} and mask {mask.shape} differ in shape",
            "pass a quality map of the same matrix")
    return _keep_reliable(mask, quality >= quality_threshold, voxel_size_mm, fill_holes, dark=dark)


def _keep_reliable(mask, reliable, voxel_size_mm, fill_holes, open_first=False, dark=None):
    """The largest connected piece of ``mask & reliable`` (first opened by one voxel, to cut
    thin bridges, when ``open_first``), its enclosed holes refilled within ``mask``, and compact
    dark lesions at its edge kept with their one-voxel halo (:func:`restore_dark_lesions`; with
    ``dark``, only the dark part of what was dropped is a lesion candidate: a bleed's field makes
    the cortex above it unreliable too, which would join it to the edge). Unreliable voxels
    inside the brain (veins, iron-rich nuclei) are holes and come back; those at the edge leave."""
    kept = mask & reliable
    if not kept.any():
        return mask
    step = max(voxel_size_mm)
    if open_first:
        kept = _morph_mm(kept, step, voxel_size_mm)
        if not kept.any():
            return mask
    kept = _largest_component(kept)
    if open_first:
        kept = _morph_mm(kept, step, voxel_size_mm, dilate=True) & mask
    if fill_holes:
        kept = ndimage.binary_fill_holes(kept) & mask
    dropped = mask & ~kept
    lesions = restore_dark_lesions(kept, dropped if dark is None else dropped & dark, voxel_size_mm,
                                   enclosing=mask) & ~kept
    return kept | lesions | (ndimage.binary_dilation(lesions) & dropped)


def apparent_r2star_per_s(magnitude, echo_times_s, voxel_size_mm):
    """Apparent R2* (1/s, float32 ``[i, j, k]``) from the first and last echo of ``magnitude``
    (``[i, j, k, echo]``), each box-smoothed over about 3 voxels so noise does not decide:
    ln(S1 / Sn) / (TEn - TE1). A fast screen for the mask, not the R2* map (:mod:`.r2star`)."""
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    first = ndimage.uniform_filter(magnitude[..., 0].astype(np.float32), 3)
    last = ndimage.uniform_filter(magnitude[..., -1].astype(np.float32), 3)
    tiny = np.float32(1e-6 * max(float(first.max()), 1e-30))
    return (np.log(np.maximum(first, tiny) / np.maximum(last, tiny)) / np.float32(te[-1] - te[0])).astype(np.float32)


def restore_dark_lesions(mask, candidates, voxel_size_mm, *, max_volume_ml=2.0, enclosed_fraction=0.6,
                         enclosing=None):
    """Put compact dark lesions at the edge of ``mask`` back into it.

    A bleed or calcification just under the cortex is dark in the magnitude and its phase is
    unreliable, so thresholds and reliability cut it out of the mask, and hole filling cannot
    bring it back when it touches the surface. Each connected piece of ``candidates`` (bool
    ``[i, j, k]``: voxels that some step removed) no larger than ``max_volume_ml`` whose outer
    boundary lies in ``enclosing`` (default ``mask``) for at least ``enclosed_fraction`` of its
    voxels, and on ``mask`` itself for at least :data:`MIN_RIM_ON_MASK`, is added back (a lesion
    borders the brain it sits in; no island comes back).
    Skull, sinus walls and edge shells fail the test: they border the outside as much as the brain.
    Returns bool ``[i, j, k]`` (host numpy).
    """
    enclosing = mask if enclosing is None else enclosing
    labels, n = ndimage.label(candidates)
    if n == 0:
        return mask
    max_voxels = max_volume_ml * 1000.0 / float(np.prod(voxel_size_mm))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out = mask.copy()
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or sizes[index] > max_voxels:
            continue
        grown_box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
        piece = labels[grown_box] == index
        rim = ndimage.binary_dilation(piece) & ~piece
        n_rim = np.count_nonzero(rim)
        enclosed = np.count_nonzero(rim & enclosing[grown_box]) >= enclosed_fraction * n_rim
        if n_rim and enclosed and np.count_nonzero(rim & mask[grown_box]) >= MIN_RIM_ON_MASK * n_rim:
            out[grown_box] |= piece
    return out


def refine_brain_mask(mask, phase_quality, *, quality_threshold=0.3, fill_holes=True, voxel_size_mm=(1.0, 1.0, 1.0),
                      signal_voids=None):
    """Drop unreliable-phase voxels from the edge of an existing mask (no magnitude needed).

    mask : bool [i, j, k] (e.g. from :func:`brain_mask`); phase_quality : [i, j, k] in [0, 1]
    (e.g. ``TotalField.phase_quality`` or :func:`field_noise_quality`). Voxels below
    ``quality_threshold`` are removed, the largest connected piece is kept and enclosed holes
    are refilled (interior veins stay), never growing beyond ``mask``. Same as passing
    ``phase_quality`` to :func:`brain_mask` (give it the ``signal_voids`` that
    ``brain_mask(..., return_signal_voids=True)`` returned), without redoing the magnitude
    steps; compact dark lesions at the edge stay (:func:`restore_dark_lesions`, sized with
    ``voxel_size_mm``). Returns bool [i, j, k] on the caller's backend (computed on the host).
    """
    xp = array_module(mask)
    voids = None if signal_voids is None else to_host(signal_voids).astype(bool)
    out = _refine(to_host(mask).astype(bool), to_host(phase_quality), quality_threshold,
                  fill_holes, voxel_size_mm, dark=voids)
    return xp.asarray(out)


def field_noise_quality(field_noise_hz, mask, scale=None):
    """Reliability in [0, 1] from a field-noise map: 1 / (1 + (noise / scale)^2).

    field_noise_hz : [i, j, k] Hz; scale defaults to 4 x the median noise in ``mask``, so a
    voxel twice as noisy as that scores 0.2. Returns float32 [i, j, k].
    """
    xp = array_module(field_noise_hz)
    noise = xp.asarray(field_noise_hz, dtype=xp.float32)
    if scale is None:
        sel = noise[xp.asarray(mask, dtype=bool)]
        scale = 4.0 * float(xp.median(sel[xp.isfinite(sel)])) if sel.size else 1.0
    q = 1.0 / (1.0 + (noise / xp.float32(max(scale, 1e-12))) ** 2)
    return xp.where(xp.isfinite(noise), q, 0.0).astype(xp.float32)


def peel_edge(mask, voxels=1):
    """``mask`` (bool ``[i, j, k]``, numpy or cupy) without its outermost ``voxels`` layers
    (6-connected steps). The faces of the field of view are not an edge: a slab keeps its cut
    faces. The outermost layer of a brain mask mixes brain with CSF, bone and air in each voxel
    and is where background removal is least certain: its susceptibility is not reported.
    Slivers the peel cuts off (a thin gyrus at the edge) go too: the largest piece is kept."""
    if voxels <= 0:
        return mask
    xp = array_module(mask)
    peeled = ndimage_module(xp).binary_erosion(xp.asarray(mask, dtype=bool), iterations=int(voxels), border_value=1)
    return _largest_component(peeled)
