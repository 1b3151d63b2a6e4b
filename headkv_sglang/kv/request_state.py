"""RequestState: everything the compression manager knows about one request row, in one object.

A request row (SGLang's ``req_pool_idx``) that the manager hears of gets one
:class:`RequestState`, owned by :class:`~headkv_sglang.kv.manager.CompressionManager`; the
manager's hooks move it between phases and freeing the row drops it (so nothing about a
request can outlive its row)::

    admission                    prefill forward (per layer)              result processing / decode
    ---------                    ---------------------------              --------------------------
    begin_extend ─▶ CAPTURING ─(layer 0)─▶ COMPRESSING ─(last layer, all ranks ok)─▶ COMPRESSED
                        │                      │                                    │  ▲ decode move
                        │                      └─(error on any rank)─▶ WHOLE         │  └─┘ (new record)
                        │ drop_capture / not wanted / compress() failed ─▶ WHOLE     │ publish (kv_share)
                        │                                                           ▼
    pin (kv_share) ─▶ PINNED ─(last layer of the forward completing it: adopt)─▶ SHARED (reader)
                        │ adopt failed (the pin is released) ─▶ WHOLE

    release_row (finish, abort, retraction), from any phase: its pages, its reference to a
    shared prompt and its reservation go with the state.

* CAPTURING: its scoring queries (question span or window) are kept per layer during its
  prefill; ``compress_at`` is the prompt length whose forward compresses it.
* COMPRESSING: inside that forward, layer by layer (``job``).
* PINNED (``kv_share``): it will read the shared compressed prompt ``pin`` once its prefill
  is done (in the forward ending at ``adopt_at``).
* COMPRESSED: ``record`` holds its own pages. SHARED: ``record`` reads ``record.shared``'s
  pages (it published them, ``published``, or adopted them).
* WHOLE: served uncompressed (compression failed, would not save memory, or was not wanted).

Beside the phase it holds the request's reservation in the compressed pool (worst-case
pages promised at admission, until its prefill's result is processed), the forward's
outcome for the result processing (``outcome``), its decode queries and the tail positions
a decode move left for the serving layer to release (``moved``), and the serving layer's
own bookkeeping (``req``, ``restore_skip``, ``released``). Pure Python; nothing here imports
SGLang.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from headkv_sglang.config import KVPolicyConfig
from headkv_sglang.kv.pool import RequestPages


class Phase(enum.Enum):
    CAPTURING = "capturing"
    COMPRESSING = "compressing"
    PINNED = "pinned"
    COMPRESSED = "compressed"
    SHARED = "shared-reader"
    WHOLE = "whole"


# phases whose ``record`` is set (the rows the ragged kernel attends)
HAS_RECORD = frozenset({Phase.COMPRESSED, Phase.SHARED})
# phases that capture scoring queries during a prefill
CAPTURES = frozenset({Phase.CAPTURING, Phase.COMPRESSING})


@dataclass
class Job:
    """One request's compression, layer by layer (:meth:`CompressionManager.start_compression`)."""

    idx: int
    cfg: KVPolicyConfig
    seq_len: int
    policy: object
    planned: torch.Tensor | None
    w: int
    q_end: int | None
    layers: list[tuple] = field(default_factory=list)
    need: int = 0
    ms: float = 0.0  # time spent in its steps (not the forward's other work between them)
    select_global: bool = False  # question-agnostic scores ranked across all rows (agnostic_select "global")
    ranked_by_mass: bool = False  # question-agnostic scores (accumulated masses) rank the tokens
    budgets: torch.Tensor | None = None  # a global selection's [num_layers, num_kv_heads] budgets


# what a prefill forward left for the result processing: the row was compressed (or adopted
# its shared prompt), or the exception that left it whole
FORWARD_OK = "ok"


@dataclass(eq=False)
class RequestState:
    """One request row's compression state (see the module docstring for the phases)."""

    idx: int
    phase: Phase
    rid: str = ""
    # --- capture (CAPTURING / COMPRESSING)
    window: int = 0
    # question-aware scoring: the scoring queries are prompt positions [span[0], span[1]);
    # None: SnapKV's window, the last ``window`` queries of the prompt
    span: tuple[int, int] | None = None
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, Hq, D]
    # question-agnostic scoring (``self`` / ``reconstruct``): the span's queries are not kept
    # but scored as they come, ``mass`` holding per layer the most attention any of them gave
    # each of the first ``keep`` tokens ([Hkv, group, <= keep], policies.scoring.max_attention)
    agnostic: bool = False
    # ``accumulated`` scoring (H2O): ``mass`` sums the attention instead ([Hkv, 1, <= keep],
    # policies.scoring.accumulated_attention)
    accumulate: bool = False
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    # tokens compressed: the prompt's first ``keep`` (a reconstruction pass's repetition of
    # the document after them is dropped); None: the whole prompt
    keep: int | None = None
    # compress inside the forward whose chunk ends at this prompt length (compress_in_forward)
    compress_at: tuple[KVPolicyConfig, int] | None = None
    job: Job | None = None
    # --- admission: worst-case pages promised until its prefill's result is processed
    reserved: int | None = None
    # --- kv_share (PINNED): the shared prefix it will read, and the prompt length whose
    # forward adopts it
    pin: Any = None  # SharedPrefix
    adopt_at: int | None = None
    # --- pages (COMPRESSED / SHARED)
    record: RequestPages | None = None
    published: bool = False  # its own compressed prompt became the shared one it reads
    # the forward's outcome, taken by the result processing: FORWARD_OK or an Exception
    outcome: object = None
    # --- decode phase: layer -> its last decode queries [<= window, Hq, D]; tail positions
    # [start, end) moved into pages whose token slots the serving layer still has to free
    decode_q: dict[int, torch.Tensor] = field(default_factory=dict)
    moved: tuple[int, int] | None = None
    # --- the serving layer's: its request object, the value of its radix-insert switch to
    # restore when the row is freed (None: untouched), whether its prompt slots went back
    req: Any = None
    restore_skip: bool | None = None
    released: bool = False

    def __repr__(self) -> str:
        return f"RequestState(row {self.idx}, {self.phase.value}, rid={self.rid!r})"
