"""CompressionManager: owns the ragged pool, and one :class:`RequestState` per request row.

The serving layer (``headkv_sglang.serving``) calls it at these moments:

1. admission: :meth:`begin_extend` starts a request's state (CAPTURING) and :meth:`reserve`
   promises its worst-case pages; during each prefill forward :meth:`capture_queries` keeps
   its scoring queries per layer: its question's (a span of positions), or the last
   ``window`` ones;
2. the prefill forward that completes a prompt compresses it, one layer right after that
   layer's attention (:meth:`on_prefill_layer`, :mod:`headkv_sglang.kv.prefill`), after
   which SGLang's token-pool slots of the prompt can be released; the result processing
   takes the outcome (:meth:`take_forward_outcome`);
3. decode forwards move generated tokens into the pages (:mod:`headkv_sglang.kv.decode`);
4. when the request's row is released (finish, abort, retraction), :meth:`release_row`
   drops its state and frees what it held.

Everything about one request lives in its :class:`~headkv_sglang.kv.request_state.RequestState`
(phases: capturing -> compressing -> compressed | shared-reader | whole, or pinned for
``kv_share``); the manager's other modules do one job each: :mod:`~headkv_sglang.kv.prefill`
(compressing a prompt), :mod:`~headkv_sglang.kv.decode` (decode moves),
:mod:`~headkv_sglang.kv.shared` (the shared-prompt registry), :mod:`~headkv_sglang.kv.tables`
(page tables), :mod:`~headkv_sglang.kv.ranks` (the tensor-parallel ranks' votes).

Shared compressed prompts (``kv_share``): :meth:`publish` hands a compressed request's
pages to a :class:`SharedPrefix`; a later request whose prompt extends that prompt (same
config) is :meth:`pin`-ned to it before its prefill and :meth:`adopt`-s it after: its
record reads the shared pages, and the rest of its prompt stays whole in its tail.

Decode attention over the pages is :mod:`headkv_sglang.kv.ragged` (it reads :attr:`records`).
Requests are keyed by SGLang's ``req_pool_idx`` (the request's row in ``req_to_token``).
Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from typing import Callable

import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.decode import DecodeCompression
from headkv_sglang.kv.pool import PageAllocator, RaggedHeadKVPool, RequestPages
from headkv_sglang.kv.prefill import NotSmallerError, PrefillCompression
from headkv_sglang.kv.ranks import PeerFailed, RankVote
from headkv_sglang.kv.request_state import CAPTURES, FORWARD_OK, HAS_RECORD, Phase, RequestState
from headkv_sglang.kv.shared import SharedPrefix, SharedRegistry
from headkv_sglang.kv.stats import ManagerStats, PolicyStats
from headkv_sglang.kv.tables import page_addresses, values_only_counts, values_only_starts
from headkv_sglang.policies.scoring import accumulated_attention, max_attention
from headkv_sglang.policies.sharding import HeadShard

logger = logging.getLogger("headkv_sglang")

__all__ = ["CompressionManager", "NotSmallerError", "PeerFailed", "PolicyStats", "SharedPrefix", "page_addresses",
           "values_only_counts", "values_only_starts"]


class Records(Mapping):
    """Read-only ``req_pool_idx -> RequestPages`` of the rows that hold a record (COMPRESSED or
    SHARED): what the ragged kernel attends."""

    def __init__(self, manager: "CompressionManager") -> None:
        self._m = manager

    def __getitem__(self, idx: int) -> RequestPages:
        st = self._m._states.get(idx)
        if st is None or st.record is None:
            raise KeyError(idx)
        return st.record

    def __contains__(self, idx: object) -> bool:
        st = self._m._states.get(idx)
        return st is not None and st.record is not None

    def __iter__(self) -> Iterator[int]:
        return (idx for idx, st in list(self._m._states.items()) if st.record is not None)

    def __len__(self) -> int:
        c = self._m._phases
        return c[Phase.COMPRESSED] + c[Phase.SHARED]


class CompressionManager(PrefillCompression, DecodeCompression, ManagerStats):
    """Compressed-pool owner for one model (one scheduler process)."""

    def __init__(self, shape: ModelShape, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: str | torch.device, *, only_if_smaller: bool = True,
                 shard: HeadShard | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 min_over_ranks: Callable[[int], int] | None = None,
                 gather_queries: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 pool: RaggedHeadKVPool | None = None, allocator: PageAllocator | None = None) -> None:
        """``only_if_smaller``: :meth:`compress` refuses (NotSmallerError) a prompt whose pages
        would not take less memory than its full KV (the server's rule; tests of the
        selection math at budgets >= the prompt turn it off).

        Tensor parallelism: ``shape`` is the whole model's; ``shard`` says which of its heads
        this rank holds (its K/V and queries are those heads only), and ``gather`` all-gathers
        a layer's ``[H_local, T]`` scores over the ranks (see ``policies.sharding``). Every
        decision that must be the same on all ranks (the plan, whether compressing saves
        memory, admission's bound) is then made from the global plan, and every compression
        step ends with a vote of the ranks (``min_over_ranks``, :mod:`headkv_sglang.kv.ranks`):
        a failure or a full pool on any rank leaves the request whole on all of them. With
        fewer KV heads than ranks (replicated heads) ``gather_queries`` all-gathers a
        rank's ``[Hq_local, n, D]`` scoring queries into its KV head's whole query group, so
        that every replica scores (and keeps) alike.

        ``pool`` and ``allocator`` (both or neither): storage and ownership made elsewhere, e.g.
        a :class:`~headkv_sglang.kv.shared_memory.SharedPagePool` over SGLang's token slots and
        its :class:`~headkv_sglang.kv.shared_memory.BorrowingPageAllocator` (``num_pages``,
        ``page_size``, ``dtype``, ``device`` are then theirs)."""
        self.global_shape = shape
        self.shard = shard if shard is not None and shard.tp_size > 1 else None
        if self.shard is not None:
            lo, hi = self.shard.kv_heads(shape.num_kv_heads)
            qlo, qhi = self.shard.q_heads(shape.num_q_heads)
            shape = dataclasses.replace(shape, num_kv_heads=hi - lo, num_q_heads=qhi - qlo)
            if self.shard.replicas(self.global_shape.num_kv_heads) > 1 and gather_queries is None:
                raise ValueError(
                    f"--tp {self.shard.tp_size} replicates each of the {self.global_shape.num_kv_heads} KV heads on "
                    f"{self.shard.replicas(self.global_shape.num_kv_heads)} ranks: the replicas need gather_queries "
                    "to score with their head's whole query group")
        self.min_over_ranks = min_over_ranks if self.shard is not None else None
        self.vote = RankVote(self.min_over_ranks)
        self.gather = gather
        self._gather = self.vote.flagged(gather)  # what the policies call: after an OK vote
        replicated = self.shard is not None and self.shard.replicas(self.global_shape.num_kv_heads) > 1
        self._gather_queries = self.vote.flagged(gather_queries) if replicated else None
        self.shape = shape  # this rank's heads
        self.only_if_smaller = only_if_smaller
        if (pool is None) != (allocator is None):
            raise ValueError("pass both pool and allocator, or neither")
        if pool is not None and pool.head_dim != shape.head_dim:
            raise ValueError(f"the pool's head_dim is {pool.head_dim}, the model's {shape.head_dim}")
        self.pool = pool if pool is not None else RaggedHeadKVPool(num_pages, page_size, shape.head_dim, dtype, device)
        self.allocator = allocator if allocator is not None else PageAllocator(num_pages)
        dtype = self.pool.dtype
        self.shared = SharedRegistry(self.allocator)
        # the one per-request store: req_pool_idx -> its state
        self._states: dict[int, RequestState] = {}
        self._phases: Counter = Counter()  # states per phase (kept by _set_phase)
        self.records = Records(self)
        # High-water mark of len(records); the server reports and resets it per read.
        self.peak_records = 0
        self._lock = threading.Lock()
        self.total_compressed: dict[str, int] = defaultdict(int)
        # since start, per policy: kept head-tokens, prompt head-tokens, held and full bytes
        self.cumulative: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.elt = torch.empty(0, dtype=dtype).element_size()
        self.decode_totals: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ request states
    def state(self, req_pool_idx: int) -> RequestState | None:
        """Row ``req_pool_idx``'s state (None: the manager holds nothing for it)."""
        return self._states.get(req_pool_idx)

    def states(self) -> list[RequestState]:
        return list(self._states.values())

    def phase(self, req_pool_idx: int) -> Phase | None:
        st = self._states.get(req_pool_idx)
        return None if st is None else st.phase

    def _state(self, req_pool_idx: int) -> RequestState:
        st = self._states.get(req_pool_idx)
        if st is None:
            st = self._states[req_pool_idx] = RequestState(req_pool_idx, Phase.CAPTURING)
            self._phases[Phase.CAPTURING] += 1
        return st

    def _set_phase(self, st: RequestState, phase: Phase) -> None:
        self._phases[st.phase] -= 1
        self._phases[phase] += 1
        st.phase = phase
        if phase in HAS_RECORD:
            self.peak_records = max(self.peak_records, len(self.records))

    def _to_whole(self, st: RequestState, outcome: object = None) -> None:
        """The request stays uncompressed: its capture, job and pin go (its reservation and the
        serving layer's fields stay until its row is freed)."""
        assert st.record is None, f"{st!r} holds pages and cannot become whole"
        st.queries, st.mass, st.job, st.compress_at = {}, {}, None, None
        self._unpin(st)
        if outcome is not None:
            st.outcome = outcome
        self._set_phase(st, Phase.WHOLE)

    def has_rows(self, req_pool_indices) -> bool:
        """Any of these rows is compressed or capturing (a batch that needs this backend's
        work: no CUDA graph)."""
        if not self._states:
            return False
        return any((st := self._states.get(i)) is not None and (st.phase in CAPTURES or st.phase in HAS_RECORD)
                   for i in req_pool_indices)

    def prefill_work(self) -> bool:
        """Some row captures queries or waits to adopt a shared prompt (prefill forwards call
        :meth:`on_prefill_layer`)."""
        c = self._phases
        return c[Phase.CAPTURING] + c[Phase.COMPRESSING] + c[Phase.PINNED] > 0

    def take_peak_records(self) -> int:
        """The high-water mark of compressed rows since the last call (then reset)."""
        peak = max(self.peak_records, len(self.records))
        self.peak_records = len(self.records)
        return peak

    # ------------------------------------------------------------------ admission
    def reserve(self, req_pool_idx: int, pages: int) -> None:
        """Row ``req_pool_idx`` (admitted) may take up to ``pages``: promised until
        :meth:`release_reservation` (a second call keeps the first promise)."""
        st = self._state(req_pool_idx)
        if st.reserved is None:
            st.reserved = int(pages)

    def release_reservation(self, req_pool_idx: int) -> None:
        st = self._states.get(req_pool_idx)
        if st is not None:
            st.reserved = None

    def reserved_pages(self, uncommitted_only: bool = False) -> int:
        """Pages promised to admitted rows; ``uncommitted_only``: of rows that hold no record
        yet (a record's pages are taken already)."""
        return sum(st.reserved for st in self._states.values()
                   if st.reserved is not None and not (uncommitted_only and st.record is not None))

    # ------------------------------------------------------------------ prefill capture
    def begin_extend(self, req_pool_idx: int, rid: str, window: int,
                     span: tuple[int, int] | None = None,
                     compress_at: tuple[KVPolicyConfig, int] | None = None,
                     agnostic: bool = False, keep: int | None = None, accumulate: bool = False) -> None:
        """Start (or continue, for the same request) capturing a request's scoring queries:
        the last ``window`` of its prompt, or with ``span`` the positions ``[span[0], span[1])``
        (its question, see ``headkv_sglang.question``). ``compress_at = (cfg, seq_len)``: compress
        the request inside the forward whose chunk completes ``seq_len`` tokens
        (:meth:`compress_in_forward`).

        ``agnostic`` (question-agnostic scoring, needs ``span``): the span's queries score the
        tokens as each chunk comes (the most attention any of them gives a token,
        :func:`~headkv_sglang.policies.scoring.max_attention`) and are not kept. ``keep``: only
        the prompt's first ``keep`` tokens are compressed (the rest, a reconstruction pass's
        repetition of the document, is dropped); None: all of them. ``accumulate`` (with
        ``agnostic``): the queries' attention is summed instead, H2O's accumulated scores
        (:func:`~headkv_sglang.policies.scoring.accumulated_attention`)."""
        span = None if span is None else (int(span[0]), int(span[1]))
        if span is not None and not 0 <= span[0] < span[1]:
            raise ValueError(f"span must be (start, end) with 0 <= start < end, got {span}")
        if agnostic and span is None:
            raise ValueError("question-agnostic scoring needs the span of its scoring queries")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 tokens, got {keep}")
        if accumulate and not agnostic:
            raise ValueError("accumulated scores are question-agnostic (agnostic=True)")
        st = self._state(req_pool_idx)
        assert st.record is None, f"{st!r} is compressed already"
        if (st.phase not in CAPTURES or st.rid != rid or st.window != window or st.span != span
                or st.agnostic != agnostic or st.keep != keep or st.accumulate != accumulate):
            st.queries, st.mass = {}, {}
            st.rid, st.window, st.span, st.agnostic, st.keep = rid, window, span, agnostic, keep
            st.accumulate = accumulate
        if st.phase is not Phase.CAPTURING:
            self._unpin(st)
            self._set_phase(st, Phase.CAPTURING)
        st.compress_at, st.job = compress_at, None  # a pending outcome stays for the result processing

    def capture_queries(self, layer: int, req_pool_idx: int, q: torch.Tensor, pos: int | None = None,
                        get_k: Callable[[int], torch.Tensor] | None = None) -> None:
        """Keep this chunk's scoring queries. ``q``: ``[n, num_q_heads, head_dim]``, the queries of
        prompt positions ``[pos, pos + n)`` (``pos`` is needed with a span only). For a
        question-agnostic capture, ``get_k(end)`` gives the layer's keys of positions
        ``[0, end)`` as ``[end, num_kv_heads, head_dim]`` and the chunk's scores are accumulated."""
        st = self._states.get(req_pool_idx)
        if st is None or st.phase not in CAPTURES:
            return
        prev = st.queries.get(layer)
        q = q.detach()
        if st.span is not None:
            if pos is None:
                raise ValueError("a span capture needs the chunk's start position (pos)")
            lo, hi = max(st.span[0], pos), min(st.span[1], pos + q.shape[0])
            if lo >= hi:
                return
            q = q[lo - pos:hi - pos]
            if st.agnostic:
                if get_k is None:
                    raise ValueError("a question-agnostic capture needs the layer's keys (get_k)")
                mass_of = accumulated_attention if st.accumulate else max_attention
                m = mass_of(q.transpose(0, 1), get_k(hi).detach().transpose(0, 1), lo)
                if st.keep is not None:
                    m = m[..., :st.keep]
                old = st.mass.get(layer)
                if old is not None and lo > st.span[0]:  # a later chunk: the most (or the sum) of both
                    if old.shape[-1] > m.shape[-1]:
                        old, m = m, old
                    m = m.clone()
                    head = m[..., :old.shape[-1]]
                    m[..., :old.shape[-1]] = head + old if st.accumulate else torch.maximum(head, old)
                st.mass[layer] = m
                return
            if prev is not None and lo > st.span[0]:  # a later chunk continues the span
                q = torch.cat([prev, q])
            st.queries[layer] = q.clone()
            return
        if prev is not None and q.shape[0] < st.window:
            q = torch.cat([prev, q])
        st.queries[layer] = q[-st.window:].clone()

    def capturing(self, req_pool_idx: int) -> bool:
        st = self._states.get(req_pool_idx)
        return st is not None and st.phase in CAPTURES

    def drop_capture(self, req_pool_idx: int) -> None:
        """Row ``req_pool_idx`` will not be compressed: it stays whole."""
        st = self._states.get(req_pool_idx)
        if st is not None and st.phase in CAPTURES:
            self._to_whole(st)

    def on_prefill_layer(self, layer: int, req_pool_idx: int, end: int,
                         get_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After layer ``layer``'s attention of a prefill chunk of row ``req_pool_idx`` ending at
        ``end`` (``get_kv(i)``: layer ``i``'s K/V of positions ``[0, end)``): compress the layer
        (:meth:`compress_in_forward`) or, for a pinned row, adopt its shared prompt after the
        last layer (:meth:`adopt_in_forward`)."""
        st = self._states.get(req_pool_idx)
        if st is None:
            return
        if st.phase is Phase.PINNED:
            self.adopt_in_forward(layer, req_pool_idx, end)
        elif st.phase in CAPTURES:
            self.compress_in_forward(layer, req_pool_idx, end, get_kv)

    def forward_outcome(self, req_pool_idx: int) -> object:
        """What the last prefill forward did to the row: ``FORWARD_OK`` (compressed, or reads its
        shared prompt), the exception that left it whole, or None (nothing)."""
        st = self._states.get(req_pool_idx)
        return None if st is None else st.outcome

    def take_forward_outcome(self, req_pool_idx: int) -> object:
        """:meth:`forward_outcome`, then forgotten (the result processing takes it once)."""
        st = self._states.get(req_pool_idx)
        if st is None:
            return None
        out, st.outcome = st.outcome, None
        return out

    # ------------------------------------------------------------------ shared prefixes
    @property
    def shared_generation(self) -> int:
        return self.shared.generation

    @property
    def shared_totals(self) -> dict[str, int]:
        return self.shared.totals

    def find_shared(self, key: object, ids) -> SharedPrefix | None:
        """The longest shared prefix compressed under ``key`` whose tokens begin ``ids``."""
        if self.shard is not None:  # eviction is per rank: ranks could disagree on what exists
            return None
        return self.shared.find(key, ids)

    def publish(self, req_pool_idx: int, key: object, ids) -> SharedPrefix | None:
        """Make request ``req_pool_idx``'s compressed prompt (its tokens: ``ids``) a shared
        prefix that it keeps reading. None (the request keeps its pages) if the request
        decodes into its pages, or runs tensor-parallel, or the same prefix is already shared."""
        st = self._states.get(req_pool_idx)
        rec = st.record if st is not None else None
        ids = tuple(int(t) for t in ids)
        if rec is None or rec.shared is not None or rec.decode_budget or self.shard is not None:
            return None
        if len(ids) != rec.prompt_len:
            raise ValueError(f"row {req_pool_idx}: {len(ids)} tokens given for a {rec.prompt_len}-token prompt")
        if self.shared.has(key, ids):
            return None
        with self._lock:
            entry = SharedPrefix(key, ids, rec, refs={req_pool_idx})
            self.allocator.transfer(rec.page_ids, req_pool_idx, entry)
            self.shared.add(entry)
            st.record = dataclasses.replace(rec, page_ids=[], shared=entry)
        st.published = True
        self._set_phase(st, Phase.SHARED)
        return entry

    def pin(self, req_pool_idx: int, entry: SharedPrefix, at: int | None = None) -> None:
        """Row ``req_pool_idx`` will adopt ``entry`` once its prefill is done: keep it. ``at``:
        the prompt length whose prefill forward adopts it (:meth:`adopt_in_forward`).
        Raises ValueError (changing nothing) if ``entry`` is not shared any more."""
        if not self.shared.contains(entry):
            raise ValueError(f"{entry!r} is not shared any more")
        st = self._states.get(req_pool_idx)
        assert st is None or st.record is None, f"{st!r} is compressed already: it cannot be pinned"
        st = self._state(req_pool_idx)
        if st.pin is not entry:
            self._unpin(st)
            entry.refs.add(req_pool_idx)
        st.pin, st.adopt_at = entry, at
        st.queries, st.job, st.compress_at = {}, None, None
        self._set_phase(st, Phase.PINNED)

    def _unpin(self, st: RequestState) -> None:
        if st.pin is not None:
            st.pin.refs.discard(st.idx)
            self.shared.touch(st.pin)
            st.pin, st.adopt_at = None, None

    def adopt_in_forward(self, layer: int, req_pool_idx: int, end: int) -> None:
        """Called by the attention backend after each layer of a prefill chunk ending at ``end``:
        after the last layer of the chunk that completes a pinned row's prompt, the row reads
        its shared prompt (the next forward sees its record, as a compressed row's). The
        outcome is left as :meth:`compress_in_forward` leaves it."""
        st = self._states.get(req_pool_idx)
        if layer != self.shape.num_layers - 1 or st is None or st.phase is not Phase.PINNED or st.adopt_at != end:
            return
        try:
            self.adopt(req_pool_idx, end)
            st.outcome = FORWARD_OK
        except Exception as e:  # the serving layer reports it; the request stays whole
            st.outcome = e

    def pinned(self, req_pool_idx: int) -> SharedPrefix | None:
        st = self._states.get(req_pool_idx)
        return st.pin if st is not None and st.phase is Phase.PINNED else None

    def adopt(self, req_pool_idx: int, seq_len: int) -> RequestPages:
        """Row ``req_pool_idx`` (pinned) reads its shared prefix from now on; positions from the
        prefix's end to ``seq_len`` are its tail. On any failure the row is unpinned and stays
        whole (its reference to the prefix is released)."""
        st = self._states.get(req_pool_idx)
        entry = self.pinned(req_pool_idx)
        if entry is None:
            raise ValueError(f"row {req_pool_idx} is not pinned to a shared prompt ({st!r})")
        try:
            assert st.record is None, f"request row {req_pool_idx} is already compressed"
            if seq_len < entry.length:
                raise ValueError(f"a {seq_len}-token prompt cannot adopt the {entry.length}-token prefix {entry!r}")
        except BaseException:
            self._to_whole(st)
            raise
        src = entry.record
        st.record = RequestPages(prompt_len=src.prompt_len, policy=src.policy, budget=src.budget, layers=src.layers,
                                 kept_tokens=src.kept_tokens, selection=src.selection, shared=entry)
        st.pin, st.adopt_at = None, None  # entry.refs keeps the row: it reads it now
        self._set_phase(st, Phase.SHARED)
        entry.adoptions += 1
        self.shared.touch(entry)
        self.shared.totals["adopted"] += 1
        return st.record

    def evictable_pages(self) -> int:
        """Pages of shared prefixes no row reads (they are freed when pages are needed)."""
        return self.shared.evictable_pages()

    def evict_shared(self, need: int) -> int:
        """Free unread shared prefixes, least recently used first, until ``need`` pages are
        free (or none is left to free). Returns the pages freed."""
        with self._lock:
            return self.shared.evict(need)

    def drop_shared(self, entry: SharedPrefix) -> int:
        """Free an unread shared prefix's pages; returns how many."""
        with self._lock:
            return self.shared.drop(entry)

    def clear_shared(self) -> int:
        """Free every unread shared prefix (SGLang's cache flush); returns the pages freed."""
        with self._lock:
            return self.shared.clear()

    def shared_prefixes(self) -> list[SharedPrefix]:
        return self.shared.entries()

    def install_record(self, req_pool_idx: int, rec: RequestPages) -> None:
        """Row ``req_pool_idx`` holds ``rec``, built outside the manager (benchmarks, tests): its
        pages must be allocated to the row already. The row becomes COMPRESSED."""
        assert rec.shared is None, "install_record takes a record that owns its pages"
        st = self._state(req_pool_idx)
        assert st.record is None and st.pin is None, f"{st!r} holds pages or a pin already"
        st.queries, st.job, st.compress_at, st.record = {}, None, None, rec
        self._set_phase(st, Phase.COMPRESSED)

    # ------------------------------------------------------------------ ownership
    def release_row(self, req_pool_idx: int) -> RequestState | None:
        """The row is released (finish, abort, retraction): drop its state, free its pages and
        its reference to a shared prompt. Returns the dropped state (None: there was none)."""
        st = self._states.pop(req_pool_idx, None)
        if st is None:
            return None
        self._phases[st.phase] -= 1
        if st.pin is not None:
            st.pin.refs.discard(req_pool_idx)
            self.shared.touch(st.pin)
        rec = st.record
        if rec is not None:
            with self._lock:
                self.allocator.free(rec.page_ids, owner=req_pool_idx)
            if rec.shared is not None:
                rec.shared.refs.discard(req_pool_idx)
                self.shared.touch(rec.shared)
        return st

    def free(self, req_pool_idx: int) -> bool:
        """:meth:`release_row`; True if the row held a compressed record."""
        st = self.release_row(req_pool_idx)
        return st is not None and st.record is not None

    def check_integrity(self) -> None:
        """Every page owned once, shared prefixes' refs are exactly their readers, and each
        state's fields match its phase. Raises AssertionError naming what is off."""
        with self._lock:
            states = list(self._states.values())
            counts = Counter(st.phase for st in states)
            assert all(counts[p] == self._phases[p] for p in Phase), \
                f"phase counts {dict(self._phases)} but states {dict(counts)}"
            for st in states:
                assert (st.record is not None) == (st.phase in HAS_RECORD), f"{st!r}: record {st.record is not None}"
                assert (st.pin is not None) == (st.phase is Phase.PINNED), f"{st!r}: pin {st.pin!r}"
                assert st.job is None or st.phase is Phase.COMPRESSING, f"{st!r}: a job outside COMPRESSING"
                assert st.phase is not Phase.SHARED or st.record.shared is not None, f"{st!r}: no shared prefix"
            owned = {st.idx: st.record.page_ids for st in states if st.record is not None and st.record.page_ids}
            for e in self.shared_prefixes():
                owned[e] = e.record.page_ids
                readers = {st.idx for st in states if (st.record is not None and st.record.shared is e)
                           or st.pin is e}
                assert e.refs == readers, f"{e!r}: refs {sorted(e.refs)}, read by rows {sorted(readers)}"
            self.allocator.check_integrity(owned)
