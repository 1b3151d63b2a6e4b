"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls :func:`register` in the launcher (before argument parsing) and first thing
in every scheduler / detokenizer process. Hooks are patched by dotted path with SGLang's
own ``HookRegistry``. SGLang logs and swallows plugin exceptions, so when ``--kv-policy``
was asked for, any failure to install raises SystemExit instead: the server must never
serve silently uncompressed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Any

from headkv_sglang.config import AGNOSTIC_SCORINGS, ENV_VAR, ConfigError, KVPolicyConfig, ModelShape, settings
from headkv_sglang.reconstruct import RECONSTRUCT_KEY
from headkv_sglang.unsupported import layer_error, model_error, server_args_error

logger = logging.getLogger("headkv_sglang")

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)
_SAMPLING_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
_VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
_POOL_CONF = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"
_PREFILL_RESULT = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_prefill"
)
_DECODE_RESULT = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_decode"
)
_FREE_ROWS = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows"
_ADMIT = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
_FLUSH = "sglang.srt.managers.scheduler.Scheduler.flush_cache"
_PREFIX_CAP = "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len"
_DECODE_GRAPH = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph"
_PREFILL_GRAPH = "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph"
_CPU_GRAPH = "sglang.srt.model_executor.cpu_graph_runner.CPUGraphRunner.can_run_graph"
# --kv-memory shared only
_KV_BUFFERS = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal"
_FULL_POOL_CHECK = "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_full_pool"
_PARALLEL_GROUP = "sglang.srt.distributed.parallel_state.init_model_parallel_group"
_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
#: --kv-memory shared's hooks (one allocation, the invariant check, admission on one budget)
SHARED_MEMORY_TARGETS = (_KV_BUFFERS, _FULL_POOL_CHECK, f"{_ADDER}.__init__", f"{_ADDER}.add_one_req")
SERVING_TARGETS = (
    f"{_POOL_CONF}.calculate_pool_sizes",
    f"{_POOL_CONF}.calculate_pool_sizes_from_max_tokens",
    _RUN_BATCH,
    _PREFILL_RESULT,
    _DECODE_RESULT,
    _FREE_ROWS,
    _ADMIT,
    _PREFIX_CAP,
    _DECODE_GRAPH,
    _PREFILL_GRAPH,
    _CPU_GRAPH,
)

def cli_flags() -> dict[str, tuple[str, dict[str, Any]]]:
    """flag -> (KVPolicyConfig setting, argparse kwargs), generated from the declarations
    (:func:`headkv_sglang.config.settings`: the server's, then every registered policy's)."""
    return {p.flag: (p.name, p.argparse_kwargs()) for p in settings()}


def __getattr__(name: str) -> Any:
    if name == "FLAGS":  # the flags of the policies registered now
        return cli_flags()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cpu_auto() -> bool:
    """True when the compatibility layer found no CUDA driver in this process tree."""
    return os.environ.get("HEADKV_SGLANG_CPU_AUTO") == "1"


def active_config() -> KVPolicyConfig | None:
    return KVPolicyConfig.from_env()


# ------------------------------------------------------------------------- launcher side
def _add_cli_args(result, parser: argparse.ArgumentParser, *args, **kwargs):
    group = parser.add_argument_group("headkv_sglang (head-level KV-cache compression)")
    for flag, (dest, kw) in cli_flags().items():
        group.add_argument(flag, dest=f"headkv_{dest}", **kw)
    return result


def config_from_namespace(ns: argparse.Namespace) -> KVPolicyConfig | None:
    """Resolve and validate the ``--kv-*`` flags (None when --kv-policy is not given)."""
    if getattr(ns, "headkv_policy", None) is None:
        return None
    values: dict[str, Any] = {}
    for p in settings():
        value = getattr(ns, f"headkv_{p.name}", p.default)  # a policy registered after the parser was built: default
        if value is None:  # a flag not given whose argparse default is None (--kv-pool-fraction): the field's
            continue
        values.update(p.parse(value, p.flag) if p.parse is not None else {p.name: value})
    cfg = KVPolicyConfig(**values).validate()
    cfg = cfg.with_memory_resolved(cpu=cpu_auto(), fraction_given="pool_fraction" in values)
    from headkv_sglang.policies.registry import resolve_profile

    shape = ModelShape.from_model_path(ns.model_path)
    resolve_profile(cfg, shape)  # a missing or mismatched profile fails here, before weights load
    return cfg


