"""Context reconstruction (KVzip, arXiv 2505.23416): scoring a document without its question.

A document compressed before any question is asked (``kv_share`` with ``max_new_tokens``
0: the first request of a long-document QA program) has no question to rank its tokens
by. KVzip ranks them by how much the model attends to each while it *repeats* the
document: the prompt is extended with an instruction to repeat the text, the chat
template's turn change, and the document again; the queries of that copy score the
document's keys (:func:`~headkv_sglang.policies.scoring.max_attention`), and only the
document itself is compressed: the copy's KV is dropped with the request.

The tokenizer process extends the prompt (:func:`reconstruction_ids`) and marks the
request's ``custom_params`` with :data:`RECONSTRUCT_KEY` (:func:`make_mark`); the scheduler
reads the mark (``serving.requests.reconstruction``) and trusts it only for the prompt it was
made for.
Pure Python: no SGLang, no torch.
"""

from __future__ import annotations

import array
import zlib
from typing import Sequence

#: custom_params key of a reconstructed request: ``[document_tokens, copy_start, total_tokens,
#: crc32 of the document's tokens]`` (not a ``kv_*`` key: users do not set it, and request
#: validation ignores it). The length and checksum tie the mark to its own prompt: a batch whose
#: items share one sampling-params dict shares the mark too, and only its own item matches it.
RECONSTRUCT_KEY = "_headkv_reconstruct"
#: the instruction after the document (KVzip's "Repeat the previous context exactly.")
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."


def content_start(ids: Sequence[int], header: Sequence[int]) -> int:
    """Where the document's text starts: after the first user header of the chat template
    (``header``; the system turn before it is not repeated), or 0 without one."""
    h = len(header)
    if h:
        pattern = tuple(header)
        for i in range(len(ids) - h + 1):
            if tuple(ids[i:i + h]) == pattern:
                return i + h
    return 0


def reconstruction_ids(ids: Sequence[int], repeat: Sequence[int], tail: Sequence[int],
                       header: Sequence[int] = ()) -> tuple[list[int], int]:
    """``(extended, copy_start)``: ``ids`` (the document's prompt), the ``repeat``
    instruction, the template's generation ``tail`` (the assistant turn's start), then the
    document's text again (from :func:`content_start`); its copy starts at ``copy_start``."""
    if not ids:
        raise ValueError("an empty prompt has nothing to reconstruct")
    start = content_start(ids, header)
    if start >= len(ids):
        start = 0
    prefix = list(ids) + list(repeat) + list(tail)
    return prefix + list(ids[start:]), len(prefix)


def checksum(ids: Sequence[int]) -> int:
    """CRC-32 of token ids (as 64-bit integers)."""
    return zlib.crc32(array.array("q", ids).tobytes())


def make_mark(ids: Sequence[int], extended: Sequence[int], copy_start: int) -> list[int]:
    """The :data:`RECONSTRUCT_KEY` value of a document ``ids`` extended to ``extended``."""
    return [len(ids), copy_start, len(extended), checksum(ids)]


def reconstruction_mark(params: object, ids: Sequence[int] | None = None) -> tuple[int, int] | None:
    """A request's :data:`RECONSTRUCT_KEY` mark as ``(document_tokens, copy_start)``, or None
    (none, malformed, or with ``ids`` (the request's prompt) given: not this prompt's)."""
    if not isinstance(params, dict):
        return None
    mark = params.get(RECONSTRUCT_KEY)
    if not (isinstance(mark, (list, tuple)) and len(mark) == 4 and all(isinstance(x, int) for x in mark)
            and 0 < mark[0] <= mark[1] < mark[2]):
        return None
    if ids is not None and (len(ids) != mark[2] or checksum(ids[:mark[0]]) != mark[3]):
        return None
    return int(mark[0]), int(mark[1])
