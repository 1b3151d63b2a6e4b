"""Per-request ``kv_*`` validation over HTTP: exact 400 messages on every endpoint, and fuzzing.

One ``--kv-policy full`` server. Every bad ``custom_params`` case is sent to the native
``/generate``, ``/v1/chat/completions`` and ``/v1/completions``; each must answer 400 with
the whole message line the plugin produces (``KVPolicyConfig.with_request``, see
``headkv_sglang/config.py``), and none may reach the scheduler: afterwards the compressed
pool is empty, its integrity holds and the server still answers. A hypothesis fuzzer then
sends random ``custom_params`` dicts and checks the server agrees with ``with_request``
computed in this process: valid <-> 200, invalid <-> 400 with exactly its message.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from headkv_sglang.config import POLICY_CHOICES, REQUEST_KEYS, ConfigError, KVPolicyConfig

pytestmark = pytest.mark.server

ALLOWED = ", ".join(sorted(REQUEST_KEYS))
assert ALLOWED == ("kv_agnostic_kernel, kv_agnostic_select, kv_beta, kv_budget, kv_d2o_layers, kv_d2o_merge, kv_d2o_sink_size, kv_decode_budget, kv_floor_alpha, kv_kernel_size, kv_min_prompt, "
                   "kv_pod_group, kv_pod_share, kv_pod_sharing, kv_pod_threshold, kv_policy, kv_pool_shift, kv_pooling, kv_question, kv_razor_fraction, kv_razor_heads, kv_scoring, "
                   "kv_share, kv_sink_size, kv_window")
BUDGET = "an integer in [1, 1048576] (tokens per KV head) or a share of the prompt like '5%' (0% < share <= 100%)"
POLICIES = "full, headkv, snapkv, pyramidkv, adakv, streamingllm, razor, d2o, pod"

# (custom_params, the exact error message). The server default is --kv-policy full with
# budget 128, window 0 (auto), sink size 4.
INVALID = [
    # kv_budget: types
    ({"kv_budget": "64"}, f"custom_params.kv_budget: invalid value '64'; expected {BUDGET}"),
    ({"kv_budget": 64.5}, f"custom_params.kv_budget: invalid value 64.5; expected {BUDGET}"),
    ({"kv_budget": True}, f"custom_params.kv_budget: invalid value True; expected {BUDGET}"),
    ({"kv_budget": False}, f"custom_params.kv_budget: invalid value False; expected {BUDGET}"),
    ({"kv_budget": None}, f"custom_params.kv_budget: invalid value None; expected {BUDGET}"),
    ({"kv_budget": [64]}, f"custom_params.kv_budget: invalid value [64]; expected {BUDGET}"),
    ({"kv_budget": {"value": 64}}, f"custom_params.kv_budget: invalid value {{'value': 64}}; expected {BUDGET}"),
    # kv_budget: range
    ({"kv_budget": 0}, f"custom_params.kv_budget: invalid value 0; expected {BUDGET}"),
    ({"kv_budget": -5}, f"custom_params.kv_budget: invalid value -5; expected {BUDGET}"),
    ({"kv_budget": -5.0}, f"custom_params.kv_budget: invalid value -5; expected {BUDGET}"),
    ({"kv_budget": 1 << 20 | 1}, f"custom_params.kv_budget: invalid value 1048577; expected {BUDGET}"),
    ({"kv_budget": 1 << 40}, f"custom_params.kv_budget: invalid value 1099511627776; expected {BUDGET}"),
    # beyond 64 bits SGLang's JSON parser reads the integer as a float: the message shows
    # int(1e30), not 10**30 (SGLang's parsing, not the plugin's)
    ({"kv_budget": 10 ** 30},
     f"custom_params.kv_budget: invalid value 1000000000000000019884624838656; expected {BUDGET}"),
    # kv_budget: shares of the prompt
    ({"kv_budget": "0%"}, f"custom_params.kv_budget: invalid value '0%'; expected {BUDGET}"),
    ({"kv_budget": "101%"}, f"custom_params.kv_budget: invalid value '101%'; expected {BUDGET}"),
    ({"kv_budget": "5 percent"}, f"custom_params.kv_budget: invalid value '5 percent'; expected {BUDGET}"),
    ({"kv_budget": "-5%"}, f"custom_params.kv_budget: invalid value '-5%'; expected {BUDGET}"),
    # kv_scoring, kv_question, kv_razor_heads
    ({"kv_scoring": "last"}, "custom_params.kv_scoring: invalid value 'last'; choose one of auto, question, window, self, reconstruct, accumulated"),
    ({"kv_scoring": 1}, "custom_params.kv_scoring: invalid value 1; expected str"),
    ({"kv_agnostic_select": "all"}, "custom_params.kv_agnostic_select: invalid value 'all'; choose one of policy, global"),
    ({"kv_agnostic_select": True}, "custom_params.kv_agnostic_select: invalid value True; expected str"),
    ({"kv_question": -1}, "custom_params.kv_question: invalid value -1; expected an integer in [0, 4096]"),
    ({"kv_question": 4097}, "custom_params.kv_question: invalid value 4097; expected an integer in [0, 4096]"),
    ({"kv_question": "32"}, "custom_params.kv_question: invalid value '32'; expected int"),
    ({"kv_razor_heads": "all"}, "custom_params.kv_razor_heads: invalid value 'all'; choose one of fraction, budget"),
    ({"kv_d2o_merge": "yes"}, "custom_params.kv_d2o_merge: invalid value 'yes'; choose one of on, mean, off"),
    ({"kv_d2o_merge": True}, "custom_params.kv_d2o_merge: invalid value True; expected str"),
    ({"kv_d2o_sink_size": -1}, "custom_params.kv_d2o_sink_size: invalid value -1; expected an integer in [0, 4096]"),
    ({"kv_policy": "d2o", "kv_budget": 5, "kv_d2o_sink_size": 5},
     "custom_params.kv_d2o_sink_size: invalid value 5; sinks must leave room for recent tokens: < --kv-budget (5)"),
    # kv_pod_share
    ({"kv_pod_share": 0.96}, "custom_params.kv_pod_share: invalid value 0.96; expected a number in [0.0, 0.95]"),
    ({"kv_pod_group": 1}, "custom_params.kv_pod_group: invalid value 1; expected an integer in [2, 1024]"),
    ({"kv_pod_sharing": "values"}, "custom_params.kv_pod_sharing: invalid value 'values'; choose one of keys, scores"),
    ({"kv_pod_threshold": 1.2}, "custom_params.kv_pod_threshold: invalid value 1.2; expected a number in [0.0, 1.0]"),
    ({"kv_pod_share": "0.3"}, "custom_params.kv_pod_share: invalid value '0.3'; expected float"),
    ({"kv_policy": "pod", "kv_budget": 4, "kv_sink_size": 4},
     "custom_params.kv_sink_size: invalid value 4; sinks must leave room for recent tokens: < --kv-budget (4)"),
    # kv_share
    ({"kv_share": 1}, "custom_params.kv_share: invalid value 1; expected bool"),
    ({"kv_share": "true"}, "custom_params.kv_share: invalid value 'true'; expected bool"),
    ({"kv_policy": "snapkv", "kv_share": True, "kv_decode_budget": 16},
     "custom_params.kv_decode_budget: invalid value 16; kv_share and kv_decode_budget do not combine yet (a shared "
     "prompt's pages cannot grow with one request's generated tokens)"),
    # kv_decode_budget
    ({"kv_decode_budget": -1}, "custom_params.kv_decode_budget: invalid value -1; expected an integer in [0, 1048576]"),
    ({"kv_decode_budget": "64"}, "custom_params.kv_decode_budget: invalid value '64'; expected int"),
    ({"kv_policy": "razor", "kv_decode_budget": 64},
     "custom_params.kv_decode_budget: invalid value 64; decode-phase compression is not supported with razor (use 0)"),
    # kv_policy
    ({"kv_policy": "nope"}, f"custom_params.kv_policy: invalid value 'nope'; choose one of {POLICIES}"),
    ({"kv_policy": "SnapKV"}, f"custom_params.kv_policy: invalid value 'SnapKV'; choose one of {POLICIES}"),
    ({"kv_policy": "snapkv "}, f"custom_params.kv_policy: invalid value 'snapkv '; choose one of {POLICIES}"),
    ({"kv_policy": ""}, f"custom_params.kv_policy: invalid value ''; choose one of {POLICIES}"),
    ({"kv_policy": 3}, "custom_params.kv_policy: invalid value 3; expected str"),
    ({"kv_policy": None}, "custom_params.kv_policy: invalid value None; expected str"),
    ({"kv_policy": ["snapkv"]}, "custom_params.kv_policy: invalid value ['snapkv']; expected str"),
    # kv_window
    ({"kv_window": -1}, "custom_params.kv_window: invalid value -1; expected an integer in [0, 4096]"),
    ({"kv_window": 4097}, "custom_params.kv_window: invalid value 4097; expected an integer in [0, 4096]"),
    ({"kv_window": 8.5}, "custom_params.kv_window: invalid value 8.5; expected int"),
    ({"kv_policy": "snapkv", "kv_budget": 64, "kv_window": 65},
     "custom_params.kv_window: invalid value 65; the observation window must not exceed --kv-budget (64)"),
    ({"kv_policy": "headkv", "kv_window": 129},  # the server's budget (128)
     "custom_params.kv_window: invalid value 129; the observation window must not exceed --kv-budget (128)"),
    ({"kv_policy": "adakv", "kv_budget": 1, "kv_window": 2},
     "custom_params.kv_window: invalid value 2; the observation window must not exceed --kv-budget (1)"),
    # kv_min_prompt
    ({"kv_min_prompt": -1}, "custom_params.kv_min_prompt: invalid value -1; expected an integer in [0, 1048576]"),
    ({"kv_min_prompt": "10"}, "custom_params.kv_min_prompt: invalid value '10'; expected int"),
    # kv_sink_size
    ({"kv_sink_size": -1}, "custom_params.kv_sink_size: invalid value -1; expected an integer in [0, 4096]"),
    ({"kv_sink_size": 4097}, "custom_params.kv_sink_size: invalid value 4097; expected an integer in [0, 4096]"),
    ({"kv_policy": "streamingllm", "kv_budget": 8, "kv_sink_size": 8},
     "custom_params.kv_sink_size: invalid value 8; sinks must leave room for recent tokens: < --kv-budget (8)"),
    ({"kv_policy": "razor", "kv_budget": 4},  # the server's sink size (4): the budget is to blame
     "custom_params.kv_budget: invalid value 4; must exceed the attention sinks (4)"),
    # kv_beta
    ({"kv_beta": 0.5}, "custom_params.kv_beta: invalid value 0.5; expected a number in [1.0, 1000000.0]"),
    ({"kv_beta": 1e7}, "custom_params.kv_beta: invalid value 10000000.0; expected a number in [1.0, 1000000.0]"),
    ({"kv_beta": "2"}, "custom_params.kv_beta: invalid value '2'; expected float"),
    ({"kv_beta": True}, "custom_params.kv_beta: invalid value True; expected float"),
    # kv_floor_alpha
    ({"kv_floor_alpha": 1.5}, "custom_params.kv_floor_alpha: invalid value 1.5; expected a number in [0.0, 1.0]"),
    ({"kv_floor_alpha": -1}, "custom_params.kv_floor_alpha: invalid value -1.0; expected a number in [0.0, 1.0]"),
    ({"kv_floor_alpha": [0.2]}, "custom_params.kv_floor_alpha: invalid value [0.2]; expected float"),
    # kv_kernel_size
    ({"kv_kernel_size": 4}, "custom_params.kv_kernel_size: invalid value 4; expected an odd integer"),
    ({"kv_kernel_size": 0}, "custom_params.kv_kernel_size: invalid value 0; expected an integer in [1, 63]"),
    ({"kv_kernel_size": 65}, "custom_params.kv_kernel_size: invalid value 65; expected an integer in [1, 63]"),
    ({"kv_kernel_size": "7"}, "custom_params.kv_kernel_size: invalid value '7'; expected int"),
    # kv_pooling
    ({"kv_pooling": "median"}, "custom_params.kv_pooling: invalid value 'median'; choose one of maxpool, avgpool"),
    ({"kv_pooling": "MaxPool"}, "custom_params.kv_pooling: invalid value 'MaxPool'; choose one of maxpool, avgpool"),
    ({"kv_pooling": 1}, "custom_params.kv_pooling: invalid value 1; expected str"),
    # kv_agnostic_kernel
    ({"kv_agnostic_kernel": 2}, "custom_params.kv_agnostic_kernel: invalid value 2; expected an odd integer"),
    ({"kv_agnostic_kernel": 0}, "custom_params.kv_agnostic_kernel: invalid value 0; expected an integer in [1, 63]"),
    # kv_pool_shift
    ({"kv_pool_shift": -1}, "custom_params.kv_pool_shift: invalid value -1; expected an integer in [0, 31]"),
    ({"kv_pool_shift": "3"}, "custom_params.kv_pool_shift: invalid value '3'; expected int"),
    # kv_razor_fraction
    ({"kv_razor_fraction": 1.5}, "custom_params.kv_razor_fraction: invalid value 1.5; expected a number in [0.0, 1.0]"),
    ({"kv_razor_fraction": -0.01},
     "custom_params.kv_razor_fraction: invalid value -0.01; expected a number in [0.0, 1.0]"),
    ({"kv_razor_fraction": "0.2"}, "custom_params.kv_razor_fraction: invalid value '0.2'; expected float"),
    # unknown kv_* keys (server-only settings included), named exactly
    ({"kv_bogus": 1}, f"custom_params.kv_bogus: unknown key; allowed: {ALLOWED}"),
    ({"kv_bugdet": 64}, f"custom_params.kv_bugdet: unknown key; allowed: {ALLOWED}"),
    ({"kv_Budget": 64}, f"custom_params.kv_Budget: unknown key; allowed: {ALLOWED}"),
    ({"kv_": 64}, f"custom_params.kv_: unknown key; allowed: {ALLOWED}"),
    ({"kv_bügdet": 64}, f"custom_params.kv_bügdet: unknown key; allowed: {ALLOWED}"),
    ({"kv_page_size": 16}, f"custom_params.kv_page_size: unknown key; allowed: {ALLOWED}"),
    ({"kv_pool_fraction": 0.5}, f"custom_params.kv_pool_fraction: unknown key; allowed: {ALLOWED}"),
    ({"kv_head_profile": "/tmp/x.json"}, f"custom_params.kv_head_profile: unknown key; allowed: {ALLOWED}"),
    ({"kv_pyramid_beta": 20.0}, f"custom_params.kv_pyramid_beta: unknown key; allowed: {ALLOWED}"),
    # the first bad key in the request's order is the one reported
    ({"kv_budget": 64, "kv_bogus": 1, "kv_policy": "nope"}, f"custom_params.kv_bogus: unknown key; allowed: {ALLOWED}"),
    ({"kv_policy": 7, "kv_budget": "x"}, "custom_params.kv_policy: invalid value 7; expected str"),
    ({"other_feature": [1, 2], "kv_kernel_size": 2},
     "custom_params.kv_kernel_size: invalid value 2; expected an odd integer"),
]

# Accepted: each must answer 200 on every endpoint.
VALID = [
    {"kv_budget": 64.0},  # an integral JSON float is an integer
    {"kv_policy": "headkv", "kv_budget": "5%"},  # a share of the prompt
    {"kv_policy": "streamingllm", "kv_budget": "0.5%"},  # resolved to at least sinks + 1
    {"kv_policy": "snapkv", "kv_budget": "100%", "kv_scoring": "window"},
    {"kv_policy": "adakv", "kv_budget": 16, "kv_question": 1},
    {"kv_policy": "snapkv", "kv_budget": 16, "kv_decode_budget": 16},
    {"kv_policy": "razor", "kv_budget": "2%", "kv_razor_heads": "budget"},
    {"kv_policy": "d2o", "kv_budget": "2%", "kv_d2o_merge": "off"},
    {"kv_policy": "d2o", "kv_budget": 6, "kv_d2o_sink_size": 5, "kv_scoring": "question"},
    {"kv_policy": "d2o", "kv_budget": 4, "kv_sink_size": 4},  # d2o's sinks are kv_d2o_sink_size (0)
    {"kv_policy": "pod", "kv_budget": "5%", "kv_pod_share": 0.5, "kv_decode_budget": 8},
    {"kv_policy": "pod", "kv_budget": 64, "kv_pod_share": 0},
    {"kv_policy": "pod", "kv_budget": "10%", "kv_pod_share": 0.8, "kv_pod_group": 5, "kv_pod_sharing": "scores"},
    {"kv_policy": "pod", "kv_budget": "100%", "kv_pod_threshold": 0.5, "kv_pod_group": 1024},
    {"kv_policy": "snapkv", "kv_budget": "5%", "kv_share": True},
    {"kv_policy": "streamingllm", "kv_budget": 16, "kv_share": False, "kv_decode_budget": 8},
    {"kv_policy": "streamingllm", "kv_budget": 16, "kv_window": 64},  # window > budget is fine without scoring
    {"kv_policy": "snapkv", "kv_budget": 1},  # auto window: max(1, 1 // 4) = 1
    {"kv_policy": "razor", "kv_budget": 5, "kv_razor_fraction": 0.0, "kv_sink_size": 0},
    {"kv_policy": "adakv", "kv_budget": 32, "kv_window": 32, "kv_floor_alpha": 1, "kv_pooling": "avgpool",
     "kv_kernel_size": 1},
    {"kv_policy": "headkv", "kv_budget": 8, "kv_beta": 1, "kv_min_prompt": 0},
    {"KV_BUDGET": "junk", "kvbudget": -1, "temperature_like": None},  # not kv_*: not ours, ignored
]

PROMPT = "What is the capital of France?"
GEN_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def kv_server(kv_small_server):
    return kv_small_server  # conftest: --kv-policy full, --max-total-tokens 20000, shared


@pytest.fixture(scope="module")
def client(kv_server):
    from openai import OpenAI

    return OpenAI(base_url=kv_server.openai_base_url, api_key="none", timeout=300, max_retries=0)


def generate(server, custom_params, max_new_tokens: int = 2) -> tuple[int, dict]:
    return server.post_json("/generate", {"text": GEN_PROMPT, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0, "custom_params": custom_params}}, timeout=300)


def chat(client, custom_params, content: str = PROMPT, max_tokens: int = 2):
    return client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, extra_body={"custom_params": custom_params})


def complete(client, custom_params, max_tokens: int = 2):
    return client.completions.create(model="default", prompt=GEN_PROMPT, max_tokens=max_tokens, temperature=0,
                                     extra_body={"custom_params": custom_params})


def endpoint_errors(server, client, custom_params) -> dict[str, tuple[int, str | None]]:
    """(status, error message or None) of the same custom_params on the three endpoints."""
    import openai

    out = {}
    status, body = generate(server, custom_params)
    out["generate"] = (status, body["error"]["message"] if status != 200 else None)
    for name, call in (("chat", chat), ("completions", complete)):
        try:
            call(client, custom_params)
            out[name] = (200, None)
        except openai.BadRequestError as e:
            out[name] = (e.status_code, e.body.get("message") if isinstance(e.body, dict) else str(e.body))
        except openai.APIStatusError as e:
            out[name] = (e.status_code, str(e.body))
    return out


def assert_clean(server, timeout: float = 60.0) -> dict:
    st = server.wait_idle(timeout)
    assert st["shared"]["in_use"] == 0, st["shared"]  # kv_share: no copy still read by anyone
    if st["shared"]["prefixes"]:  # idle shared copies are cache: a flush frees them
        assert server.flush_cache()
        st = server.wait_idle(timeout)
    assert st["pool"]["used_pages"] == 0, st["pool"]
    assert st["integrity"] == "ok", st["integrity"]
    assert st["admission"]["reserved_pages"] == 0, st["admission"]
    assert st["fallbacks"] == {}, st["fallbacks"]  # no compression failed for an accepted config
    return st


def _id(x) -> str:
    return json.dumps(x, ensure_ascii=True)[:60]


@pytest.mark.parametrize("custom_params, message", INVALID, ids=[_id(c) for c, _ in INVALID])
def test_invalid_custom_params_are_400_with_exact_message(kv_server, client, custom_params, message):
    got = endpoint_errors(kv_server, client, custom_params)
    assert got == {"generate": (400, message), "chat": (400, message), "completions": (400, message)}, got


@pytest.mark.parametrize("custom_params", VALID, ids=[_id(c) for c in VALID])
def test_valid_custom_params_are_served(kv_server, client, custom_params):
    assert endpoint_errors(kv_server, client, custom_params) == {
        "generate": (200, None), "chat": (200, None), "completions": (200, None)}


def test_custom_params_not_an_object(kv_server, client):
    import openai

    for value, type_name in (("kv_budget", "str"), (["kv_budget", 64], "list"), (64, "int"), (True, "bool")):
        # /generate takes custom_params as any JSON value; the plugin rejects a non-object
        # (the scheduler could not read kv_* settings from it)
        status, body = generate(kv_server, value)
        assert (status, body["error"]["message"]) == (400, f"custom_params must be a JSON object, got {type_name}")
        # the OpenAI endpoints declare it a dict: SGLang's own request validation answers
        # (its message goes on with a server-side traceback location, not asserted)
        for call in (chat, complete):
            with pytest.raises(openai.BadRequestError) as err:
                call(client, value)
            lines = err.value.body["message"].splitlines()
            assert lines[:2] == ["1 validation error:", "  {'type': 'dict_type', 'loc': ('body', 'custom_params'), "
                                 f"'msg': 'Input should be a valid dictionary', 'input': {value!r}}}"], lines
    # empty / null custom_params mean "no overrides" everywhere
    for value in (None, {}, []):
        assert generate(kv_server, value)[0] == 200
    for value in (None, {}):
        assert chat(client, value).choices[0].message.content
        assert complete(client, value).choices[0].text


def test_one_bad_item_fails_a_native_batch(kv_server):
    status, body = kv_server.post_json("/generate", {
        "text": [GEN_PROMPT, PROMPT],
        "sampling_params": [{"max_new_tokens": 2, "custom_params": {"kv_policy": "snapkv", "kv_budget": 16}},
                            {"max_new_tokens": 2, "custom_params": {"kv_pooling": "median"}}],
    }, timeout=300)
    assert (status, body["error"]["message"]) == (
        400, "custom_params.kv_pooling: invalid value 'median'; choose one of maxpool, avgpool")


def test_server_unaffected_after_invalid_requests(kv_server, client):
    assert kv_server.healthy()
    assert_clean(kv_server)
    answer = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    # and with a compressing policy whose budget covers the prompt
    assert "Paris" in chat(client, {"kv_policy": "snapkv", "kv_budget": 256}, max_tokens=16).choices[0].message.content
    assert_clean(kv_server)


# ---------------------------------------------------------------------------- fuzzing
_JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1)  # beyond: SGLang parses floats
              | st.floats(allow_nan=False, allow_infinity=False)  # NaN/Infinity are not JSON
              | st.text(max_size=8))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
# Values near the valid ranges: mostly accepted, so that compression runs with odd but
# legal settings (budget 1, window = budget, sinks 0, ...).
_NEAR = {
    "kv_policy": st.sampled_from(POLICY_CHOICES),
    "kv_budget": st.integers(1, 80) | st.sampled_from([1, 2, 4, 5, 16, 1 << 20, "1%", "5%", "37.5%", "100%"]),
    "kv_window": st.integers(0, 24),
    "kv_scoring": st.sampled_from(["auto", "question", "window", "self", "accumulated"]),
    "kv_question": st.integers(0, 64),
    "kv_razor_heads": st.sampled_from(["fraction", "budget"]),
    "kv_d2o_merge": st.sampled_from(["on", "mean", "off"]),
    "kv_d2o_layers": st.sampled_from(["request", "profile", "uniform"]),
    "kv_pod_share": st.floats(0.0, 0.95),
    "kv_pod_group": st.integers(2, 40) | st.just(1024),
    "kv_pod_sharing": st.sampled_from(["keys", "scores"]),
    "kv_pod_threshold": st.floats(0.0, 1.0),
    "kv_min_prompt": st.integers(0, 40),
    "kv_sink_size": st.integers(0, 8),
    "kv_d2o_sink_size": st.integers(0, 8),
    "kv_beta": st.floats(1, 20) | st.integers(1, 3),
    "kv_floor_alpha": st.floats(0, 1),
    "kv_kernel_size": st.sampled_from([1, 3, 5, 13, 63]),
    "kv_agnostic_kernel": st.sampled_from([1, 3, 7, 63]),
    "kv_agnostic_select": st.sampled_from(["policy", "global"]),
    "kv_pooling": st.sampled_from(["maxpool", "avgpool"]),
    "kv_pool_shift": st.integers(0, 9),
    "kv_razor_fraction": st.floats(0, 1),
    "kv_decode_budget": st.integers(0, 40),
    "kv_share": st.booleans(),
}
# ... and just outside them
_EDGE = {
    "kv_policy": st.text(max_size=8),
    "kv_budget": st.sampled_from([-1, 0, (1 << 20) + 1, "0%", "100.1%", "5", "%"]),
    "kv_window": st.sampled_from([-1, 81, 4097]),
    "kv_scoring": st.sampled_from(["", "Question", "last"]),
    "kv_question": st.sampled_from([-1, 4097]),
    "kv_razor_heads": st.sampled_from(["", "all", "Budget"]),
    "kv_d2o_merge": st.sampled_from(["", "ON", "none"]) | st.booleans(),
    "kv_d2o_layers": st.sampled_from(["", "Uniform", "layers"]) | st.booleans(),
    "kv_pod_share": st.sampled_from([-0.01, 0.951, "0.3", 1]),
    "kv_pod_group": st.sampled_from([0, 1, 1025, 2.5, "2"]),
    "kv_pod_sharing": st.sampled_from(["", "Keys", "values"]) | st.booleans(),
    "kv_pod_threshold": st.sampled_from([-0.01, 1.01, "0.5"]),
    "kv_min_prompt": st.sampled_from([-1, (1 << 20) + 1]),
    "kv_sink_size": st.sampled_from([-1, 80, 4097]),
    "kv_d2o_sink_size": st.sampled_from([-1, 80, 4097]),
    "kv_beta": st.floats(-1, 0.999) | st.floats(1e6, 1e300, exclude_min=True),
    "kv_floor_alpha": st.floats(-1, 0, exclude_max=True) | st.floats(1, 10, exclude_min=True),
    "kv_kernel_size": st.sampled_from([-1, 0, 2, 4, 64, 65]),
    "kv_agnostic_kernel": st.sampled_from([-1, 0, 2, 64, "5", 1.5]),
    "kv_agnostic_select": st.sampled_from(["", "Global", "layer"]) | st.booleans(),
    "kv_pooling": st.sampled_from(["minpool", "MAXPOOL", ""]),
    "kv_pool_shift": st.sampled_from([-1, 32, "3", 1.5]),
    "kv_razor_fraction": st.floats(-1, 0, exclude_max=True) | st.floats(1, 10, exclude_min=True),
    "kv_decode_budget": st.sampled_from([-1, (1 << 20) + 1, "16", 1.5]),
    "kv_share": st.sampled_from([0, 1, "true", "yes"]),
}
assert set(_NEAR) == set(_EDGE) == set(REQUEST_KEYS), "every request key needs near and edge values here"
_KEYS = (st.sampled_from(sorted(REQUEST_KEYS)) | st.sampled_from(["kv_page_size", "kv_head_profile", "kv_", "kv_Policy"])
         | st.text(max_size=6).map(lambda s: "kv_" + s)  # unknown kv_* keys
         | st.text(max_size=6))  # other features' keys: ignored unless they start with kv_


@st.composite
def custom_params_dicts(draw) -> dict:
    out: dict = {}
    if draw(st.booleans()):  # known keys, values near the valid ranges: mostly accepted
        out["kv_policy"] = draw(_NEAR["kv_policy"])
        out["kv_budget"] = draw(_NEAR["kv_budget"])  # mostly below the prompt: real compression
        for key in draw(st.lists(st.sampled_from(sorted(REQUEST_KEYS)), max_size=3, unique=True)):
            out[key] = draw(_NEAR[key])
        if draw(st.booleans()):
            out[draw(st.text(max_size=6))] = draw(_JSON)  # another feature's key: ignored unless kv_*
        return out
    for _ in range(draw(st.integers(0, 5))):  # anything: mostly rejected
        key = draw(_KEYS)
        choice = draw(st.integers(0, 2)) if key in REQUEST_KEYS else 2
        out[key] = draw((_NEAR, _EDGE)[choice][key]) if choice < 2 else draw(_JSON)
    return out


@pytest.fixture(scope="module")
def server_config(kv_server) -> KVPolicyConfig:
    cfg = KVPolicyConfig(**kv_server.plugin_state()["config"])
    assert cfg.policy == "full" and cfg.budget == 128
    return cfg


_fuzz_seen = {"valid": 0, "invalid": 0, "compressing": 0}
# Every compressing policy once, whatever hypothesis draws: derandomized draws change with the
# strategies and hypothesis' version (a CI run drew only 6 compressing dicts of 60).
_ENDPOINTS = ("generate", "chat", "completions")
_COMPRESSING = [({"kv_policy": p, "kv_budget": 16}, _ENDPOINTS[i % 3])
                for i, p in enumerate(p for p in POLICY_CHOICES if p != "full")]


def _with_examples(test):
    for params, endpoint in _COMPRESSING:
        test = example(custom_params=params, endpoint=endpoint)(test)
    return test


@_with_examples
@settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(custom_params=custom_params_dicts(), endpoint=st.sampled_from(["generate", "chat", "completions"]))
def test_fuzz_custom_params_agree_with_the_reference(kv_server, client, server_config, custom_params, endpoint):
    import openai

    try:
        server_config.with_request(custom_params)
        expected = None
    except ConfigError as e:
        expected = str(e)
    if endpoint == "generate":
        status, body = generate(kv_server, custom_params, max_new_tokens=2)
        if status == 200:
            assert isinstance(body["text"], str) and 1 <= body["meta_info"]["completion_tokens"] <= 2, body
        message = body["error"]["message"] if status != 200 else None
    else:
        try:
            if endpoint == "chat":
                out = chat(client, custom_params, max_tokens=2)
                text, n = out.choices[0].message.content, out.usage.completion_tokens
            else:
                out = complete(client, custom_params, max_tokens=2)
                text, n = out.choices[0].text, out.usage.completion_tokens
            assert isinstance(text, str) and 1 <= n <= 2, out
            status, message = 200, None
        except openai.APIStatusError as e:  # a 5xx would land here too, and fail below
            status, message = e.status_code, (e.body or {}).get("message") if isinstance(e.body, dict) else str(e.body)
    if expected is None:
        _fuzz_seen["valid"] += 1
        _fuzz_seen["compressing"] += server_config.with_request(custom_params).policy != "full"
        assert (status, message) == (200, None), (custom_params, endpoint)
    else:
        _fuzz_seen["invalid"] += 1
        assert (status, message) == (400, expected), (custom_params, endpoint)
        assert message.startswith("custom_params.")
        key = message.split(":", 1)[0].removeprefix("custom_params.")
        assert key in custom_params, (key, custom_params)


def test_server_clean_after_fuzzing(kv_server, client):
    # the fuzzer exercised both outcomes (its derandomized draws), and every policy compressed (the examples)
    assert _fuzz_seen["valid"] >= 10 and _fuzz_seen["invalid"] >= 10, _fuzz_seen
    assert _fuzz_seen["compressing"] >= len(_COMPRESSING) >= 7, _fuzz_seen
    assert kv_server.healthy()
    assert_clean(kv_server)
    st_ = kv_server.plugin_state()
    # accepted configs ran compression: compressed, or kept whole by the size rule (prompts of
    # ~37 tokens are smaller than 16-token pages per head only at budgets <= 16)
    attempted = sum(p["compressed_requests_total"] for p in st_["policies"].values())
    assert attempted + st_["not_compressed"].get("not_smaller", 0) >= len(_COMPRESSING), st_
    # and one that must be compressed for real, after all that fuzzing
    chat(client, {"kv_policy": "snapkv", "kv_budget": 16}, content=" ".join([PROMPT] * 20))
    st_ = assert_clean(kv_server)
    assert sum(p["compressed_requests_total"] for p in st_["policies"].values()) > attempted
    assert "Paris" in chat(client, None, max_tokens=16).choices[0].message.content
