"""Capacity: a token pool sized for ~4 full prompts runs >= 16 compressed ones at once."""

from __future__ import annotations

import re
import threading
import time

import pytest

from headkv_sglang.dev.haystack import needle_prompt

pytestmark = pytest.mark.server

PROMPT_WORDS = 800  # ~1.2k tokens
N_REQUESTS = 16


def ask_concurrently(client, needles, max_tokens: int, poll=None) -> dict[int, str]:
    """Send every needle prompt at once (greedy chat), calling ``poll()`` every 0.5 s while
    any runs; fails on any request error; returns the answers by index."""
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            r = client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": needles[i].prompt}],
                max_tokens=max_tokens, temperature=0,
            )
            answers[i] = r.choices[0].message.content
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(needles))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if poll is not None:
            poll()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert not errors, errors
    return answers


def test_16_compressed_requests_run_in_a_token_pool_for_4(start_server):
    # prompts of ~600 tokens (half the module's: the 16 prefills are most of this test's time)
    prompts = [needle_prompt(PROMPT_WORDS // 2, depth=0.5, seed=100 + i) for i in range(N_REQUESTS)]
    # 3125 tokens of KV capacity, 20% moved to the compressed pool: SGLang's token pool keeps
    # 2500 slots = about 4 prompts of ~600 tokens (checked below from the served lengths).
    srv = start_server(
        ["--max-total-tokens", "3125", "--kv-policy", "snapkv", "--kv-budget", "32", "--kv-pool-fraction", "0.2"],
        name="capacity",
    )
    from openai import OpenAI

    client = OpenAI(base_url=srv.openai_base_url, api_key="none", timeout=1800, max_retries=0)  # a retry would double the load
    token_pool = srv.plugin_state()["token_pool"]["total"]
    assert token_pool == 2500, token_pool

    usage: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            r = client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": prompts[i].prompt}],
                # SGLang prefills every waiting request before it decodes: 32 steps keep all 16
                # running together for ~13 s here (120 took 47 s of decoding for the same check)
                max_tokens=32, temperature=0, extra_body={"ignore_eos": True},
            )
            usage[i] = r.usage.prompt_tokens
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
    # sampled counts, and the server's high-water marks since the previous read
    sampled = [0, 0]
    peaks = [0, 0]

    def read() -> dict:
        st = srv.plugin_state()
        sampled[0] = max(sampled[0], st["token_pool"]["running_requests"])
        sampled[1] = max(sampled[1], st["running_compressed_requests"])
        peaks[0] = max(peaks[0], st["token_pool"]["peak_running_requests_since_last_read"])
        peaks[1] = max(peaks[1], st["peak_running_compressed_requests_since_last_read"])
        return st

    while any(t.is_alive() for t in threads):
        read()
        time.sleep(1.0)
    for t in threads:
        t.join()
    read()
    assert not errors, errors
    prompt_len = max(usage.values())
    assert token_pool < 4.5 * prompt_len, (token_pool, prompt_len)  # room for ~4 uncompressed prompts
    assert sampled[0] >= N_REQUESTS and sampled[1] >= N_REQUESTS, (sampled, peaks)
    # the high-water marks see at least what sampling saw, and never more than was sent
    assert peaks == [N_REQUESTS, N_REQUESTS], (sampled, peaks)
    st = srv.plugin_state()
    # nothing ran since the previous read: the marks were reset by it
    assert st["token_pool"]["peak_running_requests_since_last_read"] == 0, st["token_pool"]
    assert st["peak_running_compressed_requests_since_last_read"] == 0, st
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok"
    assert st["fallbacks"] == {}, st["fallbacks"]


def test_requests_wait_for_a_full_compressed_pool_instead_of_falling_back(start_server):
    """A compressed pool with room for two headkv-128 requests: six concurrent ones queue.

    Every request must end up compressed (no ``pool_full`` fallback, which would serve it
    uncompressed from SGLang's pool), never more than two hold pages at once, the needle
    answers stay right, and the pool is empty and consistent afterwards.
    """
    n = 6
    needles = [needle_prompt(PROMPT_WORDS, depth=0.3 + 0.1 * i, seed=200 + i) for i in range(n)]
    # 375 token-equivalents moved = 2109 pages of 16; a headkv-128 request of this model
    # (30 layers x 3 KV heads) needs <= 810 pages, so two fit and a third does not.
    srv = start_server(
        ["--max-total-tokens", "6250", "--kv-policy", "headkv", "--kv-budget", "128", "--kv-pool-fraction", "0.06"],
        name="admission",
    )
    from openai import OpenAI

    client = OpenAI(base_url=srv.openai_base_url, api_key="none", timeout=1800, max_retries=0)  # a retry would double the load
    st0 = srv.plugin_state()
    assert st0["pool"]["num_pages"] == 2109, st0["pool"]

    peak_compressed = 0

    def poll() -> None:
        nonlocal peak_compressed
        st = srv.plugin_state()
        peak_compressed = max(peak_compressed, st["running_compressed_requests"])
        assert st["pool"]["used_pages"] <= st["pool"]["num_pages"]

    answers = ask_concurrently(client, needles, max_tokens=16, poll=poll)
    st = srv.plugin_state()
    assert st["fallbacks"] == {}, st["fallbacks"]
    assert st["admission"]["waits"] >= n - 2, st["admission"]
    assert 1 <= peak_compressed <= 2, peak_compressed
    wrong = {i: answers[i] for i in range(n) if needles[i].answer not in answers[i]}
    assert len(wrong) <= 1, wrong  # headkv at 128 tokens/head is not lossless; 5/6 is the bar
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok", st
    assert st["admission"]["reserved_pages"] == 0, st["admission"]


def test_retracted_compressed_requests_resume_and_free_their_pages(start_server):
    """Retraction: SGLang's own test switch retracts running decodes every third step.

    A retracted compressed request gives its pages back, is prefilled again (prompt plus
    the tokens it had generated), compressed again and resumes; it must still answer, and
    when the server is idle nothing may be left: no pages, no reservations, every token slot
    back, integrity ok.
    """
    n = 4
    needles = [needle_prompt(PROMPT_WORDS, depth=0.2 + 0.2 * i, seed=300 + i) for i in range(n)]
    srv = start_server(["--kv-policy", "headkv", "--kv-budget", "256"], name="retract",
                       env={"SGLANG_TEST_RETRACT": "1"})
    from openai import OpenAI

    client = OpenAI(base_url=srv.openai_base_url, api_key="none", timeout=1800, max_retries=0)
    answers = ask_concurrently(client, needles, max_tokens=24)
    st = srv.wait_idle()
    retracted = sum(int(m) for m in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)",
                                                srv.log_path.read_text()))
    assert retracted >= 2, f"SGLang retracted {retracted} requests; the switch did not take"
    compressed = st["policies"]["headkv"]["compressed_requests_total"]
    assert compressed > n, f"{compressed} compressions for {n} requests: no retracted request was compressed again"
    wrong = {i: answers[i] for i in range(n) if needles[i].answer not in answers[i]}
    assert len(wrong) <= 1, wrong
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok", st
    assert st["admission"]["reserved_pages"] == 0, st["admission"]
    tp = st["token_pool"]
    assert tp["available"] + tp["evictable"] == tp["total"], tp
    assert st["fallbacks"] == {}, st["fallbacks"]
