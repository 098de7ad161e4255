"""Derived classic MR series, deterministic UIDs, durable writing, and every output's validity."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from qsmnode.acquisition import Acquisition, SourceReference
from qsmnode.recon.result import ReconResult, StepRecord


def oblique_affine(voxel_size_mm=(1.0, 1.2, 2.0), origin=(-90.0, -110.0, -40.0)) -> np.ndarray:
    """A 4x4 LPS affine, rotated 15 degrees about x then 10 about z (an oblique acquisition)."""
    a, b = np.deg2rad(15.0), np.deg2rad(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(voxel_size_mm)
    affine[:3, 3] = origin
    return affine


def source_header(series_number: int = 7) -> Dataset:
    header = Dataset()
    header.PatientName = "QSM^Phantom"
    header.PatientID = "QSM-0001"
    header.PatientBirthDate = "19700101"
    header.PatientSex = "O"
    header.StudyInstanceUID = generate_uid(entropy_srcs=["study", "qsmnode-test"])
    header.StudyDate = "20240102"
    header.StudyTime = "101500"
    header.StudyID = "1"
    header.AccessionNumber = "ACC123"
    header.ReferringPhysicianName = "Doe^Jane"
    header.StudyDescription = "MR brain"
    header.FrameOfReferenceUID = generate_uid(entropy_srcs=["for", "qsmnode-test"])
    header.PositionReferenceIndicator = ""
    header.Manufacturer = "SIEMENS"
    header.ManufacturerModelName = "Prisma"
    header.InstitutionName = "Test Hospital"
    header.StationName = "MR1"
    header.DeviceSerialNumber = "12345"
    header.SoftwareVersions = "syngo MR XA30"
    header.SeriesNumber = series_number
    header.MagneticFieldStrength = 3
    header.ImagingFrequency = 123.255
    header.ScanningSequence = "GR"
    header.SequenceVariant = ["SP", "SK"]
    header.ScanOptions = ""
    header.MRAcquisitionType = "3D"
    header.RepetitionTime = 30.0
    header.FlipAngle = 15
    header.SliceThickness = 2.0
    header.PatientPosition = "HFS"
    return header


def synthetic_case(shape=(40, 36, 24), voxel_size_mm=(1.0, 1.2, 2.0), seed=0,
                   n_echoes=3) -> tuple[Acquisition, ReconResult]:
    """An oblique acquisition and a result with a few paramagnetic / diamagnetic spheres."""
    rng = np.random.default_rng(seed)
    affine = oblique_affine(voxel_size_mm)
    header = source_header()
    mag_series = generate_uid(entropy_srcs=["mag", str(seed)])
    phase_series = generate_uid(entropy_srcs=["phase", str(seed)])
    mr = "1.2.840.10008.5.1.4.1.1.4"
    instances = []
    for k in range(shape[2]):
        refs = []
        for e in range(n_echoes):
            for series, label in ((mag_series, "m"), (phase_series, "p")):
                refs.append(SourceReference(mr, generate_uid(entropy_srcs=[label, str(k),
                                                                           str(e), str(seed)]),
                                            series))
        instances.append(refs)
    te = np.array([0.005 + 0.006 * e for e in range(n_echoes)])
    signal = (rng.random(shape + (n_echoes,)) + 0.5).astype(np.complex64)
    acquisition = Acquisition(
        signal=signal, echo_times_s=te, b0_tesla=123.255 / 42.57747892, affine=affine,
        vendor="siemens", phase_sign_validated=True, header=header,
        source_series_uids=(mag_series, phase_series), source_instances=instances,
        provenance=["siemens phase used as stored"], warnings=[])
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2.0
    r2 = ((ii - c[0]) / (shape[0] * 0.42)) ** 2 + ((jj - c[1]) / (shape[1] * 0.42)) ** 2 + (
        (kk - c[2]) / (shape[2] * 0.45)) ** 2
    mask = r2 < 1.0
    chi = rng.normal(0.0, 0.02, shape)
    chi[(ii - 14) ** 2 + (jj - 12) ** 2 + ((kk - 12) * 2) ** 2 <= 9] = 0.9
    chi[(ii - 26) ** 2 + (jj - 22) ** 2 + ((kk - 10) * 2) ** 2 <= 9] = -0.7
    chi[3:6, 3:6, 3:6] = 40.0  # clipped to int16 range outside the mask anyway -> 0
    chi[20, 18, 12] = 50.0  # inside the mask: clipped to 32767 ppb
    chi = (chi * mask).astype(np.float32)
    r2star = (rng.random(shape) * 80.0).astype(np.float32) * mask
    swi = (rng.random(shape) * 700.0 + 100).astype(np.float32) * mask
    minip = np.minimum(swi, np.roll(swi, 1, axis=2))
    steps = [
        StepRecord("brain_mask", "magnitude threshold + morphology", "Smith SM. HBM 2002",
                   {"threshold": 0.2}, 0.1),
        StepRecord("unwrapping", "Laplacian", "Schofield MA, Zhu Y. Opt Lett 2003;28:1194",
                   {}, 0.2),
        StepRecord("echo_combination", "weighted linear fit", "Wu B et al. 2012",
                   {"echo_times_s": [float(t) for t in te]}, 0.1),
        StepRecord("background_removal", "V-SHARP", "Wu B et al. MRM 2012;67:137-147",
                   {"radii_mm": [12, 10, 8, 6, 4, 2], "tsvd": 0.05}, 0.5),
        StepRecord("dipole_inversion", "iLSQR", "Li W et al. NeuroImage 2015;108:111-122",
                   {"tolerance": 0.01, "max_iterations": 30}, 1.5),
        StepRecord("referencing", "whole-brain mean", "QSM consensus, MRM 2024", {}, 0.01),
    ]
    result = ReconResult(
        chi_ppm=chi, mask=mask, r2star_per_s=r2star,
        t2star_ms=np.where(r2star > 0, 1000.0 / np.maximum(r2star, 1e-3), 0).astype(np.float32),
        swi=swi, minip=minip, total_field_hz=np.zeros(shape, np.float32),
        local_field_hz=np.zeros(shape, np.float32), field_noise_hz=np.ones(shape, np.float32),
        reference_region="whole_brain", reference_ppm={"whole_brain": 0.0, "csf": -0.012},
        steps=steps, preset={"name": "3T", "b0_tesla": 2.89, "inversion": "iLSQR"},
        quality={"mask_volume_ml": float(mask.sum() * np.prod(voxel_size_mm) / 1000),
                 "unreliable_phase_fraction": 0.03, "fit_residual": 0.012,
                 "seconds_total": 2.41},
        device="cpu", warnings=["test warning: nothing wrong"])
    return acquisition, result