def pod_kernel_error(cfg: KVPolicyConfig, where: str) -> str | None:
    """Why ``cfg`` cannot be served here, or None: PoD's shared-distant rows have only the
    torch kernel, and a CUDA server runs FlashInfer's unless told otherwise."""
    if cfg.policy != "pod" or cpu_auto() or os.environ.get("HEADKV_SGLANG_RAGGED_KERNEL") == "torch":
        return None
    return (f"{where}: 'pod' has no FlashInfer kernel yet (its sharing rows read their layer group's "
            f"distant keys or scores and their own values-only pages); start the server with "
            f"HEADKV_SGLANG_RAGGED_KERNEL=torch to serve it with the torch kernel on this device")


def _from_cli_args(cls, ns, *args, **kwargs):
    """BEFORE ServerArgs.from_cli_args: validate our flags and publish them to subprocesses."""
    try:
        cfg = config_from_namespace(ns)
        err = None if cfg is None else pod_kernel_error(cfg, "--kv-policy")
        if err:
            raise ConfigError(err)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if cfg is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = cfg.to_json()
        logger.info("headkv_sglang: %s", cfg)
    return None


def _resolve_once(server_args, *args, **kwargs):
    """BEFORE ServerArgs.resolve_once: CPU defaults, and what --kv-policy requires."""
    if getattr(server_args, "_resolution_finished", False):  # called again by the Engine: sealed
        return None
    if cpu_auto():
        if getattr(server_args, "device", None) is None:
            server_args.device = "cpu"
        if getattr(server_args, "attention_backend", None) is None:
            server_args.attention_backend = "torch_native"
        # This CPU has no fast fp16/bf16 matmul: float32 prefill measured ~3x faster
        # (benchmarks/results/cpu_dtype.md); an explicit --dtype other than auto wins.
        if getattr(server_args, "dtype", None) == "auto":
            server_args.dtype = "float32"
    if active_config() is not None:
        from headkv_sglang.serving.backend import SUPPORTED_BACKENDS

        backend = getattr(server_args, "attention_backend", None)
        if backend is None:  # SGLang's own choice on CUDA can be fa3; the wrapper wraps flashinfer there
            backend = "torch_native" if getattr(server_args, "device", None) == "cpu" or cpu_auto() else "flashinfer"
        if backend not in SUPPORTED_BACKENDS:
            print(f"error: --kv-policy works with --attention-backend {' or '.join(SUPPORTED_BACKENDS)} "
                  f"(got {backend!r}); leave it unset for flashinfer on CUDA, torch_native on CPU", file=sys.stderr)
            raise SystemExit(2)
        server_args.attention_backend = backend
        for flag in ("decode_attention_backend", "prefill_attention_backend"):
            if getattr(server_args, flag, None) not in (None, backend):
                print(f"error: --kv-policy needs --{flag.replace('_', '-')} unset or equal to --attention-backend "
                      f"({backend})", file=sys.stderr)
                raise SystemExit(2)
        err = server_args_error(server_args) or _model_error(getattr(server_args, "model_path", None))
        tp = int(getattr(server_args, "tp_size", None) or 1)
        if err is None and tp > 1 and active_config().share:
            err = f"--kv-share does not work with --tp-size {tp} yet ({SHARE_TP_WHY}); leave it off"
        if err is None and tp > 1 and active_config().scoring in AGNOSTIC_SCORINGS:
            err = (f"--kv-scoring {active_config().scoring} does not work with --tp-size {tp} yet "
                   f"({AGNOSTIC_TP_WHY}); use question or window")
        if err is None and tp > 1 and _d2o_request_layers(active_config()):
            err = f"--kv-d2o-layers request does not work with --tp-size {tp} yet ({D2O_TP_WHY}); use profile or uniform"
        if err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2)
        os.environ[TP_ENV_VAR] = str(tp)  # for the request check (this process) and the schedulers
    return None


