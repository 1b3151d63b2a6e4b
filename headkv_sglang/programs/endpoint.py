"""An SGLang frontend backend that sends KV-compression settings with every request.

SGLang's frontend turns ``gen(...)`` into ``SglSamplingParams``, which has no
``custom_params`` field, so a plain ``RuntimeEndpoint`` cannot ask a ``--kv-policy``
server for a per-request policy or budget. :class:`KVEndpoint` adds them::

    import sglang as sgl
    from headkv_sglang.programs.endpoint import KVEndpoint

    ep = KVEndpoint("http://127.0.0.1:30000", kv_policy="headkv", kv_budget=128)
    sgl.set_default_backend(ep)
    state = my_program.run(doc=..., question=...)          # headkv, 128 tokens/head
    state = my_program.run(..., backend=ep.using(kv_budget=64))  # override per call

Plain ``sgl.function`` programs run on it unchanged. A program may also take a
``kv_params`` argument (a dict of ``kv_*`` keys): those win over the endpoint's for that
run. Settings are checked by the server: a bad value fails the call with the server's
HTTP 400 message.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path
from typing import Any

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

# The per-request keys a --kv-policy server accepts (headkv_sglang.config.REQUEST_KEYS).
from headkv_sglang.config import REQUEST_KEYS

DEFAULT_URL = "http://127.0.0.1:30000"


def _check_keys(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown KV setting(s) {unknown}; allowed: {sorted(REQUEST_KEYS)}")
    return {k: v for k, v in params.items() if v is not None}


def _chat_template_for(model_path: str) -> str | None:
    """SGLang matches chat templates by model name; a local path often matches none.

    Fall back to the tokenizer's own template: ChatML models (SmolLM2, Qwen) get ``chatml``.
    """
    d = Path(model_path)
    tmpl = ""
    try:  # transformers >= 4.43 saves the template in its own file
        tmpl = (d / "chat_template.jinja").read_text()
    except OSError:
        try:
            tmpl = str(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template") or "")
        except (OSError, ValueError):
            return None
    return "chatml" if "<|im_start|>" in tmpl else None


class KVEndpoint(RuntimeEndpoint):
    """``RuntimeEndpoint`` + ``custom_params`` (``kv_policy``, ``kv_budget``, ...) on every request."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 chat_template_name: str | None = None, **kv_params: Any) -> None:
        self.kv_params = _check_keys(kv_params)
        super().__init__(base_url.rstrip("/"), api_key=api_key, chat_template_name=chat_template_name)
        if chat_template_name is None and self.chat_template.name == "default":
            name = _chat_template_for(self.model_info.get("model_path", ""))
            if name:
                from sglang.lang.chat_template import get_chat_template

                self.chat_template = get_chat_template(name)

    def using(self, **kv_params: Any) -> "KVEndpoint":
        """A copy of this endpoint (no new connection) with some settings overridden."""
        other = copy.copy(self)
        other.kv_params = {**self.kv_params, **_check_keys(kv_params)}
        return other

    # -- the two calls that carry sampling parameters --------------------------------
    def _with_custom_params(self, s, sampling_params):
        params = dict(self.kv_params)
        per_run = (getattr(s, "arguments", None) or {}).get("kv_params")
        if per_run:
            params.update(_check_keys(dict(per_run)))
        if not params:
            return sampling_params
        sp = copy.copy(sampling_params)
        base = sampling_params.to_srt_kwargs
        sp.to_srt_kwargs = lambda: {**base(), "custom_params": dict(params)}
        return sp

    def generate(self, s, sampling_params):
        return super().generate(s, self._with_custom_params(s, sampling_params))

    def generate_stream(self, s, sampling_params):
        return super().generate_stream(s, self._with_custom_params(s, sampling_params))

    # -- what the server reports ------------------------------------------------------
    def server_state(self) -> dict:
        return server_state(self.base_url)

    def kv_report(self, rids: list[str]) -> dict[str, dict | None]:
        """Per request id: what compression kept (policy, budget, held/full bytes), or None."""
        return kv_report(self.base_url, rids)


