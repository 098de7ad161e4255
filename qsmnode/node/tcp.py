"""TCP tuning shared by the node's DICOM connections, the receiver's and the dispatcher's (Linux).

A DICOM peer with Nagle's algorithm on (DCMTK-based software as shipped: storescu, Orthanc) writes
one message in several small segments and holds each until the previous one is acknowledged;
Linux delays that ACK by up to 40 ms once a connection looks interactive, so every C-STORE would
wait ~40 ms. ``TCP_QUICKACK`` makes the kernel ACK at once, but it is not sticky: it has to be set
again after every ``recv``, which :class:`QuickAckSocket` does.
"""

from __future__ import annotations

import socket


class QuickAckSocket:
    """Socket proxy that re-arms ``TCP_QUICKACK`` after every ``recv`` (see the module docstring).

    Everything else is passed to the wrapped socket (plain or TLS).
    """

    def __init__(self, sock) -> None:
        self._sock = sock

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    def recv(self, *args, **kwargs):
        data = self._sock.recv(*args, **kwargs)
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:  # closed meanwhile: nothing to tune
            pass
        return data


def quick_ack(sock):
    """``sock`` wrapped in a :class:`QuickAckSocket` with quick ACKs on, or ``sock`` itself where
    the platform or socket has no ``TCP_QUICKACK``."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (AttributeError, OSError):
        return sock
    return QuickAckSocket(sock)
