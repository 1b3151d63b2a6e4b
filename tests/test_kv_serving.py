"""End-to-end: `--kv-policy` on a real SGLang server with the test model.

One compressing server (``--kv-policy full`` as the default, policies chosen per request
through ``custom_params``) plus the plain server from conftest as the reference.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from headkv_sglang.dev.haystack import needle_prompt

pytestmark = pytest.mark.server

L, H_KV, HEAD_DIM, F32 = 30, 3, 64, 4  # SmolLM2-135M, served in float32 on CPU


@pytest.fixture(scope="module")
def kv_server(start_server):
    # Small prefill chunks so the ~1.4k and ~3k-token prompts below are prefilled in several
    # chunks: compression must happen once, after the last one, over the whole prompt.
    return start_server(["--kv-policy", "full", "--enable-cache-report", "--enable-metrics",
                         "--chunked-prefill-size", "1024"], name="kv-full")


@pytest.fixture(scope="module")
def kv_client(kv_server):
    from openai import OpenAI

    return OpenAI(base_url=kv_server.openai_base_url, api_key="none", timeout=600)


def chat(client, content: str, max_tokens: int = 24, **kv):
    extra = {"custom_params": kv} if kv else None
    return client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, extra_body=extra,
    )


PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 plus 30?",
    "Write one sentence about the sea.",
    "What is the opposite of hot?",
    "Which planet do we live on?",
    "Translate 'thank you' into French.",
    "Who wrote Romeo and Juliet?",
    "Complete the sentence: The quick brown fox",
] + [needle_prompt(250, depth=d, seed=s).prompt for s, d in ((11, 0.2), (12, 0.5), (13, 0.8), (14, 0.4))]


def test_full_and_uncut_budgets_are_token_identical_to_plain(openai_client, kv_client, kv_server):
    """--kv-policy full, and a budget >= the prompt, change no output token.

    A budget that keeps the whole prompt cannot save memory, so those requests stay
    uncompressed (the size rule) and are counted as such; the compressed path keeping
    everything equals dense attention in tests/test_compression.py and test_backend_kit.py.
    """
    assert len(PROMPTS) >= 12
    before = kv_server.plugin_state()["not_compressed"].get("not_smaller", 0)
    mismatches = []
    for p in PROMPTS:
        ref = chat(openai_client, p).choices[0].message.content
        for kv in ({}, {"kv_policy": "snapkv", "kv_budget": 100000}, {"kv_policy": "headkv", "kv_budget": 100000}):
            got = chat(kv_client, p, **kv).choices[0].message.content
            if got != ref:
                mismatches.append((p[:40], kv, ref, got))
    assert not mismatches, mismatches
    st = kv_server.wait_idle(60.0)
    assert st["not_compressed"]["not_smaller"] - before == 2 * len(PROMPTS)
    assert not st["fallbacks"], st["fallbacks"]
    assert st["integrity"] == "ok" and st["pool"]["used_pages"] == 0


def test_compressed_prompt_frees_token_pool_and_holds_20x_less(kv_server, kv_client):
    """Budget 64 on a ~3k-token prompt: >=20x less KV held, and the prompt's slots come back."""
    before = kv_server.wait_idle(60.0)
    tp0 = before["token_pool"]
    needle = needle_prompt(2200, depth=0.5, seed=21)
    body = {
        "model": "default", "messages": [{"role": "user", "content": needle.prompt}],
        "max_tokens": 96, "temperature": 0, "stream": True, "ignore_eos": True,
        "custom_params": {"kv_policy": "snapkv", "kv_budget": 64},
    }
    req = urllib.request.Request(f"{kv_server.openai_base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    snapshots: list[dict] = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        n_chunks = 0
        for line in resp:
            if line.startswith(b"data: {"):
                n_chunks += 1
                if n_chunks == 8:  # decoding: the prefill is done and compressed
                    snapshots.append(kv_server.plugin_state())
    assert snapshots, "no streamed chunks"
    during = snapshots[0]
    pol = during["policies"]["snapkv"]
    assert during["running_compressed_requests"] == 1, during
    prompt_len = pol["full_kv_bytes"] // (2 * L * H_KV * HEAD_DIM * F32)
    assert 2700 <= prompt_len <= 3400, prompt_len  # the whole prompt, not the last 1024-token chunk
    # reported bytes, cross-checked against the pool's own page accounting and the model shape
    assert pol["held_bytes"] == during["pool"]["used_pages"] * during["pool"]["bytes_per_page"]
    assert pol["full_kv_bytes"] == 2 * prompt_len * L * H_KV * HEAD_DIM * F32
    assert pol["full_kv_bytes"] >= 20 * pol["held_bytes"], pol
    # SGLang's token pool: the prompt is not pinned, and what is free or evictable is back to
    # its pre-request size but for the decode tail (< 96 + a few tokens)
    tp = during["token_pool"]
    assert tp["protected"] == 0, tp
    # (with one memory, the slots lent to the pages are SGLang's "used" ones: counted apart)
    assert tp["available"] + tp["evictable"] + tp["lent_to_pages"] >= tp0["available"] + tp0["evictable"] - 110, (tp0, tp)
    after = kv_server.wait_idle(60.0)
    assert after["pool"]["used_pages"] == 0 and after["integrity"] == "ok"
    assert after["token_pool"]["protected"] == 0


def test_ratio_budget_keeps_that_share_of_each_prompt(kv_server, kv_client):
    """``"kv_budget": "10%"``: each prompt keeps ceil(10% of its tokens) per KV head on average."""
    import math

    rids = []
    for words, seed in ((600, 41), (1500, 42)):
        status, out = kv_server.post_json("/generate", {
            "text": needle_prompt(words, depth=0.5, seed=seed).prompt,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                "custom_params": {"kv_policy": "headkv", "kv_budget": "10%"}}})
        assert status == 200, out
        rids.append(out["meta_info"]["id"])
    st = kv_server.wait_idle(60.0)
    reports = [st["recent_requests"][rid] for rid in rids]
    # compressed inside the prefill forward, with SGLang's overlap scheduler on
    assert all(rep["compressed_in"] == "forward" for rep in reports), reports
    assert kv_server.get_json("/get_server_info")["disable_overlap_schedule"] is False
    for rep in reports:
        n = rep["prompt_tokens"]
        assert rep["budget_asked"] == "10%" and rep["budget"] == math.ceil(0.1 * n), rep
        # kept head-tokens: at most the budget on average per (layer, KV head), and a real share
        assert 0.09 * n * L * H_KV <= rep["kept_head_tokens"] <= rep["budget"] * L * H_KV, rep
    assert reports[1]["prompt_tokens"] > 2 * reports[0]["prompt_tokens"]
    assert reports[1]["budget"] > 2 * reports[0]["budget"]  # the budget follows the prompt
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok"


