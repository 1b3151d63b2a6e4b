"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls :func:`register` in the launcher (before argument parsing) and first thing
in every scheduler / detokenizer process. Hooks are patched by dotted path with SGLang's
own ``HookRegistry``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("headkv_sglang")

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)


def cpu_auto() -> bool:
    """True when the compatibility layer found no CUDA driver in this process tree."""
    return os.environ.get("HEADKV_SGLANG_CPU_AUTO") == "1"


def _default_cpu_flags(server_args, *args, **kwargs):
    """BEFORE ServerArgs.resolve_once: pick the CPU device and torch_native attention.

    Only fields the user left unset (None) are filled in, so an explicit flag wins.
    Runs on both the HTTP launcher and the offline Engine path.
    """
    if cpu_auto():
        if getattr(server_args, "device", None) is None:
            server_args.device = "cpu"
        if getattr(server_args, "attention_backend", None) is None:
            server_args.attention_backend = "torch_native"
    return None


def plugin_state() -> dict[str, Any]:
    """What this process reports under ``internal_states[i]["headkv_sglang"]`` of /server_info."""
    from headkv_sglang import __version__

    return {
        "version": __version__,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cpu_auto": cpu_auto(),
    }


def _add_internal_state(result, *args, **kwargs):
    """AFTER the scheduler's get_internal_state: proves (and shows) the plugin runs there."""
    result.internal_state["headkv_sglang"] = plugin_state()
    return result


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{_SERVER_ARGS}.resolve_once", _default_cpu_flags, HookType.BEFORE)
    HookRegistry.register(_INTERNAL_STATE, _add_internal_state, HookType.AFTER)
    logger.info("headkv_sglang plugin registered in pid %d (cpu_auto=%s)", os.getpid(), cpu_auto())
