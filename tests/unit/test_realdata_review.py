"""The real Philips 2-echo field map (2.3/4.6 ms at 3 T, 3 mm; ../shared/realdata, see its
README) processes as a low-confidence result: a short-echo warning, findings withheld, and at
most a handful of candidates that the findings rules would report even if it were trusted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qsmnode.report.review import review_result, select_findings
from test_sr import build_sr, focus_groups, texts

PHILIPS = (Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
           / "philips_classic_elitionx_3D_fmap_2echo_magphase")

pytestmark = pytest.mark.skipif(
    not PHILIPS.is_dir(),
    reason=f"real scanner DICOM not present at {PHILIPS} (see shared/realdata/README.md)")


@pytest.fixture(scope="module")
def philips():
    from qsmnode.dicom.load import load_acquisition
    from qsmnode.process import reconstruct_acquisition

    acquisition = load_acquisition([PHILIPS])
    result = reconstruct_acquisition(acquisition, device="cpu")
    return acquisition, result, review_result(acquisition, result)


def test_philips_short_echoes_give_a_low_confidence_result(philips):
    _, _, review = philips
    assert review.low_confidence
    echo = [c for c in review.concerns if c.check == "echo_times"]
    assert len(echo) == 1 and "4.6 ms at 3.00 T" in echo[0].message
    assert echo[0].value == pytest.approx(4.6 * 3.0004, rel=1e-3)  # TE x B0, ms T
    assert review.findings.listed == [] and review.findings.withheld == review.candidates


def test_philips_has_at_most_a_handful_of_reportable_candidates(philips):
    """Even trusted, the size and mask-edge rules would report at most a handful (the 191
    single-voxel 'foci' on the scalp and skull base of the first runs are not findings)."""
    acquisition, _, review = philips
    trusted = select_findings(review.candidates, acquisition.voxel_size_mm)
    assert len(trusted.reported) <= 5, [(f.kind, f.n_voxels, f.edge_distance_mm) for f in trusted.reported]
    assert all(f.n_voxels >= 2 for f in trusted.reported)


def test_philips_sr_carries_the_warning_and_withholds_findings(philips):
    acquisition, result, review = philips
    sr = build_sr(acquisition, result, review)
    text = texts(sr)
    assert "LOW CONFIDENCE - findings withheld: echoes too short" in text
    assert "Warning: echo times too short for the field" in text
    assert "Findings withheld: the result is low-confidence" in text
    assert focus_groups(sr) == []
    # (dciodvfy is run on the synthetic low-confidence SR in test_review: this source's
    # PatientName "d2n_Philips_3T_R571", copied as it is, draws a PN-form warning of its own)


def test_philips_mask_is_the_brain_without_scalp_or_face(philips):
    """1.0-2.0 L (it was 2,867 ml with the scalp ring and the face), nothing in the outer 6 mm of
    the head, and a brain's shape: one piece, no slice wider than the skull's inner table."""
    from scipy import ndimage

    acquisition, result, _ = philips
    vox = tuple(float(v) for v in acquisition.voxel_size_mm)
    volume_ml = result.mask.sum() * float(np.prod(vox)) / 1000.0
    assert 1000.0 <= volume_ml <= 2000.0, volume_ml
    rss = np.sqrt((np.abs(acquisition.signal) ** 2).sum(axis=-1))
    head = ndimage.binary_fill_holes(rss > 0.1 * np.percentile(rss, 99))
    depth_mm = ndimage.distance_transform_edt(head, sampling=vox)
    assert not (result.mask & (depth_mm <= 6.0)).any(), "the mask reaches the scalp"
    assert ndimage.label(result.mask)[1] == 1
    # below the temporal lobes the head is face and neck: the mask there is far narrower than the head
    k_widest = int(np.argmax(result.mask.sum(axis=(0, 1))))
    lowest = int(np.nonzero(result.mask.any(axis=(0, 1)))[0][0])
    assert result.mask[:, :, lowest].sum() < 0.5 * head[:, :, lowest].sum()
    assert result.mask[:, :, k_widest].sum() < 0.85 * head[:, :, k_widest].sum()
