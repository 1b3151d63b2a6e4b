"""Invalid --kv-* flags, SGLang options and model features that --kv-policy cannot serve stop the
launcher before any weights load, with one line naming the flag (or the config field)."""

from __future__ import annotations

import argparse
import json
import os
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
    (["--kv-policy", "headkv", "--kv-memory", "shared", "--kv-pool-fraction", "0.3"],
     "error: --kv-pool-fraction: invalid value 0.3; it sizes the compressed pool of --kv-memory split, and with "
     "--kv-memory shared the pages live in SGLang's token slots: leave it out (or use --kv-memory split)"),
    (["--kv-policy", "headkv", "--kv-pool-fraction", "1.5"], "error: --kv-pool-fraction: invalid value 1.5; expected a number in (0.0, 0.95]"),
    (["--kv-policy", "headkv", "--kv-head-profile", "/no/such/profile.json"],
     "error: --kv-head-profile: invalid value '/no/such/profile.json'; no such file"),
    (["--kv-policy", "snapkv", "--attention-backend", "triton"],
     "error: --kv-policy works with --attention-backend flashinfer or torch_native (got 'triton'); leave it unset "
     "for flashinfer on CUDA, torch_native on CPU"),
    (["--kv-policy", "snapkv", "--decode-attention-backend", "triton"],
     "error: --kv-policy needs --decode-attention-backend unset or equal to --attention-backend (torch_native)"),
]
# SGLang options --kv-policy refuses (headkv_sglang/unsupported.py): the message names the flag.
UNSUPPORTED = [
    (["--page-size", "16"], "error: --kv-policy does not support --page-size 16: SGLang's token pool must have "
     "pages of 1 token"),
    (["--kv-cache-dtype", "fp8_e4m3"], "error: --kv-policy does not support --kv-cache-dtype fp8_e4m3 yet: "
     "compressed pages are kept in the model's dtype"),
    (["--kv-cache-dtype", "fp8_e5m2"], "error: --kv-policy does not support --kv-cache-dtype fp8_e5m2 yet"),
    (["--speculative-algorithm", "EAGLE"], "error: --kv-policy does not support speculative decoding "
     "(--speculative-algorithm EAGLE)"),
    (["--enable-dp-attention"], "error: --kv-policy does not support --enable-dp-attention: "),
    (["--pp-size", "2"], "error: --kv-policy does not support --pp-size 2: with pipeline parallelism"),
    (["--dcp-size", "2"], "error: --kv-policy does not support --dcp-size 2 (decode context parallelism)"),
    (["--enable-prefill-cp"], "error: --kv-policy does not support --enable-prefill-cp (context-parallel prefill)"),
    (["--enable-hierarchical-cache"], "error: --kv-policy does not support --enable-hierarchical-cache yet: "),
    (["--enable-lmcache"], "error: --kv-policy does not support --enable-lmcache yet"),
    (["--disaggregation-mode", "prefill"], "error: --kv-policy does not support --disaggregation-mode prefill: "),
    (["--enable-two-batch-overlap"], "error: --kv-policy does not support --enable-two-batch-overlap: "),
    (["--enable-pdmux"], "error: --kv-policy does not support --enable-pdmux: "),
    (["--enable-streaming-session"], "error: --kv-policy does not support --enable-streaming-session: "),
    (["--enable-page-major-kv-layout"], "error: --kv-policy does not support --enable-page-major-kv-layout: "),
    (["--is-embedding"], "error: --kv-policy does not support --is-embedding: "),
    (["--enable-multimodal"], "error: --kv-policy does not support --enable-multimodal yet"),
]
BAD_FLAGS += [(["--kv-policy", "snapkv", *flags], message) for flags, message in UNSUPPORTED]
BAD_FLAGS += [(["--kv-policy", "snapkv", "--kv-share", "--tp-size", "2"],
               "error: --kv-share does not work with --tp-size 2 yet (each rank evicts its shared prompts on its own")]


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


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=lambda x: " ".join(x)[-40:] if isinstance(x, list) else "")
def test_bad_flag_is_one_line_naming_it(sglang_parser, model_path, flags, message, capsys, monkeypatch):
    """The launcher's two hooks, in order: ServerArgs.from_cli_args (our flags), then resolve_once
    (what --kv-policy needs of SGLang's flags), on the parsed command line; CPU as on CI."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")  # restored after the test; the hook sets it on success
    monkeypatch.setenv(plugin.TP_ENV_VAR, "1")  # likewise
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


@pytest.mark.parametrize("cpu, flags, memory, fraction", [
    ("1", [], "shared", 0.5),                                           # CPU: one memory
    ("", [], "split", 0.5),                                             # CUDA: the split pool
    ("1", ["--kv-pool-fraction", "0.25"], "split", 0.25),               # a fraction sizes a split
    ("1", ["--kv-memory", "split"], "split", 0.5),
    ("", ["--kv-memory", "shared"], "shared", 0.5),
])
def test_kv_memory_auto_as_the_launcher_publishes_it(sglang_parser, model_path, monkeypatch, cpu, flags, memory,
                                                     fraction):
    """--kv-memory auto (the default) reaches the scheduler resolved: what it runs on this device."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR, KVPolicyConfig

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", cpu)
    monkeypatch.setenv(ENV_VAR, "")
    ns = sglang_parser.parse_args(["--model-path", str(model_path), "--kv-policy", "headkv", *flags])
    assert ns.headkv_memory == "auto" or "--kv-memory" in flags
    plugin._from_cli_args(None, ns)
    cfg = KVPolicyConfig.from_env()
    assert (cfg.memory, cfg.pool_fraction) == (memory, fraction)


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


