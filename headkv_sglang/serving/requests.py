"""A request's effective compression config, and whether it is compressed at all."""

from __future__ import annotations

import logging

from headkv_sglang.config import ConfigError, KVPolicyConfig
from headkv_sglang.policies.registry import policy_class
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")


def request_config(state: ServingState, req) -> KVPolicyConfig:
    """The server's config with the request's ``custom_params`` applied, cached on the request."""
    cached = getattr(req, "_headkv_cfg", None)
    if cached is not None:
        return cached
    cfg = state.cfg
    params = getattr(req.sampling_params, "custom_params", None) or {}
    try:
        cfg = cfg.with_request(params)
    except ConfigError:  # validated at the HTTP layer already; be safe
        logger.exception("invalid kv_* custom_params reached the scheduler; using server defaults")
    req._headkv_cfg = cfg
    return cfg


def wants_compression(cfg: KVPolicyConfig, seq_len: int) -> bool:
    """The policy compresses, and the prompt is long enough for it (``min_prompt``)."""
    return policy_class(cfg.policy).compresses and seq_len >= max(cfg.min_prompt, 1)


def needs_queries(cfg: KVPolicyConfig) -> bool:
    """The policy scores tokens with the observation window's queries."""
    return policy_class(cfg.policy).needs_queries


def prompt_len(req) -> int:
    return len(req.origin_input_ids) + len(req.output_ids or ())
