"""Summary image: one Secondary Capture with a key slice of the QSM and the SWI, a grey bar in
ppb, and the list of candidate foci as text (burned-in annotation, no patient identifiers).

A low-confidence result (:class:`qsmnode.report.review.Review`) says so on its first text line
in amber ("LOW CONFIDENCE - findings withheld: ..."), one line per concern follows, no focus is
circled or listed, and ImageComments carries the same banner for viewers that show it.

The key slice is the slice of the most extreme candidate focus, or, with no focus, the slice
with the largest brain area. Slices are shown as a viewer shows the stored images
(``pixel_array = vol[:, :, k].T``: rows along ``j``, columns along ``i``), resampled to square
display pixels. Paramagnetic foci are circled red, diamagnetic foci cyan.
"""

from __future__ import annotations

import datetime as _dt
import textwrap

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import SecondaryCaptureImageStorage

from qsmnode.dicom import uids
from qsmnode.dicom.outputs import (
    KIND_SUMMARY,
    MANUFACTURER,
    QSM_WINDOW_WIDTH_PPB,
    _file_meta,
    contributing_equipment,
    copy_patient_study,
    series_number,
)
from qsmnode.report.findings import Focus
from qsmnode.report.review import Review

PANEL_PX = 320
TEXT_HEIGHT_PX = 260
BAR_WIDTH_PX = 24
PARAMAGNETIC_RGB = (255, 60, 60)
DIAMAGNETIC_RGB = (60, 220, 255)
WARNING_RGB = (255, 190, 0)
NO_FOCUS_TEXT = "No candidate microbleed or calcification found (automated)."


