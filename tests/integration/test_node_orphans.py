"""A killed node leaves no processes behind (issue 13 item 8): after SIGKILL of ``qsmnode serve``,
its classifier child, the multiprocessing helpers (forkserver, resource tracker) and its job
processes are gone within seconds, found by walking /proc for the node's descendants before the kill."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import require_tools
from node_helpers import ECHOSCU_BIN, NodeProcess, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    """Every living process below ``root`` (children, grandchildren, ...)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def describe(pids) -> str:
    out = []
    for pid in sorted(pids):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            command = "gone"
        out.append(f"{pid}: {command[:160]}")
    return "\n".join(out)


def test_a_killed_node_leaves_no_process_behind(tmp_path, free_port):
    require_tools(ECHOSCU_BIN)
    node = NodeProcess(tmp_path / "node", free_port()).start()
    try:
        # the classifier child (and its start method's helpers) start with the node; job
        # processes may start a moment later: take the set once it stops growing
        seen: set[int] = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = descendants(node.proc.pid)
            if now and now == seen:
                break
            seen = now
            time.sleep(1.0)
        assert seen, "the node started no child process (the classifier should be one)"
        node.kill()
        try:
            wait_until(lambda: not any(alive(p) for p in seen), 5, "the killed node's processes to end", poll_s=0.1)
        except TimeoutError:
            left = [p for p in seen if alive(p)]
            pytest.fail(f"{len(left)} process(es) of the killed node still run:\n{describe(left)}")
    finally:
        node.kill()
