"""What every child process of qsmnode does first (the classifier, job processes, the loader's readers).

A killed node (SIGKILL, OOM killer) runs no clean-up, so its children must end by themselves:
each calls :func:`die_with_parent` first. ``PR_SET_PDEATHSIG`` is tied to the process (strictly:
the thread) that started the child, so that must be the node or one of its own descendants that
dies with it. A ``multiprocessing`` forkserver breaks the chain: its children are the
forkserver's, and the forkserver outlives the node, because every child it forks holds a copy of
its keep-alive pipe (and of the resource tracker's), so neither ever sees the node go. The node
therefore starts the children it keeps with ``spawn`` (:mod:`qsmnode.node.classifier`), and
where a forkserver is worth it, the forkserver itself imports :mod:`qsmnode.forkserver_hook`,
which ties it to its parent too.
"""

from __future__ import annotations

import os
import signal


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``), so a
    killed node or job leaves no orphans. ``parent_pid``: the parent that started this process;
    if it died before the request took effect, exit at once. Elsewhere nothing happens."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)
