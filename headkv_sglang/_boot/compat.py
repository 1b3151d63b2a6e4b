"""Interpreter-start compatibility layer for CUDA-less machines.

Loaded by ``headkv_sglang_boot.pth`` (installed into site-packages with the package) in
*every* Python process of the environment, because SGLang spawns its scheduler,
detokenizer and tokenizer processes and each of them imports SGLang afresh; a plugin
entry point would run too late for module-level imports.

What it does when no CUDA driver can be loaded (``libcuda.so.1``):

1. Makes ``import sgl_kernel`` succeed. The ``sglang-kernel`` wheel fails to import
   without ``libcuda.so.1``, and SGLang imports it at module level on the CPU path
   (``mem_cache/memory_pool.py`` and friends) without calling it. A stand-in module
   defines the imported names; calling any of them raises a clear RuntimeError.
2. Sets ``SGLANG_USE_CPU_ENGINE=1`` unless the user set it, so SGLang picks its CPU
   platform; the plugin then defaults ``--device cpu --attention-backend torch_native``
   unless those flags were given (an explicit user choice always wins).

When a CUDA driver loads, it does nothing at all. ``HEADKV_SGLANG_COMPAT=0`` disables it,
``=1`` forces it on (for testing the CPU path on a GPU machine).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

# Names SGLang 0.5.23 imports from sgl_kernel at module level on the CPU serving path.
_STANDIN_NAMES = (
    "copy_all_layer_kv_cache_cpu",
    "assign_req_to_token_pool_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
    "rmsnorm",
)

ACTIVE = False


def _cuda_driver_loadable() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _unavailable(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(
            f"sgl_kernel.{name} was called, but this machine has no CUDA driver; "
            "headkv_sglang installed a stand-in sgl_kernel module so that SGLang's CPU "
            "path can import. Use --device cpu --attention-backend torch_native, or "
            "run on a machine with CUDA."
        )

    fn.__name__ = name
    return fn


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = "headkv_sglang stand-in for sgl_kernel (no CUDA driver on this machine)"
        module.__version__ = "0.0.0+headkv_sglang_standin"
        module.HEADKV_STANDIN = True
        for name in _STANDIN_NAMES:
            setattr(module, name, _unavailable(name))


class _StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "sgl_kernel":
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin="headkv_sglang")
        return None


def install() -> None:
    global ACTIVE
    mode = os.environ.get("HEADKV_SGLANG_COMPAT", "auto")
    if mode == "0" or (mode != "1" and _cuda_driver_loadable()):
        return
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ["HEADKV_SGLANG_CPU_AUTO"] = "1"
    ACTIVE = True


try:
    install()
except Exception as e:  # a .pth hook must never break the interpreter
    print(f"headkv_sglang: compatibility layer not installed: {e!r}", file=sys.stderr)