def test_d2o_per_request_merges_into_the_pool_and_returns_its_pages(kv_server, model_path):
    """D2O at 10% of a ~2k-token needle prompt, with and without merging the dropped tokens.

    Plain eviction finds the needle. The merged keys/values are what decoding reads: the
    later tokens' log-probabilities differ from plain eviction's (the first, from the
    prefill's logits, does not). Merging is not asserted to find the needle: on this model
    it does not (the needle's digits absorb similar dropped tokens; README, D2O); layer
    budgets from the shipped profile keep at most the budget; the pages come back."""
    from transformers import AutoTokenizer

    needle = needle_prompt(1500, depth=0.4, seed=51)
    text = AutoTokenizer.from_pretrained(model_path).apply_chat_template(
        [{"role": "user", "content": needle.prompt}], tokenize=False, add_generation_prompt=True)
    out, rids = {}, {}
    for merge in ("on", "off"):
        status, body = kv_server.post_json("/generate", {
            "text": text, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "custom_params": {
                "kv_policy": "d2o", "kv_budget": "10%", "kv_scoring": "question", "kv_d2o_merge": merge}}})
        assert status == 200, body
        assert merge == "on" or needle.answer in body["text"], (merge, body["text"])
        out[merge] = [lp for lp, _, _ in body["meta_info"]["output_token_logprobs"]]
        rids[merge] = body["meta_info"]["id"]
    assert out["on"][0] == pytest.approx(out["off"][0], abs=1e-5)  # from the prefill: before compression
    assert max(abs(a - b) for a, b in zip(out["on"][1:], out["off"][1:])) > 1e-4, out
    st = kv_server.wait_idle(60.0)
    for merge, rid in rids.items():
        rep = st["recent_requests"][rid]
        assert rep["policy"] == "d2o" and rep["compressed_in"] == "forward", rep
        assert rep["kept_head_tokens"] <= rep["budget"] * L * H_KV, rep
    assert st["policies"]["d2o"]["compressed_requests_total"] >= 2
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok"


