"""Grouping classified instances into acquisitions, and keeping account of every input series.

Step 2 of the loader (:mod:`qsmnode.dicom.load`): instances are grouped by ``acquisition_key``
(never by series UIDs or descriptions), a group holding repeated acquisitions of identical
geometry is split by acquisition time, and every series that does not end up in an acquisition
is recorded as :class:`Refused` with the reason, so a caller can say what became of each series
it was given (``qsmnode process`` does).

An instance here is anything with ``info`` (:class:`qsmnode.dicom.classify.InstanceInfo`),
``records`` (:class:`qsmnode.dicom.frames.ImageRecord`), ``series_label`` and
``acquisition_time`` (the loader's ``_Instance``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from qsmnode.dicom import geometry


@dataclass
class Group:
    """The images (``(instance, record)`` pairs) of one acquisition candidate."""

    key: str
    items: list = field(default_factory=list)

    def series(self) -> dict[str, str]:
        """Series Instance UID -> label of every series with images in the group, in order."""
        return {inst.info.series_instance_uid: inst.series_label for inst, _ in self.items}


@dataclass(frozen=True)
class Refused:
    """Input series that were not used, and why (one sentence a person can act on).

    ``series``: their labels (``series 5 'gre_qsm'``); ``series_instance_uids`` in the same order.
    """

    series: tuple[str, ...]
    series_instance_uids: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{', '.join(self.series)}: {self.reason}"


def group_instances(instances) -> tuple[dict[str, Group], dict[str, list[Refused]]]:
    """Usable instances grouped by acquisition key, and per key the series that classification
    refused (one :class:`Refused` per series and reason)."""
    groups: dict[str, Group] = {}
    refused: dict[str, dict[tuple[str, str], Refused]] = defaultdict(dict)
    for inst in instances:
        info = inst.info
        if info.refusal:
            entry = Refused((inst.series_label,), (info.series_instance_uid,), info.refusal)
            refused[info.acquisition_key].setdefault((info.series_instance_uid, info.refusal), entry)
            continue
        group = groups.setdefault(info.acquisition_key, Group(info.acquisition_key))
        group.items.extend((inst, rec) for rec in inst.records)
    return groups, {key: list(by_series.values()) for key, by_series in refused.items()}


def merge_refusals(refusals: list[Refused]) -> list[Refused]:
    """One entry per reason: ``series 2 'x': R`` and ``series 3 'y': R`` become
    ``series 2 'x', series 3 'y': R``."""
    by_reason: dict[str, list[Refused]] = {}
    for r in refusals:
        by_reason.setdefault(r.reason, []).append(r)
    return [
        Refused(
            tuple(s for r in same for s in r.series),
            tuple(u for r in same for u in r.series_instance_uids),
            reason,
        )
        for reason, same in by_reason.items()
    ]


def refused_group(group: Group, reason: str) -> Refused:
    """Every series of ``group``, refused together for ``reason``."""
    series = group.series()
    return Refused(tuple(series.values()), tuple(series), reason)


def unused_series(group: Group, used_series_uids) -> Refused | None:
    """The series of ``group`` that its acquisition was not built from (e.g. magnitude images
    next to the real and imaginary ones that were used), or None."""
    series = {uid: label for uid, label in group.series().items() if uid not in set(used_series_uids)}
    if not series:
        return None
    return Refused(
        tuple(series.values()),
        tuple(series),
        "not used: its acquisition was reconstructed from the other series of the same scan",
    )


def _slot(rec, normal) -> tuple:
    return (
        round(float(np.dot(rec.position, normal)), 2),
        round(rec.echo_time_ms or -1.0, 2),
        rec.component,
    )


def split_repeats(group: Group) -> list[Group]:
    """Split a group that holds repeated acquisitions of identical geometry by acquisition time."""
    if not group.items:
        return []
    _, _, normal = geometry.orientation_axes(group.items[0][1].orientation)
    slots = defaultdict(int)
    for _, rec in group.items:
        slots[_slot(rec, normal)] += 1
    if max(slots.values()) <= 1:
        return [group]
    by_time: dict[str, Group] = {}
    for inst, rec in group.items:
        t = inst.acquisition_time
        by_time.setdefault(t, Group(group.key + t)).items.append((inst, rec))
    if len(by_time) > 1:
        ok = True
        for sub in by_time.values():
            counts = defaultdict(int)
            for _, rec in sub.items:
                counts[_slot(rec, normal)] += 1
            ok &= max(counts.values()) <= 1
        if ok:
            return list(by_time.values())
    return [group]  # the assembler refuses the duplicates with a reason
