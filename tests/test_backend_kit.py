"""The headkv attention backend on SGLang's own attention test kit.

``sglang.test.kits.attention_unittest`` (installed with SGLang) builds a real
``ReqToTokenPool`` / ``MHATokenToKVPool``, a ``MockModelRunner``, SGLang's backend from
its registry and ``ForwardBatch``es for extend and decode, with its own dense reference.
Here :class:`~headkv_sglang.serving.backend.HeadKVAttnBackend` wraps that backend:

* compression off: the wrapper's output equals the wrapped backend's on every one of the
  kit's dense cases (and the kit's reference within its tolerance);
* compressed rows (prompts compressed by :class:`~headkv_sglang.kv.manager.CompressionManager`
  from the kit's token pool, some with Razor compensation, some with decoded tails) in
  decode batches and in mixed extend batches: those rows equal the naive oracle over
  pages ⊕ tail ⊕ compensation, the other rows equal the wrapped backend's output.

On this CPU it wraps ``torch_native`` with the batched torch kernel; on a CUDA machine
with FlashInfer (``scripts/gpu_check.sh``) it also wraps SGLang's ``flashinfer`` backend
with the FlashInfer kernel — the GPU serving path minus the model.
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from ragged_oracle import oracle_row

kit = pytest.importorskip("sglang.test.kits.attention_unittest.attention_methods.dense_attention")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from headkv_sglang.config import KVPolicyConfig, ModelShape  # noqa: E402
from headkv_sglang.kv.manager import CompressionManager  # noqa: E402
from headkv_sglang.kv.request_state import FORWARD_OK, Phase  # noqa: E402
from headkv_sglang.kv.pool import RequestPages  # noqa: E402
from headkv_sglang.serving.backend import HeadKVAttnBackend, graph_allowed, make_kernel, stand_in_batch  # noqa: E402
from headkv_sglang.serving.state import ServingState  # noqa: E402

GPU = torch.cuda.is_available() and importlib.util.find_spec("flashinfer") is not None
TARGETS = [("torch_native", "cpu", torch.float32, 32)]
if GPU:
    TARGETS.append(("flashinfer", "cuda", torch.bfloat16, 128))
else:
    TARGETS.append(pytest.param("flashinfer", "cuda", torch.bfloat16, 128, marks=pytest.mark.skip(
        reason="no CUDA device with flashinfer on this machine (scripts/gpu_check.sh runs it on an H100/H200)")))
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # the kit's modules are nn.Linear: no autograd through the pools
        yield


class _TestCase:
    def skipTest(self, msg):  # the kit's unittest-style skip
        pytest.skip(msg)


def build(case, device, dtype, head_dim, max_ctx=64):
    return kit.build_dense_attention_fixture(_TestCase(), case, head_dim=head_dim, hidden_size=4 * head_dim,
                                             max_context_len=max_ctx, dtype=dtype, device=device)


def wrap(fx, device, dtype, head_dim, num_pages=2048, page_size=5):
    case = fx.case
    shape = ModelShape(num_layers=1, num_q_heads=case.num_heads, num_kv_heads=case.num_kv_heads, head_dim=head_dim)
    manager = CompressionManager(shape, num_pages, page_size, dtype, device)
    _, kernel = make_kernel(manager.pool, shape, torch.device(device), head_dim ** -0.5)
    backend = HeadKVAttnBackend(fx.backend, manager, kernel, fx.runner.req_to_token_pool, fx.runner.token_to_kv_pool)
    return backend, manager, shape


def attention(fx, backend):
    """The attention layer's raw output ``[tokens, Hq, D]`` (and its q) for the fixture's batch."""
    with torch.no_grad(), kit.forward_context(kit.ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(fx.forward_batch)
        q, k, v = fx.actual_module.project_qkv(fx.input_hidden)
        o = fx.actual_module.attn(q, k, v, fx.forward_batch)  # RadixAttention -> backend.forward
    H, D = fx.case.num_heads, q.shape[-1] // fx.case.num_heads
    return o.view(-1, H, D).float(), q.view(-1, H, D)


@pytest.mark.parametrize("backend_name,device,dtype,head_dim", TARGETS)
def test_compression_off_reproduces_the_wrapped_backend_on_the_kits_cases(backend_name, device, dtype, head_dim):
    for case in kit.make_dense_cases(backend_name):
        fx = build(case, device, dtype, head_dim)
        inner_out = kit.run_dense_fixture_eager(fx)
        wrapper, _, _ = wrap(fx, device, dtype, head_dim)
        out = kit.run_dense_fixture_eager(kit.replace_backend(fx, wrapper))
        torch.testing.assert_close(out, inner_out, atol=0, rtol=0, msg=lambda m: f"{case.name}: {m}")
        torch.testing.assert_close(out.float(), kit.expected_dense_fixture_output(fx).float(),
                                   atol=kit.DENSE_ATOL, rtol=kit.DENSE_RTOL, msg=lambda m: f"{case.name}: {m}")


def compress_rows(fx, manager, shape, rows: dict[int, int], gen, razor_rows=()):
    """Compress row ``r``'s positions ``[0, rows[r])`` from the kit's token pool (AdaKV: ragged
    lengths per head; random window queries); ``razor_rows`` also get a compensation state."""
    pool = fx.runner.token_to_kv_pool
    req_to_token = fx.runner.req_to_token_pool.req_to_token
    for r, prompt_len in rows.items():
        cfg = KVPolicyConfig(policy="adakv", budget=max(4, prompt_len // 3), window=3, kernel_size=3)
        manager.begin_extend(r, f"rid{r}", cfg.obs_window)
        manager.capture_queries(0, r, torch.randn(cfg.obs_window, shape.num_q_heads, shape.head_dim, generator=gen)
                                .to(pool.get_key_buffer(0)))
        slots = req_to_token[r, :prompt_len].long()
        rec = manager.compress(r, cfg, prompt_len,
                               lambda layer: (pool.get_key_buffer(layer)[slots], pool.get_value_buffer(layer)[slots]))
        if r in razor_rows:
            lp = rec.layers[0]
            dev = pool.get_key_buffer(0).device
            lp.comp_k = torch.randn(shape.num_kv_heads, shape.head_dim, generator=gen).to(dev, pool.dtype)
            lp.comp_v = torch.randn(shape.num_kv_heads, shape.head_dim, generator=gen).to(dev, pool.dtype)
            lp.comp_count = torch.randint(1, 50, (shape.num_kv_heads,), generator=gen)


def check_rows(fx, manager, backend_name, device, dtype, head_dim, out, q, inner_out, query_rows):
    """Compressed query rows = oracle; every other row = the wrapped backend's output."""
    pool = fx.runner.token_to_kv_pool
    req_to_token = fx.runner.req_to_token_pool.req_to_token
    compressed_tokens = set()
    for token, (r, pos) in enumerate(query_rows):
        rec = manager.records.get(r)
        if rec is None:
            continue
        compressed_tokens.add(token)
        tail = req_to_token[r, rec.prompt_len:pos + 1].long()
        want = oracle_row(manager.pool, rec.layers[0], q[token].float(), pool.get_key_buffer(0)[tail].float(),
                          pool.get_value_buffer(0)[tail].float(), head_dim ** -0.5)
        torch.testing.assert_close(out[token].cpu(), want, **TOL[dtype], msg=lambda m: f"row {r} pos {pos}: {m}")
    plain = [t for t in range(len(query_rows)) if t not in compressed_tokens]
    torch.testing.assert_close(out[plain], inner_out[plain], atol=0, rtol=0)
    return compressed_tokens


