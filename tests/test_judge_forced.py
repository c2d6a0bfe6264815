"""Forced verdicts with the real SmolLM2 judge: when the judge writes no [[...]] marker, its own transcript is
continued with the marker and the verdict read from its log-probabilities. A real pairwise run (SmolLM2's
answers against the same answers cut to two words) gives a win rate, a length-controlled win rate and
Bradley-Terry ratings, all recomputed here from the raw judgments on disk. And an endpoint without
log-probabilities: G-Eval averages samples, and unforceable judgments stay parse failures."""

import json
import math
import re

import pytest

from llmlab.client import GenParams, LocalClient, EndpointClient
from llmlab.eval.judge import Judge, parse_rating, parse_verdict
from llmlab.eval.judge.judge import PAIRWISE_MARKER, swap
from llmlab.eval.judge.ratings import battles_from_records, elo, leaderboard
from llmlab.eval.judge.run import run_judge, win_rate
from llmlab.eval.judge.winrate import length_controlled

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    import llmlab
    return llmlab.load(smollm2_gguf)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_source(output, source, probs):
    """A judgment's verdict as the raw record says it must be: parsed when the marker is there, else forced."""
    parsed = parse_verdict(output)
    if parsed is not None:
        assert source == "parsed" and probs is None
        return parsed
    assert source == "logprob" and sum(probs.values()) == pytest.approx(1.0)
    return max(probs, key=probs.get)  # the most likely allowed continuation, as shown in that order


def test_pairwise_win_rate_and_ratings_from_real_forced_judgments(llm, tmp_path):
    backend = LocalClient(llm)
    answers = [g.text for g in backend.generate(QUESTIONS, GenParams(max_tokens=24, temperature=0.0))]
    truncated = [" ".join(a.split()[:2]) for a in answers]
    assert all(len(t) < len(a) for t, a in zip(truncated, answers))  # two real, different answer sets
    judge = Judge(backend, max_tokens=16)
    res = win_rate(judge, QUESTIONS, answers, truncated, tmp_path, repeat=False)

    # everything below is recomputed from the judgments as written to disk
    recs = read_jsonl(tmp_path / "judgments.jsonl")
    report = json.loads((tmp_path / "report.json").read_text())
    w = json.loads((tmp_path / "winrate.json").read_text())
    assert [r["outputs"] for r in recs] == [r["outputs"] for r in res["records"]]
    counts = {"parsed": 0, "logprob": 0}
    consistent = 0
    for r in recs:
        probs = r.get("forced_probs") or [None, None]
        raw = [expected_source(o, s, p) for o, s, p in zip(r["outputs"], r["verdict_sources"], probs)]
        for s in r["verdict_sources"]:
            counts[s] += 1
        v1, v2 = raw[0], swap(raw[1])
        assert r["verdicts"] == [v1, v2] and r["verdict"] == (v1 if v1 == v2 else "tie")
        assert r["verdict_source"] == ("parsed" if r["verdict_sources"] == ["parsed", "parsed"] else "logprob")
        consistent += v1 == v2
    # in-process the judge can always be scored: every judgment has a verdict, none is a parse failure
    assert report["parse_failures"] == 0 and w["judged"] == len(QUESTIONS)
    assert report["verdict_sources"] == {"judgments": 2 * len(QUESTIONS), "parsed": counts["parsed"],
                                         "forced": counts["logprob"], "failed": 0}
    assert report["forced_items"] == sum(r["verdict_source"] == "logprob" for r in recs)
    assert w["forced"] == report["forced_items"]
    assert report["position_consistency"] == pytest.approx(consistent / len(recs))

    # win rate: the model (answer_a) scores 1 for a win, 0.5 for a tie, 0 for a loss
    y = [{"A": 1.0, "tie": 0.5, "B": 0.0}[r["verdict"]] for r in recs]
    assert w["win_rate"] == pytest.approx(sum(y) / len(y))
    assert (w["wins"], w["ties"], w["losses"]) == (y.count(1.0), y.count(0.5), y.count(0.0))
    lc = length_controlled(y, [len(r["answer_a"]) for r in recs], [len(r["answer_b"]) for r in recs])
    assert w["lc_win_rate"] == pytest.approx(lc["lc_win_rate"]) and 0.0 <= w["lc_win_rate"] <= 1.0

    # Bradley-Terry from the same judgments (what `llmlab judge ratings --judgments` does): with two models the
    # strength ratio is (wins + ties / 2 + prior / 2) / (losses + ties / 2 + prior / 2), prior 0.1 by default
    rows = leaderboard(battles_from_records(recs), n_boot=50)
    rating = {row["model"]: row["rating"] for row in rows}
    ratio = (sum(y) + 0.05) / (len(y) - sum(y) + 0.05)
    assert rating["model"] - rating["baseline"] == pytest.approx(elo(ratio) - elo(1.0), abs=1e-6)

    # a forced verdict is the judge's own next-token distribution after "...\n\nFinal verdict: [[": checked
    # against a plain forward (Engine.score_batch) over the same transcript, without the backend's batching
    forced = [(r, k) for r in recs for k in range(2) if r["verdict_sources"][k] == "logprob"]
    if forced:
        r, k = forced[0]
        prompt = judge.pairwise_prompts(r)[k]
        tok = llm.tokenizer
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}])
        ctx = chat + r["outputs"][k].rstrip() + PAIRWISE_MARKER
        ctx_ids = tok.encode(ctx, add_special_tokens=True)
        lps = [sum(x) for x in llm.engine.score_batch([(ctx_ids, tok.encode(c + "]]")) for c in "ABC"])]
        total = sum(math.exp(x) for x in lps)
        want = {v: math.exp(x) / total for v, x in zip(["A", "B", "tie"], lps)}
        assert r["forced_probs"][k] == pytest.approx(want, abs=1e-3)
        assert r["forced_mass"][k] == pytest.approx(total, rel=1e-2)
    print(f"\nwin rate {w['win_rate']:.3f}, lc {w['lc_win_rate']:.3f}, {w['wins']}W/{w['ties']}T/{w['losses']}L; "
          f"verdicts {report['verdict_sources']}; position consistency {report['position_consistency']}; "
          f"ratings {rating}")


