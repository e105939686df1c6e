"""Free ports on 127.0.0.1, and waiting for a port to open or close."""

from __future__ import annotations

import contextlib
import socket
import time


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (worker i serves metrics on base + i)."""
    while True:
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_port(port: int, *, open_: bool, timeout: float, what: str) -> None:
    """Wait until ``port`` accepts connections (``open_``) or refuses them. Raises
    RuntimeError naming ``what`` when time runs out."""
    deadline = time.monotonic() + timeout
    while port_open(port) != open_:
        if time.monotonic() > deadline:
            state = "open" if open_ else "close"
            raise RuntimeError(f"{what}: port {port} did not {state} within {timeout:.0f}s")
        time.sleep(0.05)