#: The launcher's --tp-size, published by _resolve_once for the per-request checks.
TP_ENV_VAR = "HEADKV_SGLANG_TP_SIZE"
SHARE_TP_WHY = "each rank evicts its shared prompts on its own, so ranks could disagree on what is shared"
AGNOSTIC_TP_WHY = "a rank would rank its own KV heads by masses the other ranks never see"
D2O_TP_WHY = "each rank would measure the layers' attention density on its own KV heads and give layers different budgets"


def _d2o_request_layers(cfg: KVPolicyConfig) -> bool:
    return cfg.policy == "d2o" and cfg.d2o_layers == "request"


def request_error(cfg: KVPolicyConfig, params: dict, max_new_tokens: int | None = None) -> str | None:
    """Why this server cannot honour a request's valid ``kv_*`` settings (``cfg``: the server's
    config with them applied; ``max_new_tokens``: the request's), naming the key; None when it can."""
    err = pod_kernel_error(cfg, "custom_params.kv_policy")
    if err:
        return err
    tp = int(os.environ.get(TP_ENV_VAR) or 1)
    if params.get("kv_share") is True and tp > 1:
        return (f"custom_params.kv_share: invalid value True; this server runs --tp-size {tp}, where prompts are "
                f"not shared yet ({SHARE_TP_WHY}); send false or leave it out")
    if tp > 1 and params.get("kv_scoring") in AGNOSTIC_SCORINGS:
        return (f"custom_params.kv_scoring: invalid value {params['kv_scoring']!r}; this server runs --tp-size "
                f"{tp}, where {AGNOSTIC_TP_WHY}; send question or window")
    if params.get("kv_scoring") == "reconstruct" and not cfg.share:
        return ("custom_params.kv_scoring: invalid value 'reconstruct'; it scores a document shared before its "
                "questions (send kv_share true: the document with max_new_tokens 0, then the questions); "
                "send self, question or window")
    if tp > 1 and _d2o_request_layers(cfg):
        return (f"custom_params.kv_d2o_layers: invalid value 'request'; this server runs --tp-size {tp}, where "
                f"{D2O_TP_WHY}; send profile or uniform")
    return None


def _model_error(model_path) -> str | None:
    """:func:`~headkv_sglang.unsupported.model_error` of the served model's config.json (None
    when it cannot be read here: a hub id; the scheduler checks the built layers then)."""
    if not model_path:
        return None
    try:
        hf_config = ModelShape.from_model_path(model_path).hf_config
    except (ConfigError, KeyError, ValueError):
        return None
    return model_error(hf_config)


def _check_resolved(result, server_args, *args, **kwargs):
    """AFTER ServerArgs.resolve_once: SGLang's resolution may have changed a default (the page
    size of some backends, the KV cache dtype of some checkpoints): check again."""
    if active_config() is not None:
        from sglang.srt.arg_groups.overrides import resolution_result

        err = server_args_error(server_args, lambda a, name: resolution_result(a, name))
        if err:
            print(f"error: {err} (set by SGLang's resolution of the other flags)", file=sys.stderr)
            raise SystemExit(2)
    return result


def _verify_sampling_params(result, sampling_params, *args, **kwargs):
    """AFTER SamplingParams.verify: per-request kv_* overrides (ValueError -> HTTP 400)."""
    params = getattr(sampling_params, "custom_params", None)
    if not params:
        return result
    cfg = active_config()
    if not isinstance(params, dict):
        # /generate passes custom_params through unchecked (the OpenAI endpoints require an
        # object); the scheduler would otherwise meet it and fall back to server defaults.
        if cfg is not None:
            cfg.with_request(params)  # raises: custom_params must be a JSON object
        return result
    if not any(str(k).startswith("kv_") for k in params):
        return result
    if cfg is None:
        raise ValueError("custom_params kv_*: this server was started without --kv-policy")
    # with_request raises ConfigError if invalid
    err = request_error(cfg.with_request(params), params, getattr(sampling_params, "max_new_tokens", None))
    if err:
        raise ConfigError(err)
    return result


EMPTY_PROMPT_ERROR = "The input is empty (0 tokens); a prompt needs at least one token."