@pytest.mark.parametrize("flags", [["--page-size", "1"], ["--kv-cache-dtype", "bfloat16"], ["--kv-cache-dtype", "auto"],
                                   ["--enable-mixed-chunk"], ["--pp-size", "1"], ["--disaggregation-mode", "null"]],
                         ids=" ".join)
def test_supported_options_pass(sglang_parser, model_path, flags, capsys, monkeypatch):
    """What the refusals above must not catch: the same options at values --kv-policy serves."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.setenv(plugin.TP_ENV_VAR, "1")
    ns = sglang_parser.parse_args(["--model-path", str(model_path), "--kv-policy", "snapkv", *flags])
    plugin._from_cli_args(None, ns)
    plugin._resolve_once(types.SimpleNamespace(**vars(ns)))
    assert capsys.readouterr().err == ""


def test_options_are_ignored_without_kv_policy(sglang_parser, model_path, monkeypatch):
    """Plain SGLang (no --kv-policy) keeps every option."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")
    ns = sglang_parser.parse_args(["--model-path", str(model_path), "--page-size", "16", "--enable-dp-attention"])
    plugin._from_cli_args(None, ns)
    plugin._resolve_once(types.SimpleNamespace(**vars(ns)))


# Model features --kv-policy refuses, read from config.json (the test model's, with one field
# added): (added fields, the message). Then ones it serves.
MODEL_FEATURES = [
    ({"attn_logit_softcapping": 50.0}, "error: --kv-policy does not support the model's config.json "
     "attn_logit_softcapping=50.0: the compressed rows' attention applies no logit soft-capping"),
    ({"sliding_window": 4096}, "error: --kv-policy does not support the model's config.json sliding_window=4096: "
     "sliding-window attention"),
    ({"sliding_window": 4096, "use_sliding_window": True}, "config.json sliding_window=4096: "),
    ({"layer_types": ["sliding_attention", "full_attention"] * 15}, "config.json layer_types='... "
     "sliding_attention ...': only full-attention layers can be compressed"),
    ({"layer_types": ["linear_attention", "full_attention"] * 15}, "layer_types='... linear_attention ...'"),
    ({"sliding_window_pattern": 6}, "config.json sliding_window_pattern=6: "),
    ({"kv_lora_rank": 512}, "config.json kv_lora_rank=512: MLA models (DeepSeek-V2/V3 style)"),
    ({"query_pre_attn_scalar": 144}, "config.json query_pre_attn_scalar=144: attention is scaled by 144**-0.5, "
     "and the compressed rows by head_dim**-0.5 = 64**-0.5"),
    ({"attention_multiplier": 0.015625}, "config.json attention_multiplier=0.015625: attention is scaled by "
     "0.015625, and the compressed rows by head_dim**-0.5 = 0.125"),
    ({"attention_chunk_size": 8192}, "config.json attention_chunk_size=8192: chunked attention"),
    ({"alibi": True}, "config.json alibi=True: ALiBi"),
    ({"vision_config": {"hidden_size": 8}}, "config.json vision_config='{...}': multimodal models"),
    ({"quantization_config": {"quant_method": "fp8", "kv_cache_quant_algo": "FP8"}},
     "config.json quantization_config.kv_cache_quant_algo='FP8': the checkpoint asks for an FP8 KV cache"),
]
SERVED_FEATURES = [
    {"sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21},  # Qwen2's config
    {"final_logit_softcapping": 30.0},  # caps the LM head's logits, after attention
    {"query_pre_attn_scalar": 64},  # equal to head_dim
    {"attention_multiplier": 0.125},  # equal to head_dim ** -0.5
    {"layer_types": ["full_attention"] * 30},
    {"attn_logit_softcapping": None, "sliding_window": None},
]


def model_with(tmp_path, model_path, extra: dict, links: bool = False):
    """A model directory: the test model's config.json with ``extra`` fields (and, with
    ``links``, symlinks to its other files, weights included, for a real launch)."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = json.loads((model_path / "config.json").read_text())
    cfg.update(extra)
    (d / "config.json").write_text(json.dumps(cfg))
    if links:
        for f in model_path.iterdir():
            if f.name != "config.json":
                (d / f.name).symlink_to(f)
    return d


def run_hooks(sglang_parser, model_dir, monkeypatch, *flags: str) -> None:
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")
    ns = sglang_parser.parse_args(["--model-path", str(model_dir), "--kv-policy", "snapkv", *flags])
    plugin._from_cli_args(None, ns)
    plugin._resolve_once(types.SimpleNamespace(**vars(ns)))


@pytest.mark.parametrize("extra, message", MODEL_FEATURES, ids=lambda x: next(iter(x)) if isinstance(x, dict) else "")
def test_unsupported_model_feature_is_one_line_naming_it(sglang_parser, model_path, tmp_path, extra, message,
                                                         capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        run_hooks(sglang_parser, model_with(tmp_path, model_path, extra), monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra", SERVED_FEATURES, ids=lambda x: ",".join(x))
def test_served_model_features_pass(sglang_parser, model_path, tmp_path, extra, capsys, monkeypatch):
    run_hooks(sglang_parser, model_with(tmp_path, model_path, extra), monkeypatch)
    assert capsys.readouterr().err == ""


def test_unsupported_model_exits_before_weights_load(model_path, tmp_path):
    """End to end through a real launcher: the model check runs in resolve_once, before weights."""
    d = model_with(tmp_path, model_path, {"sliding_window": 512}, links=True)
    r = launch(d, "--kv-policy", "snapkv", "--kv-budget", "64")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: --kv-policy does not support the model's config.json sliding_window=512" in r.stderr, r.stderr[-3000:]
    assert "Load weight begin" not in r.stderr + r.stdout


def test_resolved_page_size_is_checked_after_resolution(monkeypatch, capsys):
    """SGLang's resolution may pick a page size (some backends force 64): the AFTER hook reads
    the resolved value, not the (unset) attribute."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR, KVPolicyConfig

    monkeypatch.setenv(ENV_VAR, KVPolicyConfig(policy="snapkv").to_json())
    args = types.SimpleNamespace(page_size=None, _resolved_overrides=[("a backend", {"page_size": 64})])
    with pytest.raises(SystemExit):
        plugin._check_resolved(None, args)
    assert "--kv-policy does not support --page-size 64" in capsys.readouterr().err
    ok = types.SimpleNamespace(page_size=None, _resolved_overrides=[("a backend", {"page_size": 1})])
    assert plugin._check_resolved("result", ok) == "result"
    monkeypatch.setenv(ENV_VAR, "")  # without --kv-policy nothing is checked
    assert plugin._check_resolved("result", args) == "result"


def test_built_layers_are_checked_when_the_backend_is_made():
    """The last net, for a model whose config.json did not say: the built attention layers."""
    import torch

    from headkv_sglang.plugin import _built_model_error

    class RadixAttention(torch.nn.Module):  # the attributes SGLang's layer has
        def __init__(self, layer_id, scaling=64 ** -0.5, logit_cap=0.0, sliding_window_size=-1):
            super().__init__()
            self.layer_id, self.qk_head_dim, self.head_dim, self.scaling = layer_id, 64, 64, scaling
            self.logit_cap, self.sliding_window_size, self.is_cross_attention = logit_cap, sliding_window_size, False

    def runner(*layers, dtype=torch.float32):
        return types.SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(2, 2), *layers), kv_cache_dtype=dtype)

    assert _built_model_error(runner(RadixAttention(0), RadixAttention(1))) is None
    assert _built_model_error(runner(RadixAttention(0), RadixAttention(1, scaling=0.0625))) == (
        "--kv-policy does not support attention layer 1's scaling 0.0625: the compressed rows scale by "
        "head_dim**-0.5 = 0.125")
    assert "layer 0's logit soft-capping (30.0)" in _built_model_error(runner(RadixAttention(0, logit_cap=30.0)))
    assert "layer 0's sliding window (4096 tokens)" in _built_model_error(
        runner(RadixAttention(0, sliding_window_size=4096)))
    assert "torch.float8_e4m3fn KV cache yet" in _built_model_error(runner(RadixAttention(0),
                                                                          dtype=torch.float8_e4m3fn))


