"""Capacity: a token pool sized for ~4 full prompts runs >= 16 compressed ones at once."""

from __future__ import annotations

import threading
import time

import pytest

from headkv_sglang.haystack import needle_prompt

pytestmark = pytest.mark.server

PROMPT_WORDS = 800  # ~1.2k tokens
N_REQUESTS = 16


def test_16_compressed_requests_run_in_a_token_pool_for_4(start_server):
    prompts = [needle_prompt(PROMPT_WORDS, depth=0.5, seed=100 + i) for i in range(N_REQUESTS)]
    # 6250 tokens of KV capacity, 20% moved to the compressed pool: SGLang's token pool keeps
    # 5000 slots = about 4 prompts of ~1.2k tokens (checked below from the served lengths).
    srv = start_server(
        ["--max-total-tokens", "6250", "--kv-policy", "snapkv", "--kv-budget", "32", "--kv-pool-fraction", "0.2"],
        name="capacity",
    )
    from openai import OpenAI

    client = OpenAI(base_url=srv.openai_base_url, api_key="none", timeout=900)
    token_pool = srv.plugin_state()["token_pool"]["total"]
    assert token_pool == 5000, token_pool

    usage: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            r = client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": prompts[i].prompt}],
                max_tokens=120, temperature=0, extra_body={"ignore_eos": True},
            )
            usage[i] = r.usage.prompt_tokens
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
    peak_running = peak_compressed = 0
    while any(t.is_alive() for t in threads):
        st = srv.plugin_state()
        peak_running = max(peak_running, st["token_pool"]["running_requests"])
        peak_compressed = max(peak_compressed, st["running_compressed_requests"])
        time.sleep(1.0)
    for t in threads:
        t.join()
    assert not errors, errors
    prompt_len = max(usage.values())
    assert token_pool < 4.5 * prompt_len, (token_pool, prompt_len)  # room for ~4 uncompressed prompts
    assert peak_running >= N_REQUESTS, (peak_running, peak_compressed)
    assert peak_compressed >= N_REQUESTS, (peak_running, peak_compressed)
    st = srv.plugin_state()
    assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok"
    assert st["fallbacks"] == {}, st["fallbacks"]