def _reject_empty_prompt(manager, obj, input_ids=None, *args, **kwargs):
    """BEFORE TokenizerManager._validate_one_request: an empty prompt is a 400, not a crash.

    SGLang 0.5.23 rejects ``"input_ids": []`` but not a text that tokenizes to nothing
    (``"text": ""`` or a completions ``"prompt": ""`` with a tokenizer that adds no BOS):
    the scheduler then runs a 0-token prefill, fails in the rotary embedding and the
    whole server exits, with or without --kv-policy. Session continuations (whose history
    supplies the prompt) and embedding / multimodal inputs are left to SGLang.
    """
    if input_ids is None or len(input_ids) != 0:
        return None
    if type(obj).__name__ != "GenerateReqInput" or getattr(obj, "input_embeds", None) is not None:
        return None
    if getattr(obj, "session_params", None) or getattr(obj, "session_id", None):
        return None
    if any(getattr(obj, f, None) for f in ("image_data", "video_data", "audio_data")):
        return None
    raise ValueError(EMPTY_PROMPT_ERROR)


def _reconstruct_document(manager, obj, input_ids=None, *args, **kwargs):
    """BEFORE TokenizerManager._validate_one_request: a document scored by reconstruction
    (``kv_scoring`` "reconstruct", or "auto" for a ``kv_share`` document with
    ``max_new_tokens`` 0) gets its reconstruction pass: the prompt is extended in place with
    the repeat instruction, the template's turn change and the document again, and marked
    (``headkv_sglang.reconstruct``). A document too long for that is scored by its own
    queries instead ("self"), or refused if the request asked for "reconstruct"."""
    cfg = active_config()
    if cfg is None or input_ids is None or type(obj).__name__ != "GenerateReqInput":
        return None
    sp = obj.sampling_params if isinstance(obj.sampling_params, dict) else None
    params = (sp or {}).get("custom_params")
    params = params if isinstance(params, dict) else {}
    if sp is None or sp.get("max_new_tokens") != 0 or RECONSTRUCT_KEY in params:
        return None
    try:
        rcfg = cfg.with_request(params)
    except ConfigError:
        return None  # SamplingParams.verify reports it
    if not rcfg.share or rcfg.resolve_scoring(True).scoring != "reconstruct":
        return None
    from headkv_sglang.policies.registry import policy_class
    from headkv_sglang.reconstruct import REPEAT_PROMPT, make_mark, reconstruction_ids

    pc = policy_class(rcfg.policy)
    if not (pc.compresses and pc.needs_queries) or len(input_ids) < max(rcfg.min_prompt, 1):
        return None
    finder = getattr(manager, "_headkv_finder", None)
    if finder is None:
        from headkv_sglang.question import QuestionFinder

        try:
            finder = QuestionFinder.from_tokenizer(manager.tokenizer)
            finder = (finder, tuple(manager.tokenizer.encode(REPEAT_PROMPT, add_special_tokens=False)))
        except Exception as e:  # no chat template: the copy follows the instruction directly
            logger.warning("headkv_sglang: reconstruction without the chat template's markers (%s)", e)
            finder = (QuestionFinder(), tuple(manager.tokenizer.encode(REPEAT_PROMPT)))
        manager._headkv_finder = finder
    markers, repeat = finder
    extended, copy_start = reconstruction_ids(input_ids, repeat, markers.tail, markers.header)
    limit = int(getattr(manager, "context_len", 0) or 0) - int(getattr(manager, "num_reserved_tokens", 0) or 0)
    if limit and len(extended) >= limit:
        if params.get("kv_scoring") == "reconstruct":
            raise ValueError(f"custom_params.kv_scoring: invalid value 'reconstruct'; the document ({len(input_ids)} "
                             f"tokens) and its reconstruction pass ({len(extended)} tokens in all) exceed the "
                             f"model's context length ({limit} tokens); send self")
        return None  # "auto": scored by its own queries (no mark: the scheduler resolves "self")
    # in place: a batch's items may share this dict (the mark then matches its own item only)
    sp["custom_params"] = {**params, RECONSTRUCT_KEY: make_mark(input_ids, extended, copy_start)}
    input_ids[len(input_ids):] = extended[len(input_ids):]
    return None


