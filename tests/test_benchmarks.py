"""The benchmark scripts keep working: task generators and scorers alone, then a tiny
fidelity grid and capacity sweep through a real server."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tasks import TASKS, build, rouge_l, score  # noqa: E402


@pytest.fixture(scope="module")
def count_tokens():
    from transformers import AutoTokenizer

    from headkv_sglang.dev import models

    tok = AutoTokenizer.from_pretrained(str(models.model_dir()))
    return lambda s: len(tok(s).input_ids)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [333, 1777])
def test_cases_hit_their_length_and_plant_their_answers(task, target, count_tokens):
    case = build(task, target, seed=target % 7, depth=0.37, count_tokens=count_tokens)
    # whole sentences (~30 tokens) are the unit of a haystack
    assert abs(case.meta["prompt_tokens"] - target) <= max(0.03 * target, 40), case.meta
    assert case.task == task and case.max_tokens > 0
    for a in case.answers:
        assert a in case.prompt, (task, a)
    # deterministic from the seed
    again = build(task, target, seed=target % 7, depth=0.37, count_tokens=count_tokens)
    assert again.prompt == case.prompt and again.answers == case.answers


def _model_style_answer(case) -> str:
    """A complete right answer in the shape the test model gives at full KV (seen in the grid's
    full-KV outputs): a restated question, then the answers, one per line for lists."""
    a = case.answers
    if case.task == "niah":
        return f"The secret number is {a[0]}."
    if case.task == "multikey":
        return f"The special magic number for {case.meta['key']} mentioned in the text is {a[0]}."
    if case.task == "multivalue":
        return f"The special magic numbers for {case.meta['key']} are:\n\n" + "\n".join(f"- {n}" for n in a)
    if case.task == "vartrack":
        return (f"The variables assigned the value {case.meta['value']} are:\n\n"
                + "\n".join(f"- VAR {v} = {case.meta['value']}" for v in a))
    if case.task == "cwe":
        return "The 10 most common words in the list are:\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(a))
    raise AssertionError(case.task)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "summary"])
def test_a_full_answer_fits_in_the_tasks_output_tokens(task, count_tokens):
    # multikey (16), vartrack (32) and cwe (48) once cut the full-KV answer off before its
    # number or its last words: the grid then scored the model 0 on a task it solves
    for seed in (1, 2, 3):
        case = build(task, 500, seed=seed)
        answer = _model_style_answer(case)
        assert score(case, answer) == 1.0
        assert count_tokens(answer) + 2 <= case.max_tokens, (task, count_tokens(answer), case.max_tokens)


def test_niah_needle_sits_at_its_depth():
    for depth in (0.0, 0.5, 1.0):
        c = build("niah", 900, seed=4, depth=depth)
        pos = c.prompt.index(f"The secret number is {c.answers[0]}.") / len(c.prompt)
        assert abs(pos - depth) < 0.08, (depth, pos)


def test_multikey_distractors_share_the_needle_shape():
    c = build("multikey", 800, seed=9)
    facts = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", c.prompt)
    assert len(facts) == 4 and len({k for k, _ in facts}) == 4
    assert (c.meta["key"], c.answers[0]) in facts
    assert c.meta["key"] in c.prompt.rsplit("\n", 1)[-1]


def test_vartrack_chain_resolves_to_the_value_and_decoy_does_not():
    c = build("vartrack", 900, seed=5)
    assign = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", c.prompt))
    assert len(assign) == 8

    def resolve(v):
        while assign[v].startswith("VAR "):
            v = assign[v][4:]
        return assign[v]

    assert sorted(v for v in assign if resolve(v) == c.meta["value"]) == sorted(c.answers)
    assert all(resolve(v) != c.meta["value"] for v in c.meta["decoy"])


def test_cwe_common_words_are_the_most_frequent():
    c = build("cwe", 1200, seed=2)
    items = re.findall(r"\d+\. ([a-z]+)", c.prompt)
    counts = sorted(((items.count(w), w) for w in set(items)), reverse=True)
    top = {w for _, w in counts[:10]}
    assert top == set(c.answers)
    assert counts[9][0] > counts[10][0]  # strictly more frequent than any other word


def test_score_counts_whole_tokens_case_insensitively():
    c = build("multivalue", 300, seed=1)
    a, b, *_ = c.answers
    assert score(c, f"The numbers are {a} and {b}.") == 0.5
    assert score(c, f"{a}0 {b}1") == 0.0  # a longer number is not the answer
    v = build("vartrack", 300, seed=1)
    assert score(v, " ".join(x.lower() for x in v.answers)) == 1.0
    with pytest.raises(ValueError):
        score(build("summary", 300, seed=1), "x")


def _naive_lcs(a, b):
    # exponential-free reference: classic full DP table
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_rouge_l_matches_a_dense_lcs_reference_on_random_texts():
    rng = random.Random(0)
    vocab = "a b c d e f g".split()
    for _ in range(200):
        c = [rng.choice(vocab) for _ in range(rng.randint(1, 23))]
        r = [rng.choice(vocab) for _ in range(rng.randint(1, 19))]
        lcs = _naive_lcs(c, r)
        want = 0.0 if lcs == 0 else 2 * (lcs / len(c)) * (lcs / len(r)) / (lcs / len(c) + lcs / len(r))
        assert rouge_l(" ".join(c), " ".join(r)) == pytest.approx(want)
    assert rouge_l("Same words.", "same WORDS") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown task 'ruler'"):
        build("ruler", 500, seed=0)
    with pytest.raises(ValueError, match="target_tokens must be >= 64"):
        build("niah", 10, seed=0)
    r = subprocess.run([sys.executable, "benchmarks/fidelity.py", "--budgets", "0%"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--budgets: invalid budget '0%'" in r.stderr, r.stderr


def test_rows_measured_under_other_policy_defaults_are_not_reused(tmp_path, capsys):
    """A finished grid or a journal measured under other policy defaults gives back only its full-KV
    rows (which depend on none): the compressed ones are asked again, and the change is named."""
    import benchmarks.fidelity as fid

    now = fid.policy_defaults()
    assert now["pool_shift"] == 0 and now["kernel_size"] == 13 and now["auto_question"] == 16
    rows = [{"key": "f", "policy": "full"}, {"key": "s", "policy": "snapkv"}]
    out = tmp_path / "grid.json"
    for then, keys in ((now, {"f", "s"}), ({**now, "pool_shift": 3}, {"f"}), (None, {"f"})):
        out.write_text(json.dumps({"meta": {} if then is None else {"kv_defaults": then}, "rows": rows}))
        assert set(fid.finished_rows(out)) == keys
    err = capsys.readouterr().err
    assert "policy defaults changed (pool_shift 3 -> 0)" in err and "(not recorded)" in err
    journal = tmp_path / "grid.partial.jsonl"
    journal.write_text("".join(json.dumps({"key": r["key"], "row": r, "defaults": d}) + "\n"
                               for r, d in ((rows[0], None), (rows[1], {**now, "kernel_size": 7}),
                                            ({"key": "a", "policy": "adakv"}, now))))
    assert set(fid.read_journal(journal)) == {"f", "a"}


def test_a_policy_default_stales_only_its_policy_rows(tmp_path, capsys):
    """A changed d2o (or pod) default asks that policy's rows again and keeps every other
    policy's; a default every policy reads (the window) stales them all; the docs' note names
    only the defaults of the grid's policies."""
    import benchmarks.fidelity as fid

    now = fid.policy_defaults()
    rows = [{"key": "f", "policy": "full"}, {"key": "s", "policy": "snapkv"}, {"key": "d", "policy": "d2o"},
            {"key": "p", "policy": "pod"}, {"key": "r", "policy": "streamingllm"}]
    out = tmp_path / "grid.json"
    cases = [({**now, "d2o_merge": "on"}, {"f", "s", "p", "r"}),
             ({**now, "pod_share": 0.3}, {"f", "s", "d", "r"}),
             ({**now, "sink_size": 7}, {"f", "s", "d"}),  # streamingllm's, razor's and pod's sinks
             ({**now, "window_size": 3}, {"f"})]
    for then, keys in cases:
        out.write_text(json.dumps({"meta": {"kv_defaults": then}, "rows": rows}))
        assert set(fid.finished_rows(out)) == keys, then
    assert "its d2o requests are asked again" in capsys.readouterr().err
    then = {**now, "d2o_merge": "on", "kernel_size": 5}
    assert fid.changed_defaults(then, policies=["snapkv", "headkv"]) == ["kernel_size 5 -> 13"]
    assert len(fid.changed_defaults(then, policies=["d2o"])) == 2 and len(fid.changed_defaults(then)) == 2
    journal = tmp_path / "grid.partial.jsonl"
    journal.write_text("".join(json.dumps({"key": r["key"], "row": r, "defaults": {**now, "pod_group": 3}}) + "\n"
                               for r in rows))
    assert set(fid.read_journal(journal)) == {"f", "s", "d", "r"}


