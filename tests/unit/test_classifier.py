"""The tracker's classifier process: the same answers as in-process classification, for
instances given as bytes or as paths; an unreadable one gives its error; a dead child is
started again."""

import os
import signal

import pydicom
import pytest

from qsmnode.dicom.classify import classify_instance
from qsmnode.node.classifier import Classified, ClassifierProcess, classify_sources


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from qsmnode.simulate.scan import simulate_scan

    return simulate_scan(tmp_path_factory.mktemp("scan"), vendor="ge", matrix=(16, 16, 8), echo_times_ms=[4.0, 8.0])


def test_child_classifies_bytes_and_paths_like_the_node_would(scan):
    paths = [str(p) for p in scan.paths[:6]]
    sources = [open(p, "rb").read() for p in paths[:3]] + paths[3:] + [b"not DICOM at all"]
    classifier = ClassifierProcess()
    try:
        results = classifier(sources)
    finally:
        classifier.close()
    assert len(results) == 7
    for path, result in zip(paths, results):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert isinstance(result, Classified)
        assert result.info == classify_instance(ds)
        assert result.instance_number == int(ds.InstanceNumber)
        assert result.description == str(ds.SeriesDescription)
    assert isinstance(results[-1], str) and results[-1]  # the reason, e.g. InvalidDicomError: ...


def test_a_killed_child_is_started_again(scan):
    classifier = ClassifierProcess()
    try:
        assert isinstance(classifier([str(scan.paths[0])])[0], Classified)
        (pid,) = classifier._executor._processes  # the one child
        os.kill(pid, signal.SIGKILL)
        results = classifier([str(p) for p in scan.paths[:3]])
        assert all(isinstance(r, Classified) for r in results)
        assert pid not in classifier._executor._processes
    finally:
        classifier.close()


def test_in_process_classification_uses_the_given_function(scan):
    (result,) = classify_sources([str(scan.paths[0])], classify=lambda ds: "stub info")
    assert result.info == "stub info"
