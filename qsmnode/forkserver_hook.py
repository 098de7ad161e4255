"""Imported by a ``multiprocessing`` forkserver (``set_forkserver_preload``): the forkserver dies
with the process that started it, and with it every worker it forked (they die with their parent,
:func:`qsmnode.child_process.die_with_parent`). See :mod:`qsmnode.child_process` for why."""

from qsmnode.child_process import die_with_parent

die_with_parent()