@pytest.mark.parametrize("backend_name,device,dtype,head_dim", TARGETS)
@pytest.mark.parametrize("heads", [(8, 2), (12, 3), (8, 8)])
def test_compressed_decode_rows_match_the_oracle(backend_name, device, dtype, head_dim, heads):
    gen = torch.Generator().manual_seed(sum(heads))
    # 5 requests; rows 0, 2, 3 compressed (row 3 with a 9-token decoded tail, row 2 Razor-like)
    case = kit.DenseAttentionCase(name=f"headkv_decode_{heads[0]}_{heads[1]}", backend=backend_name,
                                  forward_mode=ForwardMode.DECODE, num_heads=heads[0], num_kv_heads=heads[1],
                                  page_size=1, prefix_lens=(53, 17, 97, 40, 8))
    fx = build(case, device, dtype, head_dim, max_ctx=128)
    inner_out, _ = attention(fx, fx.backend)
    wrapper, manager, shape = wrap(fx, device, dtype, head_dim)
    compress_rows(fx, manager, shape, {0: 53, 2: 97, 3: 31}, gen, razor_rows=(2,))
    out, q = attention(fx, wrapper)
    # the wrapped backend saw each compressed row as one token (its newest)
    seen = stand_in_batch(fx.forward_batch, [0, 2, 3]).seq_lens_cpu.tolist()
    assert seen == [1, 18, 1, 1, 9]
    done = check_rows(fx, manager, backend_name, device, dtype, head_dim, out, q, inner_out,
                      [(r, case.prefix_lens[r]) for r in range(case.batch_size)])
    assert done == {0, 2, 3}
    manager.free(0), manager.free(2), manager.free(3)
    manager.check_integrity()
    assert manager.allocator.used_pages == 0


