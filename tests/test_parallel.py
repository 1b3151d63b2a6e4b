"""Issue 20: ``--kv-policy`` with ``--tp 3`` and ``--dp 2`` on real SGLang servers (CPU, gloo).

The test model has 3 KV heads and 9 query heads, so ``--tp 3`` puts one KV head (and its
3 query heads) on each rank: each rank's pool holds only its head's pages, the budgets
come from one global plan, Ada-KV gathers a layer's scores from the 3 ranks and D2O's
merge threshold is the layer's over all ranks. The reference is the shared one-rank
server (``kv_small_server``, the same flags): the same request must get the same answer,
and afterwards every rank's pool must be empty and consistent.

SGLang's CPU engine wants one NUMA node per rank unless ``SGLANG_CPU_OMP_THREADS_BIND``
says which cores each rank uses; this machine has 1 node and 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.soak import post  # (status, JSON or error text) of one POST, never raising
from headkv_sglang.dev.haystack import needle_prompt
from headkv_sglang.dev.server import free_port

pytestmark = pytest.mark.server

SMALL = ["--kv-policy", "full", "--max-total-tokens", "20000"]  # kv_small_server's sizing
# one of each way a rank's plan is made: the global plan sliced (headkv, snapkv), scores
# gathered (adakv), the merge threshold gathered (d2o), compensation states (razor); every
# policy is checked rank by rank against the one-rank rows in tests/test_sharding.py
POLICIES = ["headkv", "snapkv", "adakv", "d2o", "razor"]
FINDS_NEEDLE = ["headkv", "snapkv", "adakv"]  # question-scored, 256 of ~1.5k tokens


# One multi-process server at a time, stopped right after its test: with the session's
# servers up, the --tp 3 and --dp 2 servers together (5 schedulers) ran the 24 GiB CI
# machine out of memory, and the OOM killer took the plain server's scheduler.
@pytest.fixture
def tp_server(start_server):
    # the split pool (CUDA's default), so --tp runs on both memories (test_tp3_on_one_memory_...)
    srv = start_server([*SMALL, "--tp", "3", "--enable-metrics", "--kv-memory", "split"], name="kv-tp3",
                       env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1|0"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")  # after the tp3 test (file order), so never up together with it
def dp_server(start_server):
    srv = start_server([*SMALL, "--dp", "2", "--enable-cache-report"], name="kv-dp2",
                       env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"})
    yield srv
    srv.stop()


@pytest.fixture
def router(dp_server, kv_small_server, tmp_path):
    """SGLang's router (``sglang_router``, cache-aware) in front of the dp2 server and the one-rank one."""
    port = free_port()
    log = tmp_path / "router.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", dp_server.url, kv_small_server.url,
         # --dp-aware: the router addresses each replica of the --dp server itself (without it
         # the server's own round robin sends a repeated prompt to the other replica)
         "--policy", "cache_aware", "--dp-aware", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:  # its /health answers before the workers are registered: wait for a routed request
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            if post(url + "/v1/completions", {"model": "default", "prompt": "Hi", "max_tokens": 1})[0] == 200:
                break
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.openai_base_url, api_key="none", timeout=900)


def ask(server, prompt: str, policy: str, budget, max_tokens: int = 12):
    o = client(server).chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        extra_body={"custom_params": {"kv_policy": policy, "kv_budget": budget, "kv_scoring": "question",
                                      # d2o merges only when asked (its default is off): the threshold's gather
                                      **({"kv_d2o_merge": "on"} if policy == "d2o" else {})}})
    return o.choices[0].message.content, o.id


