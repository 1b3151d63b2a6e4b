"""KVPolicyConfig validation, per-request overrides, JSON transport; ModelShape; build_policy (fast)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from headkv_sglang.config import (BUDGET_FORMS, MAX_BUDGET, REQUEST_KEYS, ConfigError, KVPolicyConfig, ModelShape,
                                  parse_budget)
from headkv_sglang.policies import AdaKV, FullKV, PyramidKV, SnapKV, StreamingLLM
from headkv_sglang.policies.registry import build_policy

SHAPE = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=8)


# --------------------------------------------------------------------------- #
# validate
# --------------------------------------------------------------------------- #
def test_defaults_and_every_policy_validate():
    base = KVPolicyConfig()
    assert base.validate() is base
    for policy in ("full", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor", "headkv"):
        cfg = KVPolicyConfig(policy=policy, budget=64, window=8, sink_size=4)
        assert cfg.validate() is cfg


# (field overrides, flag named in the message, value as shown by repr, text of the "allowed" part)
INVALID = [
    (dict(policy="bogus"), "--kv-policy", "'bogus'", "choose one of full, headkv, snapkv"),
    (dict(policy="SnapKV"), "--kv-policy", "'SnapKV'", "choose one of"),
    (dict(budget=0), "--kv-budget", "0", f"expected an integer in [1, {MAX_BUDGET}]"),
    (dict(budget=-5), "--kv-budget", "-5", "expected an integer in [1,"),
    (dict(budget=MAX_BUDGET + 1), "--kv-budget", str(MAX_BUDGET + 1), "expected an integer in"),
    (dict(budget=True), "--kv-budget", "True", "expected an integer"),
    (dict(budget=64.0), "--kv-budget", "64.0", "expected an integer"),
    (dict(budget="64"), "--kv-budget", "'64'", "expected an integer"),
    (dict(window=-1), "--kv-window", "-1", "expected an integer in [0, 4096]"),
    (dict(window=4097, budget=5000), "--kv-window", "4097", "expected an integer in [0, 4096]"),
    (dict(min_prompt=-1), "--kv-min-prompt", "-1", "expected an integer in [0,"),
    (dict(sink_size=-1), "--kv-sink-size", "-1", "expected an integer in [0, 4096]"),
    (dict(sink_size=4097), "--kv-sink-size", "4097", "expected an integer in [0, 4096]"),
    (dict(kernel_size=0), "--kv-kernel-size", "0", "expected an integer in [1, 63]"),
    (dict(kernel_size=65), "--kv-kernel-size", "65", "expected an integer in [1, 63]"),
    (dict(kernel_size=6), "--kv-kernel-size", "6", "expected an odd integer"),
    (dict(pooling="sumpool"), "--kv-pooling", "'sumpool'", "choose one of maxpool, avgpool"),
    (dict(pool_shift=-1), "--kv-pool-shift", "-1", "expected an integer in [0, 31]"),
    (dict(pool_shift=32), "--kv-pool-shift", "32", "expected an integer in [0, 31]"),
    (dict(beta=0.5), "--kv-beta", "0.5", "expected a number in [1.0, 1000000.0]"),
    (dict(beta=math.nan), "--kv-beta", "nan", "expected a number in"),
    (dict(beta=math.inf), "--kv-beta", "inf", "expected a number in"),
    (dict(beta=True), "--kv-beta", "True", "expected a number in"),
    (dict(pyramid_beta=0.99), "--kv-pyramid-beta", "0.99", "expected a number in [1.0,"),
    (dict(floor_alpha=-0.1), "--kv-floor-alpha", "-0.1", "expected a number in [0.0, 1.0]"),
    (dict(floor_alpha=1.5), "--kv-floor-alpha", "1.5", "expected a number in [0.0, 1.0]"),
    (dict(razor_fraction=1.01), "--kv-razor-fraction", "1.01", "expected a number in [0.0, 1.0]"),
    (dict(pool_fraction=0.0), "--kv-pool-fraction", "0.0", "expected a number in (0.0, 0.95]"),
    (dict(pool_fraction=0.96), "--kv-pool-fraction", "0.96", "expected a number in (0.0, 0.95]"),
    (dict(page_size=0), "--kv-page-size", "0", "expected an integer in [1, 4096]"),
    (dict(page_size=4097), "--kv-page-size", "4097", "expected an integer in [1, 4096]"),
    (dict(policy="snapkv", budget=8, window=9), "--kv-window", "9",
     "the observation window must not exceed --kv-budget (8)"),
    (dict(policy="adakv", budget=3, window=4), "--kv-window", "4", "must not exceed --kv-budget (3)"),
    (dict(policy="pyramidkv", budget=3, window=4), "--kv-window", "4", "must not exceed --kv-budget (3)"),
    (dict(policy="headkv", budget=3, window=4), "--kv-window", "4", "must not exceed --kv-budget (3)"),
    (dict(policy="streamingllm", budget=4, sink_size=4), "--kv-sink-size", "4",
     "sinks must leave room for recent tokens: < --kv-budget (4)"),
    (dict(policy="razor", budget=2, sink_size=7), "--kv-sink-size", "7", "< --kv-budget (2)"),
    (dict(head_profile="/nonexistent/profile.json"), "--kv-head-profile", "'/nonexistent/profile.json'",
     "no such file"),
]


@pytest.mark.parametrize("fields, flag, shown, allowed", INVALID,
                         ids=[f"{f}={v!r}"[:40] for d, f, *_ in INVALID for v in [list(d.values())[-1]]])
def test_invalid_value_names_flag_and_value(fields, flag, shown, allowed):
    cfg = KVPolicyConfig(**fields)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = str(err.value)
    assert msg.startswith(f"{flag}: invalid value {shown}; "), msg
    assert allowed in msg, msg


@pytest.mark.parametrize("memory, cpu, given, expected", [
    ("auto", True, False, "shared"),   # CPU: one memory
    ("auto", False, False, "split"),   # CUDA: the split until FlashInfer read the shared buffers on a GPU
    ("auto", True, True, "split"),     # --kv-pool-fraction sizes a split
    ("auto", False, True, "split"),
    ("split", True, False, "split"),   # an explicit mode is kept on either device
    ("split", True, True, "split"),
    ("shared", False, False, "shared"),
])
def test_memory_auto_resolves_by_device_and_pool_fraction(memory, cpu, given, expected):
    cfg = KVPolicyConfig(policy="headkv", memory=memory, **({"pool_fraction": 0.3} if given else {})).validate()
    resolved = cfg.with_memory_resolved(cpu=cpu, fraction_given=given)
    assert resolved.memory == expected
    assert dataclasses.replace(resolved, memory=memory) == cfg  # nothing else changes
    assert resolved.with_memory_resolved(cpu=not cpu, fraction_given=given) == resolved  # resolved once: kept


def test_pool_fraction_with_shared_memory_is_refused_naming_the_flag():
    cfg = KVPolicyConfig(policy="headkv", memory="shared", pool_fraction=0.3).validate()
    with pytest.raises(ConfigError, match=r"^--kv-pool-fraction: invalid value 0\.3; it sizes the compressed pool "
                                          r"of --kv-memory split"):
        cfg.with_memory_resolved(cpu=True, fraction_given=True)
    assert cfg.with_memory_resolved(cpu=True, fraction_given=False).memory == "shared"  # the field's default: fine


def test_cross_field_rules_only_apply_to_their_policies():
    # window > budget is fine where the window is not part of the budget
    KVPolicyConfig(policy="full", budget=2, window=9).validate()
    KVPolicyConfig(policy="streamingllm", budget=5, window=9, sink_size=4).validate()
    # sinks >= budget is fine for score-based policies
    KVPolicyConfig(policy="snapkv", budget=4, window=4, sink_size=4).validate()
    # edges are allowed
    KVPolicyConfig(policy="snapkv", budget=MAX_BUDGET, window=4096, kernel_size=63, pool_fraction=0.95,
                   floor_alpha=1.0, razor_fraction=0.0, page_size=4096).validate()
    KVPolicyConfig(budget=1, window=1, kernel_size=1, min_prompt=0, sink_size=0, floor_alpha=0.0).validate()


def test_existing_head_profile_file_validates(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{}")
    KVPolicyConfig(policy="headkv", head_profile=str(f)).validate()
    with pytest.raises(ConfigError, match=re.escape(f"--kv-head-profile: invalid value '{tmp_path}'; no such file")):
        KVPolicyConfig(policy="headkv", head_profile=str(tmp_path)).validate()  # a directory


def test_custom_flag_format():
    with pytest.raises(ConfigError, match=re.escape("cfg[budget]: invalid value 0")):
        KVPolicyConfig(budget=0).validate(flag="cfg[{}]")


# --------------------------------------------------------------------------- #
# with_request
# --------------------------------------------------------------------------- #
SERVER = KVPolicyConfig(policy="snapkv", budget=128, window=8, sink_size=4).validate()


def test_with_request_applies_valid_overrides():
    got = SERVER.with_request({"kv_policy": "streamingllm", "kv_budget": 31, "kv_window": 3, "kv_sink_size": 2,
                               "kv_min_prompt": 100, "kv_beta": 2, "kv_floor_alpha": 0.5})
    want = dataclasses.replace(SERVER, policy="streamingllm", budget=31, window=3, sink_size=2, min_prompt=100,
                               beta=2.0, floor_alpha=0.5)
    assert got == want
    assert type(got.beta) is float and type(got.budget) is int
    assert SERVER.budget == 128  # the server default is untouched (frozen)
    # JSON numbers: an integral float is an int
    got = SERVER.with_request({"kv_budget": 64.0})
    assert got.budget == 64 and type(got.budget) is int
    # every request key maps to a real setting (a field, or a policy's hyperparameter)
    assert set(REQUEST_KEYS.values()) <= set(KVPolicyConfig().as_dict())


@pytest.mark.parametrize("params", [None, {}, {"temperature": 0.1, "lora": "x", "kv": 1, "KV_BUDGET": "junk", 3: 4}])
def test_with_request_without_kv_keys_is_the_server_config(params):
    assert SERVER.with_request(params) is SERVER


def test_with_request_unknown_kv_key_is_named():
    with pytest.raises(ConfigError) as err:
        SERVER.with_request({"kv_budget": 16, "kv_bugdet": 16})
    msg = str(err.value)
    assert msg.startswith("custom_params.kv_bugdet: unknown key; allowed: "), msg
    for key in REQUEST_KEYS:
        assert key in msg, msg
    with pytest.raises(ConfigError, match=re.escape("custom_params.kv_page_size: unknown key")):
        SERVER.with_request({"kv_page_size": 5})  # a server-only setting


@pytest.mark.parametrize(
    "value, shown, allowed",
    [
        ("64", "'64'", BUDGET_FORMS),  # a JSON number, or a string with '%'
        (True, "True", BUDGET_FORMS),
        (False, "False", BUDGET_FORMS),
        (5.5, "5.5", BUDGET_FORMS),
        (math.inf, "inf", BUDGET_FORMS),
        (math.nan, "nan", BUDGET_FORMS),
        (None, "None", BUDGET_FORMS),
        ([64], "[64]", BUDGET_FORMS),
        ("0%", "'0%'", "0% < share <= 100%"),
        ("100.5%", "'100.5%'", "0% < share <= 100%"),
        ("-5%", "'-5%'", BUDGET_FORMS),
        ("5", "'5'", BUDGET_FORMS),
        ("%", "'%'", BUDGET_FORMS),
        ("5%%", "'5%%'", BUDGET_FORMS),
        ("nan%", "'nan%'", BUDGET_FORMS),
        (MAX_BUDGET + 1, str(MAX_BUDGET + 1), f"expected an integer in [1, {MAX_BUDGET}]"),
        (10 ** 30, str(10 ** 30), "expected an integer in [1,"),
        (1e300, str(int(1e300)), "expected an integer in [1,"),
        (0, "0", "expected an integer in [1,"),
        (-7, "-7", "expected an integer in [1,"),
        (-7.0, "-7", "expected an integer in [1,"),
    ],
    ids=lambda x: repr(x)[:20],
)
def test_with_request_bad_budget_names_the_key(value, shown, allowed):
    with pytest.raises(ConfigError) as err:
        SERVER.with_request({"kv_budget": value})
    msg = str(err.value)
    assert msg.startswith(f"custom_params.kv_budget: invalid value {shown}; "), msg
    assert allowed in msg, msg


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("kv_policy", "nope", "'nope'"),
        ("kv_policy", 3, "3"),
        ("kv_window", -1, "-1"),
        ("kv_kernel_size", 4, "4"),
        ("kv_pooling", "median", "'median'"),
        ("kv_pool_shift", 40, "40"),
        ("kv_pool_shift", 1.5, "1.5"),
        ("kv_window", 129, "129"),  # > the server's budget for snapkv
        ("kv_min_prompt", -1, "-1"),
        ("kv_sink_size", "4", "'4'"),
        ("kv_beta", 0.5, "0.5"),
        ("kv_beta", math.nan, "nan"),
        ("kv_beta", "2", "'2'"),
        ("kv_beta", True, "True"),
        ("kv_floor_alpha", 2, "2.0"),
        ("kv_floor_alpha", -0.5, "-0.5"),
    ],
)
def test_with_request_bad_value_names_its_key(key, value, shown):
    with pytest.raises(ConfigError) as err:
        SERVER.with_request({key: value})
    assert str(err.value).startswith(f"custom_params.{key}: invalid value {shown}; "), str(err.value)


@pytest.mark.parametrize("value, expected", [
    (128, (128, 0.0)), (1, (1, 0.0)), (64.0, (64, 0.0)), ("5%", (0, 0.05)), (" 1.5 % ", (0, 0.015)),
    ("100%", (0, 1.0)), (".5%", (0, 0.005)),
])
def test_parse_budget_tokens_or_share(value, expected):
    budget, ratio = parse_budget(value, "--kv-budget")
    assert budget == expected[0] and ratio == pytest.approx(expected[1], abs=1e-12)


@pytest.mark.parametrize("policy, window, sinks, prompt, ratio, expected", [
    ("headkv", 0, 4, 1000, 0.05, 50),      # ceil(5% of 1000)
    ("headkv", 0, 4, 1001, 0.05, 51),      # rounded up, never below the share
    ("snapkv", 0, 4, 10, 0.01, 1),         # automatic window: at least one token
    ("snapkv", 8, 4, 100, 0.01, 8),        # an explicit window is always kept
    ("streamingllm", 0, 4, 100, 0.01, 5),  # sinks + one recent token
    ("razor", 0, 4, 3000, 0.02, 60),
    ("full", 0, 4, 77, 0.5, 39),
])
def test_ratio_budget_resolves_per_prompt_to_at_least_what_the_policy_keeps(policy, window, sinks, prompt,
                                                                             ratio, expected):
    cfg = KVPolicyConfig(policy=policy, budget_ratio=ratio, window=window, sink_size=sinks).validate()
    got = cfg.for_prompt(prompt)
    assert got.budget == expected and got.budget_ratio == ratio and got.budget_label == f"{ratio * 100:g}%"
    assert got.validate() is got  # the resolved config is itself valid
    # and the policy built from it keeps at most that many tokens per head on average
    assert cfg.for_prompt(prompt).for_prompt(prompt) == got


def test_ratio_and_token_budgets_override_each_other_per_request():
    tokens = KVPolicyConfig(policy="headkv", budget=256).validate()
    share = tokens.with_request({"kv_budget": "5%"})
    assert (share.budget_ratio, share.budget_label, share.for_prompt(2000).budget) == (0.05, "5%", 100)
    back = share.with_request({"kv_budget": 64})
    assert (back.budget, back.budget_ratio, back.budget_label, back.for_prompt(2000).budget) == (64, 0.0, "64", 64)
    # a ratio server, with a small window: a ratio needs no window check, a token budget does
    server = KVPolicyConfig(policy="snapkv", budget_ratio=0.02, window=16).validate()
    assert server.for_prompt(100).budget == 16
    with pytest.raises(ConfigError, match=re.escape("custom_params.kv_budget: invalid value 8; must be at least")):
        server.with_request({"kv_budget": 8})
    assert KVPolicyConfig.from_json(share.to_json()) == share


def test_with_request_rejects_non_object():
    with pytest.raises(ConfigError, match=re.escape("custom_params must be a JSON object, got list")):
        SERVER.with_request([("kv_budget", 4)])


def test_with_request_small_budget_names_the_request_budget():
    """A request budget that conflicts with a server default is reported under the key that was sent."""
    with pytest.raises(ConfigError) as err:
        SERVER.with_request({"kv_budget": 4})  # server window is 8
    msg = str(err.value)
    assert msg.startswith("custom_params.kv_budget: invalid value 4; ") and "(8)" in msg, msg
    streaming = KVPolicyConfig(policy="streamingllm", budget=64, sink_size=4).validate()
    with pytest.raises(ConfigError) as err:
        streaming.with_request({"kv_budget": 4})
    msg = str(err.value)
    assert msg.startswith("custom_params.kv_budget: invalid value 4; ") and "(4)" in msg, msg
    # both sent: the window is the one reported, as for the server flags
    with pytest.raises(ConfigError, match=re.escape("custom_params.kv_window: invalid value 9; ")):
        SERVER.with_request({"kv_budget": 8, "kv_window": 9})
    assert SERVER.with_request({"kv_budget": 8}).budget == 8  # equal to the window is fine


def test_with_request_float_field_accepts_float_when_default_was_int():
    server = KVPolicyConfig(policy="snapkv", beta=2, floor_alpha=0).validate()
    got = server.with_request({"kv_beta": 1.5, "kv_floor_alpha": 0.25})
    assert (got.beta, got.floor_alpha) == (1.5, 0.25)


# --------------------------------------------------------------------------- #
# JSON transport
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("cfg", [
    KVPolicyConfig(),
    KVPolicyConfig(policy="pyramidkv", budget=37, window=5, min_prompt=11, beta=1.25, pyramid_beta=7.5,
                   sink_size=3, floor_alpha=0.35, kernel_size=5, pooling="avgpool", razor_fraction=0.3,
                   pool_fraction=0.9, page_size=3, head_profile="/some/profile.json"),
], ids=["defaults", "all_fields"])
def test_json_round_trip(cfg):
    text = cfg.to_json()
    back = KVPolicyConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert json.loads(text) == cfg.as_dict()  # flat: the policies' hyperparameters beside the fields
    for name in cfg.as_dict():
        assert type(getattr(back, name)) is type(getattr(cfg, name)), name


def test_from_json_ignores_unknown_keys_and_keeps_defaults():
    back = KVPolicyConfig.from_json(json.dumps({"policy": "adakv", "budget": 9, "from_a_newer_version": 1}))
    assert back == KVPolicyConfig(policy="adakv", budget=9)


# --------------------------------------------------------------------------- #
# ModelShape and build_policy
# --------------------------------------------------------------------------- #
def test_model_shape_from_model_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576}))
    s = ModelShape.from_model_path(tmp_path)
    assert (s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim, s.architecture) == (30, 9, 3, 64, "LlamaForCausalLM")
    assert s == ModelShape(30, 9, 3, 64, "LlamaForCausalLM")  # hf_config does not take part in equality
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "head_dim": 16}}))
    s = ModelShape.from_model_path(tmp_path)
    assert (s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim) == (2, 4, 4, 16)
    with pytest.raises(ConfigError, match=re.escape("--model-path: cannot read")):
        ModelShape.from_model_path(tmp_path / "missing")


def test_build_policy_maps_the_config_fields():
    kw = dict(budget=64, window=6, kernel_size=5, pooling="avgpool", pyramid_beta=3.0, floor_alpha=0.4, sink_size=2)
    assert build_policy(KVPolicyConfig(policy="full", **kw), SHAPE) == FullKV()
    obs = dict(window_size=6, kernel_size=5, pooling="avgpool")
    assert build_policy(KVPolicyConfig(policy="snapkv", **kw), SHAPE) == SnapKV(**obs)
    assert build_policy(KVPolicyConfig(policy="pyramidkv", **kw), SHAPE) == PyramidKV(beta=3.0, **obs)
    assert build_policy(KVPolicyConfig(policy="adakv", **kw), SHAPE) == AdaKV(floor_alpha=0.4, **obs)
    assert build_policy(KVPolicyConfig(policy="streamingllm", **kw), SHAPE) == StreamingLLM(sink_size=2, window_size=6)


def test_build_policy_without_a_matching_profile_says_how_to_make_one():
    with pytest.raises(ConfigError) as err:
        build_policy(KVPolicyConfig(policy="headkv"), SHAPE)
    msg = str(err.value)
    assert msg.startswith("--kv-head-profile: no shipped 'r2' profile matches this model"), msg
    assert "3 layers, 6 query / 2 KV heads" in msg, msg
    assert "`headkv-sglang profile --model MODEL_DIR --method r2 --out " in msg and "--kv-head-profile " in msg, msg


@pytest.mark.parametrize("budget,expected", [(1, 1), (3, 1), (8, 2), (64, 16), (127, 31), (128, 32), (4096, 32)])
def test_auto_observation_window_is_a_quarter_of_the_budget_up_to_32(budget, expected):
    cfg = KVPolicyConfig(policy="snapkv", budget=budget).validate()  # window 0 = auto: always valid
    assert cfg.window == 0 and cfg.obs_window == expected
    assert KVPolicyConfig(policy="snapkv", budget=budget, window=1).obs_window == 1  # explicit wins
    assert cfg.with_request({"kv_window": 1}).obs_window == 1


def test_policy_objects_use_the_effective_window():
    shape = ModelShape(architecture="LlamaForCausalLM", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
                       hf_config={})
    assert build_policy(KVPolicyConfig(policy="snapkv", budget=40), shape).window_size == 10
    assert build_policy(KVPolicyConfig(policy="snapkv", budget=40, window=3), shape).window_size == 3
