"""Field-strength presets: table values, interpolation, extrapolation, overrides, refusals."""

import pytest

from qsmnode.errors import ReconstructionError
from qsmnode.recon.presets import FIELD_TABLE, NAMED_PRESETS, TABLE_FIELDS_T, known_keys, preset_for_field


@pytest.mark.parametrize("index", range(3))
def test_table_fields_return_table_values(index):
    b0 = TABLE_FIELDS_T[index]
    p = preset_for_field(b0)
    for key, values in FIELD_TABLE.items():
        assert p[key] == values[index], key
    assert p["b0_tesla"] == b0 and p["preset_name"] == "default"


def test_interpolation_between_fields_is_monotone_and_bounded():
    lo, mid, hi = preset_for_field(1.5), preset_for_field(2.89), preset_for_field(3.0)
    assert lo["minip_slab_mm"] > mid["minip_slab_mm"] > hi["minip_slab_mm"]
    assert lo["csf_r2star_max_per_s"] < mid["csf_r2star_max_per_s"] < hi["csf_r2star_max_per_s"]
    assert lo["echo_max_te_s"] > mid["echo_max_te_s"] > hi["echo_max_te_s"]
    p5 = preset_for_field(5.0)
    assert 0.025 < p5["echo_max_te_s"] < 0.040
    assert isinstance(p5["swi_mask_power"], int) and p5["swi_mask_power"] in (3, 4)
    assert isinstance(p5["admm_iterations"], int)


def test_extrapolation_beyond_table():
    low, high = preset_for_field(0.55), preset_for_field(9.4)
    # physically scaled keys follow their rule, the others hold the end value
    assert low["echo_max_te_s"] == pytest.approx(0.060 * 1.5 / 0.55)
    assert high["echo_max_te_s"] == pytest.approx(0.025 * 7.0 / 9.4)
    assert high["csf_r2star_max_per_s"] == pytest.approx(20.0 * 9.4 / 7.0)
    assert low["minip_slab_mm"] == 16.0 and high["minip_slab_mm"] == 10.0
    assert low["background_method"] in ("pdf", "vsharp")


def test_overrides_and_named_presets():
    p = preset_for_field(3.0, {"inversion_method": "tkd", "tv_gradient_scale_ppm_per_mm": 0.1})
    assert p["inversion_method"] == "tkd" and p["tv_gradient_scale_ppm_per_mm"] == 0.1
    fast = preset_for_field(3.0, name="fast")
    assert fast["inversion_method"] == "tkd" and fast["preset_name"] == "fast"
    # overrides win over the named preset
    assert preset_for_field(3.0, {"inversion_method": "fansi_wtv"}, name="fast")["inversion_method"] == "fansi_wtv"
    assert set(NAMED_PRESETS) >= {"default", "fast", "accurate", "csf_reference"}


def test_overrides_do_not_leak_between_calls():
    preset_for_field(3.0, {"vsharp_radius_max_mm": 3.0})
    assert preset_for_field(3.0)["vsharp_radius_max_mm"] == 12.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"overrides": {"tv_wieght": 1}}, "unknown reconstruction parameter"),
        ({"overrides": {"inversion_method": "magic"}}, "not supported"),
        ({"overrides": {"background_method": "harmonic"}}, "not supported"),
        ({"name": "turbo"}, "unknown preset"),
    ],
)
def test_refusals(kwargs, message):
    with pytest.raises(ReconstructionError, match=message):
        preset_for_field(3.0, **kwargs)


@pytest.mark.parametrize("b0", [0.0, -1.0, float("nan")])
def test_bad_field_refused(b0):
    with pytest.raises(ReconstructionError):
        preset_for_field(b0)


def test_known_keys_cover_table():
    assert set(FIELD_TABLE) <= set(known_keys())
