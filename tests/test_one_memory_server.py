"""``--kv-memory shared`` on a real server under memory pressure: compressed pages and SGLang's
token slots are one memory, and SGLang's admission weighs both.

Four needle prompts sent at once whose prefills alone fit SGLang's slots but whose pages,
added while the prompts are still held, do not: SGLang must admit them in turns (the pages
promised to admitted requests are not its to give), so every one is compressed (no
``pool_full`` fallback), answers its needle, and every borrowed slot is back in SGLang's
allocator afterwards.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from headkv_sglang.dev.haystack import needle_prompt

pytestmark = pytest.mark.server

ARGS = ["--max-total-tokens", "3000", "--kv-policy", "snapkv", "--kv-budget", "60%", "--kv-memory", "shared",
        "--kv-page-size", "16", "--kv-scoring", "question"]


def memory(srv) -> dict:
    return srv.plugin_state()


def test_pages_and_prefills_share_the_slots_without_failed_compressions(start_server):
    srv = start_server(ARGS, name="one-memory")
    needles = [needle_prompt(420, depth, seed=s) for s, depth in ((11, 0.3), (12, 0.5), (13, 0.7), (14, 0.4))]

    def ask(n):
        code, body = srv.post_json("/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": n.prompt}], "max_tokens": 16,
            "temperature": 0})
        assert code == 200, body
        return body["usage"]["prompt_tokens"], body["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(len(needles)) as ex:
        answers = list(ex.map(ask, needles))
    tokens = [n for n, _ in answers]
    # the prefills fit the slots together; with their pages (60% of each) they would not
    assert sum(tokens) < 3000 < sum(tokens) * 1.6, tokens
    st = memory(srv)
    assert st["integrity"] == "ok", st["integrity"]
    assert not st["fallbacks"].get("pool_full"), st["fallbacks"]
    assert st["policies"]["snapkv"]["compressed_requests_total"] == len(needles), (st["policies"], st["not_compressed"])
    right = sum(n.answer in text for n, (_, text) in zip(needles, answers))
    assert right >= 3, [(n.answer, text) for n, (_, text) in zip(needles, answers)]
    assert srv.flush_cache()
    mem = memory(srv)["memory"]
    assert mem["slots_borrowed_by_pages"] == 0 and mem["pages_used"] == 0, mem
    assert mem["slots_free"] == mem["slots_total"], mem
    assert mem["borrowed_chunks"] > 0 and mem["borrowed_chunks"] == mem["returned_chunks"], mem

    # a prompt whose slots and pages together exceed the whole memory is served whole (a
    # pool_full fallback) instead of waiting forever: the longest prompt is plain SGLang's
    long = needle_prompt(1800, 0.5, seed=15)
    code, body = srv.post_json("/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": long.prompt}], "max_tokens": 16,
        "temperature": 0}, timeout=300)
    assert code == 200, body
    assert 2000 < body["usage"]["prompt_tokens"] < 3000 - 16, body["usage"]  # its pages: 60% more slots
    st = srv.wait_idle()
    assert st["fallbacks"].get("pool_full") == 1 and st["integrity"] == "ok", st["fallbacks"]
    assert long.answer in body["choices"][0]["message"]["content"], body["choices"][0]["message"]["content"]

    # a document left shared (kv_share, max_new_tokens 0) holds its pages while idle; the flush
    # clears SGLang's allocator (the slots lent to those pages included) and then frees the
    # document: its chunks must not go back a second time (available > total killed the server)
    code, body = srv.post_json("/generate", {"text": needle_prompt(300, 0.5, seed=16).prompt,
                                             "sampling_params": {"max_new_tokens": 0, "custom_params": {
                                                 "kv_share": True, "kv_scoring": "window"}}})
    assert code == 200, body
    st = srv.wait_idle()
    assert st["shared"]["in_use"] == 0 and st["memory"]["pages_used"] > 0, (st["shared"], st["memory"])
    # the pool's used pages are the document's (not SGLang's slots too), its borrowed slots are
    # what SGLang's token pool reports lent, and SGLang's own slots are free or evictable cache
    pool, tp, mem = st["pool"], st["token_pool"], st["memory"]
    assert pool["used_pages"] == mem["pages_used"] == st["shared"]["pages"], (pool, mem, st["shared"])
    assert tp["lent_to_pages"] == mem["slots_borrowed_by_pages"] > 0, (tp, mem)
    assert mem["slots_borrowed_by_pages"] * 30 * 3 >= pool["used_pages"] * 16, mem  # slot: L x Hkv head-vectors
    assert tp["available"] + tp["evictable"] + tp["lent_to_pages"] == tp["total"], tp
    assert srv.flush_cache()
    st = srv.wait_idle()
    mem = st["memory"]
    assert mem["slots_free"] == mem["slots_total"] and mem["pages_used"] == 0, mem
    assert mem["borrowed_chunks"] == mem["returned_chunks"] and st["integrity"] == "ok", (mem, st["integrity"])
    assert srv.healthy()