def server_state(base_url: str) -> dict:
    """The ``headkv_sglang`` part of ``/server_info`` (empty when the plugin is absent)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/server_info", timeout=60) as r:
        info = json.loads(r.read())
    states = info.get("internal_states") or [{}]
    return states[0].get("headkv_sglang", {}) or {}


def kv_report(base_url: str, rids: list[str]) -> dict[str, dict | None]:
    return report_from_state(server_state(base_url), rids)


def report_from_state(state: dict, rids: list[str]) -> dict[str, dict | None]:
    """Per request id, the server's record of its compression (None: not compressed or too old)."""
    recent = state.get("recent_requests", {})
    return {rid: recent.get(str(rid)) for rid in rids}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class EngineBackend:
    """The frontend on an in-process ``sglang.Engine`` (see ``headkv_sglang.engine.kv_engine``).

    Same surface as :class:`KVEndpoint` (``generate``, ``using``, ``kv_report``,
    ``model_info``), so programs and the batch job run unchanged. The Engine's event loop
    runs in a background thread, so several program threads can have requests in flight
    at once and SGLang batches them.
    """

    def __init__(self, engine, *, chat_template_name: str | None = None, **kv_params: Any) -> None:
        import asyncio
        import threading

        from sglang.lang.backend.base_backend import BaseBackend
        from sglang.lang.chat_template import get_chat_template, get_chat_template_by_model_path

        BaseBackend.__init__(self)  # type: ignore[arg-type]
        self.engine = engine
        self.kv_params = _check_keys(dict(kv_params))
        model_path = str(engine.tokenizer_manager.server_args.model_path)
        self.model_info = {"model_path": model_path}
        name = chat_template_name or (None if get_chat_template_by_model_path(model_path).name != "default"
                                      else _chat_template_for(model_path))
        self.chat_template = get_chat_template(name) if name else get_chat_template_by_model_path(model_path)
        self.support_concate_and_append = False
        self._loop: asyncio.AbstractEventLoop = engine.loop
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def _call(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def using(self, **kv_params: Any) -> "EngineBackend":
        other = copy.copy(self)
        other.kv_params = {**self.kv_params, **_check_keys(kv_params)}
        return other

    def get_model_name(self):
        return self.model_info["model_path"]

    def get_chat_template(self):
        return self.chat_template

    # BaseBackend no-ops the frontend calls around a program
    def begin_program(self, s):
        pass

    def end_program(self, s):
        pass

    def commit_lazy_operations(self, s):
        self._call(self.engine.async_generate(s.text_, {"max_new_tokens": 0}))

    def fork_program(self, src, dst_rids, position_ids_offset=None):
        pass

    def fill_image(self, s):
        pass

    def generate(self, s, sampling_params):
        params = {k: v for k, v in sampling_params.to_srt_kwargs().items() if v is not None}
        kv = dict(self.kv_params)
        per_run = (getattr(s, "arguments", None) or {}).get("kv_params")
        if per_run:
            kv.update(_check_keys(dict(per_run)))
        if kv:
            params["custom_params"] = kv
        out = self._call(self.engine.async_generate(s.text_, params))
        return out["text"], out["meta_info"]

    def generate_stream(self, s, sampling_params):
        text, meta = self.generate(s, sampling_params)
        yield text, meta

    def server_state(self) -> dict:
        states = self._call(self.engine.tokenizer_manager.get_internal_state())
        return (states[0] if states else {}).get("headkv_sglang", {}) or {}

    def kv_report(self, rids: list[str]) -> dict[str, dict | None]:
        return report_from_state(self.server_state(), rids)

    def shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.engine.shutdown()


def budget_arg(text: str) -> int | str:
    """argparse type of ``--kv-budget``: tokens per KV head (``128``) or a share of each prompt
    (``5%``), sent as ``kv_budget`` as is (the server resolves a share per request)."""
    import argparse

    from headkv_sglang.config import ConfigError, parse_budget

    value: int | str = int(text) if text.strip().isdigit() else text.strip()
    try:
        parse_budget(value, "--kv-budget")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return value
