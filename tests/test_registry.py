"""The policy registry and the facts each policy class carries (CPU, fast).

Adding a policy is one class and one ``register`` call; every registered policy's
admission bound covers what compression actually allocates.
"""

from __future__ import annotations

import dataclasses
import math
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from headkv_sglang.config import POLICY_CHOICES, POOLING_CHOICES, ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager, NotSmallerError
from headkv_sglang.policies import (
    POLICIES,
    AdaKV,
    HeadKV,
    KVPolicy,
    PyramidKV,
    RazorAttention,
    SnapKV,
    StreamingLLM,
    compress_layer,
    defaults,
)
from headkv_sglang.policies.registry import (
    build_policy,
    pages_upper_bound,
    policy_class,
    register,
    registered,
    resolve_profile,
    unregister,
)

SHAPE = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=8)  # GQA group 3
SHAPE_G1 = ModelShape(num_layers=2, num_q_heads=2, num_kv_heads=2, head_dim=16)  # group 1


@dataclass(frozen=True, kw_only=True)
class KeepLast(KVPolicy):
    """Toy policy: every head keeps its last ``B`` prompt tokens, by position alone."""

    name: ClassVar[str] = "keeplast"
    needs_queries: ClassVar[bool] = False

    window_size: int = 1

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> KeepLast:
        return cls()

    def plan_budgets(self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_layers, num_kv_heads), min(budget, seq_len), dtype=torch.int64)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int) -> torch.Tensor:
        pos = torch.arange(k.shape[1], dtype=torch.float32, device=k.device)
        return pos.expand(k.shape[0], -1).contiguous()


def random_kv(shape: ModelShape, T: int, seed: int) -> tuple[list[torch.Tensor], ...]:
    """Per layer q ``[T, Hq, D]`` and k, v ``[T, H, D]`` (SGLang's token-pool layout), float32."""
    g = torch.Generator().manual_seed(seed)
    L, Hq, H, D = shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    q = [torch.randn(T, Hq, D, generator=g) for _ in range(L)]
    k = [torch.randn(T, H, D, generator=g) for _ in range(L)]
    v = [torch.randn(T, H, D, generator=g) for _ in range(L)]
    return q, k, v


def compress_random(cfg: KVPolicyConfig, shape: ModelShape, T: int, page_size: int, seed: int):
    """Capture the window queries, compress a random prompt; returns (manager, RequestPages, k).

    RequestPages is None when the manager refused because the pages would not be smaller
    than the full KV (NotSmallerError, nothing allocated).
    """
    q, k, v = random_kv(shape, T, seed)
    mgr = CompressionManager(shape, num_pages=20000, page_size=page_size, dtype=torch.float32, device="cpu")
    mgr.begin_extend(0, "rid0", cfg.obs_window)
    for layer in range(shape.num_layers):
        mgr.capture_queries(layer, 0, q[layer])
    try:
        rec = mgr.compress(0, cfg, T, lambda layer: (k[layer], v[layer]))
    except NotSmallerError:
        assert mgr.allocator.free_pages == mgr.allocator.num_pages
        rec = None
    mgr.check_integrity()
    return mgr, rec, (q, k, v)


def kept_pages(cfg: KVPolicyConfig, shape: ModelShape, qkv, T: int, page_size: int) -> int:
    """The pages the kept rows take (each (layer, KV head) row padded), from compress_layer."""
    q, k, v = qkv
    policy = build_policy(cfg, shape)
    planned = policy.plan_budgets(T, cfg.budget, shape.num_layers, shape.num_kv_heads)
    w = min(cfg.obs_window, T)
    pages, prev = 0, None
    for layer in range(shape.num_layers):
        q_win = q[layer][T - w:].transpose(0, 1)
        comp = compress_layer(policy, layer, q_win, k[layer].transpose(0, 1), v[layer].transpose(0, 1),
                              cfg.budget, planned, prev=prev)
        vo = [0] * comp.num_kv_heads
        if comp.values_only is not None:  # PoD: values-only tokens take pages of 2 * page_size
            for h in range(comp.num_kv_heads):
                vo[h] = int(comp.values_only[int(comp.indptr[h]):int(comp.indptr[h + 1])].sum())
        pages += sum(math.ceil((n - o) / page_size) + math.ceil(o / (2 * page_size))
                     for n, o in zip(comp.lengths.tolist(), vo))
        prev = comp
    return pages


# --------------------------------------------------------------------------- #
# adding a policy
# --------------------------------------------------------------------------- #
def test_a_policy_is_one_class_and_one_register_call():
    assert "keeplast" not in POLICIES
    with registered(KeepLast):
        cfg = KVPolicyConfig(policy="keeplast", budget=5).validate()
        assert KVPolicyConfig(policy="snapkv").with_request({"kv_policy": "keeplast"}).policy == "keeplast"
        assert policy_class("keeplast") is KeepLast and KeepLast.compresses
        assert resolve_profile(cfg, SHAPE) is None
        assert build_policy(cfg, SHAPE) == KeepLast()
        T, page_size = 23, 3
        bound = pages_upper_bound(cfg, SHAPE, T, page_size)  # KVPolicy's default: whole prompt
        assert bound == SHAPE.num_layers * SHAPE.num_kv_heads * math.ceil(T / page_size)
        mgr, rec, (_, k, _) = compress_random(cfg, SHAPE, T, page_size, seed=7)
        assert rec is not None and len(rec.page_ids) <= bound
        assert rec.kept_tokens == SHAPE.num_layers * SHAPE.num_kv_heads * 5
        for layer, lp in enumerate(rec.layers):
            kp, _, mask = mgr.pool.gather_padded(lp)
            assert mask.sum(dim=1).tolist() == [5] * SHAPE.num_kv_heads
            torch.testing.assert_close(kp[:, :5], k[layer][T - 5:].transpose(0, 1))
        mgr.free(0)
    assert "keeplast" not in POLICIES
    with pytest.raises(ConfigError, match="--kv-policy: invalid value 'keeplast'; choose one of full, headkv"):
        KVPolicyConfig(policy="keeplast").validate()