def test_endpoint_without_logprobs(llm):
    """The real llmlab server used without log-probabilities: G-Eval's score is the mean of the sampled scores,
    and a pairwise judgment without its marker cannot be forced, so it stays a counted parse failure."""
    from llmlab.serve.testing import running_server
    items = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "Name a color.", "answer": "Blue."}]
    with running_server(llm) as url:
        judge = Judge(EndpointClient(url, "smollm2", logprobs=False), max_tokens=8, samples=3)
        g = run_judge(judge, "geval", [dict(i) for i in items], None, repeat=False,
                      criterion="Correctness: the answer is right.", steps="1. Check the answer.")
        p = run_judge(judge, "pairwise", [{"question": "What is 2 + 2?", "answer_a": "4", "answer_b": "5"}],
                      None, repeat=False)
    for r in g["records"]:
        assert r["method"] == "samples" and len(r["outputs"]) == 3
        values = []
        for text in r["outputs"]:  # the first integer of each sample, kept when it is on the 1-5 scale
            m = re.search(r"\d+", text)
            values.append(int(m.group(0)) if m and 1 <= int(m.group(0)) <= 5 else None)
        assert r["samples"] == values and r["sample_parse_errors"] == values.count(None)
        ok = [v for v in values if v is not None]
        if ok:
            assert r["score"] == pytest.approx(sum(ok) / len(ok)) and not r["parse_error"]
        else:
            assert r["score"] is None and r["parse_error"]
    assert g["report"]["parse_failures"] == sum(r["score"] is None for r in g["records"])

    (r,) = p["records"]
    sources = ["parsed" if parse_verdict(o) is not None else None for o in r["outputs"]]
    assert r["verdict_sources"] == sources and "forced_probs" not in r  # nothing could be forced
    assert r["parse_error"] == (None in sources)
    rep = p["report"]
    assert rep["verdict_sources"] == {"judgments": 2, "parsed": sources.count("parsed"), "forced": 0,
                                      "failed": sources.count(None)}
    assert rep["parse_failures"] == int(None in sources)


def test_forcing_can_be_turned_off(llm):
    item = {"question": "What is 2 + 2?", "answer": "4"}
    (on,) = Judge(LocalClient(llm), max_tokens=4).pointwise([dict(item)])
    (off,) = Judge(LocalClient(llm), max_tokens=4, force_verdict=False).pointwise([dict(item)])
    assert on["output"] == off["output"] and parse_rating(off["output"]) is None  # 4 tokens: no marker
    probs = on["forced_probs"]
    assert on["verdict_source"] == "logprob" and on["score"] == float(max(probs, key=probs.get))
    assert off["verdict_source"] is None and off["parse_error"] and off["score"] is None and "forced_probs" not in off
