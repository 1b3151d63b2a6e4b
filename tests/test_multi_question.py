"""benchmarks/multi_question.py without a server: the cases, the answer check, the run's
handling of a refused scoring, and the table."""

from __future__ import annotations

import io
import json
import random
import re
import urllib.error

import pytest

from benchmarks import multi_question as mq
from benchmarks import shared_document


def words(text: str) -> int:
    """A stand-in tokenizer: ~1.35 tokens per word, as the test model's for this prose."""
    return round(len(text.split()) * 1.35)


@pytest.mark.parametrize("n_facts", [1, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 7, 123])
def test_a_case_is_deterministic_and_its_facts_have_distinct_shapes(n_facts, seed):
    a = mq.case(words, 777, n_facts, seed)
    b = mq.case(words, 777, n_facts, seed)
    assert a == b
    shapes = [f.shape for f in a.facts]
    assert len(shapes) == n_facts and len(set(shapes)) == n_facts, shapes
    assert set(shapes) <= set(mq.SHAPES)
    assert abs(words(a.text) - 777) <= 0.05 * 777, words(a.text)
    for f in a.facts:
        assert a.text.count(f.sentence) == 1, f.sentence
        assert f.answer in f.sentence
        assert all(p.lower() in f.answer.lower() for p in f.parts), (f.parts, f.answer)
        assert not mq.correct(f, f.question), f"the question gives its answer away: {f.question}"
        assert mq.correct(f, f.sentence) and mq.correct(f, f.answer)


def test_other_seeds_give_other_documents_and_facts():
    cases = [mq.case(words, 501, 4, s) for s in range(6)]
    assert len({c.text for c in cases}) == 6
    assert len({tuple(f.answer for f in c.facts) for c in cases}) == 6


def test_facts_are_planted_in_order_evenly():
    for seed in range(5):
        c = mq.case(words, 1203, 6, seed)
        pos = [c.text.index(f.sentence) for f in c.facts]
        assert pos == sorted(pos)
        gaps = [b - a for a, b in zip([0, *pos], [*pos, len(c.text)])]
        # fact i sits at depth (i + 0.5) / n: the first and last gaps are half the others
        assert max(gaps[1:-1]) < 2.5 * min(gaps[1:-1]), gaps


@pytest.mark.parametrize("bad", [0, len(mq.SHAPES) + 1])
def test_facts_for_refuses_more_facts_than_shapes(bad):
    with pytest.raises(ValueError, match="one fact per shape"):
        mq.facts_for(bad, 0)


def reference_correct(fact: mq.Fact, output: str) -> bool:
    """Naive: every part equals some token of the output (split on non-word characters)."""
    toks = [t.lower() for t in re.split(r"\W+", output) if t]
    return all(p.lower() in toks if " " not in p else p.lower() in output.lower() for p in fact.parts)


def test_answer_check_against_a_naive_reference_on_random_outputs():
    rng = random.Random(5)
    vocab = ["the", "is", "in", "town", "of", "color", "a", "named", ",", ".", "\"", "March", "1857", "14", "140"]
    checked = 0
    for seed in range(40):
        facts = mq.facts_for(len(mq.SHAPES), seed)
        for f in facts:
            for _ in range(15):
                pool = vocab + list(f.parts) + [p + "x" for p in f.parts] + ["x" + p for p in f.parts]
                out = " ".join(rng.choice(pool) for _ in range(rng.randrange(1, 12)))
                if rng.random() < 0.5:
                    out = out.upper() if rng.random() < 0.5 else out.title()
                assert mq.correct(f, out) == reference_correct(f, out), (f, out)
                checked += mq.correct(f, out)
    assert checked > 50  # both outcomes were drawn


