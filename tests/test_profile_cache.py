"""Ratio budgets reuse parsed head profiles (CPU, fast, no server).

With ``--kv-budget 5%`` every prompt length resolves to its own budget, so ``build_policy``
(keyed by the whole config) builds a policy per length, in admission and in the forward.
The profile JSON behind it must be parsed once per file, not once per build.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest
import torch

from headkv_sglang import profiles
from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.policies import registry

SMOL = ModelShape(num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64, architecture="LlamaForCausalLM",
                  hf_config={"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
                             "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
                             "_name_or_path": "SmolLM2-135M-Instruct"})
PARSE = profiles.load_profile  # the uncached parser (the fixture below counts its calls)


@pytest.fixture
def parses(monkeypatch):
    """Paths of every profile JSON parsed (through profiles.load_profile), caches emptied."""
    seen: list[str] = []
    real = profiles.load_profile

    def counting(path):
        seen.append(os.path.abspath(path))
        return real(path)

    monkeypatch.setattr(profiles, "load_profile", counting)
    profiles._load_version.cache_clear()
    registry.build_policy.cache_clear()
    yield seen
    profiles._load_version.cache_clear()
    registry.build_policy.cache_clear()


def _same_policy(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, (f.name, x, y)


@pytest.mark.parametrize("policy", ["headkv", "razor", "d2o", "pod"])
def test_ratio_budget_parses_the_shipped_profile_once(parses, policy):
    rng = random.Random(len(policy))
    base = KVPolicyConfig(policy=policy, budget_ratio=0.05)
    lengths = rng.sample(range(300, 9000), 157)
    budgets = set()
    for n in lengths:
        cfg = base.for_prompt(n)
        budgets.add(cfg.budget)
        registry.pages_upper_bound(cfg, SMOL, n, 16)  # admission
        built = registry.build_policy(cfg, SMOL)  # the forward
        # the same policy as one built from a freshly parsed profile
        path = profiles.shipped_profile(SMOL.hf_config, registry.policy_class(policy).profile_method)
        fresh = registry.policy_class(policy).from_config(cfg, SMOL, PARSE(path))
        _same_policy(built, fresh)
    assert len(budgets) > 100, f"only {len(budgets)} distinct budgets: the test would not miss build_policy's cache"
    assert registry.build_policy.cache_info().misses >= min(len(budgets), 64)
    counts = {p: parses.count(p) for p in set(parses)}
    assert counts and max(counts.values()) == 1, f"a profile parsed more than once: {counts}"
    assert len(counts) == len(profiles.shipped_profiles()), counts  # the shipped scan, once each


def test_a_rewritten_profile_file_is_parsed_again(parses, tmp_path):
    """The cache is keyed by the file's version: a profile rewritten in place is read anew."""
    src = json.loads(profiles.shipped_profile(SMOL.hf_config, "r2").read_text())
    path = tmp_path / "mine.r2.json"
    path.write_text(json.dumps(src))
    cfg = KVPolicyConfig(policy="headkv", budget=64, head_profile=str(path))
    first = registry.build_policy(cfg, SMOL)
    for b in (65, 66, 67):
        registry.build_policy(dataclasses.replace(cfg, budget=b), SMOL)
    assert parses.count(str(path)) == 1
    src["scores"][0] = [v + 1.0 for v in src["scores"][0]]
    src.pop("kv_scores", None)
    path.write_text(json.dumps(src) + "\n")  # another size: another version even within one mtime tick
    registry.build_policy.cache_clear()
    second = registry.build_policy(cfg, SMOL)
    assert parses.count(str(path)) == 2
    assert not torch.equal(first.importance, second.importance)


def test_a_missing_profile_still_names_the_path(parses, tmp_path):
    cfg = KVPolicyConfig(policy="headkv", budget=64, head_profile=str(tmp_path / "nope.json"))
    with pytest.raises(Exception, match=r"nope\.json: cannot read head profile"):
        registry.build_policy(cfg, SMOL)