def all_ranks_clean(server, ranks: int) -> list[dict]:
    """Every scheduler (and, with --tp, every rank's pool): idle, no page used, integrity ok."""
    st = server.wait_idle(180)
    states = [s["headkv_sglang"] for s in server.get_json("/server_info")["internal_states"]]
    for s in states:
        assert s["pool"]["used_pages"] == 0 and s["integrity"] == "ok", s["pool"]
        assert s["admission"]["reserved_pages"] == 0 and s["fallbacks"] == {}, (s["admission"], s["fallbacks"])
        tok = s["token_pool"]
        assert tok["available"] + tok["evictable"] == tok["total"] and tok["protected"] == 0, tok
    if ranks > 1:
        pools = st["tp_ranks"]
        assert [p["tp_rank"] for p in pools] == list(range(ranks)), pools
        for p in pools:
            assert p["used_pages"] == 0 and p["free_pages"] == p["num_pages"] and p["integrity"] == "ok", p
        assert len({p["num_pages"] for p in pools}) == 1, pools  # one pool size: admission agrees
    return states


def test_tp3_serves_every_policy_like_one_rank(tp_server, kv_small_server):
    st = tp_server.plugin_state()
    assert st["tensor_parallel"] == {"tp_rank": 0, "tp_size": 3, "kv_heads": [0, 1]}, st["tensor_parallel"]
    assert st["backend_installed"] and st["config"]["memory"] == "split" and "memory" not in st, st
    n = needle_prompt(1100, depth=0.4, seed=11)
    short = "What is the capital of France? Answer in one word."
    jobs = [(n.prompt, p, 256) for p in POLICIES] + [(short, "headkv", 64), (n.prompt, "headkv", "5%")]
    with ThreadPoolExecutor(4) as ex:
        tp = list(ex.map(lambda a: ask(tp_server, *a), jobs))
    one = [ask(kv_small_server, *a) for a in jobs]
    assert [t for t, _ in tp] == [t for t, _ in one], list(zip(jobs, tp, one))
    for (prompt, policy, _), (text, _) in zip(jobs, tp):
        if prompt == n.prompt and policy in FINDS_NEEDLE:
            assert n.answer in text, (policy, text)
    recent = tp_server.plugin_state()["recent_requests"]
    done = [r for r in recent.values() if r.get("compressed_in")]
    assert len(done) >= len(POLICIES) + 1, recent  # every needle request was compressed on the ranks
    all_ranks_clean(tp_server, 3)
    # Prometheus: one series per rank (each rank compressed every request, and holds nothing now)
    text = urllib.request.urlopen(f"{tp_server.url}/metrics", timeout=60).read().decode()
    for rank in range(3):
        assert metric(text, "sglang:headkv_pool_used_pages", f'tp_rank="{rank}"') == 0
        assert metric(text, "sglang:headkv_compressed_requests_total", 'policy="adakv"', f'tp_rank="{rank}"') >= 1


@pytest.fixture
def tp_shared_server(start_server):
    srv = start_server([*SMALL, "--tp", "3", "--kv-memory", "shared"], name="kv-tp3-shared",
                       env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1|0"})
    yield srv
    srv.stop()


def test_tp3_on_one_memory_ranks_borrow_alike_and_answer_like_one_rank(tp_shared_server, kv_small_server):
    """--kv-memory shared with --tp 3: each rank stores its own head's pages in its own token
    slots, yet the ranks borrow and give back slots together (SGLang's replicated schedulers
    decide on their free slots). Answers equal the one-rank server's (split memory) under
    concurrent load, decode-phase moves included; afterwards every rank's slots are back."""
    srv = tp_shared_server
    st = srv.plugin_state()
    assert st["tensor_parallel"]["tp_size"] == 3 and st["memory"]["lockstep"] is True, st.get("memory")
    n = needle_prompt(1100, depth=0.4, seed=11)
    jobs = [(n.prompt, p, 256) for p in ("headkv", "adakv", "d2o")] + [(n.prompt, "headkv", "5%")]

    def decode_job(server):  # a long output with a decode budget: generated tokens move into pages
        o = client(server).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Count from one to forty in words."}],
            max_tokens=96, temperature=0, extra_body={"custom_params": {
                "kv_policy": "snapkv", "kv_budget": 16, "kv_decode_budget": 24}})
        return o.choices[0].message.content

    with ThreadPoolExecutor(5) as ex:
        moved = ex.submit(decode_job, srv)
        tp = list(ex.map(lambda a: ask(srv, *a), jobs))
        moved = moved.result()
    one = [ask(kv_small_server, *a) for a in jobs]
    assert [t for t, _ in tp] == [t for t, _ in one], list(zip(jobs, tp, one))
    assert moved == decode_job(kv_small_server)
    for (_, policy, _), (text, _) in zip(jobs, tp):
        if policy in FINDS_NEEDLE:
            assert n.answer in text, (policy, text)
    st = srv.plugin_state()
    done = [r for r in st["recent_requests"].values() if r.get("compressed_in")]
    assert len(done) >= len(jobs) + 1, st["recent_requests"]
    assert st["decode"]["compressions"] >= 1, st["decode"]
    assert st["memory"]["borrowed_chunks"] > 0, st["memory"]  # the pages did live in token slots
    all_ranks_clean(srv, 3)
    pools = srv.plugin_state()["tp_ranks"]
    assert [p["slots_borrowed_by_pages"] for p in pools] == [0, 0, 0], pools  # every slot given back


