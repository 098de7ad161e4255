"""Classifying received instances for the tracker, in a child process.

Parsing a header with pydicom and classifying it (:func:`qsmnode.dicom.classify.classify_instance`)
is 0.3–0.7 ms of Python per instance. Done by the tracker's thread it holds the node's GIL
against the threads that acknowledge instances: on the 2-core development VM one association
then took about 900 instances/s instead of 1,400–1,600/s. :class:`ClassifierProcess` does it in
one child process at a lower CPU priority, so the operating system, not the GIL, shares the
CPUs, and the acknowledgement path comes first.

An instance is given as its bytes (File Meta + data set; the spool still holds it in memory) or
as the path of its file. The result per instance is a :class:`Classified`, or a message saying
why its header could not be read.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Union

import pydicom

from qsmnode.child_process import die_with_parent
from qsmnode.dicom.classify import InstanceInfo, classify_instance
from qsmnode.logs import setup_logging, withhold_details

log = logging.getLogger("qsmnode.tracker")

Source = Union[bytes, str]


@dataclass(frozen=True)
class Classified:
    """What the tracker records for one instance."""

    info: InstanceInfo
    instance_number: int | None
    description: str


def classify_sources(sources: list[Source], classify: Callable = classify_instance) -> list[Classified | str]:
    """Classify each instance (its bytes or its file's path) from its header; an instance whose
    header cannot be read or classified gives the error as a string instead."""
    out: list[Classified | str] = []
    for source in sources:
        try:
            ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True)
            number = ds.get("InstanceNumber", None)
            out.append(Classified(classify(ds), int(number) if number not in (None, "") else None,
                                  str(ds.get("SeriesDescription", "") or "")))
        except Exception as err:  # noqa: BLE001 - one unreadable instance must not stop the others
            # the message may quote the bad value, and with it patient data: its words only
            out.append(f"{type(err).__name__}: {withhold_details(str(err))}")
    return out


def _child_init(niceness: int, node_pid: int, log_level: str) -> None:
    die_with_parent(node_pid)
    setup_logging(log_level)  # pydicom's warnings quote header bytes: through the node's filter, not raw stderr
    try:
        os.nice(niceness)
    except OSError:
        pass


def _log_level() -> str:
    """The node's log level, for the child's log set-up."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


class ClassifierProcess:
    """:func:`classify_sources` in one child process (started on first use, started again if it
    dies). If the child dies twice on one batch, the batch is classified in this process.

    ``niceness``: how much lower the child's CPU priority is than the node's.

    The child is started with ``spawn``, so it is the node's own child and dies with it
    (:mod:`qsmnode.child_process`: a forkserver's child outlived a killed node, and kept the
    forkserver and the resource tracker alive with it).
    """

    def __init__(self, niceness: int = 10):
        self.niceness = niceness
        self._executor: ProcessPoolExecutor | None = None

    def __call__(self, sources: list[Source]) -> list[Classified | str]:
        for _ in range(2):
            try:
                return self._pool().submit(classify_sources, sources).result()
            except BrokenProcessPool:
                log.warning("the classifier process died; starting it again")
                self.close()
        log.error("the classifier process died twice on a batch of %d instance(s); classifying them in the node",
                  len(sources))
        return classify_sources(sources)

    def start(self) -> None:
        """Start the child and have it import what it needs (about a second of CPU), so that
        the first burst of instances does not pay for it."""
        self._pool().submit(classify_sources, []).result()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_child_init,
                                                 initargs=(self.niceness, os.getpid(), _log_level()))
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