def test_pod_per_request_shares_distant_attention_in_values_only_pages(kv_server, model_path):
    """PoD at 10% of a ~2k-token needle prompt: with no sharing rows (kv_pod_share 0) every
    row is whole and finds the needle; with the shipped profile's most similar half
    (kv_pod_share 0.5) the sharing rows hold their distant tokens as values only (less KV
    held for the same tokens kept) and decoding reads the layer below's logits for them
    (the log-probabilities after the first, which comes from the prefill, change); sharing
    keys instead of scores holds the same pages and decodes differently again; groups of 4
    layers (kv_pod_group) take more rows and hold less."""
    from transformers import AutoTokenizer

    needle = needle_prompt(1500, depth=0.6, seed=52)
    text = AutoTokenizer.from_pretrained(model_path).apply_chat_template(
        [{"role": "user", "content": needle.prompt}], tokenize=False, add_generation_prompt=True)
    cases = {"off": (0.0, 2, "scores"), "scores": (0.5, 2, "scores"), "keys": (0.5, 2, "keys"),
             "groups": (0.8, 4, "scores")}
    out, rids = {}, {}
    for name, (share, group, sharing) in cases.items():
        status, body = kv_server.post_json("/generate", {
            "text": text, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "custom_params": {
                "kv_policy": "pod", "kv_budget": "10%", "kv_scoring": "question", "kv_pod_share": share,
                "kv_pod_group": group, "kv_pod_sharing": sharing}}})
        assert status == 200, body
        assert share or needle.answer in body["text"], (share, body["text"])
        out[name] = [lp for lp, _, _ in body["meta_info"]["output_token_logprobs"]]
        rids[name] = body["meta_info"]["id"]
    for a, b in (("off", "scores"), ("scores", "keys")):
        assert out[a][0] == pytest.approx(out[b][0], abs=1e-5)
        assert max(abs(x - y) for x, y in zip(out[a][1:], out[b][1:])) > 1e-4, (a, b, out)
    st = kv_server.wait_idle(60.0)
    rec = {name: st["recent_requests"][rid] for name, rid in rids.items()}
    whole = rec["off"]
    assert {r["policy"] for r in rec.values()} == {"pod"}, rec
    assert all(r["compressed_in"] == "forward" for r in rec.values()), rec
    B = whole["budget"]
    assert {r["kept_head_tokens"] for r in rec.values()} == {L * H_KV * B}
    # a sharing row: 4 sinks + the window whole, the rest values-only, two pages' worth a page
    from headkv_sglang import profiles
    from headkv_sglang.policies.pod import sharing_map

    prof = profiles.load_profile(profiles.shipped_profile(json.loads((model_path / "config.json").read_text()), "pod"))
    sim = torch.tensor(prof.kv_scores, dtype=torch.float64)
    ps, n_whole, bpp = st["pool"]["page_size"], 4 + min(32, B // 4), st["pool"]["bytes_per_page"]
    saved = math.ceil(B / ps) - math.ceil(n_whole / ps) - math.ceil((B - n_whole) / (2 * ps))
    assert whole["held_bytes"] == L * H_KV * math.ceil(B / ps) * bpp, whole
    for name in ("scores", "keys", "groups"):
        share, group, _ = cases[name]
        rows = int(sharing_map(sim, share, group).sum())
        assert whole["held_bytes"] - rec[name]["held_bytes"] == rows * saved * bpp, (name, rec[name], rows)
    assert rec["groups"]["held_bytes"] < rec["scores"]["held_bytes"]
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok"


def test_shared_document_is_compressed_once_and_read_by_every_question(kv_server, model_path):
    """kv_share: a document sent once (``max_new_tokens: 0``) is compressed once; questions
    that extend it read its pages (none of their own) and keep their own tokens whole; a
    request equal to a shared prompt answers exactly as with a private copy; the shared
    pages go back to the pool with a cache flush, and the owner table agrees throughout."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    needle = needle_prompt(1100, depth=0.92, seed=61)
    body = needle.prompt.rsplit("\n\n", 1)[0]
    chat_text = tok.apply_chat_template([{"role": "user", "content": body + "\n\nQQQ"}], tokenize=False,
                                        add_generation_prompt=True)
    head, tail = chat_text.split("QQQ")
    doc = tok(head, add_special_tokens=False)["input_ids"]
    questions = ["What is the secret number? Answer with the number only.",
                 "Repeat the secret number mentioned in the text.",
                 "Is the text about computers? Answer yes or no.",
                 "Name one word from the text."]
    prompts = [doc + tok(q + tail, add_special_tokens=False)["input_ids"] for q in questions]
    kv = {"kv_policy": "streamingllm", "kv_budget": "25%", "kv_share": True}
    assert kv_server.flush_cache()
    before = kv_server.wait_idle(60.0)["shared"]

    def generate(ids, n, params, logprob=False):
        status, out = kv_server.post_json("/generate", {"input_ids": ids, "return_logprob": logprob, "sampling_params": {
            "max_new_tokens": n, "temperature": 0, "custom_params": params}})
        assert status == 200, out
        return out

    generate(doc, 0, kv)  # "compress this document"
    st = kv_server.wait_idle(60.0)
    doc_pages, bpp = st["pool"]["used_pages"], st["pool"]["bytes_per_page"]
    assert st["shared"]["prefixes"] == 1 and st["shared"]["pages"] == doc_pages > 0, st["shared"]
    assert doc_pages * bpp < 0.3 * L * H_KV * len(doc) * HEAD_DIM * 2 * F32

    outs: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, generate(prompts[i], 16, kv)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert needle.answer in outs[0]["text"], outs[0]["text"]
    st = kv_server.wait_idle(60.0)
    for i, out in outs.items():
        r = st["recent_requests"][out["meta_info"]["id"]]
        assert (r["shared"], r["held_bytes"], r["shared_tokens"], r["shared_bytes"], r["prompt_tokens"]) == (
            "read", 0, len(doc), doc_pages * bpp, len(prompts[i])), r
    assert st["pool"]["used_pages"] == doc_pages and st["integrity"] == "ok"
    assert st["shared"]["in_use"] == 0 and st["shared"]["adopted_total"] - before["adopted_total"] == 4

    # a prompt equal to a shared one (the document's copy flushed first, else it would read
    # that) answers as with a private copy of its own
    assert kv_server.flush_cache()
    private = generate(prompts[0], 12, dict(kv, kv_share=False), logprob=True)
    generate(prompts[0], 0, kv)
    shared = generate(prompts[0], 12, kv, logprob=True)
    assert shared["text"] == private["text"]
    got = [lp for lp, _, _ in shared["meta_info"]["output_token_logprobs"]]
    want = [lp for lp, _, _ in private["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(want, abs=1e-5)
    st = kv_server.wait_idle(60.0)
    rp, rs = (st["recent_requests"][x["meta_info"]["id"]] for x in (private, shared))
    assert rp["shared"] is None and rp["held_bytes"] == rs["shared_bytes"] > 0 and rs["shared"] == "read", (rp, rs)
    assert st["shared"]["prefixes"] == 1 and st["integrity"] == "ok"

    assert kv_server.flush_cache()
    st = kv_server.wait_idle(60.0)
    assert st["pool"]["used_pages"] == 0 and st["shared"]["prefixes"] == 0 and st["integrity"] == "ok"


#: benchmarks/multi_question.py's first document (4 facts of different shapes, ~2k tokens) at
#: snapkv 10%: the reconstructed shared copy answered 3/4 there (full KV 3/4, the document-end
#: window 1/4: benchmarks/results/multi_question_cpu.md)
RECONSTRUCTED_MIN_RIGHT = 2


def test_reconstructed_shared_document_answers_and_returns_its_memory(kv_server, model_path):
    """kv_scoring "auto" (the default) scores a document sent alone (kv_share, max_new_tokens 0)
    by reconstruction: the prompt is prefilled with a pass that repeats it, only the document
    is compressed and shared, and the pass's token slots go back to SGLang; the questions read
    the copy and answer, and a flush returns every page."""
    import sys

    from transformers import AutoTokenizer

    from headkv_sglang.reconstruct import REPEAT_PROMPT

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.multi_question import case, correct
    from benchmarks.shared_document import chat_prompts

    tok = AutoTokenizer.from_pretrained(model_path)
    c = case(lambda t: len(tok(t, add_special_tokens=False)["input_ids"]), 2000, 4, 0)
    doc, prompts = chat_prompts(tok, c.text, [f.question for f in c.facts])
    kv = {"kv_policy": "snapkv", "kv_budget": "10%", "kv_share": True}
    assert kv_server.flush_cache()
    tp0 = kv_server.wait_idle(60.0)["token_pool"]

    def generate(ids, n, params):
        status, out = kv_server.post_json("/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": n, "temperature": 0, "custom_params": params}})
        assert status == 200, out
        return out

    d = generate(doc, 0, kv)
    st = kv_server.wait_idle(60.0)
    r = st["recent_requests"][d["meta_info"]["id"]]
    repeat = len(tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"])
    # the pass: the instruction, the template's turn change, the document's text again (not
    # its system turn and user header)
    assert r["scoring"] == "reconstruct" and r["selection"] == "global", r  # the defaults
    assert r["shared"] == "published" and r["shared_tokens"] == len(doc), r
    assert len(doc) + repeat < r["prompt_tokens"] < 2 * len(doc) + repeat + 16, r
    assert r["reconstruction_tokens"] == r["prompt_tokens"] - len(doc) and r["compress_ms"] > 0, r
    assert d["meta_info"]["prompt_tokens"] == r["prompt_tokens"]
    # one copy, a tenth of the document's KV; the pass's slots are SGLang's again (free or
    # evictable cache), nothing pinned
    pages, bpp = st["pool"]["used_pages"], st["pool"]["bytes_per_page"]
    assert st["shared"]["prefixes"] == 1 and st["shared"]["pages"] == pages > 0
    assert pages * bpp < 0.15 * L * H_KV * len(doc) * HEAD_DIM * 2 * F32
    tp = st["token_pool"]
    assert tp["protected"] == 0, tp
    assert tp["available"] + tp["evictable"] + tp["lent_to_pages"] >= tp0["available"] + tp0["evictable"] - 8, (tp0, tp)

    outs = [generate(p, 32, kv) for p in prompts]
    st = kv_server.wait_idle(60.0)
    for out in outs:
        r = st["recent_requests"][out["meta_info"]["id"]]
        assert (r["shared"], r["shared_tokens"], r["held_bytes"], r["scoring"]) == ("read", len(doc), 0, "question"), r
    right = [correct(f, o["text"]) for f, o in zip(c.facts, outs)]
    assert sum(right) >= RECONSTRUCTED_MIN_RIGHT, [(f.answer, o["text"]) for f, o in zip(c.facts, outs)]
    assert st["pool"]["used_pages"] == pages and st["integrity"] == "ok"

    assert kv_server.flush_cache()
    st = kv_server.wait_idle(60.0)
    assert st["pool"]["used_pages"] == 0 and st["shared"]["prefixes"] == 0 and st["integrity"] == "ok"


@pytest.mark.parametrize("params,message", [
    ({"kv_policy": "snapkv", "kv_scoring": "reconstruct"}, "custom_params.kv_scoring: invalid value 'reconstruct'"),
])
def test_reconstruct_needs_a_shared_document(kv_server, params, message):
    status, out = kv_server.post_json("/generate", {"text": "Hello there, how are you?", "sampling_params": {
        "max_new_tokens": 4, "custom_params": params}})
    assert status == 400 and message in json.dumps(out), out


def test_prefix_hit_after_compression_answers_like_a_cold_cache(kv_server, kv_client):
    doc = needle_prompt(900, depth=0.3, seed=31).prompt.rsplit("\n\n", 1)[0]
    q1 = doc + "\n\nWhat is the secret number? Answer with the number only."
    q2 = doc + "\n\nRepeat the secret number mentioned in the text."
    kv = {"kv_policy": "snapkv", "kv_budget": 512}  # ~1.2k-token prompts: compressed for real
    compressed_before = kv_server.plugin_state()["policies"].get("snapkv", {}).get("compressed_requests_total", 0)
    chat(kv_client, q1, **kv)
    warm = chat(kv_client, q2, **kv)
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached > 0.8 * warm.usage.prompt_tokens - 40, (cached, warm.usage.prompt_tokens)
    urllib.request.urlopen(urllib.request.Request(f"{kv_server.url}/flush_cache", method="POST"), timeout=60).read()
    cold = chat(kv_client, q2, **kv)
    assert (cold.usage.prompt_tokens_details.cached_tokens or 0) == 0
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert kv_server.wait_idle(60.0)["policies"]["snapkv"]["compressed_requests_total"] - compressed_before == 3


def test_32_concurrent_mixed_policies_then_pools_empty(kv_server, kv_client):
    policies = ["full", "snapkv", "pyramidkv", "adakv", "streamingllm", "headkv", "razor", "d2o", "pod"]
    jobs = []
    # budgets at or above the prompts' length: answers must stay right (such prompts are kept
    # whole by the size rule; concurrent compressed needles: tests/test_capacity.py)
    for i in range(24):  # short prompts
        jobs.append(("What is the capital of France?", "Paris",
                     {"kv_policy": policies[i % len(policies)], "kv_budget": 64 + 32 * (i % 3)}))
    for i in range(8):  # haystacks with a needle, budgets that keep everything
        n = needle_prompt(300, depth=0.1 + 0.1 * i, seed=40 + i)
        jobs.append((n.prompt, n.answer, {"kv_policy": policies[i % len(policies)], "kv_budget": 4096}))
    jobs.append(("What is the capital of France?", "Paris", {}))  # server default (full)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i, prompt, kv):
        try:
            results[i] = chat(kv_client, prompt, max_tokens=16, **kv).choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, p, kv)) for i, (p, _, kv) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    wrong = [(jobs[i][2], jobs[i][1], results.get(i)) for i in range(len(jobs)) if jobs[i][1] not in (results.get(i) or "")]
    assert not wrong, wrong
    st = kv_server.wait_idle(60.0)
    assert st["integrity"] == "ok", st["integrity"]
    assert st["pool"]["used_pages"] == 0 and st["running_compressed_requests"] == 0
    assert st["token_pool"]["protected"] == 0


def test_aborted_stream_frees_its_pages(kv_server):
    kv_server.wait_idle(60.0)
    n = needle_prompt(600, depth=0.5, seed=51)
    body = {"model": "default", "messages": [{"role": "user", "content": n.prompt}], "max_tokens": 2000,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "custom_params": {"kv_policy": "snapkv", "kv_budget": 64}}
    req = urllib.request.Request(f"{kv_server.openai_base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=600)
    chunks = 0
    for line in resp:
        if line.startswith(b"data: {"):
            chunks += 1
            if chunks == 4:
                break
    assert kv_server.plugin_state()["running_compressed_requests"] == 1
    resp.close()  # client disconnect: SGLang aborts the request
    st = kv_server.wait_idle(timeout=120)
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"kv_policy": "nope"}, "custom_params.kv_policy: invalid value 'nope'"),
        ({"kv_budget": -5}, "custom_params.kv_budget: invalid value -5"),
        ({"kv_budget": "big"}, "custom_params.kv_budget: invalid value 'big'; expected an integer in [1, 1048576] "
                               "(tokens per KV head) or a share of the prompt like '5%'"),
        ({"kv_budget": "0%"}, "custom_params.kv_budget: invalid value '0%'"),
        ({"kv_bogus": 1}, "custom_params.kv_bogus: unknown key"),
    ],
)
def test_invalid_request_params_are_400_and_server_unaffected(kv_server, kv_client, body, message):
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        chat(kv_client, "hi", **body)
    assert message in str(exc.value), str(exc.value)
    assert kv_server.healthy()
    assert "Paris" in chat(kv_client, "What is the capital of France?").choices[0].message.content


def _metric(text: str, name: str, policy: str | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name) and (policy is None or f'policy="{policy}"' in line):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {policy} not in /metrics")


def test_prometheus_metrics_report_compression(kv_server, kv_client):
    n = needle_prompt(700, depth=0.5, seed=61)
    chat(kv_client, n.prompt, kv_policy="pyramidkv", kv_budget=64)
    kv_server.wait_idle(60.0)
    text = urllib.request.urlopen(f"{kv_server.url}/metrics", timeout=60).read().decode()
    assert _metric(text, "sglang:headkv_compressed_requests_total", "pyramidkv") >= 1
    assert _metric(text, "sglang:headkv_held_bytes", "pyramidkv") == 0  # finished: nothing held
    assert _metric(text, "sglang:headkv_pool_used_pages") == 0
