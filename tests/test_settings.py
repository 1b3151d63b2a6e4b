"""Settings declared once (policies/params.py): a new policy's hyperparameters become flags,
``--help`` text, request keys and validation messages with no other edit (CPU, fast)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from headkv_sglang.config import (REQUEST_KEYS, ConfigError, KVPolicyConfig, ModelShape, request_keys, settings,
                                  settings_table)
from headkv_sglang.policies import KVPolicy, compress_layer
from headkv_sglang.policies.params import Param, hyper, param, params_of
from headkv_sglang.policies.registry import build_policy, policy_params, registered

SHAPE = ModelShape(num_layers=2, num_q_heads=6, num_kv_heads=3, head_dim=8)


# The whole of a new policy with two hyperparameters: this class plus one registry line
# (here `registered(Strided)`; a shipped one adds ("strided", "module:Strided") to _BUILTIN).
@dataclass(frozen=True, kw_only=True)
class Strided(KVPolicy):
    """Toy: every head keeps its last ``window_size`` tokens and every ``stride``-th of the rest,
    counted from the ``anchor`` end, up to its budget."""

    name: ClassVar[str] = "strided"
    needs_queries: ClassVar[bool] = False

    window_size: int = 1
    stride: int = hyper(3, "Strided: keep every stride-th prompt token.", low=1, high=64)
    anchor: str = hyper("last", "Strided: count the stride from the 'first' or the 'last' token.",
                        choices=("first", "last"))

    def plan_budgets(self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_layers, num_kv_heads), min(budget, seq_len), dtype=torch.int64)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int, q_end: int | None = None) -> torch.Tensor:
        T = k.shape[1]
        pos = torch.arange(T, dtype=torch.float32)
        offset = pos if self.anchor == "first" else (T - 1 - pos)
        scores = torch.where(offset % self.stride == 0, 1.0 + pos / T, pos / T)  # on-stride first, newer first
        scores[T - min(self.window_size, T):] = float("inf")
        return scores.expand(k.shape[0], T).contiguous()


def naive_strided(T: int, budget: int, window: int, stride: int, anchor: str) -> list[int]:
    """The positions ``Strided`` keeps, by hand: window, then on-stride newest first, then the newest."""
    window = min(window, T, budget)
    order = list(range(T - window, T))
    rest = list(range(T - window - 1, -1, -1))
    on = [p for p in rest if (p if anchor == "first" else T - 1 - p) % stride == 0]
    order += on + [p for p in rest if p not in on]
    return sorted(order[:min(budget, T)])


@pytest.fixture(scope="module")
def sglang_parser_factory():
    """Builds SGLang's launch_server parser with the plugin's flags, as the launcher does."""
    from sglang.srt.server_args import ServerArgs

    from headkv_sglang.plugin import _add_cli_args

    def build() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="launch_server")
        ServerArgs.add_cli_args(parser)
        if not any("--kv-policy" in a.option_strings for a in parser._actions):
            _add_cli_args(None, parser)
        return parser

    return build


def test_toy_policy_flags_are_in_the_parser_and_help(sglang_parser_factory, model_path, monkeypatch):
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    assert "--kv-stride" not in plugin.FLAGS
    with registered(Strided):
        parser = sglang_parser_factory()
        flags = plugin.FLAGS
        assert flags["--kv-stride"][0] == "stride" and flags["--kv-anchor"][1]["choices"] == ("first", "last")
        text = " ".join(parser.format_help().split())
        assert "--kv-stride HEADKV_STRIDE Strided: keep every stride-th prompt token." in text, text[-3000:]
        assert "--kv-anchor {first,last} Strided: count the stride" in text
        assert "--kv-policy {full,headkv,snapkv,pyramidkv,adakv,streamingllm,razor,d2o,pod,strided}" in text
        assert "| `--kv-stride` | `kv_stride` | `3` | Strided: keep every stride-th prompt token. " \
               "Policies: strided. |" in settings_table()

        # the launcher's path: flags -> validated config -> the policy object
        monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
        monkeypatch.setenv(ENV_VAR, "")
        ns = parser.parse_args(["--model-path", str(model_path), "--kv-policy", "strided", "--kv-budget", "9",
                                "--kv-stride", "5", "--kv-anchor", "first"])
        plugin._from_cli_args(None, ns)
        cfg = KVPolicyConfig.from_env()
        assert (cfg.policy, cfg.budget, cfg.stride, cfg.anchor) == ("strided", 9, 5, "first")
        assert build_policy(cfg, SHAPE) == Strided(window_size=cfg.obs_window, stride=5, anchor="first")
        # defaults when the flags are not given
        ns = parser.parse_args(["--model-path", str(model_path), "--kv-policy", "strided"])
        assert plugin.config_from_namespace(ns).stride == 3

        # a bad value stops the launcher with one line naming the flag
        for argv, message in (
            (["--kv-stride", "0"], "error: --kv-stride: invalid value 0; expected an integer in [1, 64]"),
            (["--kv-stride", "65"], "error: --kv-stride: invalid value 65; expected an integer in [1, 64]"),
        ):
            ns = parser.parse_args(["--model-path", str(model_path), "--kv-policy", "strided", *argv])
            with pytest.raises(SystemExit) as exc:
                plugin._from_cli_args(None, ns)
            assert exc.value.code == 2
        with pytest.raises(SystemExit):  # argparse's own choices check
            parser.parse_args(["--model-path", str(model_path), "--kv-anchor", "middle"])
    assert "--kv-stride" not in plugin.FLAGS
    assert "--kv-stride" not in " ".join(sglang_parser_factory().format_help().split())


def test_bad_flag_message_is_printed(sglang_parser_factory, model_path, monkeypatch, capsys):
    from headkv_sglang import plugin
    from headkv_sglang.config import ENV_VAR

    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.setenv(ENV_VAR, "")
    with registered(Strided):
        ns = sglang_parser_factory().parse_args(["--model-path", str(model_path), "--kv-policy", "snapkv",
                                                 "--kv-stride", "0"])
        with pytest.raises(SystemExit):
            plugin._from_cli_args(None, ns)
    assert capsys.readouterr().err.strip() == "error: --kv-stride: invalid value 0; expected an integer in [1, 64]"


def test_toy_policy_request_keys_validate():
    server = KVPolicyConfig(policy="snapkv", budget=64).validate()
    assert "kv_stride" not in REQUEST_KEYS
    with registered(Strided):
        keys = request_keys()
        assert keys["kv_stride"].name == "stride" and keys["kv_anchor"].name == "anchor"
        got = server.with_request({"kv_policy": "strided", "kv_stride": 7, "kv_anchor": "first"})
        assert (got.policy, got.stride, got.anchor) == ("strided", 7, "first")
        assert server.with_request({"kv_stride": 7.0}).stride == 7  # an integral JSON float is an int
        assert server.stride == 3 and server.anchor == "last"  # the server's defaults
        for params, message in (
            ({"kv_stride": 0}, "custom_params.kv_stride: invalid value 0; expected an integer in [1, 64]"),
            ({"kv_stride": "7"}, "custom_params.kv_stride: invalid value '7'; expected int"),
            ({"kv_stride": 2.5}, "custom_params.kv_stride: invalid value 2.5; expected int"),
            ({"kv_anchor": "middle"}, "custom_params.kv_anchor: invalid value 'middle'; choose one of first, last"),
            ({"kv_anchor": 1}, "custom_params.kv_anchor: invalid value 1; expected str"),
        ):
            with pytest.raises(ConfigError) as err:
                server.with_request(params)
            assert str(err.value) == message
        # through the plugin's request hook (a ValueError there is SGLang's HTTP 400)
        from headkv_sglang import plugin
        from headkv_sglang.config import ENV_VAR

        import os
        old = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = server.to_json()
        try:
            sp = types.SimpleNamespace(custom_params={"kv_policy": "strided", "kv_stride": 64})
            assert plugin._verify_sampling_params("ok", sp) == "ok"
            with pytest.raises(ValueError, match=re.escape("custom_params.kv_stride: invalid value 65; ")):
                plugin._verify_sampling_params("ok", types.SimpleNamespace(custom_params={"kv_stride": 65}))
        finally:
            if old is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = old
    with pytest.raises(ConfigError, match=re.escape("custom_params.kv_stride: unknown key; allowed: kv_agnostic_kernel, kv_agnostic_select, kv_beta")):
        server.with_request({"kv_stride": 7})


def test_toy_policy_compresses_as_declared():
    """The policy the server builds from its settings keeps what the naive reference says."""
    g = torch.Generator().manual_seed(3)
    with registered(Strided):
        for T, budget, stride, anchor in ((54, 13, 4, "last"), (97, 30, 7, "first"), (5, 9, 2, "first")):
            cfg = KVPolicyConfig(policy="strided", budget=budget, window=3, stride=stride, anchor=anchor).validate()
            policy = build_policy(cfg, SHAPE)
            assert (policy.stride, policy.anchor, policy.window_size) == (stride, anchor, 3)
            k, v = torch.randn(2, SHAPE.num_kv_heads, T, SHAPE.head_dim, generator=g)
            planned = policy.plan_budgets(T, budget, SHAPE.num_layers, SHAPE.num_kv_heads)
            out = compress_layer(policy, 0, torch.empty(0), k, v, budget, planned)
            want = naive_strided(T, budget, 3, stride, anchor)
            for h in range(SHAPE.num_kv_heads):
                assert out.indices[out.indptr[h]:out.indptr[h + 1]].tolist() == want, (T, budget, stride, anchor)
        # the class checks its declared fields when built by hand too
        with pytest.raises(ValueError, match=re.escape("Strided.stride: expected an integer in [1, 64], got 0")):
            Strided(stride=0)
        with pytest.raises(ValueError, match=re.escape("Strided.anchor: choose one of first, last, got 'x'")):
            Strided(anchor="x")


def test_config_keywords_and_json_carry_the_hyperparameters():
    with registered(Strided):
        cfg = KVPolicyConfig(policy="strided", stride=5)
        assert cfg.params == (("stride", 5),) and cfg.anchor == "last"
        assert KVPolicyConfig(policy="strided", stride=3) == KVPolicyConfig(policy="strided")  # a default is not held
        assert hash(KVPolicyConfig(policy="strided", stride=3)) == hash(KVPolicyConfig(policy="strided"))
        assert dataclasses.replace(cfg, anchor="first").params == (("anchor", "first"), ("stride", 5))
        assert KVPolicyConfig.from_json(cfg.to_json()) == cfg
        assert KVPolicyConfig(**cfg.__dict__) == cfg  # what /server_info reports reads back
        with pytest.raises(TypeError, match=r"unknown setting\(s\) \['strde'\]"):
            KVPolicyConfig(strde=5)
    with pytest.raises(AttributeError, match="no setting 'stride'"):
        _ = KVPolicyConfig().stride


def test_one_name_one_meaning():
    """Two policies may share a setting only if they declare it alike."""

    @dataclass(frozen=True, kw_only=True)
    class OtherStride(Strided):
        name: ClassVar[str] = "otherstride"
        stride: int = hyper(4, "Another stride.", low=1, high=64)

    with registered(Strided), registered(OtherStride):
        with pytest.raises(AssertionError, match="'otherstride' declares setting 'stride'"):
            policy_params()

    @dataclass(frozen=True, kw_only=True)
    class SameStride(Strided):
        name: ClassVar[str] = "samestride"

    with registered(Strided), registered(SameStride):
        assert policy_params()["stride"][1] == ("strided", "samestride")
    assert "stride" not in policy_params()


def test_declarations_cover_every_setting():
    """Every flag and request key comes from a declaration, and the built-ins keep their names."""
    names = [p.name for p in settings()]
    assert len(names) == len(set(names))
    assert names[:14] == ["policy", "budget", "window", "scoring", "question", "agnostic_kernel", "agnostic_select",
                          "min_prompt", "decode_budget", "share", "head_profile", "pool_fraction", "page_size", "memory"]
    assert set(names[14:]) == {"kernel_size", "pooling", "pool_shift", "beta", "pyramid_beta", "floor_alpha",
                               "sink_size", "razor_fraction", "razor_heads", "d2o_sink_size", "d2o_merge", "d2o_layers",
                               "pod_share", "pod_group", "pod_threshold", "pod_sharing"}
    server_only = {p.flag for p in settings() if p.key is None}
    assert server_only == {"--kv-head-profile", "--kv-pool-fraction", "--kv-page-size", "--kv-memory",
                           "--kv-pyramid-beta"}
    from headkv_sglang.policies import RazorAttention

    assert [(f, p.name) for f, p in params_of(RazorAttention)] == [
        ("sink_size", "sink_size"), (None, "razor_fraction"), (None, "razor_heads")]
    assert isinstance(RazorAttention.razor_heads, Param) and param("x", 1, "h", low=0).type is int
    with pytest.raises(AssertionError, match="a number setting needs low="):
        param("x", 1.5, "h")
    table = settings_table()
    for p in settings():
        assert f"| `{p.flag}` |" in table


def test_no_import_cycle():
    """The policies never import config.py (which imports them); config.py stays torch-free."""
    code = ("import sys, headkv_sglang.policies.registry as r; r.policy_params(); "
            "import headkv_sglang.policies.d2o, headkv_sglang.policies.pod; "
            "assert 'headkv_sglang.config' not in sys.modules, 'config imported'; print(len(r.policy_params()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "16", out.stderr[-2000:]
