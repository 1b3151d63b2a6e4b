"""Start, wait for, and stop a real ``python -m sglang.launch_server`` process.

Used by the test suite, the demo (`python -m headkv_sglang.dev.demo`) and the benchmarks, so
all of them start servers the same way: in their own process group (so SGLang's
scheduler and detokenizer die with it), logging to a file, with a readiness poll that
fails with the log's tail as soon as the process exits or the timeout passes.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message carries its log tail."""


class PortTaken(ServerError):
    """uvicorn could not bind the HTTP port: something took it after it was chosen."""


# What uvicorn logs when its bind fails; the server then hangs in shutdown instead of exiting.
BIND_ERROR = "error while attempting to bind on address"


# Ports handed out for servers and routers: under the kernel's ephemeral range (32768+ by
# default), where every outgoing connection and every gloo pair of a starting server takes its
# local port (CI once lost a server start to that: the port chosen with bind(0) was taken by the
# time uvicorn bound it, ~50 s later), and under SGLang's own 22000-29999 for its NCCL port.
PORT_RANGE = (12000, 21999)


def free_port(attempts: int = 200) -> int:
    """A free TCP port on 127.0.0.1, outside the ephemeral range and SGLang's NCCL range."""
    low, high = PORT_RANGE
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    for port in random.sample(range(low, high + 1), min(attempts, high - low + 1)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    # SGLang prints one 'Ignore import error' line per optional model module on CPU.
    text = [ln for ln in text if "Ignore import error when loading" not in ln]
    return "\n".join(text[-lines:])


class SGLangServer:
    """One SGLang HTTP server process.

    Parameters
    ----------
    model_path : the ``--model-path`` value.
    args : further ``launch_server`` flags, e.g. ``["--kv-policy", "headkv"]``.
    port : TCP port on 127.0.0.1; a free one when None.
    log_path : where stdout+stderr go; a temporary file when None.
    env : extra environment variables for the server.
    startup_timeout : seconds to wait for readiness before failing.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 420.0,
    ) -> None:
        self.model_path = str(model_path)
        self.args = list(args)
        self.port_given = port is not None
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", self.model_path,
            "--host", "127.0.0.1", "--port", str(self.port),
            *self.args,
        ]

    def start(self, port_attempts: int = 3) -> "SGLangServer":
        """Launch and wait for /health. A port lost to a race is replaced by a fresh one
        (up to ``port_attempts`` launches), unless the caller chose the port."""
        for attempt in range(1, port_attempts + 1):
            try:
                return self._launch()
            except PortTaken:
                if self.port_given or attempt == port_attempts:
                    raise
                self.port = free_port()

    def _launch(self) -> "SGLangServer":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        finally:
            log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(
                    f"SGLang server exited with code {rc} before becoming ready.\n"
                    f"command: {' '.join(self.command())}\nlog ({self.log_path}):\n{log_tail(self.log_path)}"
                )
            if self.healthy():
                return
            if self._log_says(BIND_ERROR):
                raise PortTaken(
                    f"SGLang server could not bind port {self.port}.\nlog ({self.log_path}):\n{log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"SGLang server not ready after {self.startup_timeout:.0f} s.\n"
                    f"log ({self.log_path}):\n{log_tail(self.log_path)}"
                )
            time.sleep(1.0)

    def _log_says(self, text: str) -> bool:
        try:
            return text in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def get_json(self, path: str, timeout: float = 60.0) -> dict:
        import json

        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: dict, timeout: float = 600.0) -> tuple[int, dict]:
        """POST ``body`` as JSON; (HTTP status, decoded answer), error statuses included."""
        import json

        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def flush_cache(self, timeout: float = 60.0) -> bool:
        """``POST /flush_cache``: SGLang empties its radix cache (and the plugin its idle shared
        compressed prompts) when no request runs. True if it did."""
        req = urllib.request.Request(f"{self.url}/flush_cache", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def plugin_state(self) -> dict:
        """``/server_info`` -> the scheduler's ``headkv_sglang`` state (pool occupancy, integrity)."""
        return self.get_json("/server_info")["internal_states"][0]["headkv_sglang"]

    def wait_idle(self, timeout: float = 120.0) -> dict:
        """The plugin state once no request runs (compressed or not); TimeoutError after ``timeout`` s."""
        import json

        deadline = time.monotonic() + timeout
        while True:
            st = self.plugin_state()
            if st["token_pool"]["running_requests"] == 0 and st.get("running_compressed_requests", 0) == 0:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not idle after {timeout} s: {json.dumps(st)[:2000]}")
            time.sleep(0.5)

    def stop(self, grace: float = 2.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL after ``grace`` seconds.

        The scheduler and detokenizer exit on SIGTERM at once; SGLang's launcher then sees a
        child gone and sleeps 5 s "before crash diagnostics" before it exits. Nothing is
        left to flush by then, so 2 s is enough (the suite and the benchmarks stop ~25
        servers a run)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive the leader (scheduler, detokenizer): always sweep it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