def test_a_grid_older_than_a_setting_measured_its_value_from_before():
    """A grid recorded before ``pod_sharing`` / ``pod_group`` existed measured score sharing
    between pairs: it stays current while those are the defaults, and is stale otherwise."""
    import benchmarks.fidelity as fid

    now = fid.policy_defaults()
    older = {k: v for k, v in now.items() if k not in fid.BEFORE_THE_SETTING}
    want = [f"{k} {json.dumps(v)} -> {json.dumps(now[k])}" for k, v in fid.BEFORE_THE_SETTING.items() if now[k] != v]
    assert fid.changed_defaults(older) == want
    assert fid.changed_defaults({**older, "pod_sharing": "keys", "pod_group": 2}) == (
        [] if now["pod_sharing"] == "keys" else [f'pod_sharing "keys" -> {json.dumps(now["pod_sharing"])}'])
    assert fid.recorded_defaults(None) is None and fid.recorded_defaults(now) == now


def test_calibration_variants_become_request_keys():
    from argparse import ArgumentTypeError

    from benchmarks.scoring import variant_params

    assert variant_params("window") == {"kv_scoring": "window"}
    assert variant_params("question:16") == {"kv_scoring": "question", "kv_question": 16}
    assert variant_params("kv_beta=1.005") == {"kv_beta": 1.005}
    assert variant_params("window,kv_beta=5,kv_pooling=avgpool") == {
        "kv_scoring": "window", "kv_beta": 5, "kv_pooling": "avgpool"}
    for bad in ("question:0", "beta=2", "kv_beta=", "snap"):
        with pytest.raises(ArgumentTypeError, match="variant"):
            variant_params(bad)


@pytest.fixture(scope="module")
def hf_model():
    from headkv_sglang.dev import models
    from headkv_sglang.profile import load_model

    return load_model(str(models.model_dir()))


