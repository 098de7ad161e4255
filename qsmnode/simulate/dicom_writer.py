"""Write a complex multi-echo GRE signal as DICOM the way each vendor does.

Input: ``signal`` complex ``[i, j, k, echo]`` in the internal phase convention of DESIGN.md (a
paramagnetic source gives a phase that grows with TE), a :class:`SlabGeometry` and the echo
times. Output: one file per instance in vendor-typical layout:

- ``siemens``: classic MR, separate magnitude (ImageType ``ORIGINAL\\PRIMARY\\M\\ND\\NORM``) and
  phase (``...\\P\\ND``) series; 12-bit phase 0..4095 with RescaleSlope 2 / Intercept -4096
  (``siemens_phase_rescale=False``: no rescale); ImagesInAcquisition = slices x echoes;
  ``xa_interop=True`` mimics XA "interoperability" classic exports (a StudyInstanceUID per echo
  volume).
- ``siemens-enhanced``: XA Enhanced MR multi-frame, one instance per echo and component,
  per-frame ComplexImageComponent, PixelValueTransformationSequence, TE only in MREchoSequence,
  frequency only in MRImagingModifierSequence.
- ``ge``: one interleaved series, private (0043,102F) 0/1/2/3 = magnitude/phase/real/imaginary,
  phase in milliradians (int16), the GE handedness (stored phase negated) and a pi phase offset
  on alternate slices.
- ``philips``: classic, one series with ``M_FFE`` and ``PHASE MAP`` images, phase in mrad through
  the display rescale, private scale slope (2005,100E), InstanceNumbers in random order.
- ``philips-enhanced``: one Enhanced MR instance with every frame (random frame order),
  per-frame rescale to mrad.
- ``canon``: classic, one series, ImageType ``...\\PHASE``, phase in mrad (sign not validated).

Pixel values are quantised as the scanners do (12-bit magnitude and phase), so a reader gets the
signal back within quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    generate_uid,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

VENDOR_FLAVOURS = ("siemens", "siemens-enhanced", "ge", "philips", "philips-enhanced", "canon")

_MANUFACTURER = {
    "siemens": ("SIEMENS", "Prisma", "syngo MR E11"),
    "siemens-enhanced": ("Siemens Healthineers", "MAGNETOM Prisma Fit", "syngo MR XA30"),
    "ge": ("GE MEDICAL SYSTEMS", "SIGNA Premier", "27\\LX\\MR Software release:RX27.0_R05"),
    "philips": ("Philips", "Ingenia Elition X", "5.7.1\\5.7.1.1"),
    "philips-enhanced": ("Philips Medical Systems", "Ingenia", "5.7.1\\5.7.1.1"),
    "canon": ("Canon_Medical_Systems", "Vantage Galan 3T", "V6.0"),
}


@dataclass(frozen=True)
class SlabGeometry:
    """Geometry of the imaged slab. ``orientation``: ImageOrientationPatient (row cosine, column
    cosine); ``origin_mm``: LPS position of voxel (0, 0, 0); ``voxel_size_mm`` along (i, j, k);
    ``shape`` (ni, nj, nk) = (Columns, Rows, slices)."""

    orientation: tuple[float, ...]
    origin_mm: tuple[float, float, float]
    voxel_size_mm: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def affine(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.orientation[:3]) * self.voxel_size_mm[0]
        a[:3, 1] = np.asarray(self.orientation[3:]) * self.voxel_size_mm[1]
        a[:3, 2] = self.normal * self.voxel_size_mm[2]
        a[:3, 3] = self.origin_mm
        return a

    def position(self, k: int) -> list[float]:
        return [
            float(v) for v in np.asarray(self.origin_mm) + k * self.voxel_size_mm[2] * self.normal
        ]


@dataclass
class WriterOptions:
    """Knobs for vendor variants (defaults = what the vendor usually writes)."""

    siemens_phase_rescale: bool = True
    xa_interop: bool = False
    ge_components: tuple[str, ...] = ("magnitude", "phase", "real", "imaginary")
    ge_slice_pi_offset: bool = True
    patient_name: str = "QSM^Phantom"
    patient_id: str = "QSMPHANTOM01"
    extra: dict = field(default_factory=dict)  # keyword -> value set on every instance


def _uid(*parts) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def _ds_str(value: float) -> str:
    s = f"{value:.6f}".rstrip("0").rstrip(".")
    return s if len(s) <= 16 else f"{value:.8g}"


def _quantise_magnitude(mag: np.ndarray, target_max: float = 3000.0) -> tuple[np.ndarray, float]:
    scale = target_max / max(float(np.percentile(mag, 99.9)), 1e-12)
    return np.clip(np.rint(mag * scale), 0, 4095).astype(np.uint16), scale


def _wrap(phase: np.ndarray) -> np.ndarray:
    return (phase + np.pi) % (2 * np.pi) - np.pi


def _base_dataset(vendor: str, study: dict, sop_class: str) -> Dataset:
    manufacturer, model, software = _MANUFACTURER[vendor]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = study["date"]
    ds.SeriesDate = study["date"]
    ds.AcquisitionDate = study["date"]
    ds.ContentDate = study["date"]
    ds.StudyTime = "101500"
    ds.AccessionNumber = study["accession"]
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "Simulated Imaging Centre"
    ds.ReferringPhysicianName = "Referrer^Simulated"
    ds.StationName = "SIMMR01"
    ds.StudyDescription = "BRAIN^QSM"
    ds.ManufacturerModelName = model
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "055Y"
    ds.PatientWeight = "70"
    ds.BodyPartExamined = "BRAIN"
    ds.DeviceSerialNumber = "166042"
    ds.SoftwareVersions = software
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study["study_uid"]
    ds.StudyID = "1"
    ds.FrameOfReferenceUID = study["for_uid"]
    ds.PositionReferenceIndicator = ""
    ds.MagneticFieldStrength = _ds_str(study["field_label"])
    ds.ImagedNucleus = "1H"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    return ds


def _classic_mr(
    ds: Dataset, geom: SlabGeometry, study: dict, te_ms: float, echo: int, n_echoes: int
) -> None:
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SP", "OSP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.SliceThickness = _ds_str(geom.voxel_size_mm[2])
    ds.SpacingBetweenSlices = _ds_str(geom.voxel_size_mm[2])
    ds.RepetitionTime = _ds_str(study["tr_ms"])
    ds.EchoTime = _ds_str(te_ms)
    ds.EchoNumbers = echo
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _ds_str(study["frequency_mhz"])
    ds.EchoTrainLength = n_echoes
    ds.FlipAngle = _ds_str(study["flip_deg"])
    ds.PixelBandwidth = "260"
    ds.ImageOrientationPatient = [_ds_str(v) for v in geom.orientation]
    ds.PixelSpacing = [_ds_str(geom.voxel_size_mm[1]), _ds_str(geom.voxel_size_mm[0])]
    ds.Rows = geom.shape[1]
    ds.Columns = geom.shape[0]


def _save(ds: Dataset, path: Path, pixels: np.ndarray, transfer_syntax: str | None) -> None:
    """Attach pixel data (frames, rows, cols) and write with the requested transfer syntax."""
    ts = transfer_syntax or ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    meta.ImplementationVersionName = "QSMNODE_SIM"
    ds.file_meta = meta
    arr = pixels if pixels.shape[0] > 1 else pixels[0]
    ds.PixelData = (
        np.ascontiguousarray(arr).astype("<i2" if ds.PixelRepresentation else "<u2").tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts in (ExplicitVRLittleEndian,):
        ds.save_as(path, enforce_file_format=True)
    elif ts == ImplicitVRLittleEndian:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    elif ts == DeflatedExplicitVRLittleEndian:
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.compress(ts, arr, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)


def write_gre_dicom(
    outdir,
    signal: np.ndarray,
    geom: SlabGeometry,
    *,
    vendor: str,
    echo_times_ms,
    frequency_mhz: float,
    field_label: float,
    seed: int = 0,
    transfer_syntax: str | None = None,
    options: WriterOptions | None = None,
) -> list[Path]:
    """Write ``signal`` (complex ``[i, j, k, echo]``, internal phase convention) as ``vendor``
    DICOM under ``outdir``; returns the written paths. Echo times in ms, frequency in MHz."""
    if vendor not in VENDOR_FLAVOURS:
        raise ValueError(
            f"unknown vendor flavour {vendor!r}; choose one of {', '.join(VENDOR_FLAVOURS)}"
        )
    options = options or WriterOptions()
    outdir = Path(outdir)
    signal = np.asarray(signal)
    te = [float(t) for t in echo_times_ms]
    if (
        signal.ndim != 4
        or signal.shape[3] != len(te)
        or tuple(signal.shape[:3]) != tuple(geom.shape)
    ):
        raise ValueError(
            f"signal shape {signal.shape} does not match geometry {geom.shape} x {len(te)} echoes"
        )
    study = {
        "date": "20240315",
        "accession": f"SIM{seed:06d}",
        "patient_name": options.patient_name,
        "patient_id": options.patient_id,
        "study_uid": _uid("study", seed, options.patient_id),
        "for_uid": _uid("for", seed, vendor, options.patient_id),
        "field_label": field_label,
        "frequency_mhz": frequency_mhz,
        "tr_ms": max(te) + 8.0,
        "flip_deg": 15.0,
    }
    writer = {
        "siemens": _write_siemens,
        "canon": _write_canon,
        "ge": _write_ge,
        "philips": _write_philips,
        "siemens-enhanced": _write_enhanced,
        "philips-enhanced": _write_enhanced,
    }[vendor]
    return writer(outdir, signal, geom, vendor, te, study, seed, transfer_syntax, options)


def _apply_extra(ds: Dataset, options: WriterOptions) -> None:
    for keyword, value in options.extra.items():
        setattr(ds, keyword, value)


def _write_siemens(outdir, signal, geom, vendor, te, study, seed, ts, options):
    mag, _ = _quantise_magnitude(np.abs(signal))
    phase = _wrap(np.angle(signal))
    stored_phase = (np.rint((phase + np.pi) * (4096 / (2 * np.pi))).astype(np.int64) % 4096).astype(
        np.uint16
    )
    n_sl, n_ec = geom.shape[2], len(te)
    paths = []
    for comp, series_no, image_type, data in (
        ("magnitude", 5, ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], mag),
        ("phase", 6, ["ORIGINAL", "PRIMARY", "P", "ND"], stored_phase),
    ):
        series_uid = _uid("series", seed, vendor, comp)
        number = 0
        for e in range(n_ec):
            study_uid = _uid("xa-study", seed, e) if options.xa_interop else study["study_uid"]
            for k in range(n_sl):
                number += 1
                ds = _base_dataset(vendor, study, MR_IMAGE_STORAGE)
                ds.StudyInstanceUID = study_uid
                ds.ImageType = image_type
                ds.SOPInstanceUID = _uid("sop", seed, vendor, comp, e, k)
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = series_no
                ds.SeriesDescription = (
                    "gre_qsm_5echo" if not options.xa_interop else f"gre_qsm_e{e + 1}"
                )
                ds.ProtocolName = "gre_qsm_5echo"
                ds.SequenceName = f"*fl3d{n_ec}r"
                ds.SeriesTime = "102000"
                ds.AcquisitionTime = "102010.250000"
                ds.ContentTime = "102300"
                ds.AcquisitionNumber = 1
                ds.InstanceNumber = number
                ds.ImagesInAcquisition = n_sl * n_ec
                _classic_mr(ds, geom, study, te[e], e + 1, n_ec)
                ds.ImagePositionPatient = [_ds_str(v) for v in geom.position(k)]
                ds.SliceLocation = _ds_str(float(np.dot(geom.position(k), geom.normal)))
                ds.BitsStored = 12
                ds.HighBit = 11
                ds.PixelRepresentation = 0
                if comp == "phase" and options.siemens_phase_rescale:
                    ds.RescaleIntercept = "-4096"
                    ds.RescaleSlope = "2"
                    ds.RescaleType = "US"
                    ds.WindowCenter, ds.WindowWidth = "0", "8192"
                else:
                    ds.WindowCenter, ds.WindowWidth = "1500", "3000"
                ds.add_new((0x0051, 0x0010), "LO", "SIEMENS CSA HEADER")
                ds.add_new((0x0051, 0x100F), "LO", "HEA;HEP")
                _apply_extra(ds, options)
                path = outdir / f"{series_no:03d}_gre_qsm_{comp}" / f"IM_{number:05d}.dcm"
                _save(ds, path, data[:, :, k, e].T[None], ts)
                paths.append(path)
    return paths


def _write_canon(outdir, signal, geom, vendor, te, study, seed, ts, options):
    mag, _ = _quantise_magnitude(np.abs(signal))
    phase = _wrap(np.angle(signal))
    slope = 2 * 3142 / 4095
    stored_phase = np.clip(np.rint((phase * 1000 + 3142) / slope), 0, 4095).astype(np.uint16)
    series_uid = _uid("series", seed, vendor)
    paths, number = [], 0
    for comp, image_type, data in (
        ("magnitude", ["ORIGINAL", "PRIMARY", "MR", "MAGNITUDE"], mag),
        ("phase", ["ORIGINAL", "PRIMARY", "MR", "PHASE"], stored_phase),
    ):
        for e in range(len(te)):
            for k in range(geom.shape[2]):
                number += 1
                ds = _base_dataset(vendor, study, MR_IMAGE_STORAGE)
                ds.ImageType = image_type
                ds.SOPInstanceUID = _uid("sop", seed, vendor, comp, e, k)
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = 7
                ds.SeriesDescription = "3D FFE QSM"
                ds.ProtocolName = "QSM_3D_FFE"
                ds.InstanceNumber = number
                _classic_mr(ds, geom, study, te[e], e + 1, len(te))
                ds.ImagePositionPatient = [_ds_str(v) for v in geom.position(k)]
                ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
                if comp == "phase":
                    ds.RescaleIntercept, ds.RescaleSlope = "-3142", _ds_str(slope)
                _apply_extra(ds, options)
                path = outdir / "007_qsm" / f"IM{number:05d}.dcm"
                _save(ds, path, data[:, :, k, e].T[None], ts)
                paths.append(path)
    return paths


def _write_ge(outdir, signal, geom, vendor, te, study, seed, ts, options):
    stored = np.conj(signal)  # GE handedness: the stored phase is the negative of ours
    if options.ge_slice_pi_offset:
        stored = stored.copy()
        stored[:, :, 1::2, :] *= -1
    amp = np.abs(stored)
    ref = max(float(np.percentile(amp, 99.9)), 1e-12)
    data = {
        "magnitude": (np.clip(np.rint(amp * (3000 / ref)), 0, 32767)).astype(np.int16),
        "phase": np.clip(np.rint(_wrap(np.angle(stored)) * 1000), -3142, 3142).astype(np.int16),
        "real": np.clip(np.rint(stored.real * (12000 / ref)), -32768, 32767).astype(np.int16),
        "imaginary": np.clip(np.rint(stored.imag * (12000 / ref)), -32768, 32767).astype(np.int16),
    }
    codes = {"magnitude": 0, "phase": 1, "real": 2, "imaginary": 3}
    series_uid = _uid("series", seed, vendor)
    comps = [c for c in ("magnitude", "phase", "real", "imaginary") if c in options.ge_components]
    n_sl, n_ec = geom.shape[2], len(te)
    paths, number = [], 0
    for k in range(n_sl):
        for e in range(n_ec):
            for comp in comps:
                number += 1
                ds = _base_dataset(vendor, study, MR_IMAGE_STORAGE)
                ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
                ds.SOPInstanceUID = _uid("sop", seed, vendor, comp, e, k)
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = 4
                ds.SeriesDescription = "AX 3D MEGRE QSM"
                ds.ProtocolName = "NEURO QSM"
                ds.InstanceNumber = number
                ds.ImagesInAcquisition = n_sl * n_ec * len(comps)
                _classic_mr(ds, geom, study, te[e], e + 1, n_ec)
                ds.SequenceName = "efgre3d"
                ds.ImagePositionPatient = [_ds_str(v) for v in geom.position(k)]
                ds.SliceLocation = _ds_str(float(np.dot(geom.position(k), geom.normal)))
                ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
                block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
                block.add_new(0x2F, "SS", codes[comp])
                ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0xA2, "SL", n_ec)
                _apply_extra(ds, options)
                path = outdir / "004_megre" / f"i{number:06d}.dcm"
                _save(ds, path, data[comp][:, :, k, e].T[None], ts)
                paths.append(path)
    return paths


def _write_philips(outdir, signal, geom, vendor, te, study, seed, ts, options):
    rng = np.random.default_rng(seed + 7)
    amp = np.abs(signal)
    mag_slope = 1.29157509157509
    mag_stored = np.clip(
        np.rint(amp * (3000 / max(float(np.percentile(amp, 99.9)), 1e-12)) / mag_slope), 0, 4095
    ).astype(np.uint16)
    ph_slope = 2 * 3142 / 4095
    ph_stored = np.clip(
        np.rint((_wrap(np.angle(signal)) * 1000 + 3142) / ph_slope), 0, 4095
    ).astype(np.uint16)
    n_sl, n_ec = geom.shape[2], len(te)
    total = 2 * n_sl * n_ec
    instance_numbers = rng.permutation(total) + 1  # Philips exports arrive in no useful order
    series_uid = _uid("series", seed, vendor)
    paths, index = [], 0
    for comp, image_type, data, slope, intercept in (
        ("magnitude", ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], mag_stored, mag_slope, 0.0),
        ("phase", ["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"], ph_stored, ph_slope, -3142.0),
    ):
        for e in range(n_ec):
            for k in range(n_sl):
                number = int(instance_numbers[index])
                index += 1
                ds = _base_dataset(vendor, study, MR_IMAGE_STORAGE)
                ds.ImageType = image_type
                ds.SOPInstanceUID = _uid("sop", seed, vendor, comp, e, k)
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = 801
                ds.SeriesDescription = "QSM_mFFE_5echo"
                ds.ProtocolName = "WIP QSM_mFFE_5echo"
                ds.InstanceNumber = number
                _classic_mr(ds, geom, study, te[e], e + 1, n_ec)
                ds.ScanningSequence = "GR"
                ds.ImagePositionPatient = [_ds_str(v) for v in geom.position(k)]
                ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
                ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = (
                    _ds_str(intercept),
                    _ds_str(slope),
                    ("normalized" if comp == "magnitude" else "mrad"),
                )
                b1 = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
                b1.add_new(0x14, "SL", n_ec)
                b1.add_new(0x18, "SL", n_sl)
                b1.add_new(0x0A, "IS", str(k + 1))
                b5 = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
                b5.add_new(0x0D, "FL", 0.0 if comp == "magnitude" else -2047.5)
                b5.add_new(0x0E, "FL", 1.0 / mag_slope if comp == "magnitude" else 651.7395)
                _apply_extra(ds, options)
                path = outdir / "801_QSM_mFFE" / f"IM_{number:05d}.dcm"
                _save(ds, path, data[:, :, k, e].T[None], ts)
                paths.append(path)
    return paths


def _item(**kw) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _write_enhanced(outdir, signal, geom, vendor, te, study, seed, ts, options):
    """Enhanced MR: Siemens XA (one instance per echo and component) or Philips (one instance)."""
    siemens = vendor == "siemens-enhanced"
    amp = np.abs(signal)
    mag = np.clip(
        np.rint(amp * (3000 / max(float(np.percentile(amp, 99.9)), 1e-12))), 0, 4095
    ).astype(np.uint16)
    phase = _wrap(np.angle(signal))
    if siemens:
        ph = (np.rint((phase + np.pi) * (4096 / (2 * np.pi))).astype(np.int64) % 4096).astype(
            np.uint16
        )
        ph_slope, ph_intercept = 2.0, -4096.0
    else:
        ph_slope, ph_intercept = 2 * 3142 / 4095, -3142.0
        ph = np.clip(np.rint((phase * 1000 + 3142) / ph_slope), 0, 4095).astype(np.uint16)
    n_sl, n_ec = geom.shape[2], len(te)
    # frames: (component, echo, slice)
    all_frames = [
        (c, e, k) for c in ("magnitude", "phase") for e in range(n_ec) for k in range(n_sl)
    ]
    if siemens:
        instances = [
            [f for f in all_frames if f[0] == c and f[1] == e]
            for c in ("magnitude", "phase")
            for e in range(n_ec)
        ]
    else:
        order = np.random.default_rng(seed + 11).permutation(len(all_frames))
        instances = [[all_frames[i] for i in order]]
    paths = []
    for number, frame_list in enumerate(instances, start=1):
        comps = {f[0] for f in frame_list}
        comp0 = frame_list[0][0]
        ds = _base_dataset(vendor, study, ENHANCED_MR_IMAGE_STORAGE)
        ds.SOPInstanceUID = _uid("sop", seed, vendor, number)
        if siemens:
            ds.SeriesInstanceUID = _uid("series", seed, vendor, comp0)
            ds.SeriesNumber = 8 if comp0 == "magnitude" else 9
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M" if comp0 == "magnitude" else "P", "NONE"]
            ds.ComplexImageComponent = comp0.upper()
            ds.PulseSequenceName = f"*fl3d{n_ec}r"
            ds.SeriesDescription = "gre_qsm_5echo"
        else:
            ds.SeriesInstanceUID = _uid("series", seed, vendor)
            ds.SeriesNumber = 801
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER", "MIXED"]
            ds.ComplexImageComponent = "MIXED" if len(comps) > 1 else comp0.upper()
            ds.PulseSequenceName = "FFE"
            ds.SeriesDescription = "QSM_mFFE_5echo"
        ds.ProtocolName = ds.SeriesDescription
        ds.InstanceNumber = number
        ds.ContentQualification = "PRODUCT"
        ds.PixelPresentation = "MONOCHROME"
        ds.VolumetricProperties = "VOLUME"
        ds.VolumeBasedCalculationTechnique = "NONE"
        ds.AcquisitionContrast = "T2_STAR" if not siemens else "UNKNOWN"
        ds.MRAcquisitionType = "3D"
        ds.EchoPulseSequence = "GRADIENT"
        ds.AcquisitionDateTime = study["date"] + "102010.250000"
        ds.ContentTime = "102300"
        ds.Rows, ds.Columns = geom.shape[1], geom.shape[0]
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.NumberOfFrames = len(frame_list)
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence(
            [
                _item(
                    PixelSpacing=[_ds_str(geom.voxel_size_mm[1]), _ds_str(geom.voxel_size_mm[0])],
                    SliceThickness=_ds_str(geom.voxel_size_mm[2]),
                    SpacingBetweenSlices=_ds_str(geom.voxel_size_mm[2]),
                )
            ]
        )
        shared.PlaneOrientationSequence = Sequence(
            [_item(ImageOrientationPatient=[_ds_str(v) for v in geom.orientation])]
        )
        shared.MRImagingModifierSequence = Sequence(
            [
                _item(
                    TransmitterFrequency=float(study["frequency_mhz"]),
                    PixelBandwidth="260",
                    MagnetizationTransfer="NONE",
                    BloodSignalNulling="NO",
                    Tagging="NONE",
                )
            ]
        )
        shared.MRTimingAndRelatedParametersSequence = Sequence(
            [
                _item(
                    RepetitionTime=_ds_str(study["tr_ms"]),
                    FlipAngle=_ds_str(study["flip_deg"]),
                    EchoTrainLength=n_ec,
                )
            ]
        )
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per_frame = []
        pixels = np.empty((len(frame_list), geom.shape[1], geom.shape[0]), dtype=np.uint16)
        for f, (c, e, k) in enumerate(frame_list):
            item = Dataset()
            item.FrameContentSequence = Sequence(
                [
                    _item(
                        StackID="1",
                        InStackPositionNumber=k + 1,
                        TemporalPositionIndex=1,
                        DimensionIndexValues=[k + 1, e + 1, 1 if c == "magnitude" else 2],
                    )
                ]
            )
            item.PlanePositionSequence = Sequence(
                [_item(ImagePositionPatient=[_ds_str(v) for v in geom.position(k)])]
            )
            item.MREchoSequence = Sequence([_item(EffectiveEchoTime=float(te[e]))])
            item.MRImageFrameTypeSequence = Sequence(
                [
                    _item(
                        FrameType=["ORIGINAL", "PRIMARY", "M" if c == "magnitude" else "P", "NONE"],
                        PixelPresentation="MONOCHROME",
                        VolumetricProperties="VOLUME",
                        VolumeBasedCalculationTechnique="NONE",
                        ComplexImageComponent=c.upper(),
                        AcquisitionContrast="T2_STAR" if not siemens else "UNKNOWN",
                    )
                ]
            )
            if c == "phase":
                item.PixelValueTransformationSequence = Sequence(
                    [
                        _item(
                            RescaleIntercept=_ds_str(ph_intercept),
                            RescaleSlope=_ds_str(ph_slope),
                            RescaleType="US",
                        )
                    ]
                )
                pixels[f] = ph[:, :, k, e].T
            else:
                item.PixelValueTransformationSequence = Sequence(
                    [_item(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")]
                )
                pixels[f] = mag[:, :, k, e].T
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        _apply_extra(ds, options)
        path = outdir / f"{int(ds.SeriesNumber):03d}_enhanced" / f"EN_{number:04d}.dcm"
        _save(ds, path, pixels, ts)
        paths.append(path)
    return paths
