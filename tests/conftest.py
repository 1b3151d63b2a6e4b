"""Shared fixtures: the test model and real SGLang servers.

A server fixture starts ``python -m sglang.launch_server`` on a free port, logs to a
file under pytest's tmp dir, and on any failing test that used it, the report gets the
log's tail. Teardown kills the server's whole process group.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from headkv_sglang.dev import models
from headkv_sglang.dev.server import SGLangServer, log_tail

# --sleep-on-idle: an idle SGLang scheduler otherwise busy-polls a whole core, and the
# suite keeps two servers up on a 2-core machine. Smaller than SGLang's default (which sizes the pool from free RAM: ~15 GB, ~20 s to
# allocate on this machine) so servers start faster; still > 8 full 8k-token contexts.
TEST_SERVER_ARGS = ["--max-total-tokens", "65536", "--sleep-on-idle"]

# The suite's servers walk every page on each /server_info (serving/metrics.py), not only
# the counters a production server checks.
os.environ.setdefault("HEADKV_SGLANG_CHECK_INTEGRITY", "1")

_servers: list[SGLangServer] = []
_module_servers: list[SGLangServer] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_module_servers():
    """Stop the servers a test module started (other than session ones) when it ends."""
    yield
    while _module_servers:
        _module_servers.pop().stop()


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = models.model_dir()
    if not (path / models.MANIFEST).exists():
        pytest.fail(f"test model missing at {path}: run `python -m headkv_sglang.dev.models fetch` (scripts/test.sh does)")
    return path


@pytest.fixture(scope="session")
def start_server(model_path, tmp_path_factory):
    """Factory: ``start_server(args=[...], name="x")`` -> a started SGLangServer, stopped at session end."""
    started: list[SGLangServer] = []

    def _start(args: list[str] = (), *, name: str = "server", env: dict | None = None,
               keep: bool = False) -> SGLangServer:
        """``keep=False``: stopped when the test module that started it ends (each server
        holds GBs of KV pool; the 24 GiB CI machine cannot keep every module's alive)."""
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        srv = SGLangServer(model_path, [*TEST_SERVER_ARGS, *args], log_path=log, env=env)
        started.append(srv)
        _servers.append(srv)
        if not keep:
            _module_servers.append(srv)
        return srv.start()

    yield _start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(start_server) -> SGLangServer:
    """The plain server: no flags beyond the test sizing (CPU defaults come from the plugin)."""
    return start_server(name="plain", keep=True)


@pytest.fixture(scope="session")
def kv_small_server(start_server) -> SGLangServer:
    """One small ``--kv-policy full`` server shared by the modules that need no other flags
    (policies chosen per request): each server start costs a minute or more on CI.

    20000 tokens of one memory (``--kv-memory auto`` on CPU: pages borrow SGLang's slots;
    ~1.4 GB in all, so it can stay up for the session).
    """
    return start_server(["--kv-policy", "full", "--max-total-tokens", "20000", "--enable-cache-report"],
                        name="kv-small", keep=True)


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.openai_base_url, api_key="none", timeout=300)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    uses_server = {"server", "start_server", "openai_client"} & set(getattr(item, "fixturenames", ()))
    if report.failed and uses_server:
        for srv in _servers:
            if srv.proc is not None:
                report.sections.append((f"server log {srv.log_path}", log_tail(srv.log_path, 80)))
