"""The TID 1500 Comprehensive 3D SR: provenance, reference, quality, findings in patient mm."""

from __future__ import annotations

import datetime

import numpy as np
import pydicom
import pytest
from scipy import ndimage

import tests.dciodvfy as dciodvfy
from qsmnode.dicom import outputs
from qsmnode.report.findings import find_foci
from qsmnode.report.review import Review, select_findings
from qsmnode.report.sr import build_measurement_report
from test_outputs import case_from_maps, oblique_affine, synthetic_case

HEMORRHAGE, CALCIFICATION = "50960005", "18115005"


def items(ds):
    """Every content item of the SR tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def name(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item \
        else ""


def texts(ds) -> str:
    return "\n".join(str(i.TextValue) for i in items(ds) if i.ValueType == "TEXT")


def numbers(ds, meaning: str) -> list[float]:
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in items(ds)
            if i.ValueType == "NUM" and name(i) == meaning]


def focus_groups(ds):
    """(finding type code, peak ppm, mean ppm, LPS point) of every focus group."""
    found = []
    for group in items(ds):
        if group.ValueType != "CONTAINER" or name(group) != "Measurement Group":
            continue
        children = list(group.ContentSequence)
        finding = [c for c in children if c.ValueType == "CODE" and name(c) == "Finding"]
        points = [c for c in items(group) if c.ValueType == "SCOORD3D"]
        if not finding or not points:
            continue
        peak = mean = None
        for c in children:
            if c.ValueType == "NUM" and name(c) == "Magnetic Susceptibility":
                modifiers = {name(m): m.ConceptCodeSequence[0].CodeMeaning
                             for m in c.get("ContentSequence", []) if m.ValueType == "CODE"}
                value = float(c.MeasuredValueSequence[0].NumericValue)
                if modifiers.get("Derivation") in ("Maximum", "Minimum"):
                    peak = value
                elif modifiers.get("Derivation") == "Mean":
                    mean = value
        found.append((finding[0].ConceptCodeSequence[0].CodeValue, peak, mean,
                      np.array(points[0].GraphicData, dtype=float),
                      points[0].ReferencedFrameOfReferenceUID))
    return found


def plausible_review(acquisition, result) -> Review:
    """The review of a result taken as plausible (no concern): the findings rules only. The
    synthetic cases are small volumes, far below a brain's volume."""
    vox = tuple(acquisition.voxel_size_mm)
    foci = find_foci(result.chi_ppm, result.mask, vox)
    return Review([], foci, select_findings(foci, vox), vox)


def build_sr(acquisition, result, review=None):
    qsm = outputs.build_classic_series(
        acquisition, result, "QSM", outputs.qsm_to_ppb(result.chi_ppm, result.mask),
        software_version="0.1.0", when=datetime.datetime.now())
    review = review or plausible_review(acquisition, result)
    return build_measurement_report(acquisition, result, review, qsm, software_version="0.1.0")


@pytest.fixture(scope="module")
def synthetic_sr(tmp_path_factory):
    acquisition, result = synthetic_case(
        warnings=("phase sign of vendor 'canon' is not validated: the sign may be inverted",))
    sr = build_sr(acquisition, result)
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return acquisition, result, pydicom.dcmread(path), path


def test_sr_names_every_algorithm_parameter_and_the_preset(synthetic_sr):
    acquisition, result, ds, _ = synthetic_sr
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.StudyInstanceUID == acquisition.header.StudyInstanceUID
    assert ds.SeriesDescription.startswith("SR")
    params = [str(i.TextValue) for i in items(ds)
              if i.ValueType == "TEXT" and name(i) == "Algorithm Parameters"]
    for step in result.steps:
        assert any(step.algorithm in str(i.TextValue) for i in items(ds)
                   if i.ValueType == "TEXT" and name(i) == "Algorithm Name")
        assert f"reference={step.reference}" in params
    assert "radii_mm=[12, 10, 8, 6, 4, 2]" in params and "tsvd=0.05" in params
    assert "name=3T" in params and "inversion=iLSQR" in params
    assert numbers(ds, "Echo time") == pytest.approx([5.0, 11.0, 17.0])
    assert numbers(ds, "Main magnetic field strength used") == pytest.approx(
        [acquisition.b0_tesla])
    assert sorted(numbers(ds, "Processing time"))[-1] == pytest.approx(
        sum(s.seconds for s in result.steps))


