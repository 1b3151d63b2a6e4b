"""Why D2O's 4 sinks lose needles: what they displace from SnapKV's selection (grid cases)."""
import json, sys
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks import fidelity
from benchmarks.kept_tokens import capture_qk, render, select
from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.dev import models
from headkv_sglang.policies.registry import build_policy
from headkv_sglang.profile import load_model
from headkv_sglang.question import QuestionFinder

mdir = models.model_dir()
tok, model = load_model(str(mdir))
shape = ModelShape.from_model_path(mdir)
finder = QuestionFinder.from_tokenizer(tok)
lengths = [int(x) for x in sys.argv[1:]] or [1000, 2000, 4000]
cases = fidelity.make_cases(["niah"], [], lengths, [0.1, 0.3, 0.5, 0.7, 0.9], 1, lambda s: len(tok(s).input_ids))
variants = {"snapkv": {"kv_policy": "snapkv"}, "d2o": {"kv_policy": "d2o"},
            "d2o_sink4": {"kv_policy": "d2o", "kv_d2o_sink_size": 4}}
res = []
for case in cases:
    text, ids, answer = render(tok, case)
    qs, ks = capture_qk(model, ids)
    T = len(ids)
    # attention the scoring (question) queries pay to the first 4 tokens, per layer, mean over heads
    cfg0 = KVPolicyConfig(policy="snapkv").with_request({"kv_budget": "5%"}).for_prompt(T)
    start, end = cfg0.scoring_span(finder, ids, T)
    sink_mass = []
    for q, k in zip(qs, ks):
        g = q.shape[0] // k.shape[0]
        kk = k.repeat_interleave(g, 0)
        att = torch.softmax((q[:, start:end] @ kk.transpose(1, 2)) / q.shape[-1] ** 0.5
                            + torch.triu(torch.full((end - start, T), float("-inf")), diagonal=start + 1), -1)
        sink_mass.append(att[..., :4].sum(-1).mean().item())
    for b in ["5%", "10%"]:
        masks = {}
        for name, req in variants.items():
            cfg = KVPolicyConfig(policy=req["kv_policy"]).with_request({**req, "kv_budget": b}).for_prompt(T)
            masks[name] = select(build_policy(cfg, shape), cfg, finder, ids, qs, ks)
        row = {"T": T, "budget": b, "budget_tokens": cfg.budget, "depth": case.meta.get("depth"),
               "answer_tokens": sum(e - s for s, e in answer)}
        for name, ms in masks.items():
            row[f"{name}_answer_heads"] = sum(int(torch.stack([m[:, s:e].all(1) for s, e in answer]).any(0).sum()) for m in ms)
        row["same_d2o_snapkv"] = all(torch.equal(a, c) for a, c in zip(masks["d2o"], masks["snapkv"]))
        row["snap_keeps_of_first4"] = sum(int(m[:, :4].sum()) for m in masks["snapkv"]) / (len(ks) * ks[0].shape[0])
        row["snap_keeps_tok0"] = sum(int(m[:, 0].sum()) for m in masks["snapkv"]) / (len(ks) * ks[0].shape[0])
        # heads where snapkv keeps the whole answer and sink4 does not
        lost = 0
        for a, c in zip(masks["snapkv"], masks["d2o_sink4"]):
            wa = torch.stack([a[:, s:e].all(1) for s, e in answer]).any(0)
            wc = torch.stack([c[:, s:e].all(1) for s, e in answer]).any(0)
            lost += int((wa & ~wc).sum())
        row["heads_losing_answer_to_sinks"] = lost
        row["selected_tokens_per_head"] = cfg.budget - min(32, cfg.budget // 4)
        row["sink_mass_mean"] = sum(sink_mass) / len(sink_mass)
        res.append(row)
        print(json.dumps(row), flush=True)
json.dump(res, open("/tmp/i46/sinks.json", "w"), indent=1)
