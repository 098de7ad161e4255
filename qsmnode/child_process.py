"""What every child process of qsmnode does first (job processes, the loader's readers)."""

from __future__ import annotations

import signal


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``),
    so a killed node or job leaves no orphans. Elsewhere nothing happens."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
