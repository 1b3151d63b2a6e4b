"""SGLang's CUDA serving path imports on the CPU with CUDA faked on and headkv_sglang's CUDA
``sgl_kernel`` stand-in (CPU, ~1 min, no server): what ``scripts/gpu_server_check.sh``
needs on the lent GPU machine, where SGLang's CUDA wheel cannot be carried.

In a subprocess: ``torch.cuda.is_available()`` (what ``sglang.srt.utils.is_cuda`` reads)
and the device queries are faked, the stand-in is first on ``PYTHONPATH``
(``compat.write_cuda_standin``), the CPU compatibility layer is off. Then every module the
server's CUDA path imports must import; the ``sgl_kernel`` names SGLang asked for must be
:data:`~headkv_sglang._boot.compat.CUDA_IMPORT_NAMES` (a new one is news: check it is not
called on the path the server takes); and with ``SGLANG_FORCE_FUSED_OP_BACKEND=torch``
RMSNorm, SiluAndMul and rotary run ``forward_native`` (without it they reach the stand-in
and raise). Nothing here runs a CUDA kernel: it never ran on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from headkv_sglang._boot import compat

ROOT = Path(__file__).resolve().parents[1]

# The server's CUDA path: launch_server's main process, the scheduler with its model runner,
# the Llama model, FlashInfer attention, the sampler; our plugin and kernels; bench_serving.
MODULES = [
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tp_worker",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner",
    "sglang.srt.model_loader.loader",
    "sglang.srt.models.llama",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.layers.sampler",
    "sglang.srt.layers.logits_processor",
    "sglang.srt.mem_cache.memory_pool",
    "sglang.bench_serving",
    "headkv_sglang.plugin",
    "headkv_sglang.serving.backend",
    "flashinfer_ext.ragged",
]

PROBE = r"""
import importlib, json, sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H100 80GB HBM3 (faked)"
out = {"failed": {}}
for m in json.loads(sys.argv[1]):
    try:
        importlib.import_module(m)
    except BaseException as e:
        out["failed"][m] = f"{type(e).__name__}: {e}"
import sgl_kernel
from sglang.srt.utils import is_cuda
out["is_cuda"] = is_cuda()
out["standin"] = bool(getattr(sgl_kernel, "HEADKV_STANDIN", False))
out["asked"] = sorted(sgl_kernel.ASKED)
# the fused ops, forced to torch, and then not
from sglang.kernels import fused_op
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.rotary_embedding import get_rope
torch.manual_seed(0)
x = torch.randn(5, 16)
rope = get_rope(8, rotary_dim=8, max_position=32, base=10000)
ops = {"RMSNorm": lambda: RMSNorm(16)(x), "SiluAndMul": lambda: SiluAndMul()(x),
       "rotary": lambda: rope(torch.arange(5), torch.randn(5, 16), torch.randn(5, 8))}
for forced in (True, False):
    key = "forced" if forced else "auto"
    out[key] = {}
    for name, call in ops.items():
        if not forced:
            fused_op.set_fused_op_backend(None)
        try:
            call()
            out[key][name] = "ran"
        except RuntimeError as e:
            out[key][name] = "stand-in called" if "sgl_kernel" in str(e) else f"RuntimeError: {e}"
print("PROBE " + json.dumps(out))
"""


def test_cuda_server_path_imports_with_the_standin(tmp_path):
    standin = compat.write_cuda_standin(tmp_path / "standin")
    env = {**os.environ, "HEADKV_SGLANG_COMPAT": "0", "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
           "PYTHONPATH": os.pathsep.join([standin, str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(MODULES)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert r.returncode == 0 and line, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    out = json.loads(line[-1][len("PROBE "):])
    assert out["is_cuda"] and out["standin"], out
    assert out["failed"] == {}, out["failed"]
    assert out["asked"] == sorted(compat.CUDA_IMPORT_NAMES), (
        f"SGLang now asks sgl_kernel for {sorted(set(out['asked']) - set(compat.CUDA_IMPORT_NAMES))} "
        f"(and no longer for {sorted(set(compat.CUDA_IMPORT_NAMES) - set(out['asked']))})")
    assert out["forced"] == {"RMSNorm": "ran", "SiluAndMul": "ran", "rotary": "ran"}, out["forced"]
    # without the switch the CUDA path calls sgl_kernel: the switch is what keeps it off
    assert "stand-in called" in out["auto"].values(), out["auto"]


def test_cuda_standin_names_raise_when_called(tmp_path):
    """Any name resolves (SGLang imports dozens); calling one says what happened."""
    standin = compat.write_cuda_standin(tmp_path / "s")
    code = ("import sgl_kernel, json\n"
            "from sgl_kernel import silu_and_mul\n"
            "from sgl_kernel.kvcacheio import transfer_kv_direct\n"
            "try:\n    silu_and_mul(1)\nexcept RuntimeError as e:\n    msg = str(e)\n"
            "try:\n    import sgl_kernel.scalar_type\n    absent = False\nexcept ModuleNotFoundError:\n"
            "    absent = True\n"
            "print(json.dumps([sorted(sgl_kernel.ASKED), msg, absent, sgl_kernel.HEADKV_STANDIN]))\n")
    env = {**os.environ, "HEADKV_SGLANG_COMPAT": "0",
           "PYTHONPATH": os.pathsep.join([standin, str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    asked, msg, absent, flag = json.loads(r.stdout.strip().splitlines()[-1])
    assert asked == ["kvcacheio.transfer_kv_direct", "silu_and_mul"], asked
    assert "sgl_kernel.silu_and_mul was called" in msg and absent and flag
