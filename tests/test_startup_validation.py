"""Invalid --kv-* flags stop the launcher before any weights load, with one line naming the flag."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

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


# (flags, the one-line message). Each is checked in-process, through SGLang's own argument
# parser and the plugin's launcher hooks (importing SGLang once instead of a launcher per
# case: ~30 s each on CI); the first two also through a real launcher, end to end.
BAD_FLAGS = [
    (["--kv-policy", "headkv", "--kv-budget", "0"], "error: --kv-budget: invalid value 0; expected an integer in [1, 1048576]"),
    (["--kv-policy", "streamingllm", "--kv-budget", "4", "--kv-sink-size", "4"],
     "error: --kv-sink-size: invalid value 4; sinks must leave room for recent tokens: < --kv-budget (4)"),
    (["--kv-policy", "headkv", "--kv-budget", "150%"],
     "error: --kv-budget: invalid value '150%'; expected an integer in [1, 1048576] (tokens per KV head) or a "
     "share of the prompt like '5%'"),
    (["--kv-policy", "snapkv", "--kv-budget", "16", "--kv-window", "32"],
     "error: --kv-window: invalid value 32; the observation window must not exceed --kv-budget (16)"),
    (["--kv-policy", "headkv", "--kv-question", "5000"],
     "error: --kv-question: invalid value 5000; expected an integer in [0, 4096]"),
    (["--kv-policy", "headkv", "--kv-kernel-size", "4"], "error: --kv-kernel-size: invalid value 4; expected an odd integer"),
    (["--kv-policy", "headkv", "--kv-pool-fraction", "1.5"], "error: --kv-pool-fraction: invalid value 1.5; expected a number in (0.0, 0.95]"),
    (["--kv-policy", "headkv", "--kv-head-profile", "/no/such/profile.json"],
     "error: --kv-head-profile: invalid value '/no/such/profile.json'; no such file"),
    (["--kv-policy", "snapkv", "--attention-backend", "triton"],
     "error: --kv-policy works with --attention-backend flashinfer or torch_native (got 'triton'); leave it unset "
     "for flashinfer on CUDA, torch_native on CPU"),
    (["--kv-policy", "snapkv", "--decode-attention-backend", "triton"],
     "error: --kv-policy needs --decode-attention-backend unset or equal to --attention-backend (torch_native)"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS[:2])
def test_bad_flag_exits_before_weights_load(model_path, flags, message):
    r = launch(model_path, *flags)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-3000:]
    assert "Load weight begin" not in r.stderr + r.stdout


@pytest.fixture(scope="module")
def sglang_parser():
    """SGLang's launch_server argument parser with the plugin's flags, as the launcher builds it."""
    from sglang.srt.server_args import ServerArgs

    from headkv_sglang.plugin import _add_cli_args

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    if not any("--kv-policy" in a.option_strings for a in parser._actions):  # the plugin's hook did not run here
        _add_cli_args(None, parser)
    return parser


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flag_is_one_line_naming_it(sglang_parser, model_path, flags, message, capsys, monkeypatch):
    """The launcher's two hooks, in order: ServerArgs.from_cli_args (our flags), then resolve_once
    (what --kv-policy needs of SGLang's flags), on the parsed command line; CPU as on CI."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")  # restored after the test; the hook sets it on success
    ns = sglang_parser.parse_args(["--model-path", str(model_path), *flags])
    with pytest.raises(SystemExit) as exc:
        plugin._from_cli_args(None, ns)
        plugin._resolve_once(types.SimpleNamespace(**vars(ns)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_good_flags_pass_both_hooks(sglang_parser, model_path, capsys, monkeypatch):
    """The same path accepts a valid command line (so the cases above fail for their flag)."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR, KVPolicyConfig

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")
    ns = sglang_parser.parse_args(["--model-path", str(model_path), "--kv-policy", "razor", "--kv-budget", "2%",
                                   "--kv-scoring", "question", "--kv-razor-heads", "budget"])
    plugin._from_cli_args(None, ns)
    args = types.SimpleNamespace(**vars(ns))
    plugin._resolve_once(args)
    cfg = KVPolicyConfig.from_env()
    assert (cfg.policy, cfg.budget_ratio, cfg.budget_label, cfg.scoring, cfg.razor_heads) == (
        "razor", 0.02, "2%", "question", "budget")
    # the overlap scheduler stays on: compression runs inside the prefill forward
    assert args.attention_backend == "torch_native" and not args.disable_overlap_schedule
    assert capsys.readouterr().err == ""


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
