"""Disable Nagle's algorithm on pyinfra's SSH connections (called from config.py).

paramiko leaves Nagle's algorithm on. pyinfra runs every fact and command as a small exec
request on one connection, and each then waits for the server's delayed ACK: ~40 ms per
command, which measured here as 50 ms instead of 5 ms per fact. OpenSSH's own client sets
TCP_NODELAY for the same reason. This changes no data sent, only when it is sent.
"""

from __future__ import annotations

import socket

from pyinfra.connectors.ssh import SSHConnector

_original_connect = SSHConnector._connect


def _connect_without_nagle(self) -> None:
    _original_connect(self)
    transport = self.client.get_transport() if self.client else None
    # A ProxyJump/ProxyCommand transport is not a TCP socket: leave it alone.
    if transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def install() -> None:
    SSHConnector._connect = _connect_without_nagle