def test_kept_tokens_captures_the_queries_and_keys_the_model_attends_with(hf_model):
    """``kept_tokens.capture_qk`` records every layer's post-RoPE queries and keys: their causal
    softmax is the attention the model itself reports."""
    import math

    import torch

    from benchmarks.kept_tokens import capture_qk

    tok, model = hf_model
    ids = tok("The secret number is 48213. A few more words follow, then the question: which number?").input_ids
    qs, ks = capture_qk(model, ids)
    with torch.no_grad():
        atts = model(torch.tensor([ids]), output_attentions=True).attentions
    assert len(qs) == len(atts) == model.config.num_hidden_layers
    t = len(ids)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    for layer in range(len(qs)):
        q, k = qs[layer], ks[layer]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        logits = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(causal, -math.inf)
        torch.testing.assert_close(torch.softmax(logits, -1), atts[layer][0], atol=1e-5, rtol=1e-4)


def test_kept_tokens_cli_counts_the_answer_distractors_and_question(hf_model, tmp_path):
    """At 100% every head keeps every token, so every count is known; at 5% headkv holds exactly
    L * H * B tokens and at most every head keeps the answer."""
    from benchmarks.kept_tokens import main

    out = tmp_path / "kt"
    assert main(["--lengths", "300", "--depths", "0.5", "--seeds", "1", "--policies", "headkv", "snapkv",
                 "--budgets", "100%", "5%", "--variants", "question:8", "window", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    heads = result["meta"]["heads_per_case"]
    assert heads == 90 and result["meta"]["cases_per_task"] == {"niah": 1, "multikey": 1}
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2
    for r in rows:
        if r["budget"] == "100%":
            assert r["answer"] == heads and r["kept"] == heads * r["prompt_tokens"], r
            assert r["distractor"] == (heads if r["task"] == "multikey" else 0), r
            # the question and the template tail: 10-40 tokens of this prompt, kept by every head
            assert r["question"] % heads == 0 and 10 <= r["question"] // heads <= 40, r
        else:
            assert r["budget_tokens"] == -(-5 * r["prompt_tokens"] // 100)
            assert 0 <= r["answer"] <= heads and r["question"] < heads * r["budget_tokens"]
            if r["policy"] == "headkv":
                assert r["kept"] == heads * r["budget_tokens"], r
    md = out.with_suffix(".md").read_text()
    assert "| multikey | window | snapkv | 100% | 90 of 90 | 90 of 90 |" in md


def test_headroom_masked_decode_is_greedy_decoding_and_a_hidden_token_is_not_read(hf_model):
    """``headroom.MaskedDecoder``: with every prompt token kept its decode is HF's own greedy
    ``generate``; with the needle's number hidden from every KV head the number cannot be copied;
    the first-N-steps snapshots of the recorded attention are partial sums of it."""
    import torch

    from benchmarks.headroom import MaskedDecoder
    from benchmarks.kept_tokens import token_spans

    tok, model = hf_model
    text = tok.apply_chat_template([{"role": "user", "content": "Some words first. The secret number is 48213. "
                                     "Then more words.\n\nWhat is the secret number? Answer with the number only."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    ref_text = tok.decode([t for t in ref if t != tok.eos_token_id], skip_special_tokens=True)
    assert "48213" in ref_text, ref_text  # the premise: with full KV the model copies the number
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    with MaskedDecoder(tok, model) as dec:
        dec.prefill(ids)
        assert len(dec.qs) == len(dec.ks) == layers and dec.ks[0].shape[:2] == (kv_heads, len(ids))
        full, record, early = dec.decode(12, record=True, snapshots=(1, 3, 40))
        everything = [torch.ones(kv_heads, len(ids), dtype=torch.bool)] * layers
        kept_all, _, _ = dec.decode(12, keep=everything)
        hidden = torch.ones(kv_heads, len(ids), dtype=torch.bool)
        for a, b in token_spans(tok, text, "48213"):
            hidden[:, a:b] = False
        without, _, none = dec.decode(12, keep=[hidden] * layers)
        again, _, _ = dec.decode(12)  # the cache was cut back to the prompt after each decode
    assert full == kept_all == again == ref_text and none == {}
    assert "48213" not in without and without != full, without
    steps = len(tok.encode(full, add_special_tokens=False))
    assert steps < 12 and sorted(early) == [1, 3, 40]
    for layer in range(layers):  # one step: <= one softmax row per query head; 40 > the output: all of it
        one, three = early[1][layer].sum(dim=1), early[3][layer].sum(dim=1)
        assert float(one.min()) > 0 and float(one.max()) <= 1 + 1e-4 and float(three.sum()) > float(one.sum()) + 1
        assert torch.equal(early[40][layer], record[layer])
        assert bool((early[1][layer] <= early[3][layer] + 1e-6).all() and (early[3][layer] <= record[layer] + 1e-6).all())
    for r in record:  # attention on the prompt, summed over the decode steps: <= 1 per step and query head
        assert r.shape == (model.config.num_attention_heads, len(ids)) and float(r.min()) >= 0
        assert float(r.sum(dim=1).max()) <= steps + 1e-3


def test_headroom_cli_keeps_everything_at_100_percent_and_the_budget_below(hf_model, tmp_path):
    """At 100% every selection keeps the whole prompt and decodes the full-KV output; at 5% headkv's
    selections (its own, the oracle's, the answer's) hold its budget exactly."""
    from benchmarks.headroom import main

    out = tmp_path / "hr"
    assert main(["--lengths", "300", "--depths", "0.5", "--seeds", "1", "--policies", "headkv",
                 "--budgets", "100%", "5%", "--variants", "question:8", "--out", str(out),
                 "--kinds", "policy", "oracle", "answer", "lookahead:2", "lookahead:99"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["meta"]["cases_per_task"] == {"niah": 1, "multikey": 1}
    rows = result["rows"]
    assert len(rows) == 2 * (1 + 2 * 5)
    full = {r["task"]: r["output"] for r in rows if r["kind"] == "full"}
    for r in rows:  # 99 steps is more than the answer: the oracle's selection and output
        if r["kind"] == "lookahead:99":
            twin = [o for o in rows if o["kind"] == "oracle" and (o["task"], o["budget"]) == (r["task"], r["budget"])]
            assert len(twin) == 1 and (twin[0]["kept"], twin[0]["output"]) == (r["kept"], r["output"]), (r, twin)
        if r["kind"] == "full":  # the model restates the question before the number
            assert r["score"] == 0 or r["answer_step"] > 0, r
    for r in rows:
        if r["budget"] == "100%":
            assert r["kept"] == 1.0 and r["output"] == full[r["task"]] and r["agrees_with_full"], r
        elif r["budget"] == "5%":
            assert r["kept"] == round(-(-5 * r["prompt_tokens"] // 100) / r["prompt_tokens"], 4), r
    md = out.with_suffix(".md").read_text()
    assert "| question:8 | headkv | 100% | oracle |" in md and "| - | full | full | full |" in md
    assert md.index("| question:8 | headkv | 5% | lookahead:2 |") < md.index("| question:8 | headkv | 5% | lookahead:99 |")
    with pytest.raises(SystemExit):
        main(["--kinds", "lookahead:0", "--out", str(out)])


# -- through a real server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_server(kv_small_server):
    return kv_small_server  # conftest: --kv-policy full, --enable-cache-report, shared


@pytest.mark.server
def test_fidelity_cli_writes_results_tables_and_plots(bench_server, tmp_path):
    out = tmp_path / "fid"
    r = subprocess.run(
        [sys.executable, "benchmarks/fidelity.py", "--server", bench_server.url, "--tasks", "niah", "multikey",
         "summary", "--lengths", "400", "--niah-lengths", "300", "500", "--depths", "0.2", "0.8", "--seeds", "1",
         "--policies", "headkv", "--budgets", "10%", "200", "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert data["meta"]["cases"] == 6 and len(rows) == 6 * (1 + 2)  # full + headkv at two budgets
    for row in rows:
        if row["policy"] == "full":
            continue
        # the full request left the prompt in the radix cache; the window is recomputed
        assert row["cached_tokens"] and row["prompt_tokens"] - row["cached_tokens"] >= 1, row
        if row["budget_tokens"] < row["prompt_tokens"]:
            kv = row["kv"]
            assert kv and kv["policy"] == row["policy"] and kv["budget"] == row["budget_tokens"], row
            assert 0 < row["kept_fraction"] < 1
        if row["budget"] == "10%":
            assert row["budget_tokens"] == max(8, round(0.1 * row["prompt_tokens"]))
    full_summary = [r for r in rows if r["task"] == "summary" and r["policy"] == "full"][0]
    assert full_summary["score"] == 1.0 and full_summary["output"]
    # full KV finds these short needles; the table is derived from the rows
    s = data["summary"]
    assert s["tasks"]["niah"]["full"] == pytest.approx(
        sum(r["score"] for r in rows if r["task"] == "niah" and r["policy"] == "full") / 4)
    md = out.with_suffix(".md").read_text()
    assert "| headkv |" in md and "relative to full" in md.lower()
    for png in ("fid_accuracy.png", "fid_niah_headkv.png", "fid_niah_full.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    st = bench_server.plugin_state()
    assert st["integrity"] == "ok"


@pytest.mark.server
def test_fidelity_grid_resumes_from_its_journal(bench_server, tmp_path, count_tokens, monkeypatch):
    """A killed grid run continues: requests already in the journal are not asked again and their
    rows come back the same; a new policy or other kv_params ask only the new requests."""
    import benchmarks.fidelity as fid

    cases = [build("niah", 300, seed=s, depth=0.5, count_tokens=count_tokens) for s in (1, 2)]
    asked: list[tuple[str, str]] = []
    real_chat = fid.chat

    def counting_chat(url, case, params):
        asked.append((case.prompt, params["kv_policy"]))
        return real_chat(url, case, params)

    monkeypatch.setattr(fid, "chat", counting_chat)
    journal = tmp_path / "grid.partial.jsonl"
    first = fid.run_grid(bench_server.url, cases[:1], ["snapkv"], ["10%"], progress=False, journal=journal)
    assert len(asked) == 2 and len(journal.read_text().splitlines()) == 2  # one line per request
    with journal.open("a") as f:
        f.write('{"key": "torn')  # a run killed mid-write leaves a torn line: ignored
    asked.clear()
    both = fid.run_grid(bench_server.url, cases, ["snapkv"], ["10%"], progress=False, journal=journal)
    assert asked == [(cases[1].prompt, "full"), (cases[1].prompt, "snapkv")]  # only the second case
    assert [r["output"] for r in both[:2]] == [r["output"] for r in first] and len(both) == 4
    assert [(r["case"], r["policy"]) for r in both] == [(0, "full"), (0, "snapkv"), (1, "full"), (1, "snapkv")]
    asked.clear()
    more = fid.run_grid(bench_server.url, cases[:1], ["streamingllm", "snapkv"], ["10%"], progress=False,
                        journal=journal)
    assert asked == [(cases[0].prompt, "streamingllm")]  # full and snapkv came from the journal
    assert [r["policy"] for r in more] == ["full", "streamingllm", "snapkv"]
    assert more[2]["output"] == first[1]["output"] and more[1]["kv"]["policy"] == "streamingllm"
    asked.clear()
    fid.run_grid(bench_server.url, cases[:1], ["snapkv"], ["10%"], progress=False, journal=journal,
                 kv_params={"kv_scoring": "window"})
    assert asked == [(cases[0].prompt, "snapkv")]
    # a changed default (here the pooling shift) asks the compressed requests again, not full's
    from headkv_sglang.policies import defaults

    asked.clear()
    monkeypatch.setattr(defaults, "POOL_SHIFT", defaults.POOL_SHIFT + 1)
    fid.run_grid(bench_server.url, cases[:1], ["snapkv"], ["10%"], progress=False, journal=journal)
    assert asked == [(cases[0].prompt, "snapkv")]


@pytest.mark.server
def test_fidelity_cli_extends_a_finished_grid_and_redoes_a_policy(bench_server, tmp_path, monkeypatch):
    """With --extend the CLI reuses the rows of a finished OUT.json when the grid grows, and
    --redo asks one policy's requests again while keeping the others; without it a finished
    grid is measured anew."""
    import benchmarks.fidelity as fid

    asked: list[str] = []
    real_chat = fid.chat
    monkeypatch.setattr(fid, "chat", lambda url, case, params: asked.append(params["kv_policy"]) or real_chat(
        url, case, params))
    out = tmp_path / "grid"
    base = ["--server", bench_server.url, "--tasks", "niah", "--niah-lengths", "300", "--depths", "0.5",
            "--budgets", "10%", "--out", str(out), "--no-plots", "--no-progress"]
    assert fid.main([*base, "--policies", "snapkv"]) == 0
    assert asked == ["full", "snapkv"] and not Path(f"{out}.partial.jsonl").exists()
    first = json.loads(Path(f"{out}.json").read_text())
    asked.clear()
    assert fid.main([*base, "--policies", "snapkv", "streamingllm", "--extend"]) == 0
    grown = json.loads(Path(f"{out}.json").read_text())
    assert asked == ["streamingllm"] and grown["meta"]["reused_requests"] == 2
    assert [r["output"] for r in grown["rows"][:2]] == [r["output"] for r in first["rows"]]
    assert "2 of them finished by earlier parts" in Path(f"{out}.md").read_text()
    asked.clear()
    assert fid.main([*base, "--policies", "snapkv", "streamingllm", "--extend", "--redo", "snapkv"]) == 0
    assert asked == ["snapkv"]
    redone = json.loads(Path(f"{out}.json").read_text())
    assert redone["rows"][1]["output"] == first["rows"][1]["output"]  # greedy: the same answer again
    asked.clear()
    assert fid.main([*base, "--policies", "snapkv"]) == 0  # without --extend a finished grid is measured anew
    assert asked == ["full", "snapkv"]
    with pytest.raises(SystemExit):
        fid.main([*base, "--policies", "snapkv", "--fresh", "--extend"])


@pytest.mark.server
def test_long_outputs_cli_samples_memory_and_scores_summaries(bench_server, tmp_path):
    """benchmarks/long_outputs.py on tiny settings against the shared server: the KV held is
    sampled while generating, the decode budget bounds it, and summaries are scored."""
    out = tmp_path / "lo"
    r = subprocess.run(
        [sys.executable, "benchmarks/long_outputs.py", "--server", bench_server.url, "--tokens", "60", "--every",
         "20", "--budget", "32", "--decode-budgets", "16", "--docs", "1", "--summary-tokens", "24", "--out", str(out),
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    mem = data["memory"]
    assert list(mem) == ["full", "snapkv-32", "snapkv-32 + decode 16"]
    for m in mem.values():  # one sample per 20 streamed tokens (a chunk without text is not counted)
        assert [s["generated"] for s in m["samples"]][:2] == [20, 40] and m["idle_after"]["bytes"] == 0, m
    full, prompt_only, decode = (mem[k]["samples"][1] for k in mem)  # at 40 generated tokens
    # a compressed prompt holds less than the whole one; the decode budget moved its tail into pages
    assert prompt_only["bytes"] < full["bytes"] and decode["token_slots"] < prompt_only["token_slots"], mem
    assert data["decode"]["compressions"] >= 1
    assert data["rouge_l_vs_full"]["full"] == 1.0 and set(data["rouge_l_vs_full"]) == set(mem)
    md = out.with_suffix(".md").read_text()
    assert "| snapkv-32 + decode 16 |" in md and "ROUGE-L" in md
    assert (tmp_path / "lo.png").stat().st_size > 5000

    # the reasoning case: a question shorter than the budget stays whole (no pages) unless
    # it has a decode budget; then it is kept whole in pages and its output moves there
    out = tmp_path / "q"
    r = subprocess.run(
        [sys.executable, "benchmarks/long_outputs.py", "--server", bench_server.url, "--prompt", "question",
         "--tokens", "40", "--every", "20", "--budget", "128", "--decode-budgets", "16", "--docs", "0",
         "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    mem = json.loads(out.with_suffix(".json").read_text())["memory"]
    assert all(s["pages"] == 0 for k in ("full", "snapkv-128") for s in mem[k]["samples"]), mem
    assert mem["snapkv-128 + decode 16"]["samples"][0]["pages"] > 0, mem
    md = out.with_suffix(".md").read_text()
    assert "-token question" in md and "ROUGE-L" not in md and (tmp_path / "q.png").exists()


@pytest.mark.server
def test_shared_document_cli_compresses_once_for_every_question(bench_server, tmp_path):
    """benchmarks/shared_document.py on tiny settings against the shared server: the shared
    configuration compresses the document once and every question reads that copy, holding
    less KV while decoding than one copy per request."""
    out = tmp_path / "sd"
    r = subprocess.run(
        [sys.executable, "benchmarks/shared_document.py", "--server", bench_server.url, "--doc-tokens", "700",
         "--questions", "3", "--policies", "streamingllm", "--budget", "20%", "--max-tokens", "8", "--out", str(out),
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    cfg = data["configs"]
    assert list(cfg) == ["full", "streamingllm per request", "streamingllm shared"]
    per, shared = cfg["streamingllm per request"], cfg["streamingllm shared"]
    assert (per["compressions"], per["reads_shared"]) == (3, 0) and (shared["compressions"], shared["reads_shared"]) == (1, 3)
    assert all(c["integrity"] == "ok" and c["decode_held"]["samples"] >= 1 for c in cfg.values()), cfg
    assert shared["decode_held"]["pages"] < per["decode_held"]["pages"], (shared, per)
    assert "| streamingllm shared | " in out.with_suffix(".md").read_text()
    assert (tmp_path / "sd.png").stat().st_size > 5000


@pytest.mark.server
def test_capacity_cli_measures_both_servers_through_bench_serving(tmp_path):
    out = tmp_path / "cap"
    r = subprocess.run(
        [sys.executable, "benchmarks/capacity.py", "--kv-memory", "4096", "--lengths", "300", "--concurrency",
         "3", "--requests", "3", "--output-len", "4", "--overhead-requests", "1", "--budget", "10%",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    runs = data["runs"]
    # one concurrency (each bench_serving run costs ~1-2 min here; the CLI loops over the list)
    assert [(x["server"], x["max_concurrency"]) for x in runs] == [("full", 3), ("headkv", 3)]
    for x in runs:
        assert x["completed"] == 3 and x["total_output_tokens"] == 12 and x["output_throughput"] > 0, x
        assert 1 <= x["peak_running"] <= 3 and x["median_ttft_ms"] > 0
    full, head = runs
    # the same KV memory: all of it SGLang's for full; split in half with the policy
    assert full["token_pool"] == 4096 and full["compressed_pool_token_equivalents"] == 0
    assert head["token_pool"] + head["compressed_pool_token_equivalents"] == 4096
    assert head["budget_tokens"] == 30 and head["peak_compressed"] >= 1
    assert {o["request_policy"] for o in data["overhead"]} == {"full", "headkv"}
    md = out.with_suffix(".md").read_text()
    assert "| full | 300 | 3 | 3 |" in md and "Compression overhead" in md
    assert (tmp_path / "cap.png").stat().st_size > 5000


@pytest.mark.parametrize("script,args", [
    ("gpu_compress.py", []),
    ("gpu_decode_step.py", ["--batch", "3", "--context", "200", "--tail", "5", "--budget", "16", "--layers", "2",
                            "--steps", "2", "--profile", "1"]),
])
def test_gpu_benchmarks_run_their_cpu_dry_run(script, args, tmp_path):
    """The GPU benchmarks' code paths on tiny CPU shapes (their times mean nothing here), so the
    scripts `scripts/gpu_check.sh` runs on a lent GPU are known to work before it is spent."""
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--cpu-dry-run", *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    if script == "gpu_compress.py":
        assert len(result["rows"]) == 10 and all(0 < row["ttft_share"] < 1 for row in result["rows"])
        assert "| 700 | headkv+question |" in md
    else:
        assert result["headkv"]["replan_ms"] > 0 and result["headkv"]["kept_fraction"] > 0
        assert "re-plan of the same batch" in md
        prof = out.with_suffix(".profile.txt").read_text()  # the wrapper's parts, labelled
        for part in ("## step", "## HeadKVAttnBackend._plan", "## TorchRaggedAttention.run"):
            assert part in prof, part


def test_rankings_compare_only_cells_of_equal_held_kv():
    from benchmarks.regenerate import equal_held_ranking

    policies = ["headkv", "snapkv", "razor", "streamingllm"]
    rel = {"headkv": {"1%": 0.3}, "snapkv": {"1%": 0.1}, "razor": {"1%": 0.9}, "streamingllm": {"1%": None}}
    kept = {"headkv": {"1%": 0.0140}, "snapkv": {"1%": 0.0153}, "razor": {"1%": 0.169}, "streamingllm": {"1%": 0.0127}}
    order, other = equal_held_ranking(rel, kept, policies, "1%")
    # razor scores best but holds 12x the KV: not ranked; 0.0127 is within 10% of 0.0140, 0.0153 too
    assert order == ["headkv", "snapkv", "streamingllm"] and other == {"razor": 0.169}
    kept["snapkv"]["1%"] = 0.0155  # 10.7% above headkv's
    assert equal_held_ranking(rel, kept, policies, "1%") == (["headkv", "streamingllm"],
                                                              {"snapkv": 0.0155, "razor": 0.169})
    kept["headkv"]["1%"] = None  # headkv not measured there: nothing is comparable
    assert equal_held_ranking(rel, kept, policies, "1%")[0] == []


def _grid(policies, budgets, rel, kept, cases, full_total, command="python benchmarks/fidelity.py ..."):
    return {"meta": {"machine": "test", "budgets": budgets, "policies": policies, "cases": cases,
                     "cases_per_task": {"niah": cases}, "prompt_tokens": [1012, 7110], "tasks": ["niah"],
                     "command": command},
            "summary": {"relative_to_full": rel, "kv_kept": kept, "full_short_answer_total": full_total,
                        "tasks": {"niah": {"full": full_total / cases}}}}


def test_readme_section_shows_the_needle_grid_with_equal_held_rankings():
    from benchmarks.regenerate import section

    policies, budgets = ["headkv", "snapkv"], ["1%", "2%"]
    fid = _grid(policies, budgets, {"headkv": {"1%": 0.5, "2%": 0.97}, "snapkv": {"1%": 0.2, "2%": 0.5}},
                {"headkv": {"1%": 0.014, "2%": 0.023}, "snapkv": {"1%": 0.015, "2%": 0.022}}, 24, 10.0)
    needles = _grid(policies, budgets, {"headkv": {"1%": 0.4, "2%": 0.6}, "snapkv": {"1%": 0.1, "2%": 0.7}},
                    {"headkv": {"1%": 0.014, "2%": 0.023}, "snapkv": {"1%": 0.05, "2%": 0.022}}, 30, 25.0,
                    command="python benchmarks/fidelity.py --tasks niah")
    needles["meta"]["kv_params"] = {"kv_scoring": "question", "kv_beta": 1.5}
    needles["rows"] = [{"policy": p, "task": "niah", "target_tokens": n, "depth": d}
                       for p in ("full", "headkv") for n in (1000, 2000, 4000) for d in (0.1, 0.5)]
    text = section(fid, None, None, needles)
    part = text[text.index("**Needles, 30 cases per cell**"):]
    # the grid's shape and its request parameters are read from the grid, not written in
    assert ("1012–7110 tokens, 30 with one needle (3 lengths x 2 depths), the question scoring the prompt "
            "(`kv_scoring: question`), `kv_beta: 1.5`; full KV") in part
    needles["meta"]["cases_per_task"] = {"niah": 24, "multikey": 6}
    assert ("24 with one needle (3 lengths x 2 depths) and 6 with four same-shaped needles, the question "
            "naming one (multikey), the question") in section(fid, None, None, needles)
    assert "full KV finds 25 of 30, one answer moves a cell by ~4 points" in part
    assert "| headkv | 40% (1.4%) | 60% (2.3%) |" in part and "| snapkv | 10% (5.0%) | 70% (2.2%) |" in part
    # at 1% snapkv holds 3.6x headkv's KV: not ranked; at 2% it is, and it is ahead
    assert ("1%: headkv ranks 1 of 1 (best: headkv) [not comparable: snapkv holds 5.0%]; "
            "2%: headkv ranks 2 of 2 (best: snapkv)") in part
    assert "`python benchmarks/fidelity.py --tasks niah`" in part
    needles["summary"]["relative_to_full"]["snapkv"]["2%"] = 0.6  # equal scores are said to be a tie
    assert "2%: headkv ranks 1 of 2 (best: headkv; tied with snapkv)" in section(fid, None, None, needles)
    assert "**97%** (2.3%)" in text  # the main grid's 97% cell is still marked
    assert "Needles" not in section(fid, None, None)
    # grids say which of the policy defaults they were measured under have changed since
    from benchmarks.fidelity import policy_defaults

    assert "Measured before grids recorded their policy defaults" in text
    needles["meta"]["kv_defaults"] = fid["meta"]["kv_defaults"] = policy_defaults()
    text = section(fid, None, None, needles)
    assert "Measured before" not in text and "defaults changed" not in text
    fid["meta"]["kv_defaults"] = {**policy_defaults(), "pool_shift": 3, "kernel_size": 7}
    text = section(fid, None, None, needles)
    assert text.count("Measured with policy defaults changed since") == 1
    assert "(kernel_size 7 -> 13, pool_shift 3 -> 0); re-run to update." in text
    # a default the grid's requests set themselves is not a change for it
    fid["meta"]["kv_defaults"] = {**policy_defaults(), "scoring": "window"}
    fid["meta"]["kv_params"] = {"kv_scoring": "question"}
    assert "defaults changed" not in section(fid, None, None, needles)
    del fid["meta"]["kv_params"]
    assert '(scoring "window" -> "question")' in section(fid, None, None, needles)


def test_readme_table_shows_quality_kept_and_requests_held():
    from benchmarks.regenerate import SUMMARY_BEGIN, SUMMARY_END, section, summary_table

    fid = _grid(["headkv", "snapkv", "razor"], ["2%", "5%"],
                {"headkv": {"2%": 0.5, "5%": 0.875}, "snapkv": {"2%": 0.25, "5%": None}, "razor": {"2%": 1, "5%": 1}},
                {"headkv": {"2%": 0.023, "5%": 0.054}, "snapkv": {"2%": 0.026, "5%": None},
                 "razor": {"2%": 0.17, "5%": 0.2}}, 24, 10.0)
    cap = {"meta": {"budget": "5%", "kv_memory_tokens": 999},
           "runs": [{"server": s, "prompt_tokens": n, "max_concurrency": c, "peak_running": p}
                    for s, n, c, p in [("full", 2048, 1, 1), ("full", 2048, 16, 7), ("headkv", 2048, 16, 15),
                                       ("headkv", 1024, 16, 16), ("full", 1024, 16, 9)]]}
    text = summary_table(fid, cap)
    assert text.startswith(SUMMARY_BEGIN) and text.endswith(SUMMARY_END)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows == ["| policy | 2% budget | 5% budget | requests held |",
                    "| full KV | 100% | 100% | 7 |",
                    "| headkv | 50% (2.3%) | 88% (5.4%) | 15 (at 5%) |",  # the longest prompts, most sent at once
                    "| snapkv | 25% (2.6%) | – (–) | — |"], rows
    assert "2048-token prompts in the same KV memory (999 tokens of this model), 16 sent at once" in text
    assert "razor" not in text  # policies outside the table's list are in docs/, not the README
    assert "| full KV | 100% | 100% | — |" in summary_table(fid, None)
    # the docs/ copy of the full section links one directory up
    assert "](../benchmarks/results/fidelity_cpu.md)" in section(fid, None, None, root="../")
    assert "](benchmarks/results/fidelity_cpu.md)" in section(fid, None, None)


def test_one_memory_configs_become_server_flags_and_bad_ones_are_named():
    from benchmarks import one_memory as om

    assert om.server_args("plain", "headkv", 4096, []) == ["--max-total-tokens", "4096", "--sleep-on-idle"]
    assert om.server_args("split:0.25", "snapkv", 4096, ["--x"])[-5:] == [
        "--x", "--kv-policy", "snapkv", "--kv-pool-fraction", "0.25"]
    assert om.server_args("shared", "headkv", 4096, [])[-4:] == ["--kv-policy", "headkv", "--kv-memory", "shared"]
    for bad in ("split", "split:1", "split:0", "split:x", "halves"):
        with pytest.raises(Exception, match="expected plain, shared or split:F"):
            om.parse_config(bad)
    r = subprocess.run([sys.executable, "benchmarks/one_memory.py", "--configs", "split:2"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "split:2" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("seed,heads,T,window", [(0, 3, 17, 4), (1, 5, 33, 0), (2, 1, 9, 9), (3, 4, 50, 60)])
def test_pod_overlap_counts_against_a_naive_loop(seed, heads, T, window):
    """benchmarks/pod_overlap.py: distant tokens a row keeps, those the layer below keeps too, and
    the rows keeping a whole answer span, against per-(row, position) loops on random masks."""
    import torch

    from benchmarks.pod_overlap import analyse, answer_rows, row_overlap

    g = torch.Generator().manual_seed(seed)
    keeps = [torch.rand(heads, T, generator=g) < 0.4 for _ in range(4)]
    spans = [(2, 5), (T - 3, T - 1)]
    for layer in range(1, 4):
        own, common = row_overlap(keeps[layer], keeps[layer - 1], window)
        for h in range(heads):
            mine = [t for t in range(T) if t < T - window and keeps[layer][h, t]]
            assert int(own[h]) == len(mine)
            assert int(common[h]) == sum(bool(keeps[layer - 1][h, t]) for t in mine)
    for keep in keeps:
        want = [any(all(keep[h, t] for t in range(s, e)) for s, e in spans) for h in range(heads)]
        assert answer_rows(keep, spans).tolist() == want
    got = analyse(keeps, spans, window)
    assert [x["layer"] for x in got] == [1, 2, 3]
    for x in got:
        own, common = row_overlap(keeps[x["layer"]], keeps[x["layer"] - 1], window)
        assert (x["own"], x["common"]) == (int(own.sum()), int(common.sum()))
        assert x["answer_own"] == int(answer_rows(keeps[x["layer"]], spans).sum())
        assert x["answer_below"] == int(answer_rows(keeps[x["layer"] - 1], spans).sum())
    with pytest.raises(ValueError, match="same"):
        row_overlap(keeps[0], keeps[1][:, :-1], window)


def test_pod_overlap_cli_at_the_full_budget_and_a_small_one(hf_model, tmp_path):
    """At 100% every row keeps every token: every distant token is shared with the layer below and
    every row keeps the answer; at 5% the overlap is a share and at most every row keeps it."""
    from benchmarks.pod_overlap import main

    out = tmp_path / "po"
    assert main(["--lengths", "300", "--depths", "0.5", "--budgets", "100%", "5%", "--no-plots",
                 "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["meta"]["rows_per_layer"]
    assert rows == 3 and result["meta"]["cases"] == 1 and len(result["similarity"]) == 30
    full, small = result["layers"]["100%"], result["layers"]["5%"]
    assert [x["layer"] for x in full] == list(range(1, 30))
    for x in full:
        assert x["own"] == x["common"] > 0 and x["answer_own"] == x["answer_below"] == rows, x
    for x in small:
        assert 0 <= x["common"] <= x["own"] and 0 <= x["answer_own"] <= rows and 0 <= x["answer_below"] <= rows, x
    md = out.with_suffix(".md").read_text()
    assert "| 1 | " in md and "100% | 3 / 3 |" in md and "- 100%: overall overlap 100%" in md
