"""Series tracker: classify received instances, pair series into acquisitions, decide completeness,
match rules and queue jobs.

An acquisition is every series (magnitude, phase, real, imaginary, every echo) that
:func:`qsmnode.dicom.classify.classify_instance` gives the same ``acquisition_key``. It is
complete, whichever comes first:

* by count: every series holds its expected number of instances (``expected_in_series``) and
  both halves of the complex signal are there (magnitude + phase, real + imaginary, or mixed);
* by quiet time: no new instance for ``quiet_seconds`` and no series is known to be short.

When a series is known to be short (fewer instances than expected), the tracker waits up to
``incomplete_cap_seconds`` after the last instance; then the acquisition is reported as failed,
with the missing slices (InstanceNumbers) and echoes named, as a failed job that
``qsmnode retry`` can still force through the loader. Series that can never be a QSM input
(``refusal``: derived images, field maps, ...) are kept apart and never block an acquisition.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from typing import Callable

import pydicom

from qsmnode.dicom.classify import classify_instance
from qsmnode.node.classifier import Classified, classify_sources
from qsmnode.node.index import series_components
from qsmnode.node.rules import AcquisitionFacts, match_rules, resolve_destinations
from qsmnode.threads import lower_thread_priority

log = logging.getLogger("qsmnode.tracker")

_HEADER_TAGS = None  # read whole headers (stop_before_pixels): rules may test any attribute


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    out, start, prev = [], None, None
    for n in sorted(numbers):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def describe_missing(series_rows: list[dict], instances: list[dict]) -> list[str]:
    """One sentence per short series naming its missing InstanceNumbers and short echoes."""
    by_series = defaultdict(list)
    for inst in instances:
        by_series[inst["series_instance_uid"]].append(inst)
    lines = []
    for s in series_rows:
        expected, received = s.get("expected"), s.get("received", 0)
        if not expected or received >= expected:
            continue
        insts = by_series.get(s["series_instance_uid"], [])
        numbers = {i["instance_number"] for i in insts if i.get("instance_number")}
        missing = [n for n in range(1, expected + 1) if n not in numbers] if numbers else []
        line = (f"series {s['series_instance_uid']} ({s.get('description') or 'no description'}, "
                f"{'/'.join(sorted(series_components(s))) or 'unknown component'}) has {received} of {expected} instances")
        if missing:
            line += f"; missing slices (InstanceNumber) {_ranges(missing)}"
        per_echo = Counter(e for i in insts for e in (i.get("echo_numbers") or "").split(",") if e)
        if len(per_echo) > 1:
            most = max(per_echo.values())
            short = {int(e): n for e, n in per_echo.items() if n < most}
            if short:
                line += "; short echoes: " + ", ".join(f"echo {e} has {n} of {most} slices"
                                                       for e, n in sorted(short.items()))
        lines.append(line)
    return lines


def _components(series: list[dict]) -> set[str]:
    """Every image component held by the series of one acquisition (a GE series may hold two or
    three: real and imaginary images interleaved)."""
    return set().union(*(series_components(s) for s in series))


def _has_complex_pair(components: set[str]) -> bool:
    return ("mixed" in components or {"magnitude", "phase"} <= components or {"real", "imaginary"} <= components)


class Tracker:
    """Turns indexed instances into queued jobs (see module docstring).

    ``config``: NodeConfig (quiet/cap times, rules, destinations, known AEs); ``index``: Index;
    ``spool``: the Spool the instances are in (read through it, since a just-received instance
    may not have its file yet; its files are written before a job is queued), or None to read
    the indexed paths directly; ``on_job(job_id)`` is called after a job is queued (the worker's
    wake-up); ``classifier``: classifies a batch of instances
    (:class:`qsmnode.node.classifier.ClassifierProcess` in the node), by default
    :func:`qsmnode.node.classifier.classify_sources` in this thread with ``classify`` (a
    Dataset -> InstanceInfo function, default qsmnode.dicom.classify.classify_instance);
    ``clock``: seconds.
    """

    def __init__(self, config, index, *, spool=None, metrics=None, audit=None,
                 on_job: Callable[[str], None] | None = None, classifier: Callable | None = None,
                 classify: Callable = classify_instance, clock: Callable[[], float] = time.time,
                 poll_seconds: float = 0.5):
        self.config = config
        self.index = index
        self.spool = spool
        self.metrics = metrics
        self.audit = audit
        self.on_job = on_job or (lambda job_id: None)
        self.classifier = classifier or partial(classify_sources, classify=classify)
        self.clock = clock
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qsmnode-tracker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        lower_thread_priority()
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            # while instances keep arriving, classify in batches (the parsing is in the classifier
            # process; recording each instance in the index stays in this one): once the burst
            # pauses for 0.2 s, or every 0.5 s at the latest, so the backlog left when the last
            # instance arrives stays short
            deadline = time.monotonic() + 0.5
            while self._wake.is_set() and time.monotonic() < deadline and not self._stop.is_set():
                self._wake.clear()
                self._wake.wait(0.2)
            self._wake.clear()
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the tracker must keep running; the error is logged
                log.exception("tracker step failed; will try again")
                time.sleep(self.poll_seconds)

    # ------------------------------------------------------------------ the work
    def step(self, now: float | None = None) -> list[str]:
        """Classify every pending instance, then decide on every open acquisition. Returns new job ids."""
        while self.classify_pending():
            if self._stop.is_set():
                return []
        return self.check_acquisitions(self.clock() if now is None else now)

    def classify_pending(self, batch: int = 500) -> int:
        rows = self.index.unclassified(batch)
        if not rows:
            return 0
        t0 = time.perf_counter()
        results = self.classifier([self._source(row["path"]) for row in rows])
        for row, result in zip(rows, results):
            if isinstance(result, Classified):
                info = result.info
                key = info.acquisition_key if not info.refusal else f"refused:{row['series_instance_uid']}"
                self.index.record_classification(
                    row, component=info.component, echo_numbers=tuple(info.echo_numbers),
                    instance_number=result.instance_number, acquisition_key=key,
                    expected_in_series=info.expected_in_series, description=result.description,
                    refusal=info.refusal)
            else:  # an unreadable instance is kept apart; it must not stop the tracker
                log.warning("cannot classify %s: %s", row["path"], result)
                self.index.record_classification(
                    row, component=None, echo_numbers=(), instance_number=None,
                    acquisition_key=f"refused:{row['series_instance_uid']}", expected_in_series=None,
                    refusal=f"unreadable header ({result})")
        if self.metrics:
            each = (time.perf_counter() - t0) / len(rows)
            for _ in rows:
                self.metrics.stage_seconds.labels(stage="classify").observe(each)
        return len(rows)

    def _source(self, path: str) -> bytes | str:
        """An instance's header for the classifier: its leading bytes while its file is not
        written yet, else its path."""
        if self.spool is None:
            return path
        return self.spool.pending_data(path, header_only=True) or path

    def check_acquisitions(self, now: float) -> list[str]:
        jobs = []
        cfg = self.config
        for acq in self.index.acquisitions("receiving"):
            series = self.index.series_of_acquisition(acq["id"])
            if not series:
                continue
            quiet = now - acq["last_seen"]
            if acq["acquisition_key"].startswith("refused:"):
                if quiet >= cfg.quiet_seconds:
                    reason = series[0].get("refusal") or "not a QSM input"
                    self.index.set_acquisition_state(acq["id"], "unmatched", reason, generation=acq["generation"])
                    log.info("series %s is not a QSM input: %s", series[0]["series_instance_uid"], reason)
                    if self.audit:
                        self.audit.record("completed", acquisition=acq["id"], outcome="not a QSM input",
                                          series_instance_uids=[s["series_instance_uid"] for s in series],
                                          reason=reason)
                continue
            components = _components(series)
            known = all(s["expected"] for s in series)
            short = [s for s in series if s["expected"] and s["received"] < s["expected"]]
            if known and not short and _has_complex_pair(components):
                why = "every series complete by count"
            elif short:
                if quiet < cfg.incomplete_cap_seconds:
                    continue
                jobs.append(self._fail_incomplete(acq, series, quiet))
                continue
            elif quiet >= cfg.quiet_seconds:
                why = f"no new instance for {quiet:.0f} s"
            else:
                continue
            job = self._complete(acq, series, components, why)
            if job:
                jobs.append(job)
        return jobs

    def _read_header(self, path: str) -> pydicom.Dataset:
        source = self._source(path)
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True)

    def _create_job(self, acq: dict, **job) -> str:
        """Queue (or record as failed) a job for ``acq``, after its instances' files are written:
        the job's process reads them."""
        if self.spool is not None:
            self.spool.materialize()
        return self.index.create_job(acq["id"], acq["generation"], **job)

    def facts(self, acq: dict, series: list[dict]) -> AcquisitionFacts:
        """Rule facts for an acquisition: one header per series plus components, echoes, senders."""
        headers = []
        for s in series:
            try:
                headers.append(self._read_header(s["first_path"]))
            except Exception as err:  # noqa: BLE001
                log.warning("cannot read header %s: %s", s["first_path"], err)
        echoes = set()
        for inst in self.index.instances_of_acquisition(acq["id"]):
            echoes.update(int(e) for e in (inst.get("echo_numbers") or "").split(",") if e)
        return AcquisitionFacts(headers=headers, components=_components(series),
                                echo_numbers=echoes,
                                calling_aes=set(filter(None, (acq.get("calling_aes") or "").split("\\"))))

    def _complete(self, acq: dict, series: list[dict], components: set[str], why: str) -> str | None:
        cfg = self.config
        n = sum(s["received"] for s in series)
        facts = self.facts(acq, series)
        rule, lines = match_rules(cfg.rules, facts)
        uids = [s["series_instance_uid"] for s in series]
        if rule is None:
            reason = "no rule matches: " + " | ".join(lines)
            self.index.set_acquisition_state(acq["id"], "unmatched", reason, generation=acq["generation"])
            log.info("acquisition %d complete (%s, %d instances, %d series) but %s", acq["id"], why, n, len(series),
                     reason)
            if self.audit:
                self.audit.record("completed", acquisition=acq["id"], study_instance_uid=acq["study_instance_uid"],
                                  series_instance_uids=uids, instances=n, outcome="no rule", reason=reason)
            return None
        dests, warnings = resolve_destinations(rule, cfg.destinations, cfg.known_aes, facts.calling_aes)
        for w in warnings:
            log.warning("acquisition %d: %s", acq["id"], w)
        params = {"parametric_map": rule.parametric_map, "summary_image": rule.summary_image,
                  "overrides": rule.overrides, "instances": n, "series": uids, "why_complete": why,
                  "rule_explanation": lines}
        job_id = self._create_job(acq, rule=rule.name, preset=rule.preset,
                                  destinations=[dataclasses.asdict(d) for d in dests], params=params)
        if not self.index.set_acquisition_state(acq["id"], "queued", generation=acq["generation"]):
            log.info("acquisition %d re-opened while queuing job %s", acq["id"], job_id)
        log.info("acquisition %d complete (%s): %d instances in %d series, rule %r, job %s -> %s", acq["id"], why, n,
                 len(series), rule.name, job_id, ", ".join(d.name for d in dests) or "no destination")
        if self.audit:
            self.audit.record("completed", acquisition=acq["id"], study_instance_uid=acq["study_instance_uid"],
                              series_instance_uids=uids, instances=n, rule=rule.name, job_id=job_id,
                              destinations=[d.name for d in dests], why=why)
        self.on_job(job_id)
        return job_id

    def _fail_incomplete(self, acq: dict, series: list[dict], quiet: float) -> str:
        missing = describe_missing(series, self.index.instances_of_acquisition(acq["id"]))
        reason = (f"incomplete acquisition: no new instance for {quiet:.0f} s (cap "
                  f"{self.config.incomplete_cap_seconds:g} s): " + "; ".join(missing) +
                  ". Send the missing instances again (the acquisition re-opens) or run `qsmnode retry` to "
                  "reconstruct what is there")
        # keep the rule's choices so that `qsmnode retry` can still push what is there through the loader
        facts = self.facts(acq, series)
        rule, _ = match_rules(self.config.rules, facts)
        dests = []
        if rule is not None:
            dests, _ = resolve_destinations(rule, self.config.destinations, self.config.known_aes, facts.calling_aes)
        params = {"incomplete": True, "series": [s["series_instance_uid"] for s in series]}
        if rule is not None:
            params.update(parametric_map=rule.parametric_map, summary_image=rule.summary_image,
                          overrides=rule.overrides)
        job_id = self._create_job(acq, rule=rule.name if rule else "", preset=rule.preset if rule else "auto",
                                  destinations=[dataclasses.asdict(d) for d in dests], params=params,
                                  state="failed", reason=reason)
        self.index.set_acquisition_state(acq["id"], "failed", reason, generation=acq["generation"])
        log.warning("acquisition %d failed: %s", acq["id"], reason)
        if self.audit:
            self.audit.record("failed", acquisition=acq["id"], job_id=job_id,
                              study_instance_uid=acq["study_instance_uid"],
                              series_instance_uids=[s["series_instance_uid"] for s in series], reason=reason)
        return job_id
