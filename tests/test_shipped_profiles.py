"""Profiles converted from the HeadKV authors' published scores (Llama-3-8B-Instruct,
Mistral-7B-Instruct-v0.2): the conversion reproduces the shipped files byte for byte, equals
a naive reference, and the models' real config.json files select them (a wrong shape or
another checkpoint of the same shape does not)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from headkv_sglang import profiles
from headkv_sglang.config import ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.policies.registry import build_policy, resolve_profile
from headkv_sglang.profiles import convert

# config.json of meta-llama/Meta-Llama-3-8B-Instruct and mistralai/Mistral-7B-Instruct-v0.2, as published.
LLAMA3_8B_INSTRUCT = json.loads("""{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128009, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 500000.0,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
  "use_cache": true, "vocab_size": 128256
}""")
MISTRAL_7B_INSTRUCT_V02 = json.loads("""{
  "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0", "use_cache": true, "vocab_size": 32000
}""")
CONFIGS = {"Meta-Llama-3-8B-Instruct": LLAMA3_8B_INSTRUCT, "Mistral-7B-Instruct-v0.2": MISTRAL_7B_INSTRUCT_V02}
# Same shape, other checkpoints: the scores were not measured on them.
OTHER_CHECKPOINTS = {
    "Llama-3.1-8B-Instruct": {**LLAMA3_8B_INSTRUCT, "max_position_embeddings": 131072,
                              "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}},
    "Mistral-7B-Instruct-v0.1": {**MISTRAL_7B_INSTRUCT_V02, "rope_theta": 10000.0, "sliding_window": 4096},
    "Mistral-7B-Instruct-v0.3": {**MISTRAL_7B_INSTRUCT_V02, "vocab_size": 32768},
}


def _model_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    return tmp_path


# ----------------------------------------------------------------------------- the conversion
def test_conversion_reproduces_the_shipped_files_byte_for_byte():
    pairs = convert.outputs()
    assert {p.name for p, _ in pairs} == {f"{m}.{k}.json" for m in CONFIGS for k in ("retrieval", "r2")}
    for path, prof in pairs:
        assert path.read_text() == prof.to_json(), f"{path} differs: re-run python -m headkv_sglang.profiles.convert"
        assert path.with_suffix(".png").is_file()
    assert convert.main(["--check"]) == 0


def test_check_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    for path, _ in convert.outputs():
        (tmp_path / path.name).write_text(path.read_text())
    victim = tmp_path / "Mistral-7B-Instruct-v0.2.r2.json"
    victim.write_text(victim.read_text().replace("0.", "0.0", 1))
    monkeypatch.setattr(convert, "DATA_DIR", tmp_path)
    assert convert.main(["--check"]) == 1
    assert "Mistral-7B-Instruct-v0.2.r2.json" in capsys.readouterr().err


def test_sources_are_the_upstream_blobs():
    for path, prof in convert.outputs():
        src = convert.SOURCE_DIR / Path(prof.parameters["source_file"]).name
        assert convert.git_blob_sha1(src.read_bytes()) == prof.parameters["source_blob_sha1"]
        assert prof.parameters["source_commit"] == convert.SOURCE_COMMIT and len(convert.SOURCE_COMMIT) == 40
    # git_blob_sha1 is git's own object id (reference: `git hash-object`) on odd-sized random bytes.
    data = bytes(random.Random(7).randrange(256) for _ in range(1237))
    ref = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True).stdout
    assert convert.git_blob_sha1(data) == ref.decode().strip()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind,method", [("retrieval_heads", "retrieval"), ("retrieval_reasoning_heads", "r2")])
def test_shipped_tables_equal_a_naive_reference(name, kind, method):
    """Reference: HeadKV's own loader (mean of each list, in the file's key order, reshaped to
    [layers, query heads]) and a torch reshape-mean over each group of 4 query heads."""
    raw = json.loads((convert.SOURCE_DIR / f"{name}_{kind}.json").read_text())
    ref = torch.tensor([sum(v) / len(v) for v in raw.values()], dtype=torch.float64).reshape(32, 32)
    prof = profiles.load_profile(profiles.DATA_DIR / f"{name}.{method}.json")
    assert (prof.model_name, prof.method, prof.num_layers, prof.num_q_heads, prof.num_kv_heads) == (name, method, 32, 32, 8)
    torch.testing.assert_close(torch.tensor(prof.scores, dtype=torch.float64), ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.tensor(prof.kv_scores, dtype=torch.float64),
                               ref.reshape(32, 8, 4).mean(-1), rtol=1e-12, atol=1e-15)
    assert prof.top_heads(1) == [tuple(map(int, max(raw, key=lambda k: sum(raw[k]) / len(raw[k])).split("-")))]


def test_a_source_of_the_wrong_shape_is_refused(tmp_path):
    model = convert.MODELS[0]
    raw = json.loads((convert.SOURCE_DIR / f"{model.name}_retrieval_heads.json").read_text())
    del raw["31-31"]
    (tmp_path / f"{model.name}_retrieval_heads.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"32 layers x 32 query heads \(unexpected \[\], missing \['31-31'\]\)"):
        convert.convert(model, "retrieval_heads", tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the wheel"):
        convert.convert(model, "retrieval_reasoning_heads", tmp_path)


# ----------------------------------------------------------------------------- selection by config.json
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_models_config_selects_its_profile(name, tmp_path):
    shape = ModelShape.from_model_path(_model_dir(tmp_path, CONFIGS[name]))
    for method in ("r2", "retrieval"):
        assert profiles.shipped_profile(shape.hf_config, method) == profiles.DATA_DIR / f"{name}.{method}.json"
    cfg = KVPolicyConfig(policy="headkv", budget=128).validate()
    assert resolve_profile(cfg, shape).model_name == name
    build_policy.cache_clear()  # cached on ModelShape, whose equality ignores hf_config (both models share a shape)
    policy = build_policy(cfg, shape)  # what --kv-policy headkv runs
    prof = profiles.load_profile(profiles.DATA_DIR / f"{name}.r2.json")
    torch.testing.assert_close(policy.importance, torch.tensor(prof.kv_scores, dtype=torch.float64))
    budgets = policy.plan_budgets(4097, 128, 32, 8)
    assert budgets.shape == (32, 8) and int(budgets.sum()) <= 128 * 32 * 8


@pytest.mark.parametrize("name,change", [
    ("Meta-Llama-3-8B-Instruct", {"num_key_value_heads": 4}),
    ("Meta-Llama-3-8B-Instruct", {"num_hidden_layers": 30}),
    ("Mistral-7B-Instruct-v0.2", {"num_attention_heads": 16}),
    ("Mistral-7B-Instruct-v0.2", {"architectures": ["LlamaForCausalLM"]}),
])
def test_a_wrong_shape_is_refused(name, change, tmp_path):
    shape = ModelShape.from_model_path(_model_dir(tmp_path, {**CONFIGS[name], **change}))
    # resolve_profile, not build_policy: the latter is cached on ModelShape, whose equality ignores hf_config
    with pytest.raises(ConfigError, match=r"^--kv-head-profile: no shipped 'r2' profile matches this model"):
        resolve_profile(KVPolicyConfig(policy="headkv", budget=128).validate(), shape)


@pytest.mark.parametrize("name", sorted(OTHER_CHECKPOINTS))
def test_another_checkpoint_of_the_same_shape_gets_no_profile(name):
    assert all(profiles.shipped_profile(OTHER_CHECKPOINTS[name], m) is None for m in profiles.METHODS)


def test_passing_the_file_for_another_model_is_refused(tmp_path):
    llama = profiles.DATA_DIR / "Meta-Llama-3-8B-Instruct.r2.json"
    shape = ModelShape.from_model_path(_model_dir(tmp_path, MISTRAL_7B_INSTRUCT_V02 | {"num_hidden_layers": 28}))
    with pytest.raises(ConfigError, match=r"profile is for Meta-Llama-3-8B-Instruct .* = \(32, 32, 8, 128\), "
                                          r"the served model has \(28, 32, 8, 128\)"):
        resolve_profile(KVPolicyConfig(policy="headkv", budget=128, head_profile=str(llama)).validate(), shape)


@pytest.mark.parametrize("method", ["razor", "pod", "d2o"])
def test_methods_without_a_profile_say_which_command_makes_one(method):
    msg = profiles.missing_profile_message(LLAMA3_8B_INSTRUCT, method, "/models/Meta-Llama-3-8B-Instruct")
    assert msg.startswith(f"no shipped '{method}' profile matches this model (LlamaForCausalLM, 32 layers, "
                          "32 query / 8 KV heads; shipped for this model: retrieval, r2)"), msg
    cmd = (f"`headkv-sglang profile --model /models/Meta-Llama-3-8B-Instruct --method {method} "
           f"--out Meta-Llama-3-8B-Instruct.{method}.json`")
    assert cmd in msg and f"--kv-head-profile Meta-Llama-3-8B-Instruct.{method}.json" in msg, msg
    other = profiles.missing_profile_message(OTHER_CHECKPOINTS["Mistral-7B-Instruct-v0.3"], method)
    assert "shipped for this model" not in other and f"--model MODEL_DIR --method {method}" in other, other