def test_sr_reference_quality_and_warnings(synthetic_sr):
    acquisition, result, ds, _ = synthetic_sr
    text = texts(ds)
    assert "Reference region whole_brain" in text and "referenced to this region" in text
    assert "Reference region csf" in text
    assert numbers(ds, "Reference region susceptibility") == pytest.approx([0.0, -0.012])
    assert numbers(ds, "Brain mask volume") == pytest.approx([result.quality["mask_volume_ml"]])
    assert numbers(ds, "Unreliable phase fraction") == pytest.approx([0.03])
    assert numbers(ds, "Field fit residual") == pytest.approx([0.012])
    assert "Warning: phase sign of vendor 'canon' is not validated" in text
    assert "Warning: test warning: nothing wrong" in text
    mean = np.asarray(result.chi_ppm)[result.mask].mean()
    whole_brain_means = [float(i.MeasuredValueSequence[0].NumericValue) for i in items(ds)
                         if i.ValueType == "NUM" and name(i) == "Magnetic Susceptibility"]
    assert any(abs(v - mean) < 1e-6 for v in whole_brain_means)


def test_sr_findings_have_sign_size_and_patient_location(synthetic_sr):
    acquisition, result, ds, _ = synthetic_sr
    groups = focus_groups(ds)
    # the two spheres; the 50 ppm single voxel is below the minimum size of a finding
    assert sorted(code for code, *_ in groups) == [CALCIFICATION, HEMORRHAGE]
    assert "1 candidates smaller than 2 voxels or 8 mm3 not reported" in texts(ds)
    for code, peak, mean, point, frame_uid in groups:
        assert frame_uid == acquisition.header.FrameOfReferenceUID
        ijk = np.linalg.solve(acquisition.affine[:3, :3], point - acquisition.affine[:3, 3])
        value = result.chi_ppm[tuple(np.round(ijk).astype(int))]
        if code == HEMORRHAGE:
            assert peak > 0.5 and mean > 0 and value > 0.5
        else:
            assert peak < -0.5 and mean < 0 and value < -0.5
    text = texts(ds)
    assert text.count("must be confirmed by a reader") == len(groups)
    assert "candidate microbleed" in text and "candidate calcification" in text


@pytest.mark.skipif(not dciodvfy.AVAILABLE, reason="dicom3tools dciodvfy not installed")
def test_sr_passes_dciodvfy(synthetic_sr):
    dciodvfy.assert_valid(synthetic_sr[3])


def test_sr_on_head_phantom_lists_microbleeds_calcifications_and_no_vein():
    """Every listed focus is a true microbleed (haemorrhage) or calcification of the right sign,
    never a vein; a true focus that shows as a single 2 mm voxel is below the minimum size of a
    finding and is counted as too small instead (the 1 x 1 x 2 mm simulated scan of
    test_review lists all of them)."""
    from qsmnode.report.review import review_result
    from qsmnode.simulate.phantom import LABELS, head_phantom

    phantom = head_phantom(matrix=(96, 96, 72), voxel_size_mm=(2, 2, 2), seed=2)
    rng = np.random.default_rng(7)
    mask = phantom.brain_mask
    # a reconstruction is blurred and noisy: 1 mm Gaussian blur, 0.02 ppm noise
    chi = ndimage.gaussian_filter(phantom.chi_ppm * mask, 0.5)
    chi = ((chi + rng.normal(0.0, 0.02, chi.shape)) * mask).astype(np.float32)
    affine = oblique_affine((2.0, 2.0, 2.0), origin=(-95.0, -120.0, -60.0))
    acquisition, result = case_from_maps(chi, mask, affine)
    review = review_result(acquisition, result)
    assert not review.low_confidence, review.warnings
    ds = build_sr(acquisition, result, review)
    groups = focus_groups(ds)

    def ijk_of(point):
        return np.linalg.solve(affine[:3, :3], point - affine[:3, 3])

    n_truth_listed = 0
    for truth, code, sign in ((phantom.microbleeds, HEMORRHAGE, 1),
                              (phantom.calcifications, CALCIFICATION, -1)):
        for centre, _ in truth:
            matches = [g for g in groups if np.linalg.norm(ijk_of(g[3]) - centre) < 1.5]
            assert len(matches) <= 1, f"focus at {centre} listed {len(matches)} times"
            if not matches:
                small = [f for f in review.findings.too_small
                         if np.linalg.norm(np.subtract(f.centroid_ijk, centre)) < 1.5]
                assert len(small) == 1 and small[0].n_voxels == 1, f"focus at {centre} lost"
                continue
            n_truth_listed += 1
            assert matches[0][0] == code
            assert sign * matches[0][1] > 0.15  # peak of the right sign
    veins = phantom.labels == LABELS["vein"]
    for code, _, _, point, _ in groups:
        i, j, k = np.round(ijk_of(point)).astype(int)
        near_vein = veins[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].any()
        assert not (code == HEMORRHAGE and near_vein), f"vein reported as microbleed at {(i, j, k)}"
    assert n_truth_listed >= 1 and len(groups) == n_truth_listed  # nothing but true foci listed
