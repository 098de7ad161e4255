"""Fuzzing the receiver of a real ``qsmnode serve`` over real associations (issue 13).

Several hundred malformed MR instances, made in memory from a fixed seed (:mod:`tests.malformed`:
the issue's classes, truncations, wrong VRs, bad lengths, garbage, impossible attributes, plus
valid controls in every transfer syntax), go out many per association. Then:

* every C-STORE was answered, with a status or an A-ABORT (never a silently closed connection);
* every instance the node acknowledged is read back from its spool file by the loader's own
  reader (:func:`qsmnode.dicom.load._read`, ``_stored_pixels``, ``_classified``);
* the planted patient identifiers appear in clear in no log the node wrote.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from conftest import require_tools
from node_helpers import ECHOSCU_BIN, NodeProcess
from raw_scu import Aborted, Closed, RawStoreSCU
from tests import malformed

pytestmark = pytest.mark.integration

SEED = 13
PER_ASSOCIATION = 60
CAP_MB = 4  # the node's max_instance_mb: a deflate bomb past it stays cheap to make and to refuse


def fuzz_cases(rng: random.Random) -> list[malformed.Sent]:
    """The instances to send: each class many times over, shuffled (deterministic for ``SEED``)."""
    syntaxes = [*malformed.NATIVE_SYNTAXES, RLELossless]
    cases = []
    for _ in range(25):
        cases.append(malformed.deeply_nested(rng.choice([33, 40, 100, 500, 800]),
                                             rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        cases.append(malformed.deeply_nested(rng.randrange(1, 33)))
        cases.append(malformed.little_endian_on_big_endian_context())
        cases.append(malformed.native_pixels_on_rle_context())
        cases.append(malformed.impossible_attributes(rng.choice(sorted(malformed.IMPOSSIBLE_ATTRIBUTES)),
                                                     rng.choice(syntaxes[:3])))
        cases.append(rng.choice([malformed.ct_data_set_under_mr_command,
                                 malformed.ct_class_mr_modality_under_mr_command])())
        cases.append(malformed.enormous_compressed(rng.randrange(2048, 65536), rng.randrange(2048, 65536)))
        cases.append(malformed.identifiers_in_a_value(rng.choice(sorted(malformed.QUOTED_WHEN_READ))))
        cases.append(malformed.valid(rng.choice(syntaxes)))
    cases += [malformed.deflate_bomb(CAP_MB * 2) for _ in range(3)]
    for _ in range(90):
        cases.append(malformed.truncated(rng, rng.choice(syntaxes)))
        cases.append(malformed.wrong_vr(rng))
        cases.append(malformed.bad_length(rng, rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        cases.append(malformed.garbage(rng))
    for _ in range(60):
        cases.append(malformed.mixed_attributes(rng))
    rng.shuffle(cases)
    return cases


def send_all(node: NodeProcess, cases: list[malformed.Sent]) -> tuple[dict[str, int], Counter]:
    """Send every case, ``PER_ASSOCIATION`` per association (a new one after an A-ABORT).
    Returns SOP Instance UID -> status (-1: aborted) and the count of silently closed connections."""
    pairs = sorted({(s.sop_class_uid, s.transfer_syntax) for s in cases})
    outcome: dict[str, int] = {}
    closed: Counter = Counter()
    scu = None
    for n, case in enumerate(cases):
        if scu is None or n % PER_ASSOCIATION == 0:
            if scu is not None:
                scu.release()
            scu = RawStoreSCU(node.port, pairs)
        try:
            outcome[case.sop_instance_uid] = scu.store(case.sop_class_uid, case.sop_instance_uid,
                                                       case.transfer_syntax, case.data).status
        except Aborted:
            outcome[case.sop_instance_uid] = -1
            scu.close()
            scu = None
        except Closed:
            closed[case.kind] += 1
            scu.close()
            scu = None
    if scu is not None:
        scu.release()
    return outcome, closed


def unreadable(path, sop_instance_uid: str) -> str | None:
    """Why the loader cannot read an acknowledged instance back (None: it can)."""
    from qsmnode.dicom import load

    ds = load._read(path)
    if not load._usable(ds):
        return "pydicom cannot read the file"
    try:
        if str(ds.SOPInstanceUID) != sop_instance_uid:
            return f"SOPInstanceUID reads as {ds.SOPInstanceUID!r}"
        load._classified(str(path), ds, path)
        pixels = load._stored_pixels(ds)
        if pixels.shape[1:] != (int(ds.Rows), int(ds.Columns)):
            return f"pixels of shape {pixels.shape}"
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def test_fuzzed_instances_are_answered_refused_or_readable_and_never_logged(tmp_path, free_port):
    require_tools(ECHOSCU_BIN)
    cases = fuzz_cases(random.Random(SEED))
    assert len(cases) >= 500
    node = NodeProcess(tmp_path / "node", free_port(), max_instance_mb=float(CAP_MB)).start()
    try:
        t0 = time.monotonic()
        outcome, closed = send_all(node, cases)
        seconds = time.monotonic() - t0
        acknowledged = {uid for uid, status in outcome.items() if status == 0x0000}
        files = node.spool_files(len(acknowledged), timeout_s=30)
    finally:
        node.stop()
    by_kind = {case.sop_instance_uid: case.kind for case in cases}
    print(f"{len(cases)} instances in {seconds:.1f} s: {len(acknowledged)} acknowledged, "
          f"{sum(1 for s in outcome.values() if s not in (0, -1))} refused with a status, "
          f"{sum(1 for s in outcome.values() if s == -1)} aborted; by kind: "
          f"{dict(Counter(c.kind.split('-')[0] for c in cases))}")
    assert not closed, f"connections closed without a status or an A-ABORT: {dict(closed)}"
    assert len(outcome) == len(cases)
    failures = {uid: (by_kind[uid], why) for uid in acknowledged
                if (why := unreadable(files[uid], uid) if uid in files else "no spool file")}
    assert not failures, f"{len(failures)} acknowledged instance(s) the loader cannot read: {failures}"
    valid = [c for c in cases if c.kind == "valid"]
    assert all(outcome[c.sop_instance_uid] == 0 for c in valid), "a valid control was refused"
    for log in (node.log_path, node.storage / "audit.log"):
        text = log.read_text(errors="replace")
        for value in malformed.PATIENT.values():
            assert value not in text, f"{value!r} in clear in {log.name}"
