"""``blipdiffusion-trt triton-probe`` against servers that are not Triton's HTTP endpoint (issue 20.8):
one printable line on stderr, exit status 1, never a traceback or the peer's binary bytes.

Each fake peer listens on 127.0.0.1 only and answers one connection at a time with fixed bytes.
"""

from __future__ import annotations

import socket
import threading

import pytest

from helpers import run_cli

# what a gRPC (HTTP/2) port sends first: a SETTINGS frame, then a GOAWAY with binary payload
HTTP2_FRAMES = bytes.fromhex("000006040000000000000500004000") + bytes.fromhex("00000807000000000000000000000001") + bytes(range(256))
PEERS = {
    "grpc port": HTTP2_FRAMES,
    "binary junk": bytes(range(256)) * 4,
    "closes at once": b"",
    "html, not json": b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 12\r\n\r\n<html>\x00\x01</html>"[:-2],
    "json list": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
    "half a response": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"a\"",
}


class Peer:
    """A TCP server on 127.0.0.1 that reads a little, writes ``answer`` and closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("name", list(PEERS))
def test_probe_of_a_port_that_is_not_tritons_http_is_one_line(name):
    peer = Peer(PEERS[name])
    try:
        result = run_cli("triton-probe", "--url", f"127.0.0.1:{peer.port}", "--timeout", "5", timeout=120)
    finally:
        peer.close()
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unhealthy: "), result.stderr
    assert lines[0].isprintable() and lines[0].isascii(), repr(lines[0])
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(lines[0]) < 400, lines[0]