@pytest.mark.parametrize("backend_name,device,dtype,head_dim", TARGETS)
def test_compressed_rows_in_a_mixed_extend_batch(backend_name, device, dtype, head_dim):
    """--enable-mixed-chunk: a compressed request's decode tokens ride in a prefill batch."""
    gen = torch.Generator().manual_seed(11)
    case = kit.DenseAttentionCase(name="headkv_mixed", backend=backend_name, forward_mode=ForwardMode.EXTEND,
                                  num_heads=8, num_kv_heads=2, page_size=1, prefix_lens=(0, 45, 20),
                                  extend_lens=(13, 1, 3))
    fx = build(case, device, dtype, head_dim, max_ctx=128)
    inner_out, _ = attention(fx, fx.backend)
    wrapper, manager, shape = wrap(fx, device, dtype, head_dim)
    compress_rows(fx, manager, shape, {1: 40, 2: 20}, gen)
    out, q = attention(fx, wrapper)
    query_rows = [(r, case.prefix_lens[r] + j) for r in range(case.batch_size) for j in range(case.extend_lens[r])]
    done = check_rows(fx, manager, backend_name, device, dtype, head_dim, out, q, inner_out, query_rows)
    assert len(done) == 4


@pytest.mark.parametrize("backend_name,device,dtype,head_dim", TARGETS)
@pytest.mark.parametrize("policy,scoring", [("snapkv", "window"), ("adakv", "question"), ("streamingllm", "window")])
def test_the_prefill_forward_compresses_the_rows_it_completes(backend_name, device, dtype, head_dim, policy, scoring):
    """A chunk that completes its prompt is compressed inside the forward, right after the
    layer's attention: the pages equal an offline ``CompressionManager.compress`` of the same
    prompt with the queries the forward saw. A chunk that does not complete it, and a row not
    asked to be compressed, are left alone; the forward's output is the wrapped backend's."""
    case = kit.DenseAttentionCase(name="headkv_in_forward", backend=backend_name, forward_mode=ForwardMode.EXTEND,
                                  num_heads=8, num_kv_heads=2, page_size=1, prefix_lens=(0, 31, 0, 7),
                                  extend_lens=(47, 19, 13, 29))
    fx = build(case, device, dtype, head_dim, max_ctx=128)
    inner_out, _ = attention(fx, fx.backend)
    wrapper, manager, shape = wrap(fx, device, dtype, head_dim, page_size=3)
    cfg = KVPolicyConfig(policy=policy, budget=11, window=4, kernel_size=3, scoring=scoring, sink_size=2)
    ends = [p + n for p, n in zip(case.prefix_lens, case.extend_lens)]
    span = {0: (30, 41), 1: (40, 47)}  # question spans inside the computed chunk
    targets = {0: ends[0], 1: ends[1], 2: ends[2] + 20}  # row 2: a middle chunk; row 3: not compressed
    for r, target in targets.items():
        manager.begin_extend(r, f"rid{r}", cfg.obs_window, span=span.get(r) if scoring == "question" else None,
                             compress_at=(cfg, target))
    out, q = attention(fx, wrapper)
    torch.testing.assert_close(out, inner_out, atol=0, rtol=0)
    assert set(manager.records) == {0, 1} and {r: manager.forward_outcome(r) for r in range(4)} == {
        0: FORWARD_OK, 1: FORWARD_OK, 2: None, 3: None}
    assert [r for r in range(4) if manager.capturing(r)] == [2]

    pool = fx.runner.token_to_kv_pool
    req_to_token = fx.runner.req_to_token_pool.req_to_token
    starts = [sum(case.extend_lens[:r]) for r in range(case.batch_size)]
    offline = CompressionManager(shape, 2048, 3, dtype, device)
    for r in (0, 1):
        offline.begin_extend(r, f"rid{r}", cfg.obs_window, span=span.get(r) if scoring == "question" else None)
        offline.capture_queries(0, r, q[starts[r]:starts[r] + case.extend_lens[r]], pos=case.prefix_lens[r])
        slots = req_to_token[r, :ends[r]].long()
        want = offline.compress(r, cfg, ends[r], lambda layer: (pool.get_key_buffer(layer)[slots],
                                                                pool.get_value_buffer(layer)[slots]))
        got = manager.records[r]
        assert got.prompt_len == ends[r] and torch.equal(got.layers[0].lengths, want.layers[0].lengths)
        for mine, theirs in zip(manager.pool.gather_padded(got.layers[0]), offline.pool.gather_padded(want.layers[0])):
            torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    manager.free(0), manager.free(1), manager.free(2)
    manager.check_integrity()
    assert manager.allocator.used_pages == 0 and not manager.states()