def test_answer_check_cases():
    date = mq.Fact("date", "", "", "March 14, 1857", ("March", "14", "1857"))
    assert mq.correct(date, "The treaty was signed on 14 March 1857.")
    assert not mq.correct(date, "It was signed on March 14, 1858.")
    assert not mq.correct(date, "March 140, 1857")
    num = mq.Fact("number", "", "", "12345", ("12345",))
    assert mq.correct(num, "The code is 12345.") and not mq.correct(num, "The code is 123456.")
    color = mq.Fact("color", "", "", "red", ("red",))
    assert mq.correct(color, "RED") and not mq.correct(color, "Fred") and not mq.correct(color, "reddish")


def test_one_documents_answers_do_not_answer_each_other():
    for seed in range(30):
        facts = mq.facts_for(len(mq.SHAPES), seed)
        for f in facts:
            for g in facts:
                assert mq.correct(f, g.answer) == (f is g), (f, g)


def test_configs_and_not_supported():
    cfgs = mq.configs("snapkv", "5%", ["window", "self"])
    assert [c[0] for c in cfgs] == ["full", "snapkv per request", "snapkv shared window", "snapkv shared self"]
    assert cfgs[1][1] == {"kv_policy": "snapkv", "kv_budget": "5%", "kv_scoring": "question"} and not cfgs[1][2]
    assert cfgs[3][1]["kv_share"] is True and cfgs[3][1]["kv_scoring"] == "self" and cfgs[3][2]
    two = mq.configs(["snapkv", "headkv"], "5%", ["reconstruct"])
    assert [c[0] for c in two] == ["full", "snapkv per request", "snapkv shared reconstruct", "headkv per request",
                                   "headkv shared reconstruct"]
    assert two[4][1] == {"kv_policy": "headkv", "kv_budget": "5%", "kv_share": True, "kv_scoring": "reconstruct"}
    e400 = urllib.error.HTTPError("u", 400, "Bad Request", {}, io.BytesIO(b"kv_scoring: invalid value 'self'"))
    e500 = urllib.error.HTTPError("u", 500, "Error", {}, io.BytesIO(b"boom"))
    assert "invalid value 'self'" in mq.not_supported(e400)
    assert mq.not_supported(e500) is None and mq.not_supported(ValueError("x")) is None
    # streamed: SGLang answers 200 and puts the refusal in the stream
    assert mq.not_supported(shared_document.RequestError(400, "kv_scoring: invalid value 'self'")).endswith("'self'")
    assert mq.not_supported(shared_document.RequestError(500, "boom")) is None


def fake_run(monkeypatch, refuse: set[str], wrong_after: int = 2):
    """run() against stand-ins for the server calls: a scoring in ``refuse`` is refused with
    HTTP 400; every configuration answers its first ``wrong_after`` questions right."""
    calls: list[dict] = []

    def run_config(url, doc, qs, params, shared, max_tokens, token_bytes):
        calls.append(params)
        if params.get("kv_scoring") in refuse:  # as SGLang does it: in the stream of a 200 response
            raise shared_document.RequestError(400, "custom_params.kv_scoring: invalid value")
        facts = state["facts"][len(doc)]
        texts = [f.answer if i < wrong_after else "no idea" for i, f in enumerate(facts)]
        return {"texts": texts, "decode_held": {"bytes": 1000 * len(qs) * (1 if shared else 3)},
                # as the server: no compress_ms for a shared copy's document request
                "compress_ms": [12.5] * (0 if shared else len(qs) if "kv_budget" in params else 0),
                "doc_seconds": 3.0 if shared else None,
                "compressions": (1 if shared else len(qs)) if "kv_budget" in params else 0}

    state: dict = {"facts": {}}

    def chat_prompts(tok, text, questions):
        facts = next(c.facts for c in state["cases"] if c.text == text)
        doc = [0] * (100 + len(state["facts"]))
        state["facts"][len(doc)] = facts
        return doc, [doc + [1] for _ in questions]

    monkeypatch.setattr(shared_document, "run_config", run_config)
    monkeypatch.setattr(shared_document, "chat_prompts", chat_prompts)
    monkeypatch.setattr(shared_document, "flush", lambda url: None)
    state["cases"] = [mq.case(words, 301, 3, s) for s in range(2)]
    monkeypatch.setattr(mq, "case", lambda count, n, k, seed: state["cases"][seed])
    a = mq.parser().parse_args(["--docs", "2", "--facts", "3", "--budgets", "5%", "10%", "--shared-scorings",
                                "window", "self", "reconstruct", "--no-progress"])
    a.checkpoint = lambda res: None
    return mq.run("http://x", a, tok=None, token_bytes=1), calls


