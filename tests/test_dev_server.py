"""The test/benchmark server harness itself: port choice and a start that lost its port.

The stand-in process below binds the port the way uvicorn does and, when the bind fails,
prints uvicorn's own message and hangs (what SGLang's server did in CI, until the 420 s
startup timeout). No SGLang here: these check the harness, which every server test rests on.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

from headkv_sglang.dev import server as dev_server
from headkv_sglang.dev.server import BIND_ERROR, PortTaken, SGLangServer

STAND_IN = r"""
import http.server, socket, sys, time
port = int(sys.argv[1])
try:
    httpd = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)
except OSError as e:
    print(f"ERROR:    [Errno {e.errno}] error while attempting to bind on address ('127.0.0.1', {port}): "
          "address already in use", flush=True)
    time.sleep(3600)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
httpd.RequestHandlerClass = H
httpd.serve_forever()
"""


class StandIn(SGLangServer):
    def command(self) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(self.port)]


def ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def test_free_ports_stay_under_the_ephemeral_range_and_sglangs_nccl_range():
    low, high = dev_server.PORT_RANGE
    ports = {dev_server.free_port() for _ in range(50)}
    assert len(ports) > 40  # drawn at random, not the same few
    assert all(low <= p <= high and p < ephemeral_low() for p in ports)
    assert high < 22000  # SGLang's get_free_port_below_ephemeral draws its NCCL port from 22000-29999
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free when handed out


def test_a_start_that_lost_its_port_is_relaunched_on_a_fresh_one(tmp_path):
    srv = StandIn("unused", log_path=tmp_path / "s.log", startup_timeout=60)
    lost = srv.port
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", lost))
        t0 = time.monotonic()
        try:
            srv.start()
            assert srv.port != lost and srv.healthy()
            assert time.monotonic() - t0 < 30  # found from the log, not by the startup timeout
        finally:
            srv.stop()


def test_a_port_the_caller_chose_is_not_replaced(tmp_path):
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        port = thief.getsockname()[1]
        srv = StandIn("unused", port=port, log_path=tmp_path / "s.log", startup_timeout=60)
        with pytest.raises(PortTaken) as exc:
            srv.start()
        assert BIND_ERROR in str(exc.value) and str(port) in str(exc.value)
        assert srv.proc.poll() is not None  # the hung process was stopped


def test_a_port_lost_on_every_attempt_gives_up(tmp_path, monkeypatch):
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        port = thief.getsockname()[1]
        monkeypatch.setattr(dev_server, "free_port", lambda: port)
        srv = StandIn("unused", log_path=tmp_path / "s.log", startup_timeout=60)
        with pytest.raises(PortTaken):
            srv.start(port_attempts=2)