def test_register_refuses_bad_classes_and_taken_names():
    with pytest.raises(ValueError, match="'snapkv' is already registered"):
        register(dataclasses.make_dataclass("Snap2", [], bases=(SnapKV,), frozen=True))
    with pytest.raises(TypeError, match="KVPolicy subclass"):
        register(dict)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        unregister("keeplast")
    with pytest.raises(ConfigError, match="--kv-policy: unknown policy 'h2o'; choose one of full, headkv"):
        policy_class("h2o")
    assert tuple(POLICIES) == POLICY_CHOICES


# --------------------------------------------------------------------------- #
# what each class carries
# --------------------------------------------------------------------------- #
def test_each_policy_carries_its_facts():
    facts = {name: (cls.needs_queries, cls.compresses, cls.profile_method) for name, cls in POLICIES.items()}
    assert facts == {
        "full": (False, False, None),
        "headkv": (True, True, "r2"),
        "snapkv": (True, True, None),
        "pyramidkv": (True, True, None),
        "adakv": (True, True, None),
        "streamingllm": (False, True, None),
        "razor": (False, True, "razor"),
        "d2o": (True, True, "d2o"),
        "pod": (True, True, "pod"),
    }


def test_server_and_class_defaults_agree():
    cfg = KVPolicyConfig()
    assert POOLING_CHOICES is defaults.POOLINGS
    for cls in (SnapKV, PyramidKV, AdaKV):
        assert (cls().kernel_size, cls().pooling, cls().pool_shift) == (cfg.kernel_size, cfg.pooling, cfg.pool_shift)
    heads = torch.ones(2, 2)
    assert HeadKV(importance=heads).beta == cfg.beta == 1.005
    assert PyramidKV().beta == cfg.pyramid_beta
    assert AdaKV().floor_alpha == cfg.floor_alpha
    assert StreamingLLM().sink_size == RazorAttention(retrieval_heads=heads.bool()).sink_size == cfg.sink_size
    assert defaults.RAZOR_ECHO_FRACTION + defaults.RAZOR_INDUCTION_FRACTION == pytest.approx(cfg.razor_fraction)


def test_config_imports_without_torch():
    code = ("import sys, headkv_sglang.config as c; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(','.join(c.POLICY_CHOICES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "full,headkv,snapkv,pyramidkv,adakv,streamingllm,razor,d2o,pod"


# --------------------------------------------------------------------------- #
# admission bound of every registered policy
# --------------------------------------------------------------------------- #
def write_profiles(tmp_path, shape: ModelShape, rng: random.Random) -> dict[str, str]:
    from headkv_sglang.profiles import HeadProfile

    L, Hq, H = shape.num_layers, shape.num_q_heads, shape.num_kv_heads
    table = lambda: [[rng.random() + 1e-3 for _ in range(Hq)] for _ in range(L)]  # noqa: E731
    out = {}
    for method in ("r2", "razor", "d2o", "pod"):
        extra = dict(echo=table(), induction=table()) if method == "razor" else {}
        prof = HeadProfile(architecture="", model_name="random", num_layers=L, num_q_heads=Hq, num_kv_heads=H,
                           head_dim=shape.head_dim, method=method, parameters={}, scores=table(), **extra)
        out[method] = str(prof.save(tmp_path / f"{method}-{L}x{Hq}x{H}.json", heatmap=False))
    return out


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("name", list(POLICIES))
def test_max_pages_covers_what_compress_allocates(tmp_path, name, page_size):
    """Random prompts of odd lengths; exact where every row's length is known up front."""
    rng = random.Random(f"{name}{page_size}")
    cls = POLICIES[name]
    for trial, shape in enumerate([SHAPE, SHAPE_G1] * 3):
        T = rng.choice([1, 7, 54, 97, 301, 301])
        budget = rng.randint(2, 100)
        kw: dict[str, Any] = dict(window=rng.randint(1, min(budget, 12)), sink_size=min(4, budget - 1))
        if cls.profile_method is not None:
            kw["head_profile"] = write_profiles(tmp_path, shape, rng)[cls.profile_method]
        if name == "razor":
            kw["razor_fraction"] = rng.choice([0.0, 0.15, 0.5])
        cfg = KVPolicyConfig(policy=name, budget=budget, **kw).validate()
        mgr, rec, qkv = compress_random(cfg, shape, T, page_size, seed=trial)
        used = kept_pages(cfg, shape, qkv, T, page_size)
        if rec is not None:  # what the manager allocated is what the kept rows take
            assert len(rec.page_ids) == used
        bound = pages_upper_bound(cfg.resolve_scoring(False), shape, T, page_size)  # scored by a question
        msg = f"{name} T={T} B={budget} w={cfg.obs_window} ps={page_size}: used {used}, bound {bound}"
        assert used <= bound, msg
        if name in ("razor", "snapkv", "streamingllm", "full"):
            assert used == bound, msg
        mgr.free(0)
