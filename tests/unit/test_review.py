"""What the node reports: findings rules (size, mask edge, cap), and a low-confidence result whose
warnings reach the SR, the summary image, the log and the job record, with its findings withheld."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest

import tests.dciodvfy as dciodvfy
from qsmnode.report import review as rv
from qsmnode.report.findings import Focus, find_foci
from qsmnode.report.summary_image import WARNING_RGB, build_summary_images, summary_lines
from test_plausibility import brain_sized_case
from test_sr import build_sr, focus_groups, items, name, texts
from test_summary_image import _colour_pixels

SHORT_ECHOES_S = (0.0023, 0.0046)


def focus(kind="paramagnetic", peak=0.5, n_voxels=4, voxel_mm3=8.0, edge_mm=20.0, k=10.0):
    return Focus(kind, (10.0, 10.0, k), n_voxels * voxel_mm3, peak * 0.8, peak, 1.2,
                 (6 * n_voxels * voxel_mm3 / np.pi) ** (1 / 3), n_voxels, edge_mm)


# ----------------------------------------------------------------------------- findings rules
def test_single_voxel_and_tiny_candidates_are_not_findings():
    one_voxel = focus(n_voxels=1, voxel_mm3=27.0)  # a 3 mm voxel: 27 mm3 but one voxel
    tiny = focus(n_voxels=3, voxel_mm3=1.0)  # 3 mm3
    real = focus(n_voxels=2, voxel_mm3=8.0)  # 2 voxels, 16 mm3
    selection = rv.select_findings([one_voxel, tiny, real], (2.0, 2.0, 2.0))
    assert selection.listed == [real] and selection.too_small == [one_voxel, tiny]


def test_candidates_at_the_mask_edge_are_counted_apart(monkeypatch):
    monkeypatch.setattr(rv, "BOUNDARY_MARGIN_VOXELS", 1)  # a site's wider margin (default 0)
    vox = (3.0, 3.0, 3.0)  # margin 1 voxel = 3 mm: the mask's outermost layer
    edge = focus(edge_mm=3.0)
    deep = focus(edge_mm=6.0, kind="diamagnetic", peak=-0.4)
    selection = rv.select_findings([edge, deep], vox)
    assert selection.boundary == [edge] and selection.listed == [deep]
    review = rv.Review([], [edge, deep], selection, vox)
    assert any("1 candidates within 3 mm of the mask edge" in s for s in review.findings_sentences())


def test_at_most_max_listed_the_most_extreme_and_the_rest_counted():
    candidates = [focus(peak=0.2 + 0.01 * n) for n in range(25)] + [focus("diamagnetic", -0.9)]
    selection = rv.select_findings(candidates, (1.0, 1.0, 1.0))
    assert len(selection.listed) == rv.MAX_LISTED_FINDINGS and len(selection.unlisted) == 6
    assert selection.listed[-1].kind == "diamagnetic"  # the most extreme is kept, listed last
    assert min(abs(f.peak_ppm) for f in selection.listed) > max(abs(f.peak_ppm) for f in selection.unlisted)
    sentences = rv.Review([], candidates, selection).findings_sentences()
    assert "6 more candidate foci (6 paramagnetic, 0 diamagnetic) not listed" in sentences[0]


def test_a_low_confidence_result_withholds_every_candidate():
    candidates = [focus(), focus("diamagnetic", -0.6), focus(n_voxels=1)]
    selection = rv.select_findings(candidates, (2.0, 2.0, 2.0), withheld_reason="short echoes")
    assert selection.listed == [] and selection.reported == [] and selection.withheld == candidates


def test_find_foci_measures_the_distance_to_the_mask_edge_and_field_of_view():
    vox = (2.0, 2.0, 2.0)
    shape = (40, 40, 40)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mask = np.zeros(shape, bool)
    mask[5:35, 5:35, 0:35] = True  # touches the first slice: the field of view cuts it
    chi = np.zeros(shape, np.float32)
    for centre in ((7, 20, 20), (20, 20, 20), (20, 12, 2)):
        chi[(ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2 <= 1] = 0.8
    foci = {tuple(int(round(c)) for c in f.centroid_ijk): f for f in find_foci(chi, mask, vox)}
    assert foci[(7, 20, 20)].edge_distance_mm == pytest.approx(6.0)  # its centre i=7: 3 voxels in
    assert foci[(20, 20, 20)].edge_distance_mm == pytest.approx(30.0)  # k=20 to k=35
    assert foci[(20, 12, 2)].edge_distance_mm == pytest.approx(6.0)  # k=2: 3 voxels from the cut
    # three voxels under the edge is where cortical lesions are: listed
    selection = rv.select_findings(list(foci.values()), vox)
    assert len(selection.listed) == 3 and selection.boundary == []


# ----------------------------------------------------------------------------- low confidence
@pytest.fixture(scope="module")
def short_echo_case():
    """An adult-sized brain reconstructed from 2.3/4.6 ms echoes at 3 T, with two real-looking
    foci in it: plausible in every way but the echoes."""
    acquisition, result = brain_sized_case(te_s=SHORT_ECHOES_S)
    chi = result.chi_ppm
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in chi.shape], indexing="ij")
    for centre, value in (((30, 30, 28), 0.9), ((36, 44, 24), -0.7)):
        chi[(ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2 <= 1] = value
    review = rv.review_result(acquisition, result)
    return acquisition, result, review


def test_short_echoes_give_a_low_confidence_review_with_withheld_findings(short_echo_case):
    acquisition, _, review = short_echo_case
    assert review.low_confidence and [c.check for c in review.concerns] == ["echo_times"]
    assert len(review.candidates) == 2 and review.findings.withheld == review.candidates
    assert review.banner().startswith("LOW CONFIDENCE - findings withheld: echoes too short")
    summary = review.summary()
    assert summary["low_confidence"] and summary["findings"]["withheld"] == 2
    assert summary["concerns"][0]["value"] == pytest.approx(4.6 * acquisition.b0_tesla, rel=1e-3)


def test_the_same_case_with_proper_echoes_lists_its_foci():
    acquisition, result = brain_sized_case()
    chi = result.chi_ppm
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in chi.shape], indexing="ij")
    chi[(ii - 30) ** 2 + (jj - 30) ** 2 + (kk - 28) ** 2 <= 1] = 0.9
    review = rv.review_result(acquisition, result)
    assert not review.low_confidence and review.banner() == ""
    assert [f.kind for f in review.findings.listed] == ["paramagnetic"]


@pytest.fixture(scope="module")
def low_confidence_sr(short_echo_case, tmp_path_factory):
    acquisition, result, review = short_echo_case
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr(acquisition, result, review).save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


def test_low_confidence_sr_states_why_and_withholds_its_findings(low_confidence_sr):
    ds, _ = low_confidence_sr
    text = texts(ds)
    assert "LOW CONFIDENCE - findings withheld" in text
    assert "Warning: echo times too short for the field" in text and "No warnings." not in text
    assert "Findings withheld: the result is low-confidence (echoes too short" in text
    assert "2 automated candidate foci (1 paramagnetic, 1 diamagnetic)" in text
    assert focus_groups(ds) == []  # no focus is listed as a finding
    assert not [i for i in items(ds) if i.ValueType == "NUM"
                and name(i).startswith("Number of candidate")]
    confidence = [i.ConceptCodeSequence[0].CodeMeaning for i in items(ds)
                  if i.ValueType == "CODE" and name(i) == "Result confidence"]
    assert confidence == ["Low confidence: findings withheld"]


@pytest.mark.skipif(not dciodvfy.AVAILABLE, reason="dicom3tools dciodvfy not installed")
def test_low_confidence_sr_passes_dciodvfy(low_confidence_sr):
    dciodvfy.assert_valid(low_confidence_sr[1])


def test_plausible_sr_says_so():
    acquisition, result = brain_sized_case()
    ds = build_sr(acquisition, result, rv.review_result(acquisition, result))
    assert "LOW CONFIDENCE" not in texts(ds) and "Findings withheld" not in texts(ds)
    assert [i.ConceptCodeSequence[0].CodeMeaning for i in items(ds)
            if i.ValueType == "CODE" and name(i) == "Result confidence"] == ["No plausibility concern"]


def test_summary_image_shows_the_low_confidence_banner(short_echo_case, tmp_path):
    acquisition, result, review = short_echo_case
    lines = summary_lines(acquisition, result, review, "0.1.0")
    assert lines[1] == "LOW CONFIDENCE - findings withheld; read the map itself:"
    assert lines[2].startswith("  - echoes too short: last TE 4.6 ms at 2.9 T")
    (ds,) = build_summary_images(acquisition, result, review, software_version="0.1.0")
    assert ds.ImageComments.startswith("LOW CONFIDENCE - findings withheld: echoes too short")
    rgb = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns, 3)
    assert _colour_pixels(rgb, WARNING_RGB) > 100  # the banner, drawn in amber
    path = tmp_path / "summary.dcm"
    ds.save_as(path, enforce_file_format=True)
    if dciodvfy.AVAILABLE:
        dciodvfy.assert_valid(path)
    plausible_acq, plausible = brain_sized_case()
    (ok,) = build_summary_images(plausible_acq, plausible, rv.review_result(plausible_acq, plausible),
                                 software_version="0.1.0")
    ok_rgb = np.frombuffer(ok.PixelData, np.uint8).reshape(ok.Rows, ok.Columns, 3)
    assert "ImageComments" not in ok and _colour_pixels(ok_rgb, WARNING_RGB) == 0


# ----------------------------------------------------------------------------- log, job record
@pytest.fixture(scope="module")
def short_echo_scan(tmp_path_factory):
    from qsmnode.simulate.scan import simulate_scan

    return simulate_scan(tmp_path_factory.mktemp("short"), vendor="siemens", field_tesla=3.0,
                         matrix=(64, 64, 48), voxel_size_mm=(3.0, 3.0, 3.0), seed=4,
                         echo_times_ms=[2.3, 4.6])


def test_process_summary_and_log_carry_the_low_confidence(short_echo_scan, tmp_path, caplog):
    from qsmnode.process import process_paths

    with caplog.at_level(logging.WARNING, logger="qsmnode.process"):
        outcome = process_paths([short_echo_scan.dicom_dir], tmp_path / "out", device="cpu")
    summary = outcome.summary
    assert summary["low_confidence"] is True
    assert summary["concerns"][0]["check"] == "echo_times"
    assert any(w.startswith("echo times too short for the field") for w in summary["warnings"])
    assert summary["findings"]["listed"] == 0
    assert summary["findings"]["withheld"] == summary["findings"]["candidates"]
    assert any("low-confidence result, findings withheld: echoes too short" in r.getMessage()
               for r in caplog.records)
    sr = pydicom.dcmread(next((tmp_path / "out").rglob("SR/*.dcm")))
    assert "Findings withheld" in texts(sr) and focus_groups(sr) == []


def test_worker_records_a_low_confidence_job_with_its_reason_and_logs_it(tmp_path, caplog):
    from qsmnode.config import NodeConfig
    from qsmnode.node.worker import WorkerPool, low_confidence_reason
    from test_worker import FakeIndex

    index = FakeIndex([])
    audit_lines = []

    class Audit:
        def record(self, event, **fields):
            audit_lines.append({"event": event, **fields})

    pool = WorkerPool(NodeConfig(storage=tmp_path / "node", device="cpu"), index, None, audit=Audit())
    summary = {"low_confidence": True, "warnings": ["echo times too short for the field: ..."],
               "concerns": [{"check": "echo_times", "headline": "echoes too short: last TE 4.6 ms",
                             "value": 13.8}]}
    job = {"id": "j1", "acquisition_id": 1, "destinations": []}
    with caplog.at_level(logging.WARNING, logger="qsmnode.worker"):
        assert pool._succeed(job, tmp_path, {"output_paths": []}, [], summary, 1.0) == "done"
    record = index.finished["j1"]
    assert record["state"] == "done" and record["summary"]["low_confidence"]
    assert record["reason"] == "low confidence, findings withheld: echoes too short: last TE 4.6 ms"
    assert any("low confidence, findings withheld" in r.getMessage() for r in caplog.records)
    assert audit_lines[-1]["low_confidence"] is True and audit_lines[-1]["concerns"] == ["echo_times"]
    assert low_confidence_reason({"low_confidence": False}) is None


# ----------------------------------------------------------------------------- a normal scan
def test_normal_simulated_scan_is_not_low_confidence_and_lists_its_foci(tmp_path):
    """A standard 3 T protocol (echoes 4-28 ms) at 1 x 1 x 2 mm, where the phantom's
    microbleeds (radius 1-2 mm) span several voxels: no concern, every microbleed and
    calcification listed with its sign where the truth has it, nothing else."""
    import json

    from qsmnode.dicom.load import load_acquisition
    from qsmnode.process import reconstruct_acquisition
    from qsmnode.simulate.scan import simulate_scan
    from test_sr import CALCIFICATION, HEMORRHAGE

    scan = simulate_scan(tmp_path / "scan", vendor="siemens", field_tesla=3.0,
                         matrix=(192, 192, 72), voxel_size_mm=(1.0, 1.0, 2.0), seed=3)
    acquisition = load_acquisition([scan.dicom_dir])
    result = reconstruct_acquisition(acquisition, device="cpu")
    review = rv.review_result(acquisition, result)
    assert not review.low_confidence, review.warnings
    sr = build_sr(acquisition, result, review)
    assert "LOW CONFIDENCE" not in texts(sr)
    truth = json.loads((scan.truth_dir / "truth.json").read_text())
    affine = np.asarray(truth["affine"], dtype=float)
    groups = focus_groups(sr)
    assert len(groups) == len(truth["microbleeds"]) + len(truth["calcifications"])
    for code, key in ((HEMORRHAGE, "microbleeds"), (CALCIFICATION, "calcifications")):
        for focus_truth in truth[key]:
            centre = affine[:3, :3] @ np.asarray(focus_truth["center_ijk"], float) + affine[:3, 3]
            assert min(np.linalg.norm(g[3] - centre) for g in groups if g[0] == code) < 3.0, key
