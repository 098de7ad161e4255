"""The README's first command: ``qsmnode demo`` on sample_dicom/ ends with valid outputs and a summary."""

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.dciodvfy import assert_valid

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_receives_the_sample_and_returns_every_output(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qsmnode.cli", "demo", "--workdir", str(tmp_path), "--device", "cpu",
         "--timeout", "600"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "output series in" in result.stdout
    series = sorted(p for p in (tmp_path / "pacs").iterdir() if p.is_dir())
    kinds = {}
    for folder in series:
        first = sorted(folder.glob("*.dcm"))[0]
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        kinds.setdefault(str(ds.SeriesDescription).split()[0], []).append(first)
    for kind in ("QSM", "SWI", "MINIP", "R2STAR", "QSM_PM", "SR", "SUMMARY"):
        assert len(kinds.get(kind, [])) == 2, sorted(kinds)  # one per sample study
    for paths in kinds.values():
        assert_valid(paths[0])
