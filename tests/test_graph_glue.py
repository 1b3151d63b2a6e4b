"""CUDA-graph glue for decode batches with compressed rows, on the CPU.

SGLang's decode graph runner calls ``init_cuda_graph_state(max_bs, ...)`` once, then per
captured batch size ``init_forward_metadata_out_graph(fb, in_capture=True)`` and the forward
(recorded), and before every replay ``init_forward_metadata_out_graph(view)`` with the padded
replay view (its static buffers refilled, ``num_padding`` rows at the end). Here the
"replay" runs the captured forward again with the *capture* batch object, after the replay
metadata: its attention must then equal the eager path's (``init_forward_metadata`` +
``forward_decode`` on the real batch) for every real row — compressed rows (FlashInfer glue
over ``tests/fake_flashinfer.py``), uncompressed rows (a dense stand-in for SGLang's
backend) — with padding rows never taken for compressed ones, even when their request index
is a compressed request's.

What this cannot show without a GPU: that the captured forward really records into a
``torch.cuda.CUDAGraph`` (no host reads, no allocation, fixed addresses) and replays right.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import fake_flashinfer
from ragged_oracle import oracle_row, random_request

from headkv_sglang.config import ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.kv.ragged import GraphRows
from headkv_sglang.reference import attend
from headkv_sglang.serving.backend import HeadKVAttnBackend, graph_allowed

L, H, G, D, PS = 2, 2, 3, 8, 3
SLOTS, CTX = 400, 80
DECODE = types.SimpleNamespace(is_decode=lambda: True, is_idle=lambda: False, is_extend=lambda: False,
                               is_target_verify=lambda: False)


class DenseInner:
    """Stands in for SGLang's FlashInfer backend: decode attention of each row over
    ``req_to_token[idx, :seq_len]``, eager or from its graph buffers; writes the new K/V."""

    def __init__(self, req_to_token, kv):
        self.req_to_token, self.kv = req_to_token, kv
        self.forward_metadata = None

    def init_forward_metadata(self, fb):
        self.forward_metadata = (fb.req_pool_indices.clone(), fb.seq_lens.clone())

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        self.g = (torch.zeros(max_bs, dtype=torch.int64), torch.ones(max_bs, dtype=torch.int64))

    def init_forward_metadata_out_graph(self, fb, in_capture=False):
        bs = fb.batch_size
        self.g[0][:bs].copy_(fb.req_pool_indices[:bs])
        self.g[1][:bs].copy_(fb.seq_lens[:bs])
        self.forward_metadata = (self.g[0][:bs], self.g[1][:bs])

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True):
        kb, vb = self.kv.get_key_buffer(layer.layer_id), self.kv.get_value_buffer(layer.layer_id)
        if save_kv_cache:
            kb[fb.out_cache_loc] = k.view(-1, H, D)
            vb[fb.out_cache_loc] = v.view(-1, H, D)
        idx, lens = self.forward_metadata
        qv = q.view(-1, H * G, D)
        o = torch.zeros_like(qv)
        for i in range(qv.shape[0]):
            slots = self.req_to_token[int(idx[i]), :int(lens[i])].long()
            for h in range(H):
                o[i, h * G:(h + 1) * G] = attend(qv[i, h * G:(h + 1) * G], kb[slots, h], vb[slots, h], layer.scaling)[0]
        return o.view(q.shape[0], -1)


class TokenPool:
    def __init__(self, gen):
        self.k = [torch.randn(SLOTS, H, D, generator=gen) for _ in range(L)]
        self.v = [torch.randn(SLOTS, H, D, generator=gen) for _ in range(L)]

    def get_key_buffer(self, layer):
        return self.k[layer]

    def get_value_buffer(self, layer):
        return self.v[layer]


@pytest.fixture
def setup(monkeypatch):
    import flashinfer_ext.decode as decode
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    monkeypatch.setattr(decode, "_flashinfer", fake_flashinfer.module)
    gen = torch.Generator().manual_seed(11)
    shape = ModelShape(num_layers=L, num_q_heads=H * G, num_kv_heads=H, head_dim=D)
    manager = CompressionManager(shape, 3000, PS, torch.float32, "cpu")
    manager.pool.k_pages.normal_(generator=gen)
    manager.pool.v_pages.normal_(generator=gen)
    free = torch.randperm(3000, generator=gen).tolist()
    kv = TokenPool(gen)
    req_to_token = torch.zeros(8, CTX, dtype=torch.int32)
    perm = torch.randperm(SLOTS - 1, generator=gen) + 1  # slot 0: the junk slot padding rows write
    lens = {}
    for idx in range(7):
        prompt = int(torch.randint(5, 40, (1,), generator=gen))
        seq = prompt + int(torch.randint(1, 9, (1,), generator=gen))
        req_to_token[idx, :seq] = perm[idx * 50:idx * 50 + seq].to(torch.int32)
        lens[idx] = seq
        if idx in (0, 2, 3, 5):  # compressed: the prompt in pages, its slots released (slot 0 now)
            manager.install_record(idx, random_request(manager.pool, free, L, H, prompt, gen, comp=idx == 3))
            req_to_token[idx, :prompt] = 0
    kernel = FlashInferRaggedAttention(manager.pool, L, H, H * G, D ** -0.5, workspace_bytes=8)
    backend = HeadKVAttnBackend(DenseInner(req_to_token, kv), manager, kernel,
                                types.SimpleNamespace(req_to_token=req_to_token), kv)
    layers = [types.SimpleNamespace(layer_id=i, tp_q_head_num=H * G, qk_head_dim=D, v_head_dim=D, scaling=D ** -0.5)
              for i in range(L)]
    return types.SimpleNamespace(backend=backend, manager=manager, kv=kv, req_to_token=req_to_token, lens=lens,
                                 layers=layers, gen=gen, perm=perm)


def capture_fb(bs):
    """A capture batch as SGLang's runner builds it: static buffers, padding everywhere."""
    return types.SimpleNamespace(batch_size=bs, forward_mode=DECODE, req_pool_indices=torch.zeros(bs, dtype=torch.int64),
                                 seq_lens=torch.ones(bs, dtype=torch.int64), seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
                                 seq_lens_sum=bs, out_cache_loc=torch.zeros(bs, dtype=torch.int64), num_padding=0)


