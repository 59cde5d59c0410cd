"""tmemd's optional AF_VSOCK listener: guest identity is the peer's CID.

A host-side vsock listener is only reachable by QEMU guests through
vhost-vsock; without /dev/vhost-vsock no guest can connect, so tmemd skips
the listener (with a log line) instead of binding a socket nobody can reach.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import TypeVar

log = logging.getLogger("tmemd.vsock")

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"

GuestT = TypeVar("GuestT")


def vsock_unavailable_reason() -> str | None:
    """Why a host vsock listener cannot serve guests here, or None if it can."""
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python/kernel has no AF_VSOCK"
    if not os.path.exists(VHOST_VSOCK_DEVICE):
        return f"no {VHOST_VSOCK_DEVICE} (vhost_vsock not loaded): no guest can reach the host"
    return None


def guest_for_peer(peername: object, guests_by_cid: Mapping[int, GuestT]) -> GuestT | None:
    """Map an accepted vsock connection's peer address (cid, port) to its guest.

    Only the CID counts: it is assigned by the host (QEMU's guest-cid), so a
    guest cannot claim another's identity. Unknown CIDs map to None (refused).
    """
    if not isinstance(peername, tuple) or len(peername) != 2:
        return None
    cid = peername[0]
    if not isinstance(cid, int):
        return None
    return guests_by_cid.get(cid)


def open_vsock_listener(port: int) -> socket.socket | None:
    """A listening, non-blocking AF_VSOCK socket on any CID, or None (logged) if unavailable."""
    reason = vsock_unavailable_reason()
    if reason is not None:
        log.warning("vsock listener skipped", extra={"port": port, "reason": reason})
        return None
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen(16)
    except OSError as exc:
        listener.close()
        log.warning("vsock listener skipped", extra={"port": port, "reason": str(exc)})
        return None
    listener.setblocking(False)
    return listener