def key_slice(mask: np.ndarray, foci: list[Focus]) -> int:
    """Slice index ``k`` to show: the most extreme focus' slice, else the largest brain area."""
    if foci:
        top = max(foci, key=lambda f: abs(f.peak_ppm))
        return int(np.clip(round(top.centroid_ijk[2]), 0, mask.shape[2] - 1))
    return int(np.argmax(np.asarray(mask, dtype=bool).sum(axis=(0, 1))))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _panel(slice_2d: np.ndarray, lo: float, hi: float, spacing_ji, size: int) -> tuple[Image.Image, float, float]:
    """Grey panel of ``slice_2d`` (rows j, columns i) windowed to [lo, hi], fitted in
    ``size`` x ``size`` with square display pixels. Returns the image and the x/y scales."""
    grey = np.clip((slice_2d - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    img = Image.fromarray((grey * 255).astype(np.uint8), mode="L")
    height_mm = slice_2d.shape[0] * spacing_ji[0]
    width_mm = slice_2d.shape[1] * spacing_ji[1]
    scale = size / max(height_mm, width_mm)
    w = max(1, int(round(width_mm * scale)))
    h = max(1, int(round(height_mm * scale)))
    img = img.resize((w, h), Image.BILINEAR).convert("RGB")
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    sx = w / slice_2d.shape[1]
    sy = h / slice_2d.shape[0]
    return canvas, sx, sy


def _line_colour(line: str) -> tuple[int, int, int]:
    """Amber for the low-confidence banner and its concerns, red/cyan for listed foci."""
    if line.startswith(("LOW CONFIDENCE", "  - ")):
        return WARNING_RGB
    if "microbleed" in line and line[:1].isdigit():
        return PARAMAGNETIC_RGB
    if "calcification" in line and line[:1].isdigit():
        return DIAMAGNETIC_RGB
    return (255, 255, 255)


def render_summary(
    chi_ppm: np.ndarray,
    swi: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm,
    foci: list[Focus],
    *,
    lines: list[str] | None = None,
    findings_text: list[str] | None = None,
) -> tuple[np.ndarray, int]:
    """RGB uint8 image ``(rows, columns, 3)`` of the summary and the key slice index ``k``.

    ``chi_ppm`` ppm and ``swi`` (any units) ``[i, j, k]``; the QSM panel is windowed to
    +-150 ppb with a grey bar; ``lines`` is extra text (one line each) above the findings list
    (the low-confidence banner and its concern lines, "  - ...", in amber); ``findings_text``
    follows the list (default with no focus: :data:`NO_FOCUS_TEXT`). Lines longer than the
    width are wrapped.
    """
    mask = np.asarray(mask, dtype=bool)
    k = key_slice(mask, foci)
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    spacing_ji = (vox[1], vox[0])
    half = QSM_WINDOW_WIDTH_PPB / 2.0 / 1000.0
    qsm_slice = np.where(mask[:, :, k], chi_ppm[:, :, k], 0.0).T
    qsm_img, sx, sy = _panel(qsm_slice, -half, half, spacing_ji, PANEL_PX)
    swi_slice = np.asarray(swi[:, :, k], dtype=np.float64).T
    brain = swi[mask] if mask.any() else np.asarray(swi).ravel()
    swi_hi = float(np.percentile(brain, 99)) if brain.size else 1.0
    swi_img, _, _ = _panel(swi_slice, 0.0, max(swi_hi, 1e-12), spacing_ji, PANEL_PX)

    width = 2 * PANEL_PX + BAR_WIDTH_PX + 90
    height = PANEL_PX + 30 + TEXT_HEIGHT_PX
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    small, normal = _font(12), _font(14)
    canvas.paste(qsm_img, (0, 24))
    swi_x = PANEL_PX + BAR_WIDTH_PX + 90
    canvas.paste(swi_img, (swi_x, 24))
    draw.text((4, 4), f"QSM (ppb), slice {k + 1}", fill=(255, 255, 255), font=normal)
    draw.text((swi_x + 4, 4), f"SWI, slice {k + 1}", fill=(255, 255, 255), font=normal)

    # grey bar for the QSM window, +150 at the top
    bar_x = PANEL_PX + 10
    ramp = np.linspace(255, 0, PANEL_PX).astype(np.uint8)
    bar = Image.fromarray(np.repeat(ramp[:, None], BAR_WIDTH_PX, axis=1), mode="L")
    canvas.paste(bar.convert("RGB"), (bar_x, 24))
    for value, y in ((int(half * 1000), 24), (0, 24 + PANEL_PX // 2), (-int(half * 1000),
                                                                          24 + PANEL_PX - 12)):
        draw.text((bar_x + BAR_WIDTH_PX + 4, y), f"{value:+d} ppb", fill=(255, 255, 255),
                  font=small)

    # circles on the key slice for foci within 1.5 slices
    offset_x = (PANEL_PX - qsm_slice.shape[1] * sx) / 2.0
    offset_y = (PANEL_PX - qsm_slice.shape[0] * sy) / 2.0 + 24
    for n, focus in enumerate(foci, start=1):
        i, j, kk = focus.centroid_ijk
        if abs(kk - k) > 1.5:
            continue
        colour = PARAMAGNETIC_RGB if focus.kind == "paramagnetic" else DIAMAGNETIC_RGB
        radius = max(6.0, focus.equivalent_diameter_mm / 2.0 * sx / max(vox[0], 1e-6) + 4)
        for x0 in (0, swi_x):
            cx, cy = x0 + offset_x + (i + 0.5) * sx, offset_y + (j + 0.5) * sy
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour,
                         width=2)
            draw.text((cx + radius + 1, cy - radius), str(n), fill=colour, font=small)

    y = PANEL_PX + 32
    text = list(lines or [])
    if foci:
        text.append("Candidate foci (automated; confirm by reading the QSM):")
        for n, focus in enumerate(foci, start=1):
            text.append(
                f"{n}. {focus.candidate_label}: slice {int(round(focus.centroid_ijk[2])) + 1}, "
                f"{focus.volume_mm3:.0f} mm3, peak {focus.peak_ppm * 1000:+.0f} ppb")
    elif findings_text is None:
        text.append(NO_FOCUS_TEXT)
    text.extend(findings_text or [])
    rows = [(part, _line_colour(line)) for line in text
            for part in textwrap.wrap(line, 96, subsequent_indent="    ") or [""]]
    max_lines = (TEXT_HEIGHT_PX - 8) // 16
    if len(rows) > max_lines:
        extra = len(rows) - max_lines + 1
        rows = rows[: max_lines - 1] + [(f"... {extra} more lines: see the structured report",
                                         (255, 255, 255))]
    for line, colour in rows:
        draw.text((6, y), line, fill=colour, font=normal)
        y += 16
    return np.asarray(canvas, dtype=np.uint8), k


def summary_lines(acquisition, result, review: Review, software_version: str) -> list[str]:
    """The text above the findings: provenance, the low-confidence banner and its concerns,
    then up to three other warnings."""
    lines = [
        f"qsmnode {software_version} - {result.preset.get('name', '') if result.preset else ''}"
        f" - referenced to {result.reference_region} - B0 {acquisition.b0_tesla:.2f} T",
    ]
    if review.low_confidence:
        lines.append("LOW CONFIDENCE - findings withheld; read the map itself:")
        lines += [f"  - {c.headline}" for c in review.concerns]
    others = [w for w in dict.fromkeys([*acquisition.warnings, *result.warnings])
              if w not in review.warnings]
    lines += [f"Warning: {w}" for w in others[:3]]
    return lines


def _findings_text(review: Review) -> list[str] | None:
    """What the image says besides the listed foci (None: the default)."""
    withheld = review.findings.withheld
    if review.findings.withheld_reason:
        return [f"No findings listed: {len(withheld)} automated candidate foci withheld "
                "(low-confidence result, see above and the structured report)."]
    return review.findings_sentences() or None


def build_summary_images(
    acquisition,
    result,
    review: Review,
    *,
    software_version: str,
    when: _dt.datetime | None = None,
) -> list[Dataset]:
    """The summary Secondary Capture instance(s) (RGB, BurnedInAnnotation YES) of ``result``
    with the findings ``review`` lists (and its low-confidence banner)."""
    when = when or _dt.datetime.now()
    header = acquisition.header
    rgb, k = render_summary(result.chi_ppm, result.swi, result.mask,
                            acquisition.voxel_size_mm, review.findings.listed,
                            lines=summary_lines(acquisition, result, review, software_version),
                            findings_text=_findings_text(review))
    ds = Dataset()
    ds.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 100")
    ds.ImageType = ["DERIVED", "SECONDARY", "SUMMARY"]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    number = 1
    sop_uid = uids.instance_uid(acquisition.source_series_uids, software_version,
                                KIND_SUMMARY, number)
    ds.SOPInstanceUID = sop_uid
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = "qsmnode QSM reconstruction"
    ds.SecondaryCaptureDeviceSoftwareVersions = str(software_version)
    copy_patient_study(header, ds)
    del ds.FrameOfReferenceUID  # a screen capture has no patient geometry
    del ds.PositionReferenceIndicator
    ds.SeriesInstanceUID = uids.series_uid(acquisition.source_series_uids, software_version,
                                           KIND_SUMMARY)
    ds.SeriesNumber = series_number(header, KIND_SUMMARY)
    ds.SeriesDescription = f"SUMMARY QSM findings (qsmnode {software_version})"
    ds.InstanceNumber = number
    ds.BodyPartExamined = header.get("BodyPartExamined") or "BRAIN"
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"
    if review.low_confidence:
        ds.ImageComments = review.banner()[:10240]
    ds.DerivationDescription = (
        f"Key slice {k + 1} of the QSM (window -150..+150 ppb) and SWI series with the list of "
        "automatically detected candidate foci")
    ds.ContributingEquipmentSequence = contributing_equipment(header, software_version, when)
    qsm_uid = uids.instance_uid(acquisition.source_series_uids, software_version, "QSM", k + 1)
    swi_uid = uids.instance_uid(acquisition.source_series_uids, software_version, "SWI", k + 1)
    refs = []
    for uid in (qsm_uid, swi_uid):
        item = Dataset()
        item.ReferencedSOPClassUID = pydicom.uid.MRImageStorage
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    ds.SourceImageSequence = Sequence(refs)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.file_meta = _file_meta(SecondaryCaptureImageStorage, sop_uid)
    return [ds]
