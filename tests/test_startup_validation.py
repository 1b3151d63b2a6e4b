"""Invalid --kv-* flags stop the launcher before any weights load, with one line naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from headkv_sglang.profiles import HeadProfile


def launch(model_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--port", "1", *flags],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def wrong_shape_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "wrong.json"
    HeadProfile(architecture="LlamaForCausalLM", model_name="other", num_layers=2, num_q_heads=4, num_kv_heads=2,
                head_dim=8, method="r2", parameters={}, scores=[[1.0] * 4] * 2).save(path, heatmap=False)
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-policy", "headkv", "--kv-budget", "0"], "error: --kv-budget: invalid value 0; expected an integer in [1, 1048576]"),
        (["--kv-policy", "headkv", "--kv-budget", "150%"],
         "error: --kv-budget: invalid value '150%'; expected an integer in [1, 1048576] (tokens per KV head) or a "
         "share of the prompt like '5%'"),
        (["--kv-policy", "snapkv", "--kv-budget", "16", "--kv-window", "32"],
         "error: --kv-window: invalid value 32; the observation window must not exceed --kv-budget (16)"),
        (["--kv-policy", "snapkv", "--kv-scoring", "last"], "--kv-scoring: invalid choice: 'last'"),
        (["--kv-policy", "headkv", "--kv-question", "5000"],
         "error: --kv-question: invalid value 5000; expected an integer in [0, 4096]"),
        (["--kv-policy", "headkv", "--kv-kernel-size", "4"], "error: --kv-kernel-size: invalid value 4; expected an odd integer"),
        (["--kv-policy", "headkv", "--kv-pool-fraction", "1.5"], "error: --kv-pool-fraction: invalid value 1.5; expected a number in (0.0, 0.95]"),
        (["--kv-policy", "streamingllm", "--kv-budget", "4", "--kv-sink-size", "4"],
         "error: --kv-sink-size: invalid value 4; sinks must leave room for recent tokens: < --kv-budget (4)"),
        (["--kv-policy", "headkv", "--kv-head-profile", "/no/such/profile.json"],
         "error: --kv-head-profile: invalid value '/no/such/profile.json'; no such file"),
        (["--kv-policy", "snapkv", "--attention-backend", "triton"],
         "error: --kv-policy works with --attention-backend flashinfer or torch_native (got 'triton'); leave it unset "
         "for flashinfer on CUDA, torch_native on CPU"),
        (["--kv-policy", "snapkv", "--decode-attention-backend", "triton"],
         "error: --kv-policy needs --decode-attention-backend unset or equal to --attention-backend (torch_native)"),
    ],
)
def test_bad_flag_exits_before_weights_load(model_path, flags, message):
    r = launch(model_path, *flags)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-3000:]
    assert "Load weight begin" not in r.stderr + r.stdout


def test_unknown_policy_is_an_argparse_error(model_path):
    r = launch(model_path, "--kv-policy", "magic")
    assert r.returncode == 2
    assert "--kv-policy: invalid choice: 'magic'" in r.stderr


def test_profile_of_another_shape_is_rejected(model_path, wrong_shape_profile):
    r = launch(model_path, "--kv-policy", "headkv", "--kv-head-profile", str(wrong_shape_profile))
    assert r.returncode == 2
    assert "error: --kv-head-profile: profile is for other (layers, query heads, KV heads, head_dim) = (2, 4, 2, 8), " \
           "the served model has (30, 9, 3, 64)" in r.stderr, r.stderr[-2000:]


def test_corrupt_profile_is_rejected(model_path, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "r2"}))
    r = launch(model_path, "--kv-policy", "headkv", "--kv-head-profile", str(bad))
    assert r.returncode == 2 and "missing field(s)" in r.stderr and str(bad) in r.stderr


def test_flags_are_listed_in_help():
    r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, timeout=300)
    from headkv_sglang.plugin import FLAGS

    assert len(FLAGS) >= 17
    for flag in FLAGS:
        assert flag in r.stdout, flag
    assert "share of each prompt (5%)" in " ".join(r.stdout.split())
