"""A free TCP port for a rendezvous (MASTER_PORT), standard library only.

``bind(("127.0.0.1", 0))`` would hand out a port from the kernel's ephemeral range -- the
range every outgoing connection on the machine draws from, gloo's own pair connections
included. Between choosing the port and torchrun listening on it, another job on the same
machine (two launcher runs at once, a test suite on two workers) can take it:
``EADDRINUSE``. So the port is drawn at random below the ephemeral range, where only
listeners that chose it explicitly can collide, and checked by binding it.
"""
from __future__ import annotations

import random
import socket

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST = 20000


def _ephemeral_start() -> int:
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    top = _ephemeral_start()
    if top - LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randrange(LOWEST, top)
            if _bindable(port, host):
                return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