def test_a_refused_scoring_is_reported_and_the_run_goes_on(monkeypatch):
    res, calls = fake_run(monkeypatch, refuse={"self"})
    refused = [r for r in res["runs"] if "not_supported" in r]
    assert {r["config"] for r in refused} == {"snapkv shared self"} and len(refused) == 4  # 2 budgets x 2 docs
    assert sum(p.get("kv_scoring") == "self" for p in calls) == 1  # asked once, then known
    assert sum(p.get("kv_scoring") == "reconstruct" for p in calls) == 4
    assert sum(p == {"kv_policy": "full"} for p in calls) == 2  # full KV once per document
    rows = {(r["budget"], r["config"]): r for r in mq.summary(res)}
    assert rows[("10%", "snapkv shared self")]["not_supported"]
    assert rows[("10%", "snapkv shared window")]["right"] == 4 and rows[("10%", "snapkv shared window")]["asked"] == 6
    assert rows[("5%", "full")]["held"] == rows[("10%", "full")]["held"] == 2 * 9000
    assert rows[("5%", "snapkv shared reconstruct")]["doc_seconds"] == 6.0
    assert rows[("5%", "snapkv per request")]["compress_ms"] == 75.0
    assert rows[("5%", "snapkv per request")]["compressions"] == 6


def test_table_and_files(monkeypatch, tmp_path):
    res, _ = fake_run(monkeypatch, refuse={"reconstruct"})
    peer = {"command": "python benchmarks/kvpress_peer.py", "machine": "m", "kvpress": "0.5.5", "torch": "2.13",
            "transformers": "5.2", "dtype": "float32",
            "rows": [{"budget": "10%", "config": "kvpress full", "right": 6, "asked": 6, "held": 18000,
                      "full_held": 18000, "kept": 1.0, "compress_ms": 0.0, "compressions": 0, "not_supported": None},
                     {"budget": "10%", "config": "kvpress KVzipPress", "right": 5, "asked": 6, "held": 9000,
                      "full_held": 18000, "kept": 0.1, "compress_ms": 2500.0, "compressions": 2,
                      "not_supported": None}]}
    meta = {"machine": "test machine", "model": "M", "max_tokens": 32, "doc_tokens": 301, "command": "cmd",
            "peer": peer}
    for r in res["runs"]:  # the copies per request at 5% answer everything: the shared ones reach 4/6 of it
        if r["budget"] == "5%" and r["config"] == "snapkv per request":
            r["right"] = [True] * len(r["right"])
    md = mq.markdown(res, meta)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| budget | configuration | right answers")
    body = {tuple(c.strip() for c in ln.strip("|").split("|"))[:2]: ln for ln in lines[1:]}
    assert "not supported by this server" in body[("10%", "snapkv shared reconstruct")]
    assert "| 4/6 | 100% |  | 0.0 MB | 100.0% |" in body[("10%", "full")]
    # a shared copy against the same policy's copy per request (the oracle)
    assert "| 4/6 | 100% | 67% | 0.0 MB | 33.3% | not reported; document request 6.0 s (2x) |" in body[
        ("5%", "snapkv shared window")]
    assert "| 4/6 | 100% | 100% | 0.0 MB | 33.3% |" in body[("10%", "snapkv shared window")]
    assert "| 6/6 | 150% |  | 0.0 MB | 100.0% | 0.07 s (6x) |" in body[("5%", "snapkv per request")]
    kvzip = body[("10%", "kvpress KVzipPress")]
    assert "| 5/6 | 83% |  | 0.0 MB (kept 10%) | 50.0% | 2.50 s (2x) |" in kvzip  # against kvpress's own full KV
    assert "test machine" in md and "`cmd`" in md and "kvpress 0.5.5" in md
    out = str(tmp_path / "mq")
    mq.write(out, meta, res)
    saved = json.loads((tmp_path / "mq.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(mq.summary(res, peer)))
    assert (tmp_path / "mq.md").read_text() == md and (tmp_path / "mq.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--facts", "0"], ["--facts", str(len(mq.SHAPES) + 1)], ["--docs", "0"]])
