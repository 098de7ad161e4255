"""Vendor rules and slice geometry, function by function."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qsmnode.dicom import geometry, vendors
from qsmnode.errors import InputRefused


def to_rad(vendor, slope, intercept, bits, signed, stored, observed=None):
    a, b, rule = vendors.phase_scale(vendor, slope, intercept, bits, signed, observed)
    return np.asarray(stored, dtype=np.float64) * slope * a + intercept * a + b, rule


@pytest.mark.parametrize(
    "vendor,slope,intercept,bits,signed,stored,expected",
    [
        ("siemens", 2.0, -4096.0, 12, 0, [0, 2048, 4095], [-math.pi, 0.0, math.pi * 4094 / 4096]),
        ("siemens", 1.0, 0.0, 12, 0, [0, 2048, 4095], [-math.pi, 0.0, math.pi * 2047 / 2048]),
        ("philips", 6284 / 4095, -3142.0, 12, 0, [0, 4095], [-3.142, 3.142]),
        ("unknown", 0.001534, -3.1416, 12, 0, [0, 4095], [-3.1416, 3.1416 - 0.0000018]),
    ],
)
def test_phase_scaling_by_range(vendor, slope, intercept, bits, signed, stored, expected):
    rad, rule = to_rad(vendor, slope, intercept, bits, signed, stored)
    np.testing.assert_allclose(rad, expected, atol=2e-3)
    assert rule.startswith(vendor)


def test_ge_wide_signed_range_uses_observed_values():
    rad, rule = to_rad("ge", 1.0, 0.0, 16, 1, [-3141, 0, 3141], observed=(-3141.0, 3141.0))
    np.testing.assert_allclose(rad, [-3.141, 0.0, 3.141])
    assert "milliradians" in rule
    rad, _ = to_rad("ge", 1.0, 0.0, 16, 1, [-32768, 16384], observed=(-32768.0, 16384.0))
    np.testing.assert_allclose(rad, [-math.pi, math.pi / 2])


@pytest.mark.parametrize(
    "manufacturer,vendor",
    [
        ("SIEMENS", "siemens"),
        ("Siemens Healthineers", "siemens"),
        ("GE MEDICAL SYSTEMS", "ge"),
        ("Philips Medical Systems", "philips"),
        ("Philips", "philips"),
        ("TOSHIBA_MEC", "canon"),
        ("Canon_Medical_Systems", "canon"),
        ("UIH", "united-imaging"),
        ("Bruker", "unknown"),
        (None, "unknown"),
    ],
)
def test_vendor_from_manufacturer(manufacturer, vendor):
    assert vendors.vendor_from_manufacturer(manufacturer) == vendor
    assert vendors.phase_sign_validated(vendor) == (vendor in ("siemens", "ge", "philips"))
    assert vendors.phase_sign_factor(vendor) == (-1 if vendor == "ge" else 1)


def test_alternate_slice_pi_offset_detection():
    i, j, k = np.meshgrid(
        np.linspace(-1, 1, 24), np.linspace(-1, 1, 24), np.arange(12), indexing="ij"
    )
    smooth = (np.exp(-(i**2 + j**2)) * np.exp(1j * (1.5 * i + 0.7 * j + 0.2 * k)))[
        ..., None
    ].astype(np.complex64)
    assert not vendors.alternate_slice_pi_offset(smooth)
    flipped = smooth.copy()
    flipped[:, :, 1::2] *= -1
    assert vendors.alternate_slice_pi_offset(flipped)


def test_stack_affine_oblique_and_b0_direction():
    t = math.radians(30)
    iop = [1, 0, 0, 0, math.cos(t), math.sin(t)]
    row, col, normal = geometry.orientation_axes(iop)
    first = np.array([-100.0, -90.0, -40.0])
    last = first + 9 * 2.5 * normal
    affine = geometry.stack_affine(iop, first, last, 10, [0.8, 0.9])
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.9, 0.8, 2.5])
    np.testing.assert_allclose(affine[:3, 3], first)
    from qsmnode.acquisition import b0_direction_from_affine

    np.testing.assert_allclose(
        b0_direction_from_affine(affine), [0, math.sin(t), math.cos(t)], atol=1e-12
    )


def test_slice_spacing_checks():
    assert geometry.check_slice_spacing([0.0, 2.0, 4.0, 6.0]) == pytest.approx(2.0)
    assert geometry.check_slice_spacing([5.0], slice_thickness_mm=3.0) == 3.0
    with pytest.raises(InputRefused, match="1 slice\\(s\\) missing"):
        geometry.check_slice_spacing([0.0, 2.0, 6.0, 8.0, 10.0])
    with pytest.raises(InputRefused, match="2D stack with gaps"):
        geometry.check_slice_spacing(
            [0.0, 5.0, 10.0], slice_thickness_mm=3.0, acquisition_type="2D"
        )
    assert (
        geometry.check_slice_spacing(
            [0.0, 5.0, 10.0], slice_thickness_mm=3.0, acquisition_type="3D"
        )
        == 5.0
    )


def test_broken_orientation_is_refused():
    with pytest.raises(InputRefused, match="not two orthogonal unit vectors"):
        geometry.orientation_axes([1, 0, 0, 1, 0, 0])
    with pytest.raises(InputRefused, match="6 numbers"):
        geometry.orientation_axes([1, 0, 0])