def metric(text: str, name: str, *labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(lab in line for lab in labels):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics:\n" + "\n".join(
        line for line in text.splitlines() if "headkv" in line))


def test_dp2_replicas_each_compress_with_per_request_overrides(dp_server):
    n = needle_prompt(1100, depth=0.6, seed=12)
    jobs = [(n.prompt, p, 256) for p in ("headkv", "adakv")]  # SGLang's round robin: one per replica
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda a: ask(dp_server, *a), jobs))
    assert all(n.answer in t for t, _ in outs), outs
    states = all_ranks_clean(dp_server, 1)
    assert len(states) == 2, len(states)  # one scheduler, one pool per replica
    totals = [sum(p["compressed_requests_total"] for p in s["policies"].values()) for s in states]
    assert sum(totals) == len(jobs), totals


def compressed_total(*servers) -> int:
    return sum(p["compressed_requests_total"] for srv in servers
               for s in srv.get_json("/server_info")["internal_states"]
               for p in s["headkv_sglang"]["policies"].values())


def test_sglang_router_forwards_completions_custom_params_and_routes_by_prefix(router, dp_server, kv_small_server):
    """What SGLang's router (sglang-router 0.3.2) does with per-request kv_* keys, measured:
    ``/v1/completions`` forwards ``custom_params``; ``/v1/chat/completions`` and ``/generate``
    drop them (the request is served with the server's flags). README documents both."""
    before = compressed_total(dp_server, kv_small_server)
    docs = [needle_prompt(900, depth=0.5, seed=s).prompt for s in (21, 22)]
    cached = []
    for doc in docs:
        for _ in range(2):  # cache-aware routing: the repeat goes where the prefix is cached
            status, body = post(router + "/v1/completions", {
                "model": "default", "prompt": doc, "max_tokens": 4, "temperature": 0,
                "custom_params": {"kv_policy": "snapkv", "kv_budget": 64}})
            assert status == 200, body
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"] / body["usage"]["prompt_tokens"])
    assert compressed_total(dp_server, kv_small_server) - before == 4
    # the repeats reuse the first prompt's KV (up to the recomputed scoring window)
    assert cached[1] > 0.8 and cached[3] > 0.8 and cached[0] < 0.5 and cached[2] < 0.5, cached
    # an invalid key is the worker's 400, passed back as is
    status, body = post(router + "/v1/completions", {"model": "default", "prompt": "Hi", "max_tokens": 1,
                                                    "custom_params": {"kv_policy": "nope"}})
    assert status == 400 and "custom_params.kv_policy: invalid value 'nope'" in body, (status, body)
    # the router's chat and native endpoints drop custom_params: not an error, and nothing compressed
    before = compressed_total(dp_server, kv_small_server)
    status, _ = post(router + "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": docs[0]}], "max_tokens": 2,
        "custom_params": {"kv_policy": "nope"}})
    assert status == 200
    status, _ = post(router + "/generate", {"text": docs[1], "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"kv_policy": "snapkv", "kv_budget": 64}}})
    assert status == 200
    assert compressed_total(dp_server, kv_small_server) == before
    all_ranks_clean(dp_server, 1)
    all_ranks_clean(kv_small_server, 1)
