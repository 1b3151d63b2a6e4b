"""Masked decodes (benchmarks/headroom.py's MaskedDecoder): snapkv's selection vs d2o's with 4 sinks,
and snapkv's with the first 4 tokens added (nothing displaced) or removed."""
import json, sys
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks import fidelity
from benchmarks.headroom import MaskedDecoder
from benchmarks.kept_tokens import render, select
from benchmarks.tasks import score
from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.dev import models
from headkv_sglang.policies.registry import build_policy
from headkv_sglang.profile import load_model
from headkv_sglang.question import QuestionFinder

mdir = models.model_dir()
tok, model = load_model(str(mdir))
shape = ModelShape.from_model_path(mdir)
finder = QuestionFinder.from_tokenizer(tok)
lengths = [1000]
ONLY = [float(x) for x in sys.argv[1:]]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
cases = fidelity.make_cases(["niah"], [], lengths, DEPTHS, 1, lambda s: len(tok(s).input_ids))
out = []
BUDGETS = ["5%"]
with MaskedDecoder(tok, model) as dec:
    for case in [c for c in cases if not ONLY or c.meta.get("depth") in ONLY]:
        _, ids, answer = render(tok, case)
        dec.prefill(ids)
        full, _, _ = dec.decode(case.max_tokens)
        row = {"T": len(ids), "depth": case.meta.get("depth"), "answers": case.answers, "full": full,
               "full_score": score(case, full)}
        for b in BUDGETS:
            masks = {}
            for name, req in {"snapkv": {"kv_policy": "snapkv"},
                              "d2o_sink4": {"kv_policy": "d2o", "kv_d2o_sink_size": 4}}.items():
                cfg = KVPolicyConfig(policy=req["kv_policy"]).with_request({**req, "kv_budget": b}).for_prompt(len(ids))
                masks[name] = select(build_policy(cfg, shape), cfg, finder, ids, dec.qs, dec.ks)
            plus, minus = [], []
            for m in masks["snapkv"]:
                p = m.clone(); p[:, :4] = True; plus.append(p)
                q = m.clone(); q[:, :4] = False; minus.append(q)
            masks["snapkv+first4"], masks["snapkv-first4"] = plus, minus
            for name, keeps in masks.items():
                text, _, _ = dec.decode(case.max_tokens, keep=keeps)
                row[f"{b} {name}"] = [score(case, text), text[:60]]
        out.append(row)
        print(json.dumps(row), flush=True)
json.dump(out, open("/tmp/i46/sinkdecode.json", "w"), indent=1)
