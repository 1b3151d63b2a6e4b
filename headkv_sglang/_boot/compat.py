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

The CUDA stand-in (:func:`write_cuda_standin`) is the other case: a GPU machine without
SGLang's CUDA wheel (``sgl_kernel``, 1.2 GB, cannot be carried to the lent GPU machine).
``scripts/gpu_server_check.sh`` writes a one-file ``sgl_kernel`` package that fills itself
from :func:`populate_cuda_standin` and puts it first on ``PYTHONPATH`` (so every SGLang
process gets it); SGLang then runs its CUDA path with ``SGLANG_FORCE_FUSED_OP_BACKEND=torch``
(RMSNorm, SiluAndMul, rotary: ``forward_native``) and ``--sampling-backend pytorch``, and
never calls the stand-in. Any name resolves (a call raises); the names SGLang asked for are
kept in ``sgl_kernel.ASKED`` (``tests/test_cuda_imports.py`` holds them to
:data:`CUDA_IMPORT_NAMES`).
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

# Names SGLang 0.5.23 takes from sgl_kernel while importing its CUDA serving path
# (launch_server, scheduler, model_runner, Llama, FlashInfer backend, sampler), found on
# CPU with CUDA faked on (tests/test_cuda_imports.py). Submodules: "module.name".
CUDA_IMPORT_NAMES = (
    "fused_add_rmsnorm", "gelu_and_mul", "gelu_tanh_and_mul", "gemma_fused_add_rmsnorm", "gemma_rmsnorm",
    "int8_scaled_mm", "moe_sum", "moe_sum_reduce", "rmsnorm", "silu_and_mul", "top_k_renorm_prob",
    "top_p_renorm_prob",
    *(f"kvcacheio.transfer_kv_{n}" for n in (
        "all_layer", "all_layer_direct_lf_pf", "all_layer_lf_pf", "all_layer_lf_ph", "all_layer_mla",
        "all_layer_mla_lf_pf", "direct", "per_layer", "per_layer_direct_pf_lf", "per_layer_mla",
        "per_layer_mla_pf_lf", "per_layer_pf_lf", "per_layer_ph_lf")),
    *(f"quantization.ggml_{n}" for n in ("dequantize", "moe_a8", "mul_mat_a8", "mul_mat_vec_a8")),
)
# Submodules the CUDA stand-in reports absent, so SGLang takes its own fallback
# (quantization/utils.py builds scalar_types itself when sgl_kernel.scalar_type is missing).
_CUDA_ABSENT = ("sgl_kernel.scalar_type",)

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


class _CudaStandIn(types.ModuleType):
    """A stand-in ``sgl_kernel`` module (or submodule) on the CUDA path: every public name
    resolves to a function that raises when called; the names asked are recorded."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        root = sys.modules.get("sgl_kernel")
        qual = self.__name__.partition(".")[2]
        getattr(root, "ASKED", set()).add(f"{qual}.{name}" if qual else name)
        fn = _unavailable(f"{qual}.{name}" if qual else name)
        setattr(self, name, fn)
        return fn


class _CudaSubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in _CUDA_ABSENT:
            raise ModuleNotFoundError(f"No module named {fullname!r} (headkv_sglang's sgl_kernel stand-in)",
                                      name=fullname)
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _CudaStandIn(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module) -> None:
        pass


def populate_cuda_standin(module: types.ModuleType) -> None:
    """Make ``module`` (the ``sgl_kernel`` being imported) the CUDA stand-in."""
    module.__class__ = _CudaStandIn
    module.__doc__ = "headkv_sglang stand-in for sgl_kernel on CUDA: fused ops run as torch; nothing here is called"
    module.__version__ = "0.0.0+headkv_sglang_standin"
    module.HEADKV_STANDIN = True
    module.ASKED = set()
    if not any(isinstance(f, _CudaSubmoduleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CudaSubmoduleFinder())


def write_cuda_standin(directory: str | os.PathLike) -> str:
    """Write ``directory/sgl_kernel/__init__.py`` (the CUDA stand-in, filled by
    :func:`populate_cuda_standin`); put ``directory`` first on ``PYTHONPATH``. Returns it."""
    pkg = os.path.join(os.fspath(directory), "sgl_kernel")
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("# written by headkv_sglang._boot.compat.write_cuda_standin\n"
                "import sys\n"
                "from headkv_sglang._boot.compat import populate_cuda_standin\n"
                "populate_cuda_standin(sys.modules[__name__])\n")
    return os.fspath(directory)


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
