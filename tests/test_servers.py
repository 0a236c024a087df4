"""The local-server helpers `grouplora ui` and the server tests use, against a real HTTP server."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pytest

from grouplora.orchestration.servers import answers, free_port, wait_http


def test_wait_http_returns_when_a_server_answers_and_fails_fast_otherwise():
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    assert not answers(url, timeout=1)  # nothing listens yet
    with pytest.raises(TimeoutError, match="did not answer"):
        wait_http(url, timeout=0.5, poll_s=0.1)
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert wait_http(url, timeout=10, poll_s=0.1) < 10 and answers(url)
    finally:
        server.shutdown()
        server.server_close()
    # a server process that dies is reported at once, not after the timeout
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_http(url, timeout=60, procs=[dead])
