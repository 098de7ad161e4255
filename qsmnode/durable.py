"""Durable file-system writes: what a crash (or power loss) cannot undo once these return."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename/creation inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fdatasync, rename, fsync folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        write_all(fd, (data,))
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_all(fd: int, parts) -> None:
    """Write every buffer of ``parts`` in order (one ``writev`` unless the kernel writes short)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def syncfs(path: str | os.PathLike) -> None:
    """Flush every dirty page and the metadata of the file system holding ``path`` (Linux
    ``syncfs(2)``; elsewhere ``sync(2)``): one call makes many files written without their own
    fsync durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            if ctypes.CDLL("libc.so.6", use_errno=True).syncfs(fd) == 0:
                return
        except (OSError, AttributeError):
            pass
        os.sync()
    finally:
        os.close(fd)