def test_cli_refuses_bad_grids(argv, capsys):
    with pytest.raises(SystemExit):
        mq.main(argv)
    assert "invalid value" in capsys.readouterr().err


def test_report_only_adds_the_peer_rows(monkeypatch, tmp_path):
    res, _ = fake_run(monkeypatch, refuse=set())
    meta = {"machine": "m", "model": "M", "max_tokens": 32, "doc_tokens": 301, "command": "cmd"}
    out = str(tmp_path / "mq")
    mq.write(out, meta, res)
    assert "kvpress" not in (tmp_path / "mq.md").read_text()
    peer = {"command": "p", "machine": "m", "kvpress": "0.5.5", "torch": "t", "transformers": "x", "dtype": "float32",
            "rows": [{"budget": "5%", "config": "kvpress KeyDiffPress", "right": 1, "asked": 6, "held": 10,
                      "full_held": 20, "kept": 0.05, "compress_ms": 0.0, "compressions": 2, "not_supported": None}]}
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    assert mq.main(["--report-only", "--out", out, "--peer", str(tmp_path / "peer.json")]) == 0
    md = (tmp_path / "mq.md").read_text()
    assert "| 5% | kvpress KeyDiffPress | 1/6 | - |  | 0.0 MB (kept 5%) | 50.0% |" in md  # no kvpress full row
    # one peer file per budget: their rows join in order, their commands are joined
    peer25 = {**peer, "command": "p25", "rows": [{**peer["rows"][0], "budget": "25%", "right": 3}]}
    (tmp_path / "peer25.json").write_text(json.dumps(peer25))
    assert mq.main(["--report-only", "--out", out, "--peer", str(tmp_path / "peer.json"),
                    str(tmp_path / "peer25.json")]) == 0
    md = (tmp_path / "mq.md").read_text()
    # rows by budget: the peer's 5% row after the server's 5% rows, before its 10% ones
    assert (md.index("| 5% | snapkv shared reconstruct |") < md.index("| 5% | kvpress KeyDiffPress | 1/6 |")
            < md.index("| 10% | full |") < md.index("| 25% | kvpress KeyDiffPress | 3/6 |"))
    assert "`p; p25`" in md
    # runs of different kvpress versions are not one peer
    (tmp_path / "other.json").write_text(json.dumps({**peer25, "kvpress": "0.6"}))
    with pytest.raises(SystemExit, match="kvpress differ"):
        mq.main(["--report-only", "--out", out, "--peer", str(tmp_path / "peer.json"), str(tmp_path / "other.json")])


def test_generate_raises_on_an_error_in_the_stream(monkeypatch):
    """SGLang streams a refused request as a 200 response whose chunk is {"error": ...}."""
    class Resp(io.BytesIO):
        def __enter__(self):
            return self

    chunk = {"error": {"message": "custom_params.kv_scoring: invalid value 'self'", "code": 400}}
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    monkeypatch.setattr(shared_document.urllib.request, "urlopen", lambda req, timeout: Resp(body))
    with pytest.raises(shared_document.RequestError) as e:
        shared_document.generate("http://x", [1, 2], 0, {"kv_scoring": "self"})
    assert e.value.code == 400 and "invalid value 'self'" in mq.not_supported(e.value)
