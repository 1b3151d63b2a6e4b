"""Decode-phase compression in the real server (``kv_decode_budget``): long outputs move
into the request's pages, the token pool holds only a window plus a chunk of the tail,
and everything comes back at the end (finish and abort).

On the shared ``--kv-policy full`` server; every setting comes per request.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from headkv_sglang.config import ModelShape
from headkv_sglang.dev.haystack import needle_prompt
from headkv_sglang.policies.decode import decode_chunk

pytestmark = pytest.mark.server

PROMPT = needle_prompt(800, depth=0.5, seed=31).prompt  # ~1.2k tokens
BUDGET = 64  # snapkv-64: observation window min(32, 64 // 4) = 16 = the decode window
WINDOW = 16


def stream(srv, params: dict, max_tokens: int, on_chunk=None, prompt: str = PROMPT) -> tuple[str, str]:
    """Stream a greedy chat completion with ``ignore_eos``; ``on_chunk(n)`` after each chunk
    (returning False closes the connection: an abort). Returns (rid, text)."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "custom_params": params}
    req = urllib.request.Request(f"{srv.openai_base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    rid, text, n = "", [], 0
    with urllib.request.urlopen(req, timeout=900) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            rid = chunk["id"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text.append(chunk["choices"][0]["delta"]["content"])
            n += 1
            if on_chunk is not None and on_chunk(n) is False:
                break
    return rid, "".join(text)


def private_tokens(st: dict) -> int:
    """Token-pool slots held by running requests outside the radix tree (their tails; with one
    memory, not the slots SGLang lent to compressed pages)."""
    tp = st["token_pool"]
    return tp["total"] - tp["available"] - tp["evictable"] - tp["protected"] - tp["lent_to_pages"]


def assert_all_returned(srv) -> dict:
    st = srv.wait_idle(120.0)
    assert st["integrity"] == "ok" and st["pool"]["used_pages"] == 0, st["pool"]
    assert private_tokens(st) == 0, st["token_pool"]
    assert st["decode"]["pages_promised"] == 0 and st["decode"]["errors"] == 0, st["decode"]
    return st


def test_moving_generated_tokens_without_dropping_any_changes_no_token(kv_small_server):
    """A decode budget the output never exceeds only moves the tail into pages: the output is
    the same as without it, token for token, while the tail left in SGLang's pool shrinks."""
    srv = kv_small_server
    base = {"kv_policy": "snapkv", "kv_budget": BUDGET}
    # both compared requests find the prompt in the radix tree (a first one computed all of it)
    stream(srv, base, 1)
    # 100 tokens: moves of 32 at tails of 48 and 80 (window 16 + chunk 32), 64 kept <= the budget
    _, plain = stream(srv, base, 100)
    rid, moved = stream(srv, {**base, "kv_decode_budget": 64}, 100)
    assert moved == plain
    st = assert_all_returned(srv)
    rep = st["recent_requests"][rid]
    assert rep["decode_compressions"] == 2 and rep["decode_kept"] == 64, rep
    assert rep["tail_start"] >= rep["prompt_tokens"] + 64


def test_a_short_prompt_with_a_decode_budget_moves_its_long_output_into_pages(kv_small_server, model_path):
    """A reasoning-style request: a prompt shorter than its budget (its pages would not be
    smaller than its full KV, so without a decode budget it stays whole) and a long output.
    With a decode budget it is compressed keeping every prompt token, its generated tokens
    move into pages as it goes, and while nothing is dropped its output is the plain one's."""
    srv = kv_small_server
    short = "Write a long story about a lighthouse keeper and a storm."
    not_smaller = srv.plugin_state()["not_compressed"].get("not_smaller", 0)
    _, plain = stream(srv, {"kv_policy": "snapkv", "kv_budget": BUDGET}, 100, prompt=short)
    assert assert_all_returned(srv)["not_compressed"].get("not_smaller", 0) == not_smaller + 1  # stayed whole
    # 100 tokens under a decode budget of 64: moves, drops nothing
    rid, moved = stream(srv, {"kv_policy": "snapkv", "kv_budget": BUDGET, "kv_decode_budget": 64}, 100,
                        prompt=short)
    assert moved == plain
    st = assert_all_returned(srv)
    rep = st["recent_requests"][rid]
    shape = ModelShape.from_model_path(model_path)  # every prompt token kept in every (layer, KV head)
    assert rep["prompt_tokens"] < BUDGET, rep
    assert rep["kept_head_tokens"] == shape.num_layers * shape.num_kv_heads * rep["prompt_tokens"], rep
    assert rep["decode_compressions"] == 2 and rep["decode_kept"] == 64, rep
    # 200 tokens under 32: the tail stays bounded, and every page and slot comes back
    samples: list[int] = []
    rid, text = stream(srv, {"kv_policy": "snapkv", "kv_budget": BUDGET, "kv_decode_budget": 32}, 200,
                       prompt=short, on_chunk=lambda n: samples.append(private_tokens(srv.plugin_state()))
                       if n in (120, 190) else None)
    assert text and max(samples) <= WINDOW + decode_chunk(32) + 4, samples
    rep = assert_all_returned(srv)["recent_requests"][rid]
    assert rep["decode_kept"] == 32 and rep["decode_compressions"] >= 4, rep


def test_long_output_holds_a_bounded_tail_and_frees_everything(kv_small_server):
    srv = kv_small_server
    before = srv.plugin_state()["decode"]
    decode_budget = 32
    bound = WINDOW + decode_chunk(decode_budget)
    samples: list[int] = []

    def sample(n: int) -> None:
        if n in (100, 150, 190):  # generated ~n tokens: a plain tail would hold that many
            samples.append(private_tokens(srv.plugin_state()))

    rid, text = stream(srv, {"kv_policy": "snapkv", "kv_budget": BUDGET, "kv_decode_budget": decode_budget}, 200,
                       on_chunk=sample)
    assert len(samples) == 3 and text
    # the tail: the window, at most one chunk, and the steps the overlap scheduler runs ahead
    assert max(samples) <= bound + 4, (samples, bound)
    st = assert_all_returned(srv)
    rep = st["recent_requests"][rid]
    assert rep["decode_kept"] == decode_budget and rep["decode_compressions"] >= (200 - bound) // decode_chunk(32)
    after = st["decode"]
    assert after["compressions"] - before["compressions"] == rep["decode_compressions"]
    assert after["head_tokens_dropped"] > before["head_tokens_dropped"]
    assert after["pool_full"] == before["pool_full"]


def test_an_aborted_long_output_returns_its_pages_and_slots(kv_small_server):
    srv = kv_small_server
    before = srv.plugin_state()["decode"]["compressions"]
    stream(srv, {"kv_policy": "headkv", "kv_budget": BUDGET, "kv_decode_budget": 16}, 2000,
           on_chunk=lambda n: n < 150)  # the client goes away mid-generation
    st = assert_all_returned(srv)
    assert st["decode"]["compressions"] > before


def test_d2o_merges_the_generated_tokens_it_drops(kv_small_server):
    """D2O's decode-time half: the generated tokens a move drops merge into similar kept
    ones (the merge itself is checked against naive loops in test_decode.py)."""
    srv = kv_small_server
    before = srv.plugin_state()["decode"]
    rid, text = stream(srv, {"kv_policy": "d2o", "kv_budget": BUDGET, "kv_decode_budget": 16, "kv_d2o_merge": "on"},
                       110)
    assert text
    st = assert_all_returned(srv)
    rep, after = st["recent_requests"][rid], st["decode"]
    assert rep["decode_compressions"] >= 2 and rep["decode_kept"] == 16, rep
    assert after["head_tokens_dropped"] > before["head_tokens_dropped"]
    assert 0 < after["head_tokens_merged"] - before["head_tokens_merged"] <= (
        after["head_tokens_dropped"] - before["head_tokens_dropped"])
