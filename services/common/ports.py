"""Free loopback TCP ports for tests and the local launcher.

Ports come from below the kernel's ephemeral range: a port the OS hands out for "any free port"
can be taken again a moment later by an outgoing connection or by UCX's own TCP listeners,
which all draw from that range; a port below it is only ever taken by someone asking for it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

FALLBACK_LOW = 20000  # where the search starts when the ephemeral range is unknown


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        return sock
    except OSError:
        sock.close()
        return None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free on `host` a moment ago, outside the ephemeral range."""
    high = _ephemeral_low() - 1
    low = min(FALLBACK_LOW, high - 4 * count)
    held: list[socket.socket] = []
    try:
        for port in random.sample(range(low, high), high - low):
            sock = _bindable(host, port)
            if sock is not None:
                held.append(sock)
                if len(held) == count:
                    return [int(s.getsockname()[1]) for s in held]
        raise OSError(f"no {count} free ports on {host} between {low} and {high}")
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port that was free on `host` a moment ago (a race with a deliberate bind remains)."""
    return free_ports(1, host)[0]


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
