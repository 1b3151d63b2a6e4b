"""A request's effective compression config, and whether it is compressed at all."""

from __future__ import annotations

import dataclasses
import logging

from headkv_sglang.config import AGNOSTIC_SCORINGS, AGNOSTIC_SELECT_DEFAULT, ConfigError, KVPolicyConfig
from headkv_sglang.policies.registry import policy_class
from headkv_sglang.question import QuestionFinder
from headkv_sglang.reconstruct import reconstruction_mark
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")


def request_config(state: ServingState, req) -> KVPolicyConfig:
    """The server's config with the request's ``custom_params`` applied, its scoring resolved
    (``"auto"``: a document shared before its questions is scored without them) and a ratio
    budget resolved for the tokens it compresses, cached on the request."""
    cached = getattr(req, "_headkv_cfg", None)
    if cached is not None:
        return cached
    cfg = state.cfg
    params = getattr(req.sampling_params, "custom_params", None) or {}
    try:
        cfg = cfg.with_request(params)
    except ConfigError:  # validated at the HTTP layer already; be safe
        logger.exception("invalid kv_* custom_params reached the scheduler; using server defaults")
    cfg = cfg.resolve_scoring(is_document(req, cfg), reconstructed=reconstruction(req) is not None)
    if cfg.scoring in AGNOSTIC_SCORINGS and state.manager is not None and state.manager.shard is not None:
        cfg = dataclasses.replace(cfg, scoring="window")  # refused under --tp at the HTTP layer; be safe
    cfg = cfg.for_prompt(kept_len(req))
    req._headkv_cfg = cfg
    return cfg


def is_document(req, cfg: KVPolicyConfig) -> bool:
    """A document shared before its questions: ``kv_share`` and no output (``max_new_tokens`` 0)."""
    return bool(cfg.share) and getattr(getattr(req, "sampling_params", None), "max_new_tokens", None) == 0


def reconstruction(req) -> tuple[int, int] | None:
    """``(document_tokens, copy_start)`` of a prompt extended with a reconstruction pass
    (``headkv_sglang.reconstruct``), or None."""
    cached = getattr(req, "_headkv_rpass", False)
    if cached is not False:
        return cached
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    ids = getattr(req, "origin_input_ids", None)
    out = reconstruction_mark(params, ids) if ids is not None else None
    try:
        req._headkv_rpass = out
    except AttributeError:
        pass
    return out


def kept_len(req) -> int:
    """The tokens compressed: the document of a reconstructed prompt, else the whole prompt."""
    rec = reconstruction(req)
    return prompt_len(req) if rec is None else rec[0]


def wants_compression(cfg: KVPolicyConfig, seq_len: int) -> bool:
    """The policy compresses, and the prompt is long enough for it (``min_prompt``)."""
    return policy_class(cfg.policy).compresses and seq_len >= max(cfg.min_prompt, 1)


def needs_queries(cfg: KVPolicyConfig) -> bool:
    """The policy scores tokens with the observation window's queries."""
    return policy_class(cfg.policy).needs_queries


def share_key(cfg: KVPolicyConfig) -> KVPolicyConfig:
    """What two requests must agree on to share a compressed prompt: their whole config, a
    ratio budget as the ratio (the shared prompt's own length resolves it), the scoring left
    out (how the copy was ranked does not change what it holds)."""
    cfg = dataclasses.replace(cfg, scoring="auto", question=0, agnostic_kernel=1,  # a copy serves any question
                              agnostic_select=AGNOSTIC_SELECT_DEFAULT)
    return dataclasses.replace(cfg, budget=0) if cfg.budget_ratio else cfg


def prompt_ids(req) -> list[int]:
    return list(req.origin_input_ids) + list(req.output_ids or ())


def shared_prefix(state: ServingState, req, cfg: KVPolicyConfig):
    """The shared compressed prompt ``req`` will read (``kv_share``), or None. Cached on the
    request until the set of shared prompts changes."""
    m = state.manager
    if m is None or not cfg.share or not wants_compression(cfg, prompt_len(req)):
        return None
    cached = getattr(req, "_headkv_shared", None)
    if cached is not None and cached[0] == m.shared_generation:
        return cached[1]
    entry = m.find_shared(share_key(cfg), prompt_ids(req))
    req._headkv_shared = (m.shared_generation, entry)
    return entry


def prompt_len(req) -> int:
    return len(req.origin_input_ids) + len(req.output_ids or ())


def scoring_span(state: ServingState, req, cfg: KVPolicyConfig) -> tuple[int, int]:
    """The prompt positions whose queries score ``req``'s tokens, cached on the request.

    ``scoring="question"``: the question (the last user turn's last ``question_len`` tokens
    before the chat template's tail, :mod:`headkv_sglang.question`); ``"window"``: the last
    ``obs_window`` tokens (SnapKV); ``"self"``, ``"accumulated"``: every prompt token; ``"reconstruct"``: the
    document's copy after it (:mod:`headkv_sglang.reconstruct`). The question is looked for in the original prompt (a
    retracted request re-prefills its outputs too; its question does not move).
    """
    cached = getattr(req, "_headkv_span", None)
    if cached is not None:
        return cached
    rec = reconstruction(req) if cfg.scoring == "reconstruct" else None
    if rec is not None:
        span = (rec[1], prompt_len(req))  # the document's copy
    else:
        finder = state.questions if state.questions is not None else QuestionFinder()
        span = cfg.scoring_span(finder, req.origin_input_ids, kept_len(req))
    req._headkv_span = span
    return span


def question_finder(server_args) -> QuestionFinder:
    """The served tokenizer's chat-template markers (an empty finder, logged, if unavailable)."""
    path = getattr(server_args, "tokenizer_path", None) or getattr(server_args, "model_path", None)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(getattr(server_args, "trust_remote_code", False)))
        finder = QuestionFinder.from_tokenizer(tok)
    except Exception as e:  # scoring then falls back to each prompt's last tokens
        logger.warning("headkv_sglang: no tokenizer for question-aware scoring at %s (%s); "
                       "questions are the prompts' last tokens", path, e)
        return QuestionFinder()
    logger.info("headkv_sglang: question-aware scoring: template tail %d tokens, user header %d tokens",
                len(finder.tail), len(finder.header))
    return finder
