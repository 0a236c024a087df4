"""Local servers: a free loopback port, and waiting until a server answers.

`grouplora ui` reports when its Dagster and MLflow servers answer; the browser and registry tests and the UI
screenshot benchmark start servers on free ports and wait for them the same way."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; a race with other processes is possible but rare)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def answers(url: str, timeout: float = 5.0) -> bool:
    """Does `url` answer a GET with status 200 (False while nothing listens or the server still starts)?"""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status (HTTPError is an OSError)
        return False


def wait_http(url: str, timeout: float, procs: Sequence[subprocess.Popen] = (), poll_s: float = 1.0) -> float:
    """Block until `url` answers 200; seconds waited. RuntimeError as soon as one of `procs` (the server's
    processes) has exited, TimeoutError after `timeout` seconds."""
    t0 = time.monotonic()
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, p.args))[:200]} exited with {p.returncode} before {url} answered")
        if answers(url):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(poll_s)