# ------------------------------------------------------------------------- scheduler side
def _no_pynccl_on_gloo(group_ranks, local_rank, backend, *args, **kwargs):
    """BEFORE parallel_state.init_model_parallel_group: no PyNccl communicator for a gloo group.

    SGLang 0.5.23 asks for PyNccl in every group of an in-tree platform, the CPU one
    included (``init_model_parallel_group``: ``use_pynccl = not (_is_npu or _is_xpu or
    backend == "mooncake")``), and ``PyNcclCommunicator`` then fails on the CPU device
    (``torch.cuda.device(cpu)``: "Expected a cuda device"), so ``--tp 2`` and more never
    start on a CPU. A gloo group (the CPU's backend) has nothing for NCCL to do.
    """
    if backend == "gloo" and kwargs.get("use_pynccl") is None:
        kwargs["use_pynccl"] = False
        return (group_ranks, local_rank, backend, *args), kwargs
    return None


# Largest batch run since the last /server_info read (reset by that read), so a poller
# sees the true peak of concurrently running requests however short the requests are.
_PEAK = {"running": 0}


def _track_batch(scheduler, batch, *args, **kwargs):
    """BEFORE Scheduler.run_batch (with or without --kv-policy): the batch-size high-water mark."""
    if batch is not None:
        running = len(batch.reqs)
        if batch.forward_mode.is_extend() and scheduler.running_batch is not None:
            running += len(scheduler.running_batch.reqs)
        _PEAK["running"] = max(_PEAK["running"], running)
    return None


def plugin_state(serving=None, scheduler=None) -> dict[str, Any]:
    """What this process reports under ``internal_states[i]["headkv_sglang"]`` of /server_info.

    ``serving``: the process's ServingState when --kv-policy is active.
    """
    from headkv_sglang import __version__

    state: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cpu_auto": cpu_auto(),
    }
    if serving is not None:
        from headkv_sglang.serving.metrics import report

        state.update(report(serving))
    if scheduler is not None:
        # SGLang's own token-pool accounting, so callers can see memory coming back.
        tree = scheduler.tree_cache
        state["token_pool"] = {
            "total": int(scheduler.max_total_num_tokens),
            "available": int(scheduler.token_to_kv_pool_allocator.available_size()),
            "evictable": int(tree.evictable_size()),
            "protected": int(tree.protected_size()),
            # --kv-memory shared: slots SGLang's allocator lent to compressed pages (counted as
            # used above; 0 with the split pool)
            "lent_to_pages": _lent_to_pages(serving),
            "running_requests": len(scheduler.running_batch.reqs) if scheduler.running_batch else 0,
            "peak_running_requests_since_last_read": _PEAK["running"],
        }
        _PEAK["running"] = 0
    return state


def _lent_to_pages(serving) -> int:
    m = getattr(serving, "manager", None)
    return int(getattr(m.allocator, "borrowed_slots", 0)) if m is not None else 0


def _add_internal_state(serving, result, *args, **kwargs):
    """AFTER the scheduler's get_internal_state: proves (and shows) the plugin runs there."""
    controller = args[0] if args else None
    result.internal_state["headkv_sglang"] = plugin_state(serving, getattr(controller, "scheduler", None))
    return result


def _built_model_error(model_runner) -> str | None:
    """The start-up checks once more on what was built (a model whose config.json did not
    say): every attention layer's scaling, soft-capping and window, and the KV cache dtype."""
    dtype = str(getattr(model_runner, "kv_cache_dtype", ""))
    if "float8" in dtype or "float4" in dtype:
        return f"--kv-policy does not support a {dtype} KV cache yet (compressed pages are kept in the model's dtype)"
    model = getattr(model_runner, "model", None)
    for module in (model.modules() if model is not None else ()):
        if type(module).__name__ == "RadixAttention":
            err = layer_error(module)
            if err:
                return err
    return None


