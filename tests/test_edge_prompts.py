"""Edge prompts x every policy, per request on one ``--kv-policy full`` server.

Empty and one-token prompts, prompts shorter than the observation window, exactly the
budget and one token over, the model's maximum context, ``max_tokens`` 0 and 1, stop
strings and streaming. What "correct" means here:

* a prompt no longer than the budget loses nothing: every compressing policy answers
  token-identically to ``full``;
* the first output token comes from the prefill's logits, before any compression: with
  ``max_new_tokens`` 1 every policy matches ``full`` at any length;
* a longer prompt gets a well-formed answer, and with a generous budget the needle of a
  needle-in-a-haystack prompt is still found;
* streaming, concatenated, equals the non-streaming answer; a stop string ends the answer
  (finish_reason "stop") and is not in it.

After each group the server is idle with nothing leaked: compressed pool empty, its
integrity intact, no admission reservation, and SGLang's token pool fully free or
evictable.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from headkv_sglang.dev.haystack import haystack, needle_prompt
from headkv_sglang.plugin import EMPTY_PROMPT_ERROR

pytestmark = pytest.mark.server

POLICIES = ("full", "headkv", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor", "d2o", "pod")
COMPRESSING = POLICIES[1:]
BUDGET = 64  # auto observation window: min(32, 64 // 4) = 16
L, H_KV = 30, 3  # SmolLM2-135M
CONTEXT = 8192
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def kv_server(kv_small_server):
    return kv_small_server  # conftest: --kv-policy full, --max-total-tokens 20000, shared


@pytest.fixture(scope="module")
def client(kv_server):
    from openai import OpenAI

    return OpenAI(base_url=kv_server.openai_base_url, api_key="none", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def raw_ids(tok) -> list[int]:
    """~700 tokens of prose, no chat template: prompts of exact lengths are its prefixes."""
    ids = tok(" ".join(haystack(500, seed=5)), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 400
    return ids


def chat_ids(tok, content: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def kv(policy: str, budget: int = BUDGET, **extra) -> dict:
    return {"kv_policy": policy, "kv_budget": budget, **extra}


def generate(server, prompt, max_new_tokens: int, custom_params=None, **sampling) -> tuple[int, dict]:
    """Native /generate; ``prompt``: text or token ids."""
    body = {"text": prompt} if isinstance(prompt, str) else {"input_ids": prompt}
    body["sampling_params"] = {"max_new_tokens": max_new_tokens, "temperature": 0,
                               "custom_params": custom_params, **sampling}
    return server.post_json("/generate", body)


def generate_ok(server, prompt, max_new_tokens: int, custom_params=None, **sampling) -> dict:
    status, body = generate(server, prompt, max_new_tokens, custom_params, **sampling)
    assert status == 200, (status, body, custom_params)
    return body


def generate_stream(server, prompt, max_new_tokens: int, custom_params=None, **sampling) -> dict:
    """Native streaming: each chunk carries the whole text so far; returns the last one."""
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                "custom_params": custom_params, **sampling}}
    req = urllib.request.Request(f"{server.url}/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
    assert chunks
    for a, b in zip(chunks, chunks[1:]):  # cumulative: each chunk extends the previous
        assert b["output_ids"][:len(a["output_ids"])] == a["output_ids"]
    return chunks[-1]


def chat(client, content: str, max_tokens: int, custom_params=None, **kw):
    return client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        extra_body={"custom_params": custom_params}, **kw)


def chat_stream(client, content: str, max_tokens: int, custom_params=None, **kw) -> tuple[str, str]:
    parts, finish = [], None
    for chunk in chat(client, content, max_tokens, custom_params, stream=True, **kw):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish


def parallel(fn, jobs: list[tuple]) -> list:
    """``fn(*job)`` for every job, concurrently (SGLang batches them); results in order."""
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(jobs)))) as ex:
        return list(ex.map(lambda job: fn(*job), jobs))


def assert_clean(server, timeout: float = 120.0) -> dict:
    """Idle, and nothing leaked: compressed pages, reservations, SGLang token slots."""
    st = server.wait_idle(timeout)
    assert st["pool"]["used_pages"] == 0, st["pool"]
    assert st["integrity"] == "ok", st["integrity"]
    assert st["admission"]["reserved_pages"] == 0, st["admission"]
    tp = st["token_pool"]
    assert tp["available"] + tp["evictable"] == tp["total"] and tp["protected"] == 0, tp
    assert st["fallbacks"] == {}, st["fallbacks"]  # every compression succeeded
    return st


def compressed(server, rid: str) -> dict | None:
    """What compression did to request ``rid`` (None: it was not compressed)."""
    return server.plugin_state()["recent_requests"].get(rid)


# ---------------------------------------------------------------------------- groups
def test_empty_prompt(kv_server, client):
    import openai

    # A text that tokenizes to nothing: SGLang 0.5.23 itself would run a 0-token prefill and
    # the whole server would exit (a crash in the rotary embedding, plugin or not); the
    # plugin turns it into a 400 (plugin._reject_empty_prompt).
    for policy in POLICIES:
        assert generate(kv_server, "", 4, kv(policy)) == (400, {"error": {"message": EMPTY_PROMPT_ERROR}})
    status, body = kv_server.post_json("/generate", {"text": ["", FRANCE], "sampling_params": {"max_new_tokens": 2}})
    assert (status, body["error"]["message"]) == (400, EMPTY_PROMPT_ERROR)  # one empty item fails the batch
    # SGLang's own checks
    assert generate(kv_server, [], 4, kv("snapkv")) == (400, {"error": {"message": "input_ids cannot be empty."}})
    for policy in ("full", "snapkv"):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="default", prompt="", max_tokens=4,
                                      extra_body={"custom_params": kv(policy)})
        assert err.value.body["message"] == "Prompt cannot be empty"
    # An empty chat message is not an empty prompt: the template has ~30 tokens (< budget).
    outs = parallel(lambda p: chat(client, "", 4, kv(p)), [(p,) for p in POLICIES])
    assert outs[0].usage.prompt_tokens <= BUDGET
    ref = outs[0].choices[0].message.content
    assert ref and [o.choices[0].message.content for o in outs] == [ref] * len(POLICIES)
    assert kv_server.healthy()
    assert_clean(kv_server)


def test_prompts_up_to_the_budget_stay_whole_and_longer_ones_compress(kv_server, raw_ids):
    """1 token, shorter than the observation window (auto: 16), exactly the budget: pages of
    16 tokens per (layer, KV head) would hold at least the full KV, so these stay
    uncompressed (counted as ``not_compressed``, not as a fallback) and answer token for
    token like full; 3x the budget is compressed for real."""
    lengths, new = (1, 5, BUDGET, 3 * BUDGET), 4
    before = kv_server.plugin_state()["not_compressed"].get("not_smaller", 0)
    jobs = [(n, p) for n in lengths for p in POLICIES]
    outs = parallel(lambda n, p: generate_ok(kv_server, raw_ids[:n], new, kv(p)), jobs)
    by = dict(zip(jobs, outs))
    st = kv_server.plugin_state()
    state = st["recent_requests"]
    for n in lengths:
        ref = by[(n, "full")]
        assert ref["meta_info"]["prompt_tokens"] == n
        assert len(ref["output_ids"]) == new or ref["meta_info"]["finish_reason"]["type"] == "stop", ref
        for p in COMPRESSING:
            out = by[(n, p)]
            rec = state.get(out["meta_info"]["id"])
            if n <= BUDGET:  # not smaller when compressed: kept whole, same tokens out
                assert rec is None, (n, p, rec)
                assert out["output_ids"] == ref["output_ids"], (n, p, out["text"], ref["text"])
            else:  # compressed for real, into less memory, and still a well-formed answer
                assert rec is not None and rec["policy"] == p and rec["prompt_tokens"] == n, (n, p, rec)
                assert rec["kept_head_tokens"] < n * L * H_KV and rec["held_bytes"] < rec["full_bytes"], (n, p, rec)
                assert len(out["output_ids"]) == new or out["meta_info"]["finish_reason"]["type"] == "stop", out
                assert out["output_ids"][0] == ref["output_ids"][0]  # sampled from the prefill
    assert st["not_compressed"]["not_smaller"] - before == 3 * len(COMPRESSING)
    assert_clean(kv_server)


def test_max_new_tokens_zero_and_one(kv_server, client, raw_ids):
    import openai

    prompt = raw_ids[:300]  # > budget: would be compressed if it decoded
    zero = parallel(lambda p: generate_ok(kv_server, prompt, 0, kv(p)), [(p,) for p in POLICIES])
    for out in zero:
        assert (out["text"], out["output_ids"]) == ("", []), out
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    one = parallel(lambda p: generate_ok(kv_server, prompt, 1, kv(p)), [(p,) for p in POLICIES])
    assert all(len(o["output_ids"]) == 1 for o in one)
    assert [o["output_ids"] for o in one] == [one[0]["output_ids"]] * len(POLICIES)
    # the request is over after its prefill: nothing was compressed, no page taken
    recent = kv_server.plugin_state()["recent_requests"]
    assert not [o["meta_info"]["id"] for o in zero + one if o["meta_info"]["id"] in recent]
    # OpenAI endpoints, as SGLang 0.5.23 has them: completions refuses 0 (request
    # validation), chat answers an empty completion
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="default", prompt=FRANCE, max_tokens=0,
                                  extra_body={"custom_params": kv("snapkv")})
    assert err.value.body["message"].splitlines()[:2] == [
        "1 validation error:",
        "  {'type': 'value_error', 'loc': ('body', 'max_tokens'), 'msg': 'Value error, max_tokens must be positive', "
        "'input': 0, 'ctx': {'error': ValueError('max_tokens must be positive')}}"]
    chats = parallel(lambda p: chat(client, FRANCE, 0, kv(p)), [(p,) for p in POLICIES])
    for c in chats:
        assert (c.choices[0].message.content, c.choices[0].finish_reason, c.usage.completion_tokens) == ("", "length", 0)
    assert_clean(kv_server)


def test_stop_strings_and_streaming(kv_server, client, tok):
    """Per policy: a compressed ~240-token prompt (chat and native) and a short one (<= budget)."""
    long_q = needle_prompt(150, depth=0.5, seed=71).prompt
    long_ids = chat_ids(tok, long_q)
    assert len(long_ids) > 3 * BUDGET
    new = 8
    # phase 1: each policy's plain answer, the same request streamed, and a short prompt
    # streamed with a stop string (its answer is full's: the prompt fits the budget)
    jobs = [("short_ref", "full")] + [(kind, p) for kind in ("long", "long_stream", "short_stop_stream")
                                      for p in POLICIES]

    def phase1(kind, p):
        if kind == "short_ref":
            c = chat(client, FRANCE, new).choices[0]
            return c.message.content, c.finish_reason
        if kind == "long":
            c = chat(client, long_q, new, kv(p)).choices[0]
            return c.message.content, c.finish_reason
        if kind == "long_stream":
            return chat_stream(client, long_q, new, kv(p))
        return chat_stream(client, FRANCE, new, kv(p), stop=["Paris"])

    r1 = dict(zip(jobs, parallel(phase1, jobs)))
    short_ref = r1[("short_ref", "full")][0]
    assert "Paris" in short_ref
    for p in POLICIES:
        text, finish = r1[("long", p)]
        assert len(text) >= 4 and finish in ("stop", "length"), (p, text, finish)
        assert r1[("long_stream", p)] == (text, finish), p
        assert r1[("short_stop_stream", p)] == (short_ref[:short_ref.index("Paris")], "stop"), p
    # phase 2: a stop string from the middle of each policy's own long answer; every other
    # policy on the chat endpoint, the others streamed on the native one (cumulative chunks)
    stops = {p: r1[("long", p)][0][len(r1[("long", p)][0]) // 2:][:3] for p in POLICIES}

    def phase2(i, p):
        if i % 2 == 0:
            c = chat(client, long_q, new, kv(p), stop=[stops[p]]).choices[0]
            return c.message.content, c.finish_reason
        out = generate_stream(kv_server, long_ids, new, kv(p), stop=[stops[p]])
        return out["text"], out["meta_info"]["finish_reason"]

    r2 = parallel(phase2, list(enumerate(POLICIES)))
    for i, (p, got) in enumerate(zip(POLICIES, r2)):
        full_text, stop = r1[("long", p)][0], stops[p]
        want = full_text[:full_text.index(stop)]
        assert stop not in want
        finish = "stop" if i % 2 == 0 else {"type": "stop", "matched": stop}
        assert got == (want, finish), (p, stop, full_text)
    assert_clean(kv_server)


def test_needle_found_with_a_generous_budget(kv_server, client):
    """~1.2k-token haystack, budget 512 (40%): the policies that score every head's tokens
    with the question's queries find the needle. StreamingLLM keeps only the sinks and the
    most recent tokens (the needle mid-document is gone by design) and RazorAttention keeps
    the mid-document only in its ~15% retrieval heads (on this 135M model it garbles the
    number: '7293512887' for 72937); D2O merges every dropped token into a similar kept one,
    which on this model garbles it too ('723'; docs/policies-and-profiles.md, D2O); PoD's sharing rows read the
    needle through the layer below's attention, which on this model got the last digit
    wrong at share 0.3 ('72935'; docs/policies-and-profiles.md, PoD): for those four, a well-formed answer."""
    n = needle_prompt(900, depth=0.5, seed=73)
    outs = parallel(lambda p: chat(client, n.prompt, 12, kv(p, 512)), [(p,) for p in POLICIES])
    assert outs[0].usage.prompt_tokens > 2 * 512
    got = {p: (o.choices[0].message.content, o.choices[0].finish_reason) for p, o in zip(POLICIES, outs)}
    lossy = ("streamingllm", "razor", "d2o", "pod")
    wrong = {p: t for p, (t, _) in got.items() if p not in lossy and n.answer not in t}
    assert not wrong, (n.answer, wrong)
    for p in lossy:
        assert got[p][0] and got[p][1] in ("stop", "length"), got[p]
    assert_clean(kv_server)


# At 8k tokens every request costs a whole prompt's attention even on a prefix hit
# (SGLang's torch_native extend computes attention for all seq_len queries, then keeps
# the new ones): ~35 s of CPU each on the 2-core CI machine. So the maximum context runs
# two policies: HeadKV (per-head budgets; it prefills the prompt) and RazorAttention
# (whole retrieval heads: the most pages, and an admission worst case of the whole
# prompt; a prefix hit). Every policy runs every other edge above.


def test_maximum_context(kv_server, tok):
    """The longest prompt the server takes (8185 of 8192 tokens), new tokens up to the
    context's end, budget 64: ~128x compression."""
    limit = kv_server.get_json("/server_info")["max_req_input_len"]
    assert limit == CONTEXT - 6  # SGLang: min(context - 1, token pool - 1) - 5
    longest = limit - 1  # SGLang's scheduler refuses len >= max_req_input_len
    n = needle_prompt(7000, depth=0.6, seed=75)
    ids = chat_ids(tok, n.prompt)
    head = next(i for i, (a, b) in enumerate(zip(chat_ids(tok, "alpha"), chat_ids(tok, "omega"))) if a != b)
    cut = len(ids) - longest
    assert cut > 0
    ids = ids[:head + 8] + ids[head + 8 + cut:]  # drop tokens from the start of the haystack
    assert len(ids) == longest
    # one token more (SGLang's message names max_req_input_len as the maximum, though that
    # length itself is refused), or one new token more than the context holds: SGLang's 400s
    assert generate(kv_server, ids + ids[-1:], 1, kv("headkv")) == (400, {"error": {"message": (
        f"Input length ({limit} tokens) exceeds the maximum allowed length ({limit} tokens). "
        "Use a shorter input or enable --allow-auto-truncate.")}})
    room = CONTEXT - longest  # new tokens the HTTP layer accepts: prompt + max_new_tokens <= context
    assert generate(kv_server, ids, room + 1, kv("headkv")) == (400, {"error": {"message": (
        f"Requested token count exceeds the model's maximum context length of {CONTEXT} tokens. "
        f"You requested a total of {CONTEXT + 1} tokens: {longest} tokens from the input messages and "
        f"{room + 1} tokens for the completion. Please reduce the number of tokens in the input messages "
        "or the completion to fit within the limit.")}})
    # ... but SGLang's scheduler silently caps max_new_tokens at max_req_len - prompt - 1,
    # max_req_len being context - 1: 5 tokens here, finish_reason "length"
    produced = (CONTEXT - 1) - longest - 1
    outs = [generate_ok(kv_server, ids, room, kv("headkv"))]  # prefills; then a prefix hit:
    outs.append(generate_ok(kv_server, ids, room, kv("razor")))
    recent = kv_server.plugin_state()["recent_requests"]
    for p, out in zip(("headkv", "razor"), outs):
        assert out["meta_info"]["prompt_tokens"] == longest
        assert out["output_ids"][0] == outs[0]["output_ids"][0], p  # sampled from the prefill's logits
        assert len(out["output_ids"]) == produced or out["meta_info"]["finish_reason"]["type"] == "stop", (p, out)
        rec = recent.get(out["meta_info"]["id"])
        assert rec is not None and rec["policy"] == p and rec["prompt_tokens"] == longest, (p, rec)
        assert rec["kept_head_tokens"] < longest * L * H_KV, (p, rec)
    # HeadKV keeps the budget on average per head (razor keeps its retrieval heads whole)
    assert recent[outs[0]["meta_info"]["id"]]["kept_head_tokens"] <= BUDGET * L * H_KV
    assert_clean(kv_server)