def test_a_failure_inside_the_forward_is_kept_for_result_processing_and_allocates_nothing():
    gen = torch.Generator().manual_seed(4)
    shape = ModelShape(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8)
    manager = CompressionManager(shape, 64, 4, torch.float32, "cpu")
    cfg = KVPolicyConfig(policy="snapkv", budget=6, window=3)
    k = torch.randn(40, 2, 8, generator=gen)
    manager.begin_extend(5, "r", 3, compress_at=(cfg, 40))
    manager.capture_queries(0, 5, torch.randn(3, 4, 8, generator=gen))  # layer 1 never captured
    for layer in range(2):
        manager.compress_in_forward(layer, 5, 40, lambda i: (k, k))
    err = manager.forward_outcome(5)
    assert isinstance(err, RuntimeError) and "layer 1" in str(err) and manager.phase(5) is Phase.WHOLE
    assert not manager.records and manager.allocator.free_pages == 64
    manager.compress_in_forward(0, 5, 41, lambda i: (k, k))  # another end: not this request's prompt
    manager.free(5)
    assert manager.state(5) is None and not manager.states()


def test_graph_runners_are_told_no_for_compressed_or_capturing_batches():
    gen = torch.Generator().manual_seed(1)
    shape = ModelShape(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8)
    state = ServingState(KVPolicyConfig(policy="snapkv"))
    state.manager = CompressionManager(shape, 64, 4, torch.float32, "cpu")
    fb = types.SimpleNamespace(req_pool_indices=torch.tensor([3, 5]))
    assert graph_allowed(state, True, None, fb) is True  # nothing compressed or capturing
    state.manager.begin_extend(5, "r", 4)
    assert graph_allowed(state, True, None, fb) is False
    assert graph_allowed(state, False, None, fb) is False  # never turns a "no" into a "yes"
    state.manager.drop_capture(5)
    k = torch.randn(30, 1, 8, generator=gen)
    state.manager.compress(3, KVPolicyConfig(policy="streamingllm", budget=8, sink_size=2), 30, lambda _: (k, k))
    assert graph_allowed(state, True, None, types.SimpleNamespace(req_pool_indices=torch.tensor([4]))) is True
    assert graph_allowed(state, True, None, fb) is False
    assert state.graph_fallback_batches == 2


def test_the_wrapper_is_the_inner_backend_for_everything_it_does_not_add():
    inner = types.SimpleNamespace(forward_metadata="m0", get_cuda_graph_seq_len_fill_value=lambda: 1,
                                  attn_backend_list=None)
    shape = ModelShape(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8)
    manager = CompressionManager(shape, 8, 4, torch.float32, "cpu")
    wrapper = HeadKVAttnBackend(inner, manager, make_kernel(manager.pool, shape, torch.device("cpu"), 0.35)[1],
                                None, None)
    assert wrapper.get_cuda_graph_seq_len_fill_value() == 1 and wrapper.attn_backend_list is None
    wrapper.forward_metadata = "m1"  # what SGLang's graph glue and idle batches do
    assert inner.forward_metadata == "m1" and wrapper.forward_metadata == "m1"
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute


