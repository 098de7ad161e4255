"""The structured report: Comprehensive 3D SR, TID 1500 Imaging Measurement Report (highdicom).

Content, in measurement groups (TID 1501 unless stated):

1. ``Acquisition``: B0 used (T, from ImagingFrequency), echo times (ms), voxel size (mm), vendor
   and phase-sign handling (text), the loader's provenance lines.
2. ``Processing step <n>: <name>``: one group per pipeline step, with an Algorithm
   Identification (TID 4019: algorithm name, qsmnode version, every parameter and the paper as
   ``Algorithm Parameters``) and the step's runtime; then one group for the preset.
   This covers the QSM consensus reporting items (Bilgic B et al., "Recommended implementation
   of quantitative susceptibility mapping for clinical research in the brain: a consensus of the
   ISMRM electro-magnetic tissue properties study group", MRM 2024;91:1834-1862).
3. ``Reference region: <name>``: the referencing offset of each region (whole brain always),
   with a note saying which region the map is referenced to.
4. ``Whole brain``: mask volume and susceptibility mean / SD / median / 5th / 95th percentile,
   the number of reported candidate foci of each sign (left out when findings are withheld).
5. ``Quality``: every ``result.quality`` figure, the result's confidence (a qualitative
   evaluation: low when any plausibility check of :mod:`qsmnode.recon.plausibility` raised a
   concern), and every warning (acquisition, reconstruction, plausibility) as text.
6. ``Findings``: what was not listed and why (:meth:`qsmnode.report.review.Review.findings_sentences`):
   findings withheld from a low-confidence result, candidates beyond the cap, at the mask edge
   or below the minimum size.
7. ``Focus <n>`` (TID 1411 volumetric ROI): each listed candidate focus as a SCOORD3D point
   (patient LPS mm in the source frame of reference), finding type haemorrhage (paramagnetic)
   or calcification (diamagnetic), certainty "Uncertain", volume, mean and peak susceptibility,
   elongation and equivalent diameter, and a sentence saying a reader must confirm it.

Concepts without a standard code use the private coding scheme ``99QSMNODE`` (declared in the
Coding Scheme Identification Sequence).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumeSurface,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from qsmnode.dicom import uids
from qsmnode.dicom.outputs import (
    KIND_SR,
    MANUFACTURER,
    contributing_equipment_hd,
    series_number,
)
from qsmnode.report.findings import Focus, whole_brain_statistics
from qsmnode.report.review import Review

LOCAL_SCHEME = "99QSMNODE"


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning[:64])


def _ucum(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="UCUM", meaning=meaning)


PPM = _ucum("ppm", "parts per million")
MM = _ucum("mm", "millimeter")
MM3 = _ucum("mm3", "cubic millimeter")
ML = _ucum("ml", "milliliter")
MS = _ucum("ms", "millisecond")
SECOND = _ucum("s", "second")
TESLA = _ucum("T", "Tesla")
RATIO = _ucum("1", "no units")
COUNT = _ucum("{foci}", "foci")

SUSCEPTIBILITY = CodedConcept("126396", "DCM", "Magnetic Susceptibility")
COMMENT = CodedConcept("121106", "DCM", "Comment")
BRAIN = CodedConcept("12738006", "SCT", "Brain")
HEMORRHAGE = CodedConcept("50960005", "SCT", "Hemorrhage")
CALCIFICATION = CodedConcept("18115005", "SCT", "Pathologic calcification")
CERTAINTY = CodedConcept("111012", "DCM", "Certainty of Finding")
UNCERTAIN = CodedConcept("64957009", "SCT", "Uncertain")
MEAN = CodedConcept("373098007", "SCT", "Mean")
MEDIAN = CodedConcept("373099004", "SCT", "Median")
SD = CodedConcept("386136009", "SCT", "Standard Deviation")
MAXIMUM = CodedConcept("56851009", "SCT", "Maximum")
MINIMUM = CodedConcept("255605001", "SCT", "Minimum")
P05 = CodedConcept("371888009", "SCT", "Fifth percentile")
P95 = CodedConcept("371889001", "SCT", "Ninety-fifth percentile")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
MR_BRAIN = CodedConcept("24590-2", "LN", "MR Brain")

B0_USED = _local("QSMN001", "Main magnetic field strength used")
ECHO_TIME = _local("QSMN002", "Echo time")
VOXEL_SIZE = {axis: _local(f"QSMN003{axis}", f"Voxel size along array axis {axis}")
              for axis in "ijk"}
PROCESSING_TIME = _local("QSMN004", "Processing time")
ELONGATION = _local("QSMN010", "Principal axis elongation")
EQUIVALENT_DIAMETER = _local("QSMN011", "Equivalent sphere diameter")
N_PARAMAGNETIC = _local("QSMN012", "Number of candidate paramagnetic foci")
N_DIAMAGNETIC = _local("QSMN013", "Number of candidate diamagnetic foci")
REFERENCE_OFFSET = _local("QSMN014", "Reference region susceptibility")
RESULT_CONFIDENCE = _local("QSMN015", "Result confidence")
LOW_CONFIDENCE = _local("QSMN016", "Low confidence: findings withheld")
NO_CONCERN = _local("QSMN017", "No plausibility concern")

_QUALITY_CODES = {
    "mask_volume_ml": ("QSMN020", "Brain mask volume", ML),
    "unreliable_phase_fraction": ("QSMN021", "Unreliable phase fraction", RATIO),
    "fit_residual": ("QSMN022", "Field fit residual", RATIO),
    "seconds_total": ("QSMN023", "Total processing time", SECOND),
}


def _quality_concept(key: str) -> tuple[CodedConcept, CodedConcept]:
    if key in _QUALITY_CODES:
        value, meaning, unit = _QUALITY_CODES[key]
        return _local(value, meaning), unit
    unit = SECOND if key.endswith("seconds") or key.startswith("seconds") else RATIO
    code = "QSMNQ" + "".join(c for c in key.upper() if c.isalnum())[:11]
    return _local(code, f"Quality figure {key}"), unit


def _text(value: str) -> TextContentItem:
    return TextContentItem(name=COMMENT, value=str(value)[:10000], relationship_type="CONTAINS")


def _add_texts(group: Dataset, texts: list[str]) -> None:
    for t in texts:
        group[0].ContentSequence.append(_text(t))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _tracking(acquisition, software_version: str, label: str) -> TrackingIdentifier:
    return TrackingIdentifier(
        uid=uids.deterministic_uid("+".join(sorted(acquisition.source_series_uids)),
                                   software_version, KIND_SR, "tracking", label),
        identifier=label[:64])


def focus_position_lps(focus: Focus, affine: np.ndarray) -> np.ndarray:
    """Centroid of ``focus`` in patient LPS mm (``affine @ [i, j, k, 1]``)."""
    ijk1 = np.array([*focus.centroid_ijk, 1.0])
    return (np.asarray(affine, dtype=np.float64) @ ijk1)[:3]


def focus_sentence(n: int, focus: Focus, position_lps: np.ndarray) -> str:
    """The reader-facing sentence for one focus."""
    x, y, z = position_lps
    return (
        f"Focus {n}: {focus.candidate_label} ({focus.kind}), volume {focus.volume_mm3:.0f} mm3, "
        f"mean {focus.mean_ppm * 1000:+.0f} ppb, peak {focus.peak_ppm * 1000:+.0f} ppb, at "
        f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS, slice {int(round(focus.centroid_ijk[2])) + 1}. "
        "Automated candidate: it must be confirmed by a reader before it is reported.")


def build_measurement_report(
    acquisition,
    result,
    review: Review,
    evidence: list[Dataset],
    *,
    software_version: str,
) -> Dataset:
    """The TID 1500 Comprehensive 3D SR for one reconstruction (see the module doc).

    ``review``: plausibility and findings (:func:`qsmnode.report.review.review_result`); only
    its listed findings become focus groups. ``evidence``: the QSM classic MR instances the
    report describes (same study); they are listed in the Current Requested Procedure Evidence
    Sequence.
    """
    header = acquisition.header
    source_key = "+".join(sorted(acquisition.source_series_uids))
    qsm_series_uid = uids.series_uid(acquisition.source_series_uids, software_version, "QSM")
    frame_of_reference = str(header.FrameOfReferenceUID)
    steps_algorithm = AlgorithmIdentification(
        name="qsmnode", version=str(software_version),
        parameters=[f"{s.name}: {s.algorithm}" for s in result.steps] or None)
    groups = []

    # 1. Acquisition
    vox = acquisition.voxel_size_mm
    measurements = [Measurement(name=B0_USED, value=float(acquisition.b0_tesla), unit=TESLA)]
    measurements += [Measurement(name=ECHO_TIME, value=float(te) * 1000.0, unit=MS)
                     for te in acquisition.echo_times_s]
    measurements += [Measurement(name=VOXEL_SIZE[a], value=float(v), unit=MM)
                     for a, v in zip("ijk", vox)]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(acquisition, software_version, "Acquisition"),
        finding_sites=[FindingSite(BRAIN)], measurements=measurements)
    sign = ("validated" if acquisition.phase_sign_validated else
            "NOT validated for this vendor: the sign of the susceptibility may be inverted")
    _add_texts(group, [
        f"Vendor {acquisition.vendor}; phase sign {sign}.",
        f"B0 {acquisition.b0_tesla:.4f} T from ImagingFrequency; echo times "
        f"{', '.join(f'{t * 1000:.2f}' for t in acquisition.echo_times_s)} ms; voxel size "
        f"{' x '.join(f'{v:.3g}' for v in vox)} mm; matrix "
        f"{' x '.join(str(n) for n in acquisition.shape)}.",
        "Source series: " + ", ".join(acquisition.source_series_uids),
        *[f"Loader: {line}" for line in acquisition.provenance],
    ])
    groups.append(group)

    # 2. Processing steps and preset
    for n, step in enumerate(result.steps, start=1):
        parameters = [f"{k}={_format_value(v)}" for k, v in step.parameters.items()]
        parameters.append(f"reference={step.reference}")
        algorithm = AlgorithmIdentification(
            name=str(step.algorithm)[:64] or step.name, version=str(software_version),
            parameters=parameters)
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(acquisition, software_version,
                                          f"Processing step {n}: {step.name}"),
            algorithm_id=algorithm,
            measurements=[Measurement(name=PROCESSING_TIME, value=float(step.seconds),
                                      unit=SECOND)])
        _add_texts(group, [f"Step {n} {step.name}: {step.algorithm} ({step.reference})."])
        groups.append(group)
    preset = result.preset or {}
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(acquisition, software_version, "Preset"),
        algorithm_id=AlgorithmIdentification(
            name="qsmnode preset " + str(preset.get("name", "custom"))[:40],
            version=str(software_version),
            parameters=[f"{k}={_format_value(v)}" for k, v in preset.items()] or None),
        measurements=[Measurement(name=PROCESSING_TIME,
                                  value=float(sum(s.seconds for s in result.steps)),
                                  unit=SECOND)])
    _add_texts(group, [f"Reconstruction device: {result.device}."])
    groups.append(group)

    # 3. Reference regions
    reference = dict(result.reference_ppm or {})
    if "whole_brain" not in reference:
        mask = np.asarray(result.mask, dtype=bool)
        reference["whole_brain"] = float(np.asarray(result.chi_ppm)[mask].mean()) if mask.any() \
            else 0.0
    for name, value in reference.items():
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(acquisition, software_version,
                                          f"Reference region: {name}"),
            finding_sites=[FindingSite(BRAIN)],
            measurements=[Measurement(name=REFERENCE_OFFSET, value=float(value), unit=PPM,
                                      derivation=MEAN)])
        referenced = name == result.reference_region
        _add_texts(group, [
            f"Reference region {name}: mean susceptibility {value * 1000:+.1f} ppb "
            + ("(the map is referenced to this region: its mean is zero)." if referenced
               else "(for information; the map is not referenced to it).")])
        groups.append(group)

    # 4. Whole brain
    stats = whole_brain_statistics(result.chi_ppm, result.mask, vox)
    reported = review.findings.reported
    n_para = sum(1 for f in reported if f.kind == "paramagnetic")
    n_dia = len(reported) - n_para
    measurements = [
        Measurement(name=VOLUME, value=stats["volume_ml"], unit=ML),
        Measurement(name=SUSCEPTIBILITY, value=stats["mean_ppm"], unit=PPM, derivation=MEAN),
        Measurement(name=SUSCEPTIBILITY, value=stats["std_ppm"], unit=PPM, derivation=SD),
        Measurement(name=SUSCEPTIBILITY, value=stats["median_ppm"], unit=PPM, derivation=MEDIAN),
        Measurement(name=SUSCEPTIBILITY, value=stats["p05_ppm"], unit=PPM, derivation=P05),
        Measurement(name=SUSCEPTIBILITY, value=stats["p95_ppm"], unit=PPM, derivation=P95),
    ]
    if review.findings.withheld_reason:
        findings_text = "Candidate foci are not reported: the findings were withheld (see Findings)."
    else:
        measurements += [Measurement(name=N_PARAMAGNETIC, value=float(n_para), unit=COUNT),
                         Measurement(name=N_DIAMAGNETIC, value=float(n_dia), unit=COUNT)]
        findings_text = (
            f"{n_para} candidate paramagnetic foci (possible microbleeds / haemosiderin) and "
            f"{n_dia} candidate diamagnetic foci (possible calcifications) found automatically; "
            "elongated paramagnetic structures (veins) are excluded by shape. Every candidate "
            "needs a reader's confirmation.")
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(acquisition, software_version, "Whole brain"),
        finding_sites=[FindingSite(BRAIN)],
        algorithm_id=steps_algorithm,
        measurements=measurements)
    _add_texts(group, [f"Susceptibility referenced to {result.reference_region}. {findings_text}"])
    groups.append(group)

    # 5. Quality
    measurements = []
    for key, value in (result.quality or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not np.isfinite(number):
            continue
        concept, unit = _quality_concept(key)
        measurements.append(Measurement(name=concept, value=number, unit=unit))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(acquisition, software_version, "Quality"),
        measurements=measurements or None,
        qualitative_evaluations=[QualitativeEvaluation(
            RESULT_CONFIDENCE, LOW_CONFIDENCE if review.low_confidence else NO_CONCERN)])
    warnings = list(dict.fromkeys([*acquisition.warnings, *result.warnings, *review.warnings]))
    texts = [review.banner()] if review.low_confidence else []
    texts += [f"Warning: {w}" for w in warnings] or ["No warnings."]
    _add_texts(group, texts)
    groups.append(group)

    # 6. What was not listed, and why
    sentences = review.findings_sentences()
    if sentences:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(acquisition, software_version, "Findings"))
        _add_texts(group, sentences)
        groups.append(group)

    # 7. Findings
    detection = AlgorithmIdentification(
        name="qsmnode focus detection", version=str(software_version),
        parameters=["connected components of |chi| above threshold; compact shape "
                    "(principal-axis elongation) separates foci from veins; see "
                    "qsmnode.report.findings"])
    for n, focus in enumerate(review.findings.listed, start=1):
        position = focus_position_lps(focus, acquisition.affine)
        paramagnetic = focus.kind == "paramagnetic"
        peak_derivation = MAXIMUM if paramagnetic else MINIMUM
        group = VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uids.deterministic_uid(source_key, software_version, KIND_SR, "focus", n),
                identifier=f"Focus {n}: {focus.candidate_label}"[:64]),
            referenced_volume_surface=VolumeSurface(
                graphic_type="POINT",
                graphic_data=position.reshape(1, 3).astype(np.float64),
                frame_of_reference_uid=frame_of_reference,
                source_series=SourceSeriesForSegmentation(qsm_series_uid)),
            finding_type=HEMORRHAGE if paramagnetic else CALCIFICATION,
            finding_sites=[FindingSite(BRAIN)],
            algorithm_id=detection,
            measurements=[
                Measurement(name=VOLUME, value=focus.volume_mm3, unit=MM3),
                Measurement(name=SUSCEPTIBILITY, value=focus.mean_ppm, unit=PPM,
                            derivation=MEAN),
                Measurement(name=SUSCEPTIBILITY, value=focus.peak_ppm, unit=PPM,
                            derivation=peak_derivation),
                Measurement(name=ELONGATION, value=focus.elongation, unit=RATIO),
                Measurement(name=EQUIVALENT_DIAMETER, value=focus.equivalent_diameter_mm,
                            unit=MM),
            ],
            qualitative_evaluations=[QualitativeEvaluation(CERTAINTY, UNCERTAIN)])
        _add_texts(group, [focus_sentence(n, focus, position)])
        groups.append(group)

    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=uids.deterministic_uid(MANUFACTURER, "device"), name="qsmnode",
            manufacturer_name=MANUFACTURER, model_name="qsmnode QSM reconstruction"))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=MR_BRAIN,
        imaging_measurements=groups,
    )
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_uid(acquisition.source_series_uids, software_version,
                                            KIND_SR),
        series_number=series_number(header, KIND_SR),
        sop_instance_uid=uids.instance_uid(acquisition.source_series_uids, software_version,
                                           KIND_SR, 1),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=header.get("InstitutionName") or None,
        contributing_equipment=contributing_equipment_hd(header, software_version),
        series_description=f"SR QSM report (qsmnode {software_version})",
        manufacturer_model_name="qsmnode QSM reconstruction",
        software_versions=str(software_version),
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name="qsmnode local concepts",
            responsible_organization="qsmnode project")],
    )
    return sr
