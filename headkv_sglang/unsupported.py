"""What ``--kv-policy`` cannot serve, found before any weights load: one line naming it.

Two sources: SGLang's server options (:func:`server_args_error`, on the parsed arguments and
again on SGLang's resolved ones, which can change a default such as the page size or the KV
cache dtype) and the model's own ``config.json`` (:func:`model_error`). The plugin calls both
from its ``ServerArgs.resolve_once`` hooks (``plugin.py``), which run in the launcher (and in
``sglang.Engine``) before the scheduler processes start; :func:`layer_error` checks the
built attention layers once more when the backend is created, for a model whose config
does not say what its layers do.

No SGLang import: the arguments are read by attribute name, the model config as a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: --kv-cache-dtype values whose token pool holds the model's keys and values as they are.
PLAIN_KV_DTYPES = ("auto", "bf16", "bfloat16")


def _set(value: Any) -> bool:
    return value not in (None, False, 0, "", "null", "none", "auto")


def _more_than_one(value: Any) -> bool:
    return value not in (None, 0, 1)


# (attribute of ServerArgs, is it a problem, the message after "--kv-policy does not support ")
# A message says what breaks and what to do; {v} is the value.
_SERVER_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("page_size", _more_than_one,
     "--page-size {v}: SGLang's token pool must have pages of 1 token (releasing a compressed prompt's "
     "token slots frees ranges that are not page-aligned); leave --page-size unset or 1 (the compressed "
     "pool's own pages are --kv-page-size)"),
    ("kv_cache_dtype", lambda v: v not in (None, *PLAIN_KV_DTYPES),
     "--kv-cache-dtype {v} yet: compressed pages are kept in the model's dtype and quantized KV scales are "
     "not implemented; leave --kv-cache-dtype auto (or bfloat16)"),
    ("speculative_algorithm", _set,
     "speculative decoding (--speculative-algorithm {v}): draft tokens are verified against SGLang's own KV "
     "layout; leave it unset"),
    ("enable_dp_attention", _set,
     "--enable-dp-attention: its attention runs data-parallel over the tensor-parallel ranks, while "
     "compression shards KV heads over them; use --dp for replicas, --tp for sharding"),
    ("attn_dp_size", _more_than_one,
     "--attn-dp-size {v} (data-parallel attention); use --dp for replicas, --tp for sharding"),
    ("pp_size", _more_than_one,
     "--pp-size {v}: with pipeline parallelism a rank holds only some layers, and the budget plan spans "
     "all of them; use --tp"),
    ("dcp_size", _more_than_one,
     "--dcp-size {v} (decode context parallelism): a prompt's tokens are split over ranks, and scoring "
     "ranks every token of the prompt; use --tp"),
    ("attn_cp_size", _more_than_one,
     "--attn-cp-size {v} (context parallelism): a prompt's tokens are split over ranks, and scoring "
     "ranks every token of the prompt; use --tp"),
    ("enable_prefill_cp", _set,
     "--enable-prefill-cp (context-parallel prefill): a prompt's tokens are split over ranks, and "
     "scoring ranks every token of the prompt; leave it off"),
    ("enable_hierarchical_cache", _set,
     "--enable-hierarchical-cache yet: HiCache moves token-pool KV to host memory and back, and a "
     "compressed prompt lives in headkv's own pool, which it does not know; leave it off"),
    ("hicache_storage_backend", _set,
     "--hicache-storage-backend {v} yet (HiCache storage): leave it unset"),
    ("enable_lmcache", _set,
     "--enable-lmcache yet: LMCache stores and restores token-pool KV, not the compressed pool; leave it off"),
    ("enable_flexkv", _set,
     "--enable-flexkv yet: FlexKV stores and restores token-pool KV, not the compressed pool; leave it off"),
    ("enable_hisparse", _set,
     "--enable-hisparse: its sparse attention replaces the attention the compressed rows go through; "
     "leave it off"),
    ("enable_unified_cache_external_linker", _set,
     "--enable-unified-cache-external-linker yet: it shares token-pool KV across instances, not the "
     "compressed pool; leave it off"),
    ("enable_kv_cache_sharding", _set,
     "--enable-kv-cache-sharding yet: it splits SGLang's KV cache over ranks in its own layout; leave it off"),
    ("enable_page_major_kv_layout", _set,
     "--enable-page-major-kv-layout: compression reads the token pool per layer; leave it off"),
    ("disaggregation_mode", _set,
     "--disaggregation-mode {v}: the prefill server sends the decode server its token-pool KV, not the "
     "compressed pages; serve with one server (PD disaggregation is not supported yet)"),
    ("enable_pdmux", _set,
     "--enable-pdmux: prefill and decode run as separate multiplexed streams around the attention "
     "backend that headkv wraps; leave it off"),
    ("enable_two_batch_overlap", _set,
     "--enable-two-batch-overlap: it splits a batch into micro-batches that the compressed rows' plan "
     "does not follow; leave it off"),
    ("enable_single_batch_overlap", _set,
     "--enable-single-batch-overlap; leave it off"),
    ("enable_streaming_session", _set,
     "--enable-streaming-session: a streaming session keeps a turn's token slots for the next turn, and "
     "a compressed prompt's slots are released after its prefill; leave it off (plain sessions work)"),
    ("dllm_algorithm", _set,
     "--dllm-algorithm {v} (diffusion language models): nothing is decoded token by token to compress; "
     "leave it unset"),
    ("is_embedding", _set,
     "--is-embedding: an embedding model decodes nothing, so there is no KV to compress; serve it without "
     "--kv-policy"),
    ("enable_multimodal", lambda v: v is True,
     "--enable-multimodal yet: image and audio tokens would be scored and dropped like text, untested; "
     "serve the text model"),
)


def server_args_error(args: Any, read: Callable[[Any, str], Any] | None = None) -> str | None:
    """The first SGLang option ``args`` (a ``ServerArgs`` or the launcher's namespace) sets that
    ``--kv-policy`` cannot serve with, as a one-line message; None when all are fine.

    ``read(args, name)``: how to read an option (default: the attribute; after SGLang's
    resolution, its resolved value, which SGLang 0.5.23 keeps beside the attribute)."""
    for attr, is_bad, message in _SERVER_RULES:
        value = read(args, attr) if read is not None else getattr(args, attr, None)
        if is_bad(value):
            return "--kv-policy does not support " + message.format(v=value)
    return None


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = cfg.get("text_config")
    return inner if isinstance(inner, Mapping) else cfg


def model_error(hf_config: Mapping[str, Any]) -> str | None:
    """What in a model's ``config.json`` (as a dict) ``--kv-policy`` cannot serve, as a one-line
    message naming the config field; None when nothing.

    Refused: attention logit soft-capping (Gemma 2), sliding-window or other non-full
    attention layers (Mistral v0.1, Gemma 2/3, gpt-oss, Qwen with ``use_sliding_window``,
    hybrid linear-attention models), chunked attention (Llama 4), MLA (DeepSeek-V2/V3's
    ``kv_lora_rank``), an attention scale other than ``head_dim ** -0.5``
    (``query_pre_attn_scalar``, ``attention_multiplier``), ALiBi, multimodal models and an
    FP8 KV cache set by the checkpoint. Allowed: ``final_logit_softcapping`` (it caps the
    LM head's logits, after attention) and ``sliding_window`` with ``use_sliding_window:
    false`` (Qwen2/3 configs carry a window they do not use).
    """
    top = hf_config
    cfg = _text_config(hf_config)
    where = "the model's config.json" + (" (text_config)" if cfg is not top else "")

    def err(field: str, value: Any, why: str) -> str:
        return f"--kv-policy does not support {where} {field}={value!r}: {why}"

    cap = cfg.get("attn_logit_softcapping")
    if cap:
        return err("attn_logit_softcapping", cap, "the compressed rows' attention applies no logit soft-capping "
                   "(Gemma 2); serve a model without it")
    if cfg.get("kv_lora_rank"):
        return err("kv_lora_rank", cfg["kv_lora_rank"], "MLA models (DeepSeek-V2/V3 style) keep one latent per "
                   "token, not per KV head; serve a model with grouped-query or multi-head attention")
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, (list, tuple)):
        other = sorted({str(t) for t in layer_types} - {"full_attention", "attention"})
        if other:
            return err("layer_types", f"... {', '.join(other)} ...", "only full-attention layers can be "
                       "compressed (sliding-window, chunked or linear-attention layers keep their own KV)")
    for field in ("layers_block_type", "hybrid_override_pattern", "attn_layer_indices"):
        if cfg.get(field):
            return err(field, cfg[field] if isinstance(cfg[field], str) else "...",
                       "hybrid models (attention mixed with state-space or linear layers) are not supported yet")
    window = cfg.get("sliding_window")
    use_window = cfg.get("use_sliding_window")
    if window and use_window is not False:
        return err("sliding_window", window, "sliding-window attention keeps only recent keys, which the "
                   "compressed rows do not follow; serve a model with full attention")
    if cfg.get("sliding_window_pattern"):
        return err("sliding_window_pattern", cfg["sliding_window_pattern"], "sliding-window layers are not "
                   "supported; serve a model with full attention")
    if cfg.get("attention_chunk_size"):
        return err("attention_chunk_size", cfg["attention_chunk_size"], "chunked attention (Llama 4) attends "
                   "within chunks, which the compressed rows do not follow")
    num_heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // num_heads if num_heads else 0)
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and head_dim and float(scalar) != float(head_dim):
        return err("query_pre_attn_scalar", scalar, f"attention is scaled by {scalar}**-0.5, and the compressed "
                   f"rows by head_dim**-0.5 = {head_dim}**-0.5")
    mult = cfg.get("attention_multiplier")
    if mult is not None and head_dim and abs(float(mult) - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        return err("attention_multiplier", mult, f"attention is scaled by {mult}, and the compressed rows by "
                   f"head_dim**-0.5 = {head_dim ** -0.5:.6g}")
    attn_config = cfg.get("attn_config") if isinstance(cfg.get("attn_config"), Mapping) else {}
    if cfg.get("alibi") or attn_config.get("alibi") or cfg.get("position_embedding_type") == "alibi":
        return err("alibi", True, "ALiBi adds a position bias that the compressed rows' attention does not")
    for field in ("vision_config", "audio_config"):
        if top.get(field):
            return err(field, "{...}", "multimodal models are not supported yet (image and audio tokens would "
                       "be scored and dropped like text, untested); serve the text model")
    quant = top.get("quantization_config") if isinstance(top.get("quantization_config"), Mapping) else {}
    algo = quant.get("kv_cache_quant_algo")
    if isinstance(algo, str) and algo.upper().startswith("FP8"):
        return err("quantization_config.kv_cache_quant_algo", algo, "the checkpoint asks for an FP8 KV cache, "
                   "which --kv-policy does not support yet; serve a checkpoint without KV-cache quantization")
    return None


def layer_error(layer: Any) -> str | None:
    """What a built attention layer (SGLang's ``RadixAttention``) does that the compressed rows
    do not, or None. Read by attribute: ``scaling``, ``qk_head_dim``, ``logit_cap``,
    ``sliding_window_size``, ``is_cross_attention``."""
    lid = getattr(layer, "layer_id", "?")
    head_dim = int(getattr(layer, "qk_head_dim", None) or getattr(layer, "head_dim"))
    want = head_dim ** -0.5
    scaling = float(getattr(layer, "scaling", want))
    if abs(scaling - want) > 1e-6 * want:
        return (f"--kv-policy does not support attention layer {lid}'s scaling {scaling:.6g}: the compressed rows "
                f"scale by head_dim**-0.5 = {want:.6g}")
    if (getattr(layer, "logit_cap", 0) or 0) > 0:
        return f"--kv-policy does not support attention layer {lid}'s logit soft-capping ({layer.logit_cap})"
    if (getattr(layer, "sliding_window_size", -1) or -1) > 0:
        return (f"--kv-policy does not support attention layer {lid}'s sliding window "
                f"({layer.sliding_window_size} tokens)")
    if getattr(layer, "is_cross_attention", False):
        return f"--kv-policy does not support attention layer {lid}: cross-attention"
    return None
