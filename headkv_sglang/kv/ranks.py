"""Tensor-parallel agreement: every rank leaves a compression step with the same verdict.

SGLang's schedulers of the ``--tp`` ranks run in lockstep, so a request must be compressed
(or moved into pages at decode) on every rank or on none, and no rank may skip a
collective the others wait in. Each compression *step* (one layer of the prefill forward,
a whole ``compress()``, one decode move) therefore ends with a vote, and every collective
inside a step (the score and query gathers the policies call) starts with one:

* a vote is one ``min_over_ranks`` all-reduce of a code: :data:`OK`, :data:`POOL_FULL`
  (this rank's pool cannot take it) or :data:`ERROR`;
* a rank whose step raises casts its failing vote once, at the step's end; a rank that is
  fine casts :data:`OK` at the next collective (a gather's vote or the step's closing
  one), which is the same all-reduce, so every rank makes the same number of calls and
  sees the same minimum, and every rank whose vote came back short raises (its own error
  or :class:`PeerFailed`) without any further collective;
* pages are only committed after the closing vote (what is written before it, into newly
  allocated pages, is freed again when the vote fails).

A step never blocks in a collective its peers do not reach: a step is one call of the
manager (no model collective runs inside it), and all ranks run the same steps.
Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

from typing import Callable

import torch

from headkv_sglang.kv.pool import PoolFullError

OK, POOL_FULL, ERROR = 2, 1, 0


class PeerFailed(RuntimeError):
    """Another tensor-parallel rank failed this step: every rank leaves the request as it was."""

    agreed = True  # already voted: the step must not vote again


class PeerPoolFull(PoolFullError):
    """Another tensor-parallel rank's pool cannot take this request."""

    agreed = True


def code_of(err: BaseException | None) -> int:
    if err is None:
        return OK
    return POOL_FULL if isinstance(err, PoolFullError) else ERROR


def peer_error(code: int) -> Exception:
    if code == POOL_FULL:
        return PeerPoolFull("another tensor-parallel rank's pool is full")
    return PeerFailed("compression failed on another tensor-parallel rank: the request stays whole on every rank")


def agreed(err: BaseException) -> bool:
    """``err`` already went through a vote (every rank knows): vote no more for this step."""
    return bool(getattr(err, "agreed", False))


class RankVote:
    """The votes of one manager (``min_over_ranks``: None with one rank, then every vote is
    this rank's own verdict)."""

    def __init__(self, min_over_ranks: Callable[[int], int] | None) -> None:
        self.min_over_ranks = min_over_ranks
        self.votes = 0  # cast since start (tests compare them across ranks)

    def close(self, err: BaseException | None) -> None:
        """End a step: raise this rank's ``err``, or the peers' failure, or return (all OK)."""
        code = code_of(err)
        if self.min_over_ranks is not None:
            self.votes += 1
            code = int(self.min_over_ranks(code))
        if err is not None:
            raise err
        if code != OK:
            raise peer_error(code)

    def run(self, fn: Callable[[], object]) -> object:
        """``fn()`` as one step: its result if every rank succeeded, else it raises on all."""
        try:
            out = fn()
        except Exception as e:
            if agreed(e):
                raise
            self.close(e)
            raise  # pragma: no cover - close raised
        self.close(None)
        return out

    def flagged(self, collective: Callable[[torch.Tensor], torch.Tensor] | None
                ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``collective`` preceded by an OK vote (a failed peer's closing vote pairs with it)."""
        if collective is None or self.min_over_ranks is None:
            return collective

        def call(x: torch.Tensor) -> torch.Tensor:
            self.votes += 1
            code = int(self.min_over_ranks(OK))
            if code != OK:
                raise peer_error(code)
            return collective(x)

        return call


def borrow_together(vote: RankVote, allocator, need: int) -> None:
    """A lockstep allocator (``--kv-memory shared`` under ``--tp``,
    :class:`~headkv_sglang.kv.shared_memory.BorrowingPageAllocator`): every rank borrows the
    chunks the neediest rank's ``need`` pages take, agreed in one collective of the step. It
    is a flagged one (:meth:`RankVote.flagged`): a rank that failed earlier in the step casts
    its closing vote there instead, and every rank raises. Nothing happens for any other
    allocator."""
    if not getattr(allocator, "lockstep", False):
        return
    mine = allocator.chunks_to_borrow(need)
    most = vote.flagged(lambda t: torch.tensor(-int(vote.min_over_ranks(-int(t)))))(torch.tensor(mine))
    allocator.borrow_agreed(int(most), need)
