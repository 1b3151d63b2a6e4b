"""Head-importance profiles: file format, validation, razor scoring, and agreement with the shipped files."""

from __future__ import annotations

import json

import pytest
import torch

from headkv_sglang import profiles
from headkv_sglang.profile import razor_scores, run, top_heads

SHAPE = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
             architectures=["LlamaForCausalLM"])


def _profile(**kw) -> profiles.HeadProfile:
    base = dict(architecture="LlamaForCausalLM", model_name="m", num_layers=2, num_q_heads=4, num_kv_heads=2,
                head_dim=8, method="r2", parameters={}, scores=[[0.1, 0.3, 0.0, 0.2], [0.5, 0.5, 1.0, 0.0]])
    base.update(kw)
    return profiles.HeadProfile(**base)


def test_round_trip_and_gqa_aggregate(tmp_path):
    p = _profile()
    assert p.kv_scores == [[0.2, 0.1], [0.5, 0.5]]  # mean over each group of 2 query heads
    path = p.save(tmp_path / "p.json")
    assert path.with_suffix(".png").stat().st_size > 1000  # the heatmap
    q = profiles.load_profile(path)
    assert q == p


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a profile is a JSON object"),
        (json.dumps({"method": "r2"}), "missing field(s)"),
    ],
)
def test_corrupt_files_name_the_path_and_problem(tmp_path, text, message):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(ValueError) as exc:
        profiles.load_profile(f)
    assert str(f) in str(exc.value) and message in str(exc.value)


def test_wrong_table_shape_is_rejected(tmp_path):
    f = tmp_path / "p.json"
    data = json.loads(_profile().to_json())
    data["scores"] = [[0.1, 0.2, 0.3]] * 2
    f.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"scores has shape \[2, \[3\]\], expected \[2, 4\]"):
        profiles.load_profile(f)


def test_check_model_names_both_shapes():
    with pytest.raises(ValueError) as exc:
        _profile().check_model(30, 9, 3, 64)
    assert "(2, 4, 2, 8)" in str(exc.value) and "(30, 9, 3, 64)" in str(exc.value)


@pytest.mark.parametrize("method", ["retrieval", "r2", "razor"])
def test_shipped_profiles_match_the_test_model(method):
    path = profiles.shipped_profile(SHAPE, method)
    assert path is not None and path.name == f"SmolLM2-135M-Instruct.{method}.json"
    prof = profiles.load_profile(path)
    prof.check_model(30, 9, 3, 64)
    assert len(prof.kv_scores) == 30 and all(len(r) == 3 for r in prof.kv_scores)
    assert max(max(r) for r in prof.scores) > 0
    assert path.with_suffix(".png").exists()
    assert profiles.shipped_profile({**SHAPE, "num_key_value_heads": 9}, method) is None


@pytest.mark.parametrize("offset", [0, 1])
def test_razor_scores_on_a_hand_built_pattern(offset):
    # period 3, 3 repeats; head 0 attends to the previous copy of the same token (echo),
    # head 1 to the token after the previous copy (induction), head 2 to position 0.
    period, repeats = 3, 3
    S = offset + period * repeats
    att = torch.zeros(1, 3, S, S)
    for i in range(S - offset):
        t = offset + i
        att[0, 2, t, 0] = 1.0
        if i >= period:
            att[0, 0, t, t - period] = 1.0
            att[0, 1, t, t - period + 1] = 1.0
        else:
            att[0, 0, t, t] = att[0, 1, t, t] = 1.0
    echo, ind = razor_scores(att, offset, period, repeats)
    assert torch.allclose(echo[0], torch.tensor([1.0, 0.0, 0.0 if offset else 1 / 6]))
    assert torch.allclose(ind[0], torch.tensor([0.0, 1.0, 0.0]))


def test_reduced_razor_profiling_agrees_with_shipped(model_path):
    shipped = profiles.load_profile(profiles.shipped_profile(SHAPE, "razor"))
    fresh = run(str(model_path), "razor", lengths=[], depths=0, trials=2, seed=123)
    overlap = set(top_heads(fresh.induction, 10)) & set(top_heads(shipped.induction, 10))
    assert len(overlap) >= 7, (top_heads(fresh.induction, 10), top_heads(shipped.induction, 10))


def test_reduced_r2_profiling_agrees_with_shipped(model_path):
    shipped = profiles.load_profile(profiles.shipped_profile(SHAPE, "r2"))
    fresh = run(str(model_path), "r2", lengths=[300], depths=6, trials=0, seed=7)
    assert fresh.parameters["correct_trials"] >= 1
    overlap = set(top_heads(fresh.scores, 10)) & set(top_heads(shipped.scores, 10))
    assert len(overlap) >= 4, (top_heads(fresh.scores, 10), top_heads(shipped.scores, 10))
