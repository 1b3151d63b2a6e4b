"""The interpreter-start layer: stand-in sgl_kernel and CPU defaults, tested in fresh interpreters."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest


def _cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(_cuda_driver(), reason="a CUDA driver is present: the layer is inert here by design")


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "HEADKV_SGLANG_CPU_AUTO")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_pth_installs_standin_and_cpu_engine():
    r = _py(
        "import os, sgl_kernel; print(sgl_kernel.HEADKV_STANDIN, os.environ['SGLANG_USE_CPU_ENGINE'], "
        "callable(sgl_kernel.copy_all_layer_kv_cache_cpu))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "1", "True"]


def test_standin_call_raises_clear_error():
    r = _py("import sgl_kernel; sgl_kernel.rmsnorm(1)")
    assert r.returncode != 0
    assert "no CUDA driver" in r.stderr and "sgl_kernel.rmsnorm" in r.stderr


def test_user_setting_of_cpu_engine_wins():
    r = _py("import os, sgl_kernel; print(os.environ['SGLANG_USE_CPU_ENGINE'])", SGLANG_USE_CPU_ENGINE="0")
    assert r.stdout.strip() == "0"


def test_without_layer_sglang_memory_pool_does_not_import():
    # The reason the layer exists: with it disabled, SGLang's CPU path cannot even import.
    code = "import sglang.srt.mem_cache.memory_pool"
    off = _py(code, HEADKV_SGLANG_COMPAT="0", SGLANG_USE_CPU_ENGINE="1")
    assert off.returncode != 0 and "libcuda.so.1" in off.stderr, off.stderr[-2000:]
    on = _py(code)
    assert on.returncode == 0, on.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, device, backend",
    [
        ([], "cpu", "torch_native"),
        (["--attention-backend", "triton"], "cpu", "triton"),
        (["--device", "cuda"], "cuda", "torch_native"),
    ],
)
def test_cpu_defaults_only_fill_unset_flags(argv, device, backend):
    code = (
        "import sys\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        "from headkv_sglang.plugin import _resolve_once\n"
        f"a = prepare_server_args(['--model-path', 'dummy', *{argv!r}])\n"
        "_resolve_once(a)\n"
        "print(a.device, a.attention_backend)\n"
    )
    r = _py(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == [device, backend]