def fill_replay(cap, s, idxs, new_slots):
    """Refill the capture batch's static buffers with a real batch (padding: request 0, a
    compressed one, seq_len 1, the junk slot) and return the replay view."""
    bs, raw = cap.batch_size, len(idxs)
    seq = [s.lens[i] + 1 for i in idxs]  # this step's token is the newest position
    cap.req_pool_indices.zero_()
    cap.req_pool_indices[:raw] = torch.tensor(idxs)
    cap.seq_lens.fill_(1)
    cap.seq_lens[:raw] = torch.tensor(seq)
    cap.seq_lens_cpu.copy_(cap.seq_lens)
    cap.out_cache_loc.zero_()
    cap.out_cache_loc[:raw] = torch.tensor(new_slots)
    view = copy.copy(cap)
    view.num_padding, view.seq_lens_sum = bs - raw, int(cap.seq_lens.sum())
    return view


def eager_fb(idxs, s, new_slots):
    seq = torch.tensor([s.lens[i] + 1 for i in idxs])
    return types.SimpleNamespace(batch_size=len(idxs), forward_mode=DECODE, req_pool_indices=torch.tensor(idxs),
                                 seq_lens=seq, seq_lens_cpu=seq.clone(), seq_lens_sum=int(seq.sum()),
                                 out_cache_loc=torch.tensor(new_slots))


def test_replayed_graph_metadata_gives_the_eager_attention(setup):
    s = setup
    b = s.backend
    b.init_cuda_graph_state(8, 8)
    assert b.graph_kernel is not None and b.graph_kernel.cuda_graph and b.graph_rows.max_rows == 8
    caps = {bs: capture_fb(bs) for bs in (4, 8)}
    for bs, cap in caps.items():  # capture: every row padding
        b.init_forward_metadata_out_graph(cap, in_capture=True)
        for layer in s.layers:
            b.forward_decode(torch.randn(bs, H * G * D), torch.randn(bs, H * D), torch.randn(bs, H * D), layer, cap)
    batches = [([1, 0, 2, 4, 5], 8), ([3, 6], 4), ([1, 4, 6], 4), ([5, 3, 0, 2, 1, 4, 6], 8)]
    for step, (idxs, bs) in enumerate(batches):
        for i in idxs:  # this step's token goes to a fresh slot at position seq_len
            s.req_to_token[i, s.lens[i]] = int(s.perm[350 + 7 * step + i])
        new_slots = [int(s.req_to_token[i, s.lens[i]]) for i in idxs]
        q = torch.randn(bs, H * G * D, generator=s.gen)
        k, v = torch.randn(bs, H * D, generator=s.gen), torch.randn(bs, H * D, generator=s.gen)
        cap = caps[bs]
        b.init_forward_metadata_out_graph(fill_replay(cap, s, idxs, new_slots))
        graphed = [b.forward_decode(q.clone(), k, v, layer, cap).view(bs, H * G, D) for layer in s.layers]
        fb = eager_fb(idxs, s, new_slots)
        raw = len(idxs)
        b.init_forward_metadata(fb)
        for layer, got in zip(s.layers, graphed):
            want = b.forward_decode(q[:raw].clone(), k[:raw], v[:raw], layer, fb).view(raw, H * G, D)
            torch.testing.assert_close(got[:raw], want, atol=1e-5, rtol=1e-5)
            kb, vb = s.kv.get_key_buffer(layer.layer_id), s.kv.get_value_buffer(layer.layer_id)
            for r, idx in enumerate(idxs):  # and the oracle, row by row
                rec = s.manager.records.get(idx)
                qr = q[r].view(H * G, D)
                if rec is None:
                    slots = s.req_to_token[idx, :s.lens[idx] + 1].long()
                    ref = torch.cat([attend(qr[h * G:(h + 1) * G], kb[slots, h], vb[slots, h], layer.scaling)[0]
                                     for h in range(H)])
                else:
                    tail = s.req_to_token[idx, rec.prompt_len:s.lens[idx] + 1].long()
                    ref = oracle_row(s.manager.pool, rec.layers[layer.layer_id], qr, kb[tail], vb[tail], layer.scaling)
                torch.testing.assert_close(got[r], ref, atol=1e-5, rtol=1e-5)
        for i in idxs:
            s.lens[i] += 1


