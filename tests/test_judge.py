"""Judge runs against the real SmolLM2, in-process and through llmlab's OpenAI-compatible server; the
self-report must be what the raw judgments say. (SmolLM2-135M is a weak judge: parse failures are expected
and must be counted, never turned into scores.)"""

import json

import pytest

from llmlab.eval.judge import Judge, parse_rating, parse_verdict
from llmlab.eval.judge.judge import swap
from llmlab.eval.judge.run import human_agreement, run_judge, win_rate

ITEMS = [
    {"question": "What is 2 + 2?", "answer": "4", "answer_a": "4", "answer_b": "5", "label": "A"},
    {"question": "What color is the sky on a clear day?", "answer": "Green.", "answer_a": "Green.",
     "answer_b": "Blue.", "label": "B"},
]


@pytest.fixture(scope="module")
def llm(smollm2_gguf, fp32_decode):  # in-process and endpoint judgments are compared token for token
    import llmlab
    return llmlab.load(smollm2_gguf)


def check_pointwise(res):
    """Each score is the parsed [[N]], or (marker missing) the most likely forced rating; in-process the judge
    can always be scored, so nothing is left a parse failure."""
    recs = res["records"]
    assert len(recs) == len(ITEMS)
    for r in recs:
        assert r["output"]
        parsed = parse_rating(r["output"])
        if parsed is not None:
            assert r["verdict_source"] == "parsed" and r["score"] == parsed
        else:
            probs = r["forced_probs"]
            assert r["verdict_source"] == "logprob" and sum(probs.values()) == pytest.approx(1.0)
            assert r["score"] == float(max(probs, key=probs.get)) and 0 < r["forced_mass"] <= 1
        assert r["parse_error"] == (r["score"] is None)
    rep = res["report"]
    assert rep["parse_failures"] == sum(r["score"] is None for r in recs) == 0
    assert rep["verdict_sources"]["parsed"] == sum(parse_rating(r["output"]) is not None for r in recs)
    unmarked = sum(parse_rating(r["output"]) is None for r in recs)
    assert rep["verdict_sources"]["forced"] == rep["forced_items"] == unmarked
    both = [(a, b) for a, b in zip(recs, res["repeat_records"]) if a["score"] is not None and b["score"] is not None]
    assert rep["repeat"]["n"] == len(both)


def check_pairwise(res):
    recs = res["records"]
    consistent = parsed = 0
    forced = 0
    for r in recs:
        assert len(r["outputs"]) == 2
        raw = []
        for k, out in enumerate(r["outputs"]):  # the marker when written, else the most likely forced letter
            probs = (r.get("forced_probs") or [None, None])[k]
            if parse_verdict(out) is not None:
                assert r["verdict_sources"][k] == "parsed" and probs is None
                raw.append(parse_verdict(out))
            elif probs is not None:
                assert r["verdict_sources"][k] == "logprob"
                raw.append(max(probs, key=probs.get))
                forced += 1
            else:
                assert r["verdict_sources"][k] is None
                raw.append(None)
        v1, v2 = raw[0], swap(raw[1])
        assert r["verdicts"] == [v1, v2]
        if v1 is None or v2 is None:
            assert r["verdict"] is None and r["parse_error"]
        else:
            parsed += 1
            consistent += v1 == v2
            assert r["verdict"] == (v1 if v1 == v2 else "tie")
    rep = res["report"]
    assert rep["parse_failures"] == len(recs) - parsed
    assert rep["position_consistency"] == (consistent / parsed if parsed else None)
    assert rep["verdict_sources"]["forced"] == forced


def test_judge_in_process(llm, tmp_path):
    from llmlab.client import LocalClient
    judge = Judge(LocalClient(llm), max_tokens=16)
    res = run_judge(judge, "pointwise", [dict(i) for i in ITEMS], tmp_path / "pw", verbosity=True)
    check_pointwise(res)
    v = res["report"]["verbosity"]
    assert v["n"] == len(ITEMS) and v["padded_wins"] + v["concise_wins"] + v["ties"] + v["parse_failures"] == v["n"]
    assert (tmp_path / "pw" / "report.md").exists() and (tmp_path / "pw" / "scores.png").exists()
    saved = [json.loads(l) for l in (tmp_path / "pw" / "judgments.jsonl").read_text().splitlines()]
    assert [s["output"] for s in saved] == [r["output"] for r in res["records"]]
    # a rerun resumes: nothing is judged again, the same judgments come back
    again = run_judge(judge, "pointwise", [dict(i) for i in ITEMS], tmp_path / "pw")
    assert [r["output"] for r in again["records"]] == [r["output"] for r in res["records"]]

    res = human_agreement(judge, [dict(i) for i in ITEMS], tmp_path / "agree", repeat=False)
    check_pairwise(res)
    a = res["agreement"]
    verdicts = [r["verdict"] for r in res["records"]]
    agree = [v == i["label"] for v, i in zip(verdicts, ITEMS) if v is not None]
    assert a["with_ties"]["n"] == len(agree)
    if agree:
        assert a["with_ties"]["agreement"] == pytest.approx(sum(agree) / len(agree))

    res = run_judge(judge, "geval", [dict(i) for i in ITEMS], tmp_path / "geval",
                    criterion="Correctness: the answer is factually right.", steps="1. Check the facts.")
    for r in res["records"]:
        assert r["method"] == "logprobs"
        if r["score"] is not None:
            assert 1 <= r["score"] <= 5 and sum(r["score_probs"].values()) == pytest.approx(1.0)
            assert r["score"] == pytest.approx(sum(int(k) * p for k, p in r["score_probs"].items()))
    assert res["report"]["parse_failures"] == sum(r["score"] is None for r in res["records"])


def test_judge_through_endpoint(llm, tmp_path):
    from llmlab.client import LocalClient, EndpointClient
    from llmlab.serve.testing import running_server
    local = Judge(LocalClient(llm), max_tokens=24)
    with running_server(llm) as url:
        judge = Judge(EndpointClient(url, "smollm2"), max_tokens=24)
        # no repeated run here: each forced verdict costs the endpoint one echo request per allowed letter
        res = win_rate(judge, [i["question"] for i in ITEMS], [i["answer_a"] for i in ITEMS],
                       [i["answer_b"] for i in ITEMS], tmp_path / "wr", repeat=False)
        check_pairwise(res)
        w = res["win_rate"] if any(r["verdict"] for r in res["records"]) else None
        # greedy judging is the same model either way: the endpoint's judgments equal the in-process ones
        same = local.pairwise([{"id": i, "question": it["question"], "answer_a": it["answer_a"],
                                "answer_b": it["answer_b"]} for i, it in enumerate(ITEMS)])
        assert [r["outputs"] for r in res["records"]] == [r["outputs"] for r in same]
        # and so are the forced verdicts: the endpoint scores the transcript through /v1/completions echo+logprobs
        assert [r["verdicts"] for r in res["records"]] == [r["verdicts"] for r in same]
        assert [r["verdict_sources"] for r in res["records"]] == [r["verdict_sources"] for r in same]
        for a, b in zip(res["records"], same):
            for pa, pb in zip(a.get("forced_probs") or [None] * 2, b.get("forced_probs") or [None] * 2):
                assert (pa is None and pb is None) or pa == pytest.approx(pb, abs=1e-4)
        if w:
            assert w["judged"] + w["parse_failures"] == len(ITEMS)
        g = run_judge(judge, "geval", [dict(i) for i in ITEMS], None, repeat=False,
                      criterion="Correctness", steps="1. Check the facts.")
        assert all(r["method"] == "logprobs" for r in g["records"])
