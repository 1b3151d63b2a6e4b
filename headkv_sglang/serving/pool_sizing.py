"""Sizing: a share of SGLang's KV token capacity becomes the compressed pool (same bytes)."""

from __future__ import annotations

import logging

from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")


def scale_pool_sizes(state: ServingState, result, *args, **kwargs):
    """AFTER ``DefaultPoolConfigurator.calculate_pool_sizes*``: move ``--kv-pool-fraction``
    (``--kv-memory split``; with ``shared`` nothing moves).

    One token slot holds ``layers × kv_heads`` head-tokens, so ``moved`` slots become
    ``moved × layers × kv_heads / page_size`` pages of the compressed pool.
    """
    total = result.max_total_num_tokens
    if state.cfg.memory == "shared":  # one memory: pages borrow SGLang's slots as they need them
        state.pool_tokens, state.token_pool_tokens = 0, total
        logger.info("headkv_sglang: KV capacity %d tokens, shared by SGLang and compressed pages (--kv-memory shared)",
                    total)
        return result
    moved = int(total * state.cfg.pool_fraction)
    result.max_total_num_tokens = total - moved
    state.pool_tokens = moved
    state.token_pool_tokens = total - moved
    logger.info(
        "headkv_sglang: KV capacity %d tokens -> SGLang token pool %d + compressed pool %d token-equivalents "
        "(--kv-pool-fraction %.2f)", total, total - moved, moved, state.cfg.pool_fraction,
    )
    return result


def compressed_pool_pages(state: ServingState, num_kv_heads: int) -> int:
    """Pages of this process's compressed pool; ``num_kv_heads``: the heads this rank holds
    (with ``--tp N`` a token slot of SGLang's pool holds ``H_kv / N`` heads per layer)."""
    return max(1, state.pool_tokens * state.shape.num_layers * num_kv_heads // state.cfg.page_size)