def test_kv_share_request_on_a_tp_server_is_refused(monkeypatch):
    """A per-request setting the server cannot honour is a 400 naming the key: kv_share on --tp 2
    (each rank evicts its shared prompts on its own), published by the launcher's hook."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR, KVPolicyConfig

    monkeypatch.setenv(ENV_VAR, KVPolicyConfig(policy="snapkv").to_json())
    monkeypatch.setenv(plugin.TP_ENV_VAR, "1")
    ns = types.SimpleNamespace(model_path=None, tp_size=2, device="cpu", attention_backend="torch_native")
    plugin._resolve_once(ns)
    assert os.environ[plugin.TP_ENV_VAR] == "2"
    share = types.SimpleNamespace(custom_params={"kv_policy": "snapkv", "kv_share": True})
    with pytest.raises(ValueError) as err:
        plugin._verify_sampling_params("r", share)
    assert str(err.value) == ("custom_params.kv_share: invalid value True; this server runs --tp-size 2, where "
                              "prompts are not shared yet (each rank evicts its shared prompts on its own, so ranks "
                              "could disagree on what is shared); send false or leave it out")
    assert plugin._verify_sampling_params("r", types.SimpleNamespace(custom_params={"kv_share": False})) == "r"
    monkeypatch.setenv(plugin.TP_ENV_VAR, "1")
    assert plugin._verify_sampling_params("r", share) == "r"


def test_d2o_request_layers_on_a_tp_server_are_refused(monkeypatch, capsys):
    """D2O's per-request layer budgets measure the layers' density on a rank's own KV heads: under
    --tp the ranks would give layers different budgets, so the setting is refused at start-up and
    per request (a 400 naming the key); profile / uniform layers are served."""
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR, KVPolicyConfig

    monkeypatch.setenv(plugin.TP_ENV_VAR, "1")
    ns = types.SimpleNamespace(model_path=None, tp_size=2, device="cpu", attention_backend="torch_native")
    monkeypatch.setenv(ENV_VAR, KVPolicyConfig(policy="d2o", d2o_layers="request").to_json())
    with pytest.raises(SystemExit):
        plugin._resolve_once(ns)
    assert "--kv-d2o-layers request does not work with --tp-size 2" in capsys.readouterr().err
    monkeypatch.setenv(ENV_VAR, KVPolicyConfig(policy="d2o").to_json())
    plugin._resolve_once(ns)
    assert os.environ[plugin.TP_ENV_VAR] == "2"
    req = types.SimpleNamespace(custom_params={"kv_policy": "d2o", "kv_d2o_layers": "request"})
    with pytest.raises(ValueError, match=r"^custom_params\.kv_d2o_layers: invalid value 'request'; this server runs "
                                         r"--tp-size 2, .*; send profile or uniform$"):
        plugin._verify_sampling_params("r", req)
    ok = types.SimpleNamespace(custom_params={"kv_policy": "d2o", "kv_d2o_layers": "uniform"})
    assert plugin._verify_sampling_params("r", ok) == "r"
    monkeypatch.setenv(plugin.TP_ENV_VAR, "1")
    assert plugin._verify_sampling_params("r", req) == "r"
