"""The SGLang coupling of the scheduler process: one module per job.

* :mod:`~headkv_sglang.serving.state` — ServingState, the one per-process object every hook gets;
* :mod:`~headkv_sglang.serving.pool_sizing` — the compressed pool's share of SGLang's KV memory;
* :mod:`~headkv_sglang.serving.admission` — window capture, page reservations, the prefix cap;
* :mod:`~headkv_sglang.serving.backend` — the attention backend wrapping SGLang's own;
* :mod:`~headkv_sglang.serving.lifecycle` — compress, release the prompt's slots, free pages;
* :mod:`~headkv_sglang.serving.metrics` — Prometheus gauges and the ``/server_info`` report.

``headkv_sglang.plugin`` lists the hook targets and binds these functions to the state.
Besides ``plugin.py``, ``_boot/`` and ``engine.py``, only this package imports SGLang.
"""
