"""Thread scheduling helpers."""

from __future__ import annotations

import os
import threading


def lower_thread_priority(niceness: int = 10) -> None:
    """Raise the calling thread's nice value by ``niceness`` (Linux sets it per thread), so its
    work yields the CPU to the threads that acknowledge instances. Elsewhere, or when not
    permitted, nothing happens."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except (AttributeError, OSError):
        pass