def test_with_overlap_a_request_sharing_a_pending_prefill_prefix_waits_one_step():
    """The overlap scheduler forms the next batch before the last prefill's result puts its
    prompt in the radix tree: a waiting request that shares that prompt's first tokens (a
    fork branch over the same document) is held back for that step, the others are not."""
    from headkv_sglang.serving.admission import (PREFIX_PROBE, after_get_new_batch_prefill,
                                                 before_get_new_batch_prefill)

    shape = ModelShape(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8)
    state = ServingState(KVPolicyConfig(policy="full"))
    state.manager = CompressionManager(shape, 64, 4, torch.float32, "cpu")
    doc = list(range(100, 100 + 3 * PREFIX_PROBE))

    def req(ids):
        return types.SimpleNamespace(origin_input_ids=ids, output_ids=[], sampling_params=None, rid=str(ids[-1]))

    first, branch, other, short = req(doc + [1]), req(doc + [2]), req(list(range(500, 600))), req(doc[:PREFIX_PROBE])
    extend = types.SimpleNamespace(reqs=[first], forward_mode=ForwardMode.EXTEND)
    scheduler = types.SimpleNamespace(waiting_queue=[branch, other, short], result_queue=[(extend, None)])
    before_get_new_batch_prefill(state, scheduler)
    assert scheduler.waiting_queue == [other, short] and state.prefix_waits == 1
    after_get_new_batch_prefill(state, None, scheduler)
    assert scheduler.waiting_queue == [branch, other, short]
    scheduler.result_queue = []  # processed: the prefix is in the radix tree now
    before_get_new_batch_prefill(state, scheduler)
    assert scheduler.waiting_queue == [branch, other, short] and state.prefix_waits == 1
    decode = types.SimpleNamespace(reqs=[first], forward_mode=ForwardMode.DECODE)
    scheduler.result_queue = [(decode, None)]  # a pending decode batch inserts nothing
    before_get_new_batch_prefill(state, scheduler)
    assert scheduler.waiting_queue == [branch, other, short]


def test_admission_counts_a_compressed_rows_pages_once():
    """With overlap the next batch is formed after a row was compressed in the forward (its
    pages taken, its record made) but before its result is processed (its reservation
    released): those pages are counted once, as used, and a request that fits the rest is
    admitted. A reservation of a row not compressed yet still counts."""
    from headkv_sglang.serving.admission import available_pages, before_get_new_batch_prefill, pages_bound
    from headkv_sglang.serving.requests import request_config

    shape = ModelShape(num_layers=2, num_q_heads=2, num_kv_heads=1, head_dim=8)
    state = ServingState(KVPolicyConfig(policy="snapkv", budget=32))
    m = state.manager = CompressionManager(shape, 61, 4, torch.float32, "cpu")
    waiting = types.SimpleNamespace(origin_input_ids=list(range(1000, 1203)), output_ids=[], sampling_params=None,
                                    rid="w")
    need = pages_bound(state, waiting, request_config(state, waiting))
    assert 0 < need < m.allocator.num_pages // 2, need
    taken = m.allocator.num_pages - need  # what the row compressed in the last forward holds
    ids = m.allocator.allocate(taken, owner=5)
    m.install_record(5, RequestPages(prompt_len=203, policy="snapkv", budget=32, page_ids=ids))
    m.reserve(5, taken)
    assert available_pages(state) == need
    scheduler = types.SimpleNamespace(waiting_queue=[waiting], result_queue=[])
    before_get_new_batch_prefill(state, scheduler)
    assert scheduler.waiting_queue == [waiting] and state.admission_waits == 0
    m.reserve(7, 1)  # admitted, not compressed yet: its promise stands
    assert available_pages(state) == need - 1
    before_get_new_batch_prefill(state, scheduler)
    assert scheduler.waiting_queue == [] and state.held == [waiting] and state.admission_waits == 1
