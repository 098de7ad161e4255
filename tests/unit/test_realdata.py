"""Real scanner DICOM (../shared/realdata, see its README) loads or is refused as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from qsmnode.dicom import frames
from qsmnode.dicom.classify import classify_instance
from qsmnode.dicom.load import load_acquisition
from qsmnode.errors import InputRefused

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"

pytestmark = pytest.mark.skipif(
    not REALDATA.is_dir(),
    reason=f"real scanner DICOM not present at {REALDATA} (see shared/realdata/README.md)",
)


def folder(name: str) -> Path:
    path = REALDATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def test_siemens_one_slice_3_echo_gre_loads():
    acq = load_acquisition([folder("siemens_classic_prisma_3D_3echo_GRE_QSM_partial_heudiconv")])
    assert acq.vendor == "siemens" and acq.phase_sign_validated
    assert acq.n_echoes == 3 and acq.shape[2] == 1
    np.testing.assert_allclose(acq.echo_times_s, [0.004, 0.010, 0.016])
    assert acq.b0_tesla == pytest.approx(123.253508 / 42.57747892, rel=1e-9)  # 2.895 T, not 3
    assert len(acq.source_series_uids) == 2  # magnitude and phase series paired
    phase = acq.phase[acq.magnitude > np.percentile(acq.magnitude, 50)]
    assert -np.pi <= phase.min() < -2.5 and 2.5 < phase.max() <= np.pi  # 12-bit phase -> radians
    assert any("v * pi / 4096" in p for p in acq.provenance)


def test_philips_classic_2_echo_loads_with_phase_in_radians():
    acq = load_acquisition([folder("philips_classic_elitionx_3D_fmap_2echo_magphase")])
    assert acq.vendor == "philips"
    assert acq.shape == (80, 80, 53) and acq.n_echoes == 2
    np.testing.assert_allclose(acq.echo_times_s, [0.0023, 0.0046])
    np.testing.assert_allclose(acq.voxel_size_mm, [3.0, 3.0, 3.0], atol=1e-3)
    assert acq.b0_tesla == pytest.approx(127.748512 / 42.57747892, rel=1e-9)
    assert any("milliradians" in p for p in acq.provenance)
    brain = acq.magnitude[..., 0] > np.percentile(acq.magnitude[..., 0], 80)
    phase = acq.phase[..., 1][brain]
    assert phase.min() >= -np.pi - 1e-3 and phase.max() <= np.pi + 1e-3
    assert phase.max() - phase.min() > 5.0  # wraps across the full circle: radians, not mrad
    # the echo-to-echo phase difference is smooth inside the brain (phase decoded consistently)
    dphi = np.angle(acq.signal[..., 1] * np.conj(acq.signal[..., 0]))[brain]
    assert np.median(np.abs(dphi)) < 1.0


def test_siemens_phase_difference_field_map_is_refused():
    with pytest.raises(InputRefused, match="phase-difference field map, not per-echo phase"):
        load_acquisition([folder("siemens_classic_E11_prisma_fmap_magph")])


def test_siemens_xa30_enhanced_frames_parse_and_field_map_is_refused():
    root = folder("siemens_xa30_enhanced_prismafit_fmap")
    records = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        recs = frames.image_records(ds, "siemens")
        assert len(recs) == int(ds.NumberOfFrames)
        assert frames.imaging_frequency_mhz(ds) == pytest.approx(123.262369, abs=1e-6)
        for r in recs:
            records.setdefault(r.component, set()).add(r.echo_time_ms)
            assert len(r.orientation) == 6 and r.pixel_spacing == (3.375, 3.375)
        if recs[0].component == "phase":
            assert (recs[0].slope, recs[0].intercept) == (2.0, -4096.0)
        info = classify_instance(ds)
        assert info.refusal and "phase-difference field map, not per-echo phase" in info.refusal
    assert records == {"magnitude": {10.0, 12.46}, "phase": {12.46}}
    with pytest.raises(InputRefused, match="phase-difference field map, not per-echo phase"):
        load_acquisition([root])


def test_philips_scanner_b0_map_in_hz_is_refused():
    with pytest.raises(InputRefused, match=r"scanner field map \(Hz\), not phase"):
        load_acquisition([folder("philips_enhanced_achieva_B0map_Hz")])
