"""The reconstruction pipeline: complex multi-echo GRE -> QSM, R2*/T2*, SWI, minIP, with provenance.

Order of steps (each recorded as a :class:`~qsmnode.recon.result.StepRecord` with algorithm, paper
reference, parameters and seconds):

1. input checks (:mod:`qsmnode.recon.checks`) and the field-strength preset (:mod:`.presets`);
2. echo selection (TE <= ``echo_max_te_s``, at least the first two echoes);
3. brain mask from the magnitude (:func:`qsmnode.recon.mask.brain_mask`);
4. receive-phase offset removal (MCPC-3D-S), unwrapping and weighted echo combination
   (:func:`qsmnode.recon.phase.estimate_total_field`) -> total field and its noise in Hz;
   the mask is then refined with the phase reliability (unreliable edge voxels dropped);
5. background field removal (:mod:`.background`, PDF by default) in ppm, on the whole mask; the
   mask's outermost layer then leaves the QSM (:func:`qsmnode.recon.mask.peel_edge`): partial
   volume with CSF, bone and air, and the least certain background removal;
6. dipole inversion (:mod:`.inversion`, FANSI-style weighted TV by default, TKD as preview), with
   data weights and regularisation weight from the field noise;
7. referencing (:mod:`.reference`): whole brain by default, CSF as an option, both reported;
8. R2*/T2* (:func:`qsmnode.recon.r2star.r2star_map`, all echoes), SWI from the local field and the
   minIP over a slab (:mod:`qsmnode.recon.swi`).

Arrays move to the device once at the start and back once at the end; every numerical step runs
on the chosen backend (steps that need the host, such as region-growing unwrapping, copy inside
themselves). Units: fields Hz and ppm (named), chi ppm, times s, sizes mm.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qsmnode.acquisition import GYROMAGNETIC_RATIO_MHZ_PER_T
from qsmnode.errors import ReconstructionError
from qsmnode.recon import background, inversion, reference
from qsmnode.recon.backend import get_xp, resolve_device, to_device, to_host
from qsmnode.recon.checks import check_inputs
from qsmnode.recon.dipole import dipole_kernel
from qsmnode.recon.presets import preset_for_field
from qsmnode.recon.result import ReconResult, StepRecord

REFERENCES = {
    "pdf": "Liu T et al. NMR Biomed 2011;24:1129-1136 (PDF)",
    "vsharp": "Wu B et al. MRM 2012;67:137-147; Li W et al. NeuroImage 2011;55:1645 (V-SHARP)",
    "fansi_wtv": "Milovic C et al. MRM 2018;80:814-821 (FANSI, weighted linear TV by ADMM)",
    "tkd": "Shmueli K et al. MRM 2009;62:1510-1522 (TKD)",
    "mask": "magnitude threshold after receive-bias normalisation, morphological brain/scalp split",
    "r2star": "magnitude^2-weighted log-linear mono-exponential fit (e.g. Pei M et al. MRM 2015;73:843)",
    "swi": "Haacke EM et al. MRM 2004;52:612-618 (SWI); phase from the local field",
    "minip": "sliding-slab minimum-intensity projection (Haacke EM et al. AJNR 2009;30:19)",
}


def hz_to_ppm(field_hz, b0_tesla):
    """Frequency offset (Hz) -> field shift (ppm) at ``b0_tesla``: Hz / (gamma MHz/T x B0 T)."""
    return field_hz / np.float32(GYROMAGNETIC_RATIO_MHZ_PER_T * float(b0_tesla))


def select_echoes(echo_times_s, echo_max_te_s) -> list[int]:
    """Indices of echoes with TE <= ``echo_max_te_s`` (s); at least the first two when present."""
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    keep = [int(i) for i in np.nonzero(te <= float(echo_max_te_s) + 1e-9)[0]]
    need = min(2, te.size)
    if len(keep) < need:
        keep = list(range(need))
    return keep


class _Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def _sync(xp):
    if xp is not np:  # cupy: make the stage timings honest
        xp.cuda.Stream.null.synchronize()


def reconstruct(signal, echo_times_s, b0_tesla, voxel_size_mm, b0_direction, *, preset=None, overrides=None,
                device="auto") -> ReconResult:
    """Reconstruct QSM (and R2*, T2*, SWI, minIP) from complex multi-echo GRE.

    signal : complex ``[i, j, k, echo]`` (host numpy), phase in the internal sign convention
    (DESIGN.md), magnitude in any unit; echo_times_s : (n_echo,) s increasing; b0_tesla : T (from
    ImagingFrequency); voxel_size_mm : (3,) mm along (i, j, k); b0_direction : (3,) B0 in array
    axes; preset : a name from :data:`qsmnode.recon.presets.NAMED_PRESETS` (default ``default``);
    overrides : flat dict of preset keys; device : ``auto`` | ``cpu`` | ``gpu``.

    Returns :class:`ReconResult` with numpy arrays: chi_ppm referenced (whole brain by default),
    0 outside the mask. Raises :class:`qsmnode.errors.ReconstructionError` for unusable input.
    """
    total = _Timer()
    notes = check_inputs(signal, echo_times_s, b0_tesla, voxel_size_mm, b0_direction)
    params = preset_for_field(b0_tesla, overrides, name=preset)
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as err:
        raise ReconstructionError(str(err), "use --device cpu or install CuPy with a CUDA device") from err
    xp = get_xp(dev)
    vox = tuple(float(v) for v in np.asarray(voxel_size_mm, dtype=np.float64).ravel())
    b0dir = np.asarray(b0_direction, dtype=np.float64).ravel()
    b0dir = b0dir / np.linalg.norm(b0dir)
    te_all = np.asarray(echo_times_s, dtype=np.float64).ravel()
    b0 = float(b0_tesla)
    steps: list[StepRecord] = []
    warnings: list[str] = list(notes)
    quality: dict[str, float] = {}

    from qsmnode.recon.mask import brain_mask, field_noise_quality, peel_edge, refine_brain_mask
    from qsmnode.recon.phase import estimate_total_field
    from qsmnode.recon.r2star import r2star_map
    from qsmnode.recon.swi import minimum_intensity_projection, swi_from_signal

    # -- device transfer, once ------------------------------------------------------------------
    t = _Timer()
    host_signal = np.asarray(signal)
    if host_signal.ndim == 3:
        host_signal = host_signal[..., None]
    sig = to_device(host_signal.astype(np.complex64, copy=False), xp)
    _sync(xp)
    quality["seconds_transfer_in"] = t()

    # -- echo selection ----------------------------------------------------------------------------
    echoes = select_echoes(te_all, params["echo_max_te_s"])
    te = te_all[echoes]
    sig_field = sig if len(echoes) == te_all.size else sig[..., echoes]
    if len(echoes) < te_all.size:
        warnings.append(
            f"echoes {[i + 1 for i in range(te_all.size) if i not in echoes]} (TE > "
            f"{params['echo_max_te_s'] * 1e3:.1f} ms) not used for the field; used for R2*"
        )
    steps.append(StepRecord("echo_selection", "TE limit per field strength", "qsmnode presets",
                            {"echo_max_te_s": params["echo_max_te_s"], "echoes_used": [i + 1 for i in echoes],
                             "echo_times_ms": [round(float(x) * 1e3, 3) for x in te],
                             "single_echo_path": bool(te_all.size == 1)}, 0.0))

    # -- brain mask --------------------------------------------------------------------------------
    t = _Timer()
    magnitude = xp.abs(sig).astype(xp.float32)
    mask_args = {"threshold": params["mask_threshold"], "erosion_mm": params["mask_erosion_mm"],
                 "scalp_mm": params["mask_scalp_mm"], "echo_times_s": te_all,
                 "r2star_max_per_s": params["mask_r2star_max_per_s"]}
    mask0, signal_voids = brain_mask(magnitude, vox, **mask_args, return_signal_voids=True)
    _sync(xp)
    steps.append(StepRecord("brain_mask", "bias-normalised magnitude threshold + morphology", REFERENCES["mask"],
                            {k: v for k, v in mask_args.items() if k != "echo_times_s"}, t()))

    # -- offset removal, unwrapping, echo combination (front half) ---------------------------------
    t = _Timer()
    front = estimate_total_field(sig_field, te, mask0, vox, offset_sigma_mm=params["phase_offset_sigma_mm"],
                                 unwrap_method=params["unwrap_method"])
    _sync(xp)
    steps.extend(front.steps)
    quality["seconds_phase"] = t()

    # -- mask refinement by phase reliability -------------------------------------------------------
    t = _Timer()
    # reliable = the unwrapper's quality and a field noise of the order of the brain's (marrow and
    # bone at the edge can unwrap smoothly yet carry ten times the brain's field noise)
    q = xp.minimum(xp.asarray(front.phase_quality, dtype=xp.float32),
                   field_noise_quality(xp.asarray(front.field_noise_hz, dtype=xp.float32), mask0))
    n0 = int(xp.count_nonzero(mask0))
    unreliable = int(xp.count_nonzero(mask0 & (q < params["mask_quality_threshold"])))
    quality["unreliable_phase_fraction"] = unreliable / max(n0, 1)
    mask = refine_brain_mask(mask0, q, quality_threshold=params["mask_quality_threshold"], voxel_size_mm=vox,
                             signal_voids=signal_voids)
    mask = xp.asarray(mask, dtype=bool) & xp.asarray(mask0, dtype=bool)
    if int(xp.count_nonzero(mask)) < 0.5 * n0:  # reliability collapsed: keep the magnitude mask
        warnings.append("phase reliability too low to refine the brain mask; magnitude mask kept")
        mask = xp.asarray(mask0, dtype=bool)
    _sync(xp)
    steps.append(StepRecord("mask_refinement", "drop unreliable-phase edge voxels", REFERENCES["mask"],
                            {"quality_threshold": params["mask_quality_threshold"]}, t()))
    voxel_ml = float(np.prod(vox)) / 1000.0
    quality["mask_volume_ml"] = float(int(xp.count_nonzero(mask)) * voxel_ml)

    total_hz = xp.where(mask, xp.asarray(front.total_field_hz, dtype=xp.float32), 0.0).astype(xp.float32)
    noise_hz = xp.where(mask, xp.asarray(front.field_noise_hz, dtype=xp.float32), xp.float32(np.inf))
    total_ppm = hz_to_ppm(total_hz, b0)
    noise_ppm = hz_to_ppm(noise_hz, b0)
    finite_noise = noise_hz[mask & xp.isfinite(noise_hz)]
    quality["field_noise_median_hz"] = float(xp.median(finite_noise)) if finite_noise.size else float("nan")

    # -- background field removal (on the mask's bounding box; the FFT padding is added inside) ---------
    t = _Timer()
    full_shape = tuple(mask.shape)
    box = bounding_box(mask)
    full_mask = mask
    mask, total_ppm, noise_ppm = mask[box], total_ppm[box], noise_ppm[box]
    weights = inversion.data_weights(noise_ppm, mask, params["model_error_ppm"])
    method = params["background_method"]
    if method == "pdf":
        local_ppm, local_mask, info = background.pdf(
            total_ppm, mask, vox, b0dir, weights=weights, tolerance=params["pdf_tolerance"],
            max_iterations=params["pdf_max_iterations"], pad_mm=params["background_pad_mm"])
        bg_params = {"tolerance": params["pdf_tolerance"], "max_iterations": params["pdf_max_iterations"],
                     "pad_mm": params["background_pad_mm"], "weights": "1/sqrt(noise^2 + model_error^2)",
                     **info}
    else:
        radii = background.default_vsharp_radii_mm(vox, params["vsharp_radius_max_mm"], params["vsharp_radius_min_mm"])
        local_ppm, local_mask = background.vsharp(total_ppm, mask, vox, radii_mm=radii,
                                                  threshold=params["vsharp_threshold"])
        bg_params = {"radii_mm": radii, "threshold": params["vsharp_threshold"]}
        warnings.append("V-SHARP erodes the brain mask by the smallest sphere radius")
    bg_params["edge_peel_voxels"] = params["qsm_edge_peel_voxels"]
    mask = peel_edge(xp.asarray(local_mask, dtype=bool), params["qsm_edge_peel_voxels"])
    local_ppm = xp.where(mask, local_ppm, 0.0).astype(xp.float32)
    _sync(xp)
    steps.append(StepRecord("background_removal", {"pdf": "PDF", "vsharp": "V-SHARP"}[method], REFERENCES[method],
                            bg_params, t()))
    quality["qsm_mask_volume_ml"] = float(int(xp.count_nonzero(mask)) * voxel_ml)

    # -- dipole inversion ---------------------------------------------------------------------------------
    t = _Timer()
    weights = inversion.data_weights(noise_ppm, mask, params["model_error_ppm"])
    inv_method = params["inversion_method"]
    if inv_method == "fansi_wtv":
        alpha, sigma_eff = inversion.regularisation_weight(
            noise_ppm, mask, model_error_ppm=params["model_error_ppm"],
            gradient_scale_ppm_per_mm=params["tv_gradient_scale_ppm_per_mm"])
        chi, info = inversion.fansi_wtv(local_ppm, mask, vox, b0dir, weights=weights, alpha=alpha,
                                        iterations=params["admm_iterations"], tolerance=params["admm_tolerance"],
                                        pad_mm=params["inversion_pad_mm"])
        inv_params = {"alpha": alpha, "sigma_eff_ppm": sigma_eff, "mu_gradient": 100.0 * alpha, "mu_data": 1.0,
                      "model_error_ppm": params["model_error_ppm"],
                      "tv_gradient_scale_ppm_per_mm": params["tv_gradient_scale_ppm_per_mm"],
                      "max_iterations": params["admm_iterations"], "tolerance": params["admm_tolerance"],
                      "iterations": info["iterations"], "final_update": info["update"],
                      "converged": info["converged"]}
        algorithm = "weighted linear TV (ADMM, FANSI-style)"
    else:
        chi = inversion.tkd(local_ppm, mask, vox, b0dir, threshold=params["tkd_threshold"],
                            pad_mm=params["inversion_pad_mm"])
        inv_params = {"threshold": params["tkd_threshold"]}
        algorithm = "TKD"
        warnings.append("TKD preview inversion: streaking and underestimation expected")
    _sync(xp)
    steps.append(StepRecord("dipole_inversion", algorithm, REFERENCES[inv_method], inv_params, t()))
    quality["fit_residual"] = _data_residual(chi, local_ppm, mask, weights, vox, b0dir, params["inversion_pad_mm"])
    chi, local_ppm, mask = (_uncrop(a, box, full_shape, xp) for a in (chi, local_ppm, mask))
    del full_mask

    # -- R2* / T2* --------------------------------------------------------------------------------------
    t = _Timer()
    if te_all.size >= 2:
        r2s, t2s = r2star_map(magnitude, te_all, mask)
        steps.append(StepRecord("r2star", "log-linear weighted fit", REFERENCES["r2star"],
                                {"echoes": int(te_all.size)}, t()))
    else:
        r2s = xp.zeros(mask.shape, xp.float32)
        t2s = xp.zeros(mask.shape, xp.float32)
        warnings.append("R2*/T2* not computed: one echo has no decay to fit (maps are 0)")
        steps.append(StepRecord("r2star", "not computed (single echo)", REFERENCES["r2star"], {}, t()))

    # -- referencing -----------------------------------------------------------------------------------
    t = _Timer()
    chi_ref, offsets, csf_mask, ref_notes = reference.reference_susceptibility(
        chi, mask, region=params["reference_region"], r2star_per_s=r2s if te_all.size >= 2 else None,
        voxel_size_mm=vox, r2star_max_per_s=params["csf_r2star_max_per_s"])
    warnings.extend(ref_notes)
    region = params["reference_region"] if not ref_notes else "whole_brain"
    ref_params = {"region": region, "offsets_ppm": offsets}
    if csf_mask is not None:
        ref_params["csf_volume_ml"] = float(csf_mask.sum() * voxel_ml)
        quality["csf_volume_ml"] = ref_params["csf_volume_ml"]
    steps.append(StepRecord("referencing", "whole-brain mean" if region == "whole_brain" else "ventricular CSF",
                            reference.WHOLE_BRAIN_REFERENCE if region == "whole_brain" else reference.CSF_REFERENCE,
                            ref_params, t()))

    # -- SWI and minIP -----------------------------------------------------------------------------------
    t = _Timer()
    local_hz = local_ppm * np.float32(GYROMAGNETIC_RATIO_MHZ_PER_T * b0)
    swi_img = swi_from_signal(sig, te_all, b0, vox, mask, power=params["swi_mask_power"], local_field_hz=local_hz)
    steps.append(StepRecord("swi", "positive-phase mask from the local field", REFERENCES["swi"],
                            {"power": params["swi_mask_power"]}, t()))
    t = _Timer()
    minip = minimum_intensity_projection(swi_img, vox[2], params["minip_slab_mm"])
    _sync(xp)
    steps.append(StepRecord("minip", "sliding-slab minIP along k", REFERENCES["minip"],
                            {"slab_mm": params["minip_slab_mm"]}, t()))

    # -- back to the host, once --------------------------------------------------------------------------
    t = _Timer()
    out = {name: to_host(a) for name, a in {
        "chi": chi_ref, "mask": mask, "r2s": r2s, "t2s": t2s, "swi": swi_img, "minip": minip,
        "total_hz": total_hz, "local_hz": local_hz, "noise_hz": noise_hz}.items()}
    quality["seconds_transfer_out"] = t()
    for step in steps:
        quality[f"seconds_{step.name}"] = quality.get(f"seconds_{step.name}", 0.0) + float(step.seconds)
    quality["seconds_total"] = total()
    m_host = out["mask"].astype(bool)
    noise_out = np.where(m_host, out["noise_hz"], 0.0).astype(np.float32)
    noise_out[~np.isfinite(noise_out)] = 0.0
    resolved = {"name": params.pop("preset_name"), **params}
    return ReconResult(
        chi_ppm=np.where(m_host, out["chi"], 0.0).astype(np.float32),
        mask=m_host,
        r2star_per_s=out["r2s"].astype(np.float32),
        t2star_ms=out["t2s"].astype(np.float32),
        swi=out["swi"].astype(np.float32),
        minip=out["minip"].astype(np.float32),
        total_field_hz=out["total_hz"].astype(np.float32),
        local_field_hz=np.where(m_host, out["local_hz"], 0.0).astype(np.float32),
        field_noise_hz=noise_out,
        reference_region=region,
        reference_ppm=offsets,
        steps=steps,
        preset=resolved,
        quality={k: float(v) for k, v in quality.items()},
        device=dev,
        warnings=warnings,
    )


def bounding_box(mask, margin=1):
    """Slices of the smallest box holding the mask, grown by ``margin`` voxels (clipped to the array)."""
    from qsmnode.recon.backend import array_module

    xp = array_module(mask)
    out = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        proj = to_host(xp.any(mask, axis=others))
        idx = np.nonzero(proj)[0]
        if idx.size == 0:
            raise ReconstructionError("the brain mask is empty", "check that the series covers the head")
        out.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(out)


def _uncrop(a, box, shape, xp):
    out = xp.zeros(shape, dtype=a.dtype)
    out[box] = a
    return out


def _data_residual(chi, local_ppm, mask, weights, vox, b0dir, pad_mm) -> float:
    """Relative weighted data misfit ||W (D chi - f)|| / ||W f|| inside the mask (dimensionless)."""
    from qsmnode.recon.backend import array_module

    xp = array_module(chi)
    shape = tuple(chi.shape)
    pshape = background.padded_shape(shape, vox, pad_mm)
    d = background.half_spectrum(dipole_kernel(pshape, vox, b0dir, xp=xp))
    field = background.crop_to(background.irfftn(background.rfftn(background.pad_to(chi, pshape), xp) * d, pshape, xp),
                               shape)
    m = xp.asarray(mask, dtype=bool)
    f = xp.where(m, local_ppm, 0.0)
    # the mean of the field is not determined by the model: compare demeaned fields
    n = max(int(xp.count_nonzero(m)), 1)
    field = field - xp.sum(xp.where(m, field, 0.0)) / n
    f = f - xp.sum(f) / n
    r = xp.where(m, weights * (field - f), 0.0)
    ref = xp.where(m, weights * f, 0.0)
    den = float(xp.linalg.norm(ref.ravel()))
    return float(xp.linalg.norm(r.ravel())) / den if den > 0 else float("nan")
