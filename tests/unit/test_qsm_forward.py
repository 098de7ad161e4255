"""Reconstruction of a scan simulated with the independent ``qsm-forward`` package (GPL-3.0,
imported only here): its own dipole kernel, k-space padding, signal equation and receive-phase
offset (Stewart AW et al., "QSM-CI"/qsm-forward, https://github.com/astewartau/qsm-forward).

The susceptibility, proton density and R2* come from our head phantom; everything between them
and the complex signal is qsm-forward's, so a sign, scale or axis error in our forward model
cannot cancel against the same error in the reconstruction.
"""

from __future__ import annotations

import numpy as np
import pytest

qsm_forward = pytest.importorskip("qsm_forward")

from qsmnode.recon.pipeline import reconstruct  # noqa: E402
from qsmnode.simulate.phantom import head_phantom  # noqa: E402

from test_pipeline_accuracy import assert_bar, evaluate  # noqa: E402  (sibling module, rootdir-relative)

ECHO_TIMES_S = [0.004, 0.009, 0.014, 0.019, 0.024]


def test_reconstruct_qsm_forward_scan():
    b0 = 3.0
    ph = head_phantom(matrix=(96, 96, 72), voxel_size_mm=(2.0, 2.0, 2.0), seed=0)
    field_ppm = qsm_forward.generate_field(ph.chi_ppm.astype(np.float64), voxel_size=list(ph.voxel_size_mm),
                                           B0_dir=[0, 0, 1])
    head = ph.m0 > 0
    phase_offset = qsm_forward.generate_phase_offset(ph.m0, head, ph.shape)
    r2s = ph.r2star_per_s(b0)
    echoes = [qsm_forward.generate_signal(field_ppm, B0=b0, TR=1, TE=te, flip_angle=90, phase_offset=phase_offset,
                                          R1=1, R2star=r2s, M0=ph.m0) for te in ECHO_TIMES_S]
    signal = np.stack(echoes, axis=-1).astype(np.complex64)
    rng = np.random.default_rng(11)
    sigma = float(np.mean(np.abs(signal[..., 0][ph.brain_mask]))) / 100.0  # SNR 100 at echo 1
    signal += (sigma / np.sqrt(2) * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
               ).astype(np.complex64)

    result = reconstruct(signal, ECHO_TIMES_S, b0, ph.voxel_size_mm, (0.0, 0.0, 1.0), device="cpu")
    fig = evaluate(result, ph)
    print(f"\nqsm-forward 3 T axial: NRMSE {fig['nrmse']:.1f} %  HFEN {fig['hfen']:.1f} %  XSIM {fig['xsim']:.3f}  "
          f"DGM slope {fig['dgm_slope']:.3f}  vein {fig['vein_ratio']:.2f}  bleeds "
          f"{np.round(fig['microbleeds'], 3).tolist()}  calc {np.round(fig['calcifications'], 3).tolist()}  "
          f"coverage {fig['coverage']:.3f}  outside {fig['outside']:.3f}")
    assert_bar(fig)
    # the total field agrees with qsm-forward's (Hz = ppm x 42.58 x B0 in its signal equation),
    # up to a constant (the mean is not determined) inside the mask
    m = result.mask
    expected_hz = field_ppm * 42.58 * b0
    diff = result.total_field_hz[m] - expected_hz[m]
    assert np.std(diff) < 0.05 * np.std(expected_hz[m]), np.std(diff)