def _register_serving(cfg: KVPolicyConfig):
    """Install the serving layer's hooks, each bound to one per-process ServingState."""
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from headkv_sglang.serving import admission, backend, lifecycle, pool_sizing
    from headkv_sglang.serving.state import ServingState

    state = ServingState(cfg)

    def hook(target: str, fn, kind: HookType) -> None:
        HookRegistry.register(target, functools.partial(fn, state), kind)

    hook(f"{_POOL_CONF}.calculate_pool_sizes", pool_sizing.scale_pool_sizes, HookType.AFTER)
    hook(f"{_POOL_CONF}.calculate_pool_sizes_from_max_tokens", pool_sizing.scale_pool_sizes, HookType.AFTER)
    hook(_RUN_BATCH, admission.before_run_batch, HookType.BEFORE)
    hook(_ADMIT, admission.before_get_new_batch_prefill, HookType.BEFORE)
    if cfg.memory == "shared":  # registered later, runs earlier: the chunks every rank emptied go
        from headkv_sglang.serving import one_memory  # back before admission counts (--tp)

        hook(_ADMIT, one_memory.settle, HookType.BEFORE)
    hook(_ADMIT, admission.after_get_new_batch_prefill, HookType.AFTER)
    hook(_PREFIX_CAP, admission.cap_prefix_len, HookType.AFTER)
    hook(_PREFILL_RESULT, lifecycle.before_prefill, HookType.BEFORE)
    hook(_PREFILL_RESULT, lifecycle.after_prefill, HookType.AFTER)
    hook(_DECODE_RESULT, lifecycle.before_decode, HookType.BEFORE)
    hook(_FREE_ROWS, lifecycle.before_free_rows, HookType.BEFORE)
    hook(_FLUSH, lifecycle.after_flush_cache, HookType.AFTER)
    for target in (_DECODE_GRAPH, _PREFILL_GRAPH, _CPU_GRAPH):
        hook(target, backend.graph_allowed, HookType.AFTER)
    if cfg.memory == "shared":
        from headkv_sglang.serving import one_memory

        hook(_KV_BUFFERS, one_memory.one_allocation, HookType.AFTER)
        hook(_FULL_POOL_CHECK, one_memory.count_borrowed, HookType.AROUND)
        hook(f"{_ADDER}.__init__", one_memory.promise_page_slots, HookType.AFTER)
        hook(f"{_ADDER}.add_one_req", one_memory.add_with_page_slots, HookType.AROUND)

    for name in backend.SUPPORTED_BACKENDS:
        factory = backend.backend_factory(state, name, attention_registry.ATTENTION_BACKENDS[name])

        def create(model_runner, factory=factory):
            targets = SERVING_TARGETS + (SHARED_MEMORY_TARGETS if cfg.memory == "shared" else ())
            missing = [t for t in targets if t not in HookRegistry._patched]
            if missing:
                raise SystemExit(f"headkv_sglang: --kv-policy given but hooks failed to install: {missing}")
            err = _built_model_error(model_runner)
            if err:
                raise SystemExit(f"headkv_sglang: {err}")
            state.shape = ModelShape.from_model_path(model_runner.model_config.model_path)
            return factory(model_runner)

        attention_registry.ATTENTION_BACKENDS[name] = create
    return state


def register() -> None:
    cfg = None
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", _add_cli_args, HookType.AFTER)
        HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", _from_cli_args, HookType.BEFORE)
        HookRegistry.register(f"{_SERVER_ARGS}.resolve_once", _resolve_once, HookType.BEFORE)
        HookRegistry.register(f"{_SERVER_ARGS}.resolve_once", _check_resolved, HookType.AFTER)
        HookRegistry.register(_SAMPLING_VERIFY, _verify_sampling_params, HookType.AFTER)
        HookRegistry.register(_VALIDATE_REQUEST, _reject_empty_prompt, HookType.BEFORE)
        HookRegistry.register(_VALIDATE_REQUEST, _reconstruct_document, HookType.BEFORE)
        HookRegistry.register(_RUN_BATCH, _track_batch, HookType.BEFORE)
        HookRegistry.register(_PARALLEL_GROUP, _no_pynccl_on_gloo, HookType.BEFORE)
        cfg = active_config()
        serving = _register_serving(cfg) if cfg is not None else None
        HookRegistry.register(_INTERNAL_STATE, functools.partial(_add_internal_state, serving), HookType.AFTER)
    except SystemExit:
        raise
    except Exception as e:
        if cfg is not None or "--kv-policy" in sys.argv or os.environ.get(ENV_VAR):
            raise SystemExit(f"headkv_sglang: --kv-policy was given but the plugin failed to install: {e!r}")
        raise
    logger.info("headkv_sglang plugin registered in pid %d (cpu_auto=%s, kv_policy=%s)",
                os.getpid(), cpu_auto(), cfg.policy if cfg else None)