def test_a_replay_without_compressed_rows_is_the_inner_backends(setup):
    s = setup
    b = s.backend
    b.init_cuda_graph_state(4, 4)
    cap = capture_fb(4)
    b.init_forward_metadata_out_graph(cap, in_capture=True)
    idxs = [1, 4, 6]
    new_slots = [int(s.req_to_token[i, s.lens[i]]) for i in idxs]
    q = torch.randn(4, H * G * D, generator=s.gen)
    k = torch.randn(4, H * D, generator=s.gen)
    b.init_forward_metadata_out_graph(fill_replay(cap, s, idxs, new_slots))
    got = b.forward_decode(q, k, k, s.layers[0], cap)
    want = b.inner.forward_decode(q, k, k, s.layers[0], cap)  # the inner backend alone
    assert not bool(b.graph_rows.is_comp.any())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_which_batches_a_graph_runs(setup):
    s = setup
    b, m = s.backend, s.manager
    state = types.SimpleNamespace(manager=m, graph_fallback_batches=0)
    runner = types.SimpleNamespace(attn_backend=b)
    fb = eager_fb([1, 0, 2], s, [0, 0, 0])
    assert graph_allowed(state, True, runner, fb) is False  # no graph state yet: eager
    assert state.graph_fallback_batches == 1
    b.init_cuda_graph_state(8, 8)
    assert graph_allowed(state, True, runner, fb) is True and b.graph_compressed_batches == 1
    assert graph_allowed(state, False, runner, fb) is False  # never turns a "no" into a "yes"
    m.records[2].decode_budget = 16  # a row ranking decode tokens by captured queries: host work per layer
    assert graph_allowed(state, True, runner, fb) is False
    m.records[2].decode_recency = True  # recency ranking, nothing due: graphable
    assert graph_allowed(state, True, runner, fb) is True
    m.begin_extend(6, "r", 4)  # a request capturing prefill queries elsewhere: not in this forward
    assert graph_allowed(state, True, runner, fb) is True
    m.begin_extend(1, "q", 4)  # a row of this batch captures queries (host work in the forward): eager
    assert graph_allowed(state, True, runner, fb) is False
    assert state.graph_fallback_batches == 3


def test_a_failed_decode_move_stops_capturing_and_lets_graphs_replay(setup):
    """After a decode move failed, the row's tail stays whole: no more decode queries are kept
    for it, and its batches replay graphs again."""
    s = setup
    b, m = s.backend, s.manager
    state = types.SimpleNamespace(manager=m, graph_fallback_batches=0)
    runner = types.SimpleNamespace(attn_backend=b)
    fb = eager_fb([1, 0, 2], s, [0, 0, 0])
    b.init_cuda_graph_state(8, 8)
    rec = m.records[2]
    rec.decode_budget, rec.decode_window = 16, 4  # ranks its generated tokens by captured queries
    assert graph_allowed(state, True, runner, fb) is False
    q = torch.randn(H * G, D)
    m.capture_decode_query(0, 2, q)
    assert m.state(2).decode_q, "a decode-budget row keeps its decode queries"
    m.decode_failed(2, RuntimeError("injected"))
    assert not rec.moves_decode
    m.state(2).decode_q.clear()
    m.capture_decode_query(0, 2, q)
    assert not m.state(2).decode_q
    assert graph_allowed(state, True, runner, fb) is True


def test_graph_buffers_say_what_they_cannot_hold():
    rows = GraphRows(4, 3, "cpu")
    with pytest.raises(ValueError, match=r"4 compressed rows in a graphed batch, the graphed kernel holds at most 3"):
        rows.fill([0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"a graphed batch of 5 rows, the buffers hold 1..4"):
        rows.fill([0], 5)
    with pytest.raises(ValueError, match=r"compressed rows \[1, 3\] outside the batch's 2 rows"):
        rows.fill([1, 3], 2)
    with pytest.raises(ValueError, match="max_bs > 0 and max_rows > 0"):
        GraphRows(0, 1, "cpu")
    rows.fill([2, 0], 3)
    assert rows.q_index.tolist() == [2, 0, 0] and rows.row_of.tolist() == [1, 0, 0, 0]
    assert rows.is_comp.tolist() == [True, False, True, False]
