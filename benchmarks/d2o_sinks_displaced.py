"""Which tokens D2O's 4 sinks displace from SnapKV's selection (the grid's 1k, depth 0.1 case at 5%):
the answer tokens kept per head, the displaced positions, their tokens and layers. Prints."""
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
cases = fidelity.make_cases(["niah"], [], [1000], [0.1, 0.3, 0.5, 0.7, 0.9], 1, lambda s: len(tok(s).input_ids))
for case in cases[:1]:
    text, ids, answer = render(tok, case)
    qs, ks = capture_qk(model, ids)
    T = len(ids)
    m = {}
    for name, req in {"snapkv": {"kv_policy": "snapkv"}, "sink4": {"kv_policy": "d2o", "kv_d2o_sink_size": 4}}.items():
        cfg = KVPolicyConfig(policy=req["kv_policy"]).with_request({**req, "kv_budget": "5%"}).for_prompt(T)
        m[name] = torch.stack(select(build_policy(cfg, shape), cfg, finder, ids, qs, ks))  # [L, H, T]
    s, e = answer[0]
    print("answer tokens", [tok.decode([t]) for t in ids[s:e]], "span", s, e, "T", T)
    a, b = m["snapkv"], m["sink4"]
    print("heads keeping each answer token: snapkv", a[:, :, s:e].sum((0, 1)).tolist(), "sink4", b[:, :, s:e].sum((0, 1)).tolist())
    lost = a & ~b
    print("tokens displaced per head (mean)", lost.sum(-1).float().mean().item())
    pos = lost.nonzero()[:, 2]
    near = ((pos >= s - 20) & (pos < e + 20)).sum().item()
    print("displaced (layer, head, token) total", len(pos), "within 20 tokens of the answer", near)
    print("displaced answer tokens (layer, head, pos):", [(int(l), int(h), tok.decode([ids[int(p)]])) for l, h, p in lost.nonzero() if s <= p < e])
    ctx = tok.decode(ids[s - 12:e + 3])
    print("needle context:", repr(ctx))
    from collections import Counter
    c = Counter(int(p) for p in pos)
    print("displaced positions (pos: heads) ", sorted(c.items())[:60])
    print("their tokens:", [(p, tok.decode([ids[p]])) for p, _ in sorted(c.items())][:60])
    qs_, qe_ = KVPolicyConfig(policy="snapkv").with_request({"kv_budget": "5%"}).for_prompt(T).scoring_span(finder, ids, T)
    print("scoring span", qs_, qe_, "T", T, repr(tok.decode(ids[qs_:qe_])))
    print("layers of displacement", Counter(int(l) for l in lost.nonzero()[:, 0]).most_common(10))
