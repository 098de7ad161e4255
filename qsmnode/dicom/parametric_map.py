"""The QSM as a DICOM Parametric Map: float32 susceptibility in ppm with a Real World Value Mapping.

One multi-frame Parametric Map Storage instance (highdicom ``ParametricMap``), one frame per
slice ``k``, frame pixels ``vol[:, :, k].T`` (rows along ``j``, columns along ``i``), on the
source geometry; highdicom orders the frames along its volume convention (which may be
decreasing ``k``), so a reader places each frame by its Plane Position (Plane Position / Orientation / Pixel Measures from the affine).
The Real World Value Mapping is the identity (slope 1, intercept 0) in UCUM ``ppm`` with the
quantity DCM 126396 "Magnetic Susceptibility", so a reader gets ppm to float precision.
The source images are the QSM classic series (which in turn reference the GRE source).
"""

from __future__ import annotations

import numpy as np
from highdicom.content import (
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    PlanePositionSequence,
    VOILUTTransformation,
)
from highdicom.pm import ParametricMap, RealWorldValueMapping
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset

from qsmnode.dicom import uids
from qsmnode.dicom.outputs import (
    KIND_PARAMETRIC_MAP,
    MANUFACTURER,
    QSM_WINDOW_WIDTH_PPB,
    contributing_equipment_hd,
    series_number,
    slice_geometry,
)

PPM_UNIT = CodedConcept(value="ppm", scheme_designator="UCUM", meaning="parts per million")
MAGNETIC_SUSCEPTIBILITY = CodedConcept(
    value="126396", scheme_designator="DCM", meaning="Magnetic Susceptibility")


def qsm_frames_ppm(chi_ppm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Frames ``(k, j, i)`` float32 ppm, 0 outside ``mask`` and at non-finite values."""
    chi = np.nan_to_num(np.asarray(chi_ppm, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    chi = np.where(np.asarray(mask, dtype=bool), chi, np.float32(0.0))
    return np.ascontiguousarray(chi.transpose(2, 1, 0), dtype=np.float32)


def build_parametric_map(
    acquisition, result, qsm_datasets: list[Dataset], *, software_version: str
) -> Dataset:
    """Parametric Map of ``result.chi_ppm`` (ppm, float32) referencing ``qsm_datasets``.

    ``qsm_datasets``: the QSM classic MR instances (source images; same study and frame of
    reference). Returns a highdicom ``ParametricMap`` (a pydicom Dataset) with file meta.
    """
    frames = qsm_frames_ppm(result.chi_ppm, result.mask)
    geometry = slice_geometry(acquisition.affine, result.chi_ppm.shape)
    lo, hi = float(frames.min()), float(frames.max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = RealWorldValueMapping(
        lut_label="QSM_PPM",
        lut_explanation="Magnetic susceptibility, ppm",
        unit=PPM_UNIT,
        value_range=(lo, hi),
        slope=1.0,
        intercept=0.0,
        quantity_definition=MAGNETIC_SUSCEPTIBILITY,
    )
    header = acquisition.header
    sop_uid = uids.instance_uid(acquisition.source_series_uids, software_version,
                                KIND_PARAMETRIC_MAP, 1)
    pm = ParametricMap(
        source_images=qsm_datasets,
        pixel_array=frames,
        series_instance_uid=uids.series_uid(acquisition.source_series_uids, software_version,
                                            KIND_PARAMETRIC_MAP),
        series_number=series_number(header, KIND_PARAMETRIC_MAP),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="qsmnode QSM reconstruction",
        software_versions=str(software_version),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[VOILUTTransformation(
            window_center=0.0, window_width=QSM_WINDOW_WIDTH_PPB / 1000.0,
            window_explanation="QSM -0.15..+0.15 ppm", voi_lut_function="LINEAR_EXACT")],
        content_description="QSM in ppm",
        content_label="QSM",
        pixel_measures=PixelMeasuresSequence(
            pixel_spacing=geometry.pixel_spacing,
            slice_thickness=geometry.slice_spacing_mm,
            spacing_between_slices=geometry.slice_spacing_mm,
        ),
        plane_orientation=PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=geometry.image_orientation),
        plane_positions=[
            PlanePositionSequence(coordinate_system="PATIENT",
                                  image_position=[float(v) for v in p])
            for p in geometry.positions
        ],
        contributing_equipment=contributing_equipment_hd(header, software_version),
        series_description=f"QSM_PM susceptibility ppm (qsmnode {software_version})",
    )
    if "Laterality" in pm and not pm.Laterality:
        del pm.Laterality  # General Series 2C: absent for the unpaired brain
    pm.BodyPartExamined = acquisition.header.get("BodyPartExamined") or "BRAIN"
    pm.file_meta.ImplementationVersionName = f"QSMNODE_{software_version}"[:16]
    return pm
