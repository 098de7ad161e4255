"""What the node says about a reconstruction: whether to trust it, and which foci it reports.

:func:`review_result` runs the automated focus detection (:func:`~qsmnode.report.findings.find_foci`)
and the plausibility checks (:mod:`qsmnode.recon.plausibility`) and decides what is reported.
The SR, the summary image, the log and the job record all say what the :class:`Review` says.

Which candidates become findings (every result):

- **Minimum size**: at least :data:`MIN_FOCUS_VOXELS` voxels and :data:`MIN_FOCUS_VOLUME_MM3`
  mm3. A single voxel cannot be told from a noise spike (the noise of a map is largely
  independent from voxel to voxel), and a cerebral microbleed is 2-10 mm across (>= ~4 mm3;
  Greenberg SM et al., Lancet Neurol 2009;8:165-174). At 1 mm in-plane a 2.5 mm microbleed
  spans several voxels; at 2-3 mm voxels the smallest ones are single voxels and are not
  reported (such voxels are too coarse for microbleed detection).
- **Mask edge**: a candidate whose centre is at most :data:`BOUNDARY_MARGIN_VOXELS` voxels (of
  the coarsest axis) from outside the mask or the field of view is a *boundary* candidate:
  counted in the report, not listed as a microbleed or calcification. The map is least
  reliable at the edge (residual background field, the mask edge cutting through veins,
  sinuses and skull); the reconstruction already leaves the mask's outermost layer out
  (:func:`qsmnode.recon.mask.peel_edge`), so the margin is 0 by default: a wider one would
  hide every lesion in the cortex, whose centre lies within a voxel or two of the peeled edge.
- **Cap**: at most :data:`MAX_LISTED_FINDINGS` are listed, the most extreme (|peak|) first; the
  rest are counted.
- **Low confidence**: when any plausibility check raised a concern, no candidate is listed: the
  report says findings were withheld, why, and how many candidates there were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qsmnode.recon.plausibility import Concern, assess_result, patient_age_years
from qsmnode.report.findings import Focus, find_foci

MIN_FOCUS_VOXELS = 2
MIN_FOCUS_VOLUME_MM3 = 8.0
BOUNDARY_MARGIN_VOXELS = 0
MAX_LISTED_FINDINGS = 20


def boundary_margin_mm(voxel_size_mm) -> float:
    """Distance (mm) from outside the mask within which a candidate is a boundary candidate:
    :data:`BOUNDARY_MARGIN_VOXELS` voxels of the coarsest axis."""
    return BOUNDARY_MARGIN_VOXELS * float(np.max(np.asarray(voxel_size_mm, dtype=np.float64)))


def is_large_enough(focus: Focus) -> bool:
    """Whether ``focus`` has the minimum size of a finding (voxels and mm3)."""
    return focus.n_voxels >= MIN_FOCUS_VOXELS and focus.volume_mm3 >= MIN_FOCUS_VOLUME_MM3 - 1e-9


def _count_by_kind(foci: list[Focus]) -> str:
    n_para = sum(1 for f in foci if f.kind == "paramagnetic")
    return f"{n_para} paramagnetic, {len(foci) - n_para} diamagnetic"


@dataclass(frozen=True)
class FindingsSelection:
    """The candidates sorted into what is reported and what is only counted.

    listed : reported as findings (at most :data:`MAX_LISTED_FINDINGS`, most extreme first).
    unlisted : reportable but beyond the cap (counted).
    boundary : near the mask edge (counted, not findings).
    too_small : below the minimum size (counted, not findings).
    withheld : every candidate, when the result is low-confidence (then the others are empty).
    withheld_reason : why they were withheld ("" when not).
    """

    listed: list[Focus] = field(default_factory=list)
    unlisted: list[Focus] = field(default_factory=list)
    boundary: list[Focus] = field(default_factory=list)
    too_small: list[Focus] = field(default_factory=list)
    withheld: list[Focus] = field(default_factory=list)
    withheld_reason: str = ""

    @property
    def reported(self) -> list[Focus]:
        """Every finding, listed or counted beyond the cap."""
        return self.listed + self.unlisted


def select_findings(candidates: list[Focus], voxel_size_mm, *, withheld_reason: str = "",
                    max_listed: int = MAX_LISTED_FINDINGS) -> FindingsSelection:
    """Apply the rules of the module doc to ``candidates`` (``voxel_size_mm``: mm along i, j, k).
    A non-empty ``withheld_reason`` withholds them all."""
    if withheld_reason:
        return FindingsSelection(withheld=list(candidates), withheld_reason=withheld_reason)
    margin = boundary_margin_mm(voxel_size_mm)
    too_small = [f for f in candidates if not is_large_enough(f)]
    boundary = [f for f in candidates if is_large_enough(f) and f.edge_distance_mm <= margin + 1e-6]
    reportable = [f for f in candidates if is_large_enough(f) and f.edge_distance_mm > margin + 1e-6]
    reportable.sort(key=lambda f: -abs(f.peak_ppm))
    listed = sorted(reportable[:max_listed], key=lambda f: f.kind != "paramagnetic")  # stable
    return FindingsSelection(listed=listed, unlisted=reportable[max_listed:], boundary=boundary,
                             too_small=too_small)


@dataclass
class Review:
    """Plausibility concerns and findings of one reconstruction.

    concerns : every :class:`~qsmnode.recon.plausibility.Concern` (empty: plausible).
    candidates : every automated candidate focus.
    findings : what is reported (:class:`FindingsSelection`).
    voxel_size_mm : the grid the candidates were found on (for the report's wording).
    """

    concerns: list[Concern]
    candidates: list[Focus]
    findings: FindingsSelection
    voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def low_confidence(self) -> bool:
        return bool(self.concerns)

    @property
    def warnings(self) -> list[str]:
        """The concerns as warning sentences (SR, log, job record)."""
        return [c.message for c in self.concerns]

    def banner(self) -> str:
        """One line stating the low confidence and its reasons ("" when plausible)."""
        if not self.low_confidence:
            return ""
        return ("LOW CONFIDENCE - findings withheld: "
                + "; ".join(c.headline for c in self.concerns))

    def findings_sentences(self) -> list[str]:
        """What the report says about the findings besides listing them."""
        s = self.findings
        if s.withheld_reason:
            return [f"Findings withheld: {s.withheld_reason}. {len(s.withheld)} automated candidate "
                    f"foci ({_count_by_kind(s.withheld)}) were found and are not reported; read the "
                    "susceptibility map itself."]
        lines = []
        if s.unlisted:
            lines.append(f"{len(s.unlisted)} more candidate foci ({_count_by_kind(s.unlisted)}) "
                         f"not listed (at most {MAX_LISTED_FINDINGS} are listed, the most extreme).")
        if s.boundary:
            lines.append(f"{len(s.boundary)} candidates within {boundary_margin_mm(self.voxel_size_mm):.3g} "
                         f"mm of the mask edge ({_count_by_kind(s.boundary)}) not reported as "
                         "findings: the map is least reliable at its edge.")
        if s.too_small:
            lines.append(f"{len(s.too_small)} candidates smaller than {MIN_FOCUS_VOXELS} voxels or "
                         f"{MIN_FOCUS_VOLUME_MM3:g} mm3 not reported (a single voxel cannot be told "
                         "from noise).")
        return lines

    def summary(self) -> dict[str, Any]:
        """For the job record and the audit log."""
        s = self.findings
        return {
            "low_confidence": self.low_confidence,
            "concerns": [{"check": c.check, "headline": c.headline, "value": round(c.value, 4)}
                         for c in self.concerns],
            "findings": {"candidates": len(self.candidates), "listed": len(s.listed),
                         "unlisted": len(s.unlisted), "boundary": len(s.boundary),
                         "too_small": len(s.too_small), "withheld": len(s.withheld)},
        }


def review_result(acquisition, result, candidates: list[Focus] | None = None) -> Review:
    """Find the candidate foci (unless given), check the result's plausibility and select the
    findings. ``acquisition``: the loaded :class:`~qsmnode.acquisition.Acquisition` (echo
    times, B0, voxel size, affine, header for the patient's age); ``result``: its
    :class:`~qsmnode.recon.result.ReconResult`."""
    vox = tuple(float(v) for v in np.asarray(acquisition.voxel_size_mm, dtype=np.float64).ravel())
    if candidates is None:
        candidates = find_foci(result.chi_ppm, result.mask, vox)
    concerns = assess_result(result, acquisition.echo_times_s, acquisition.b0_tesla, vox,
                             affine=acquisition.affine,
                             age_years=patient_age_years(acquisition.header),
                             n_candidate_foci=len(candidates))
    reason = ""
    if concerns:
        reason = "the result is low-confidence (" + "; ".join(c.headline for c in concerns) + ")"
    findings = select_findings(candidates, vox, withheld_reason=reason)
    return Review(concerns, list(candidates), findings, vox)
