"""End-to-end: a real SGLang server on the test model, real OpenAI clients."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from headkv_sglang.dev.haystack import needle_prompt
from headkv_sglang.dev.server import ServerError, SGLangServer

pytestmark = pytest.mark.server


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_chat_answers_capital_of_france(openai_client):
    r = openai_client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content


def test_completions_endpoint(openai_client):
    prompt = (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    r = openai_client.completions.create(model="default", prompt=prompt, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.prompt_tokens > 5


def test_needle_in_2k_token_haystack(openai_client):
    needle = needle_prompt(1500, depth=0.5, seed=3)
    r = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": needle.prompt}], max_tokens=16, temperature=0
    )
    assert 1700 <= r.usage.prompt_tokens <= 2600, r.usage.prompt_tokens
    assert needle.answer in r.choices[0].message.content, (needle.answer, r.choices[0].message.content)


def test_plugin_runs_in_scheduler_subprocess(server):
    info = _get(f"{server.url}/server_info")
    state = info["internal_states"][0]["headkv_sglang"]  # written by a hook inside the scheduler
    launcher_pid = server.proc.pid
    assert state["pid"] != launcher_pid, "plugin state came from the launcher, not the scheduler"
    assert state["ppid"] == launcher_pid, (state, launcher_pid)
    cmdline = open(f"/proc/{state['pid']}/cmdline", "rb").read().decode(errors="replace")
    assert "sglang::scheduler" in cmdline, cmdline
    # CPU auto-configuration applied without any flag on the command line.
    assert "--device" not in server.command() and "--attention-backend" not in server.command()
    assert state["cpu_auto"] is True
    assert info["device"] == "cpu"
    assert info["attention_backend"] == "torch_native"


def test_bad_model_path_fails_fast_with_sglang_error(model_path, tmp_path):
    srv = SGLangServer(tmp_path / "no-such-model", log_path=tmp_path / "bad.log", startup_timeout=240)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as exc:
        srv.start()
    assert time.monotonic() - t0 < 120
    msg = str(exc.value)
    assert "exited with code" in msg
    assert "no-such-model" in msg and "OSError" in msg, msg  # SGLang/transformers' own error is shown
    assert srv.proc.poll() is not None


def test_run_command_fails_fast_on_bad_model_path(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "headkv_sglang.dev.demo", "--model-path", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 1
    # the run command serves with --kv-policy headkv: the plugin rejects the path at startup,
    # before any weights load, naming the flag and the file it could not read
    assert "--model-path: cannot read" in proc.stderr and "missing/config.json" in proc.stderr, proc.stderr[-3000:]
    assert "exited with code 2 before becoming ready" in proc.stderr
