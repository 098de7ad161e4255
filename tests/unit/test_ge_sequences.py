"""GE research-mode series (ScanningSequence RM) are told apart by GE's private sequence names:
gradient-echo ones load, direct field maps (B0map/B0rf/3db0map) are refused as scanner field maps.

The datasets are synthetic GE series carrying the private tags real GE scanners write:
(0019,109C) pulse sequence name and (0019,109E) internal pulse sequence name (GEMS_ACQU_01),
(0043,102F) image type (GEMS_PARM_01).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from qsmnode.dicom import frames, vendors
from qsmnode.dicom.classify import REFUSAL_SCANNER_B0_MAP, classify_instance
from qsmnode.dicom.load import load_acquisition
from qsmnode.errors import InputRefused
from qsmnode.simulate.dicom_writer import WriterOptions
from qsmnode.simulate.scan import simulate_scan

SMALL = dict(matrix=(16, 16, 8), voxel_size_mm=(4.0, 4.0, 4.0))
TWELVE_ECHOES_MS = [3.0 + 2.5 * n for n in range(12)]


def research_mode(datasets, pulse_sequence: str, internal_sequence: str):
    """GE research mode: ScanningSequence RM, the technique named only in GE's private tags."""
    for ds in datasets:
        ds.ScanningSequence = "RM"
        block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        block.add_new(0x9C, "LO", pulse_sequence)
        block.add_new(0x9E, "SH", internal_sequence)
    return datasets


@pytest.fixture(scope="module")
def ge_twelve_echoes(tmp_path_factory):
    """GE 12-echo magnitude, real and imaginary images in one interleaved series."""
    opts = WriterOptions(ge_components=("magnitude", "real", "imaginary"))
    return simulate_scan(tmp_path_factory.mktemp("ge12"), vendor="ge", seed=4, writer_options=opts,
                         echo_times_ms=TWELVE_ECHOES_MS, **SMALL)


def read_all(scan):
    return [pydicom.dcmread(p) for p in scan.paths]


@pytest.mark.parametrize("pulse, internal", [("cuhpsd/mfgre_BOLD", "FGRE"), ("efgre3d_B0", "EFGRE3D")])
def test_ge_research_mode_gradient_echo_loads(ge_twelve_echoes, pulse, internal):
    """Issue 13 item 9: refused before as "not a gradient-echo acquisition (ScanningSequence RM)"."""
    reference = load_acquisition(read_all(ge_twelve_echoes))
    datasets = research_mode(read_all(ge_twelve_echoes), pulse, internal)
    assert classify_instance(datasets[0]).refusal is None
    acq = load_acquisition(datasets)
    assert acq.n_echoes == 12 and acq.signal.shape == (16, 16, 8, 12)
    np.testing.assert_allclose(acq.echo_times_s, np.array(TWELVE_ECHOES_MS) / 1000, rtol=1e-6)
    np.testing.assert_array_equal(acq.signal, reference.signal)
    assert any("real and imaginary images used" in line for line in acq.provenance)


def test_ge_twelve_echo_magnitude_real_imaginary_decodes_the_signal(ge_twelve_echoes):
    acq = load_acquisition(research_mode(read_all(ge_twelve_echoes), "cuhpsd/mfgre_BOLD", "FGRE"))
    truth = ge_twelve_echoes.signal
    bright = np.abs(truth) > 0.2 * np.abs(truth).max()
    dphi = np.angle(acq.signal * np.conj(truth))[bright]
    assert np.abs(dphi).max() < 2e-3  # GE handedness and alternate-slice pi offset undone


def test_ge_private_names_are_read_from_implicit_vr_files_without_private_creators(ge_twelve_echoes, tmp_path):
    """An export that dropped the private creators, in implicit VR: the elements are read from
    the first private block as raw bytes (VR UN), and still name the sequence and component."""
    ds = research_mode(read_all(ge_twelve_echoes)[:1], "cuhpsd/mfgre_BOLD", "FGRE")[0]
    del ds[0x0019, 0x0010], ds[0x0043, 0x0010]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    back = pydicom.dcmread(path)
    assert isinstance(back[0x0019, 0x109C].value, bytes)
    assert frames.ge_sequence_names(back) == ("cuhpsd/mfgre_BOLD", "FGRE")
    info = classify_instance(back)
    assert info.refusal is None and info.component in vendors.GE_IMAGE_TYPE_CODES.values()


@pytest.mark.parametrize("pulse, internal", [("B0rf", "B0map"), ("B0map", "B0map"), ("3db0map", "EFGRE3D")])
def test_ge_direct_field_map_is_refused_as_a_scanner_field_map(tmp_path, pulse, internal):
    """A GE B0 map is a field map in Hz and a magnitude, both stored as image type 0: refused as
    the scanner's field map, not as "not gradient echo" nor as "magnitude without phase"."""
    opts = WriterOptions(ge_components=("magnitude",), ge_slice_pi_offset=False)
    scan = simulate_scan(tmp_path, vendor="ge", seed=5, writer_options=opts, echo_times_ms=[4.6, 6.9],
                         **SMALL)
    datasets = research_mode(read_all(scan), pulse, internal)
    for ds in datasets:  # the second "echo" volume is the field map in Hz, still image type 0
        assert ds.get_private_item(0x0043, 0x2F, "GEMS_PARM_01").value == 0
    assert {classify_instance(ds).refusal for ds in datasets} == {REFUSAL_SCANNER_B0_MAP}
    with pytest.raises(InputRefused) as info:
        load_acquisition(datasets)
    message = str(info.value)
    assert "a scanner-computed B0 field map, not multi-echo GRE phase" in message
    assert "not a gradient-echo" not in message and "magnitude without phase" not in message


def test_ge_research_mode_without_a_gradient_echo_name_is_still_refused(ge_twelve_echoes):
    ds = research_mode(read_all(ge_twelve_echoes)[:1], "fse", "FSE")[0]
    assert "not a gradient-echo acquisition (ScanningSequence RM; GE sequence fse/FSE)" in (
        classify_instance(ds).refusal
    )


@pytest.mark.parametrize("name", ["cuhpsd/mfgre_BOLD", "efgre3d_B0", "FGRE", "EFGRE3D", "fspgr", "SWAN", "3dfgre"])
def test_ge_gradient_echo_names(name):
    assert vendors.ge_gradient_echo_name(["", name]) == name and not vendors.ge_is_field_map([name])


@pytest.mark.parametrize("name", ["fse", "FSE-XL", "epi2", "B0map", "BRAVO"])
def test_ge_names_that_are_not_gradient_echo(name):
    assert vendors.ge_gradient_echo_name([name]) is None
