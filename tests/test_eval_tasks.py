"""Task files, the runner (JSONL per item, resume, bootstrap summary) and the local backend on SmolLM2."""

import json
import math

import pytest

from llmlab.errors import LLMLabError
from llmlab.eval.builtin import GENERATORS, check_format, names
from llmlab.eval.tasks import load_task, run_task


@pytest.fixture(scope="module")
def llm(smollm2_gguf, fp32_decode):  # log-likelihoods of two paths are compared
    import llmlab
    return llmlab.load(smollm2_gguf)


@pytest.fixture(scope="module")
def backend(llm):
    from llmlab.client import LocalClient
    return LocalClient(llm)


def write(path, text):
    path.write_text(text)
    return path


def test_builtin_tasks_load_and_generate():
    assert {"bios_qa", "bios_mc", "arithmetic", "format_following", "bios_summary", "bios_facts", "bios_text"} <= set(names())
    for name in names():
        task = load_task(name)
        items = task.load_items()
        assert items and all("id" in it for it in items)
    a = GENERATORS["arithmetic"](5, 3)
    assert a == GENERATORS["arithmetic"](5, 3)  # a pure function of the seed
    assert all(str(eval(it["question"][8:-1])) == it["answer"] for it in a)
    mc = GENERATORS["bios_mc"](6, 0)
    assert all(len(set(it["choices"])) == 4 and it["choices"][it["gold"]] in it["biography"] for it in mc)


def test_format_checker():
    assert check_format("all lower case here", {"rule": "lowercase"}) == 1.0
    assert check_format("Not lower", {"rule": "lowercase"}) == 0.0
    assert check_format("- a\n- b\n- c", {"rule": "three_bullets"}) == 1.0
    assert check_format("- a\n- b", {"rule": "three_bullets"}) == 0.0
    assert check_format("ok. DONE.", {"rule": "ends_done"}) == 1.0
    assert check_format('Sure: {"answer": 3}', {"rule": "json_key"}) == 1.0
    assert check_format('{"other": 3}', {"rule": "json_key"}) == 0.0
    assert check_format("one two three", {"rule": "max_words"}) == 1.0


@pytest.mark.parametrize("yaml_text, missing", [
    ("type: generation\ndata: d.jsonl\nprompt: x\nscorer: exact_match\ntarget: y\n", "'name'"),
    ("name: t\ndata: d.jsonl\n", "'type'"),
    ("name: t\ntype: multiple_choice\ndata: d.jsonl\nprompt: x\nchoices: c\n", "'gold'"),
    ("name: t\ntype: generation\nprompt: x\nscorer: exact_match\ntarget: y\n", "'data'"),
    ("name: t\ntype: generation\ndata: d.jsonl\nprompt: x\nscorer: regex\ntarget: y\n", "'regex'"),
    ("name: t\ntype: generation\ndata: d.jsonl\nprompt: x\nscorer: exact_match\n", "'target'"),
    ("name: t\ntype: bleu\ndata: d.jsonl\nprompt: x\n", "'target'"),
])
def test_task_file_with_missing_field(tmp_path, yaml_text, missing):
    write(tmp_path / "d.jsonl", '{"q": 1}\n')
    f = write(tmp_path / "task.yaml", yaml_text)
    with pytest.raises(LLMLabError) as e:
        load_task(f)
    assert str(f) in str(e.value) and missing in str(e.value)


def test_task_file_other_errors(tmp_path):
    with pytest.raises(LLMLabError, match="no task file"):
        load_task(tmp_path / "nope.yaml")
    f = write(tmp_path / "t.yaml", "name: t\ntype: sorting\ndata: d.jsonl\n")
    with pytest.raises(LLMLabError, match="unknown type"):
        load_task(f)
    f = write(tmp_path / "t.yaml", "name: t\ntype: perplexity\ndata: missing.txt\n")
    with pytest.raises(LLMLabError, match="does not exist"):
        load_task(f)
    f = write(tmp_path / "t.yaml", "name: t\ntype: perplexity\ndata: d.txt\ncolour: red\n")
    write(tmp_path / "d.txt", "x")
    with pytest.raises(LLMLabError, match="unknown field 'colour'"):
        load_task(f)


def test_multiple_choice_scores_and_resume(tmp_path, llm, backend):
    task = load_task("bios_mc")
    s2 = run_task(task, backend, tmp_path, limit=2)
    items_file = tmp_path / "bios_mc" / "items.jsonl"
    first = items_file.read_text().splitlines()
    assert len(first) == 2
    # a crash mid-write leaves half a line: it is dropped and that item redone; done items are kept as they were
    with open(items_file, "a") as f:
        f.write('{"id": 2, "prom')
    s = run_task(task, backend, tmp_path, limit=3)
    lines = items_file.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    recs = [json.loads(l) for l in lines]
    # independent check: each choice's log-likelihood from the engine's own padded batch scoring
    pairs = [(llm.tokenizer.encode(r["prompt"].rstrip(" ")), llm.tokenizer.encode(" " + c))
             for r in recs for c in r["choices"]]
    refs = [sum(x) for x in llm.engine.score_batch(pairs)]
    assert [ll for r in recs for ll in r["logliks"]] == pytest.approx(refs, abs=1e-3)
    for r in recs:
        best = max(range(4), key=lambda i: r["logliks"][i])
        best_norm = max(range(4), key=lambda i: r["logliks"][i] / len(r["choices"][i]))
        assert r["acc"] == float(best == r["gold"]) and r["acc_norm"] == float(best_norm == r["gold"])
    summary = json.loads((tmp_path / "bios_mc" / "summary.json").read_text())
    assert summary == s and s["n"] == 3 and s2["n"] == 2
    assert s["metrics"]["acc"]["mean"] == pytest.approx(sum(r["acc"] for r in recs) / 3)
    lo, hi = s["metrics"]["acc"]["ci95"]
    assert lo <= s["metrics"]["acc"]["mean"] <= hi
    assert s["tokens"] > 0 and s["seconds"] > 0 and s["tokens_per_s"] > 0


def test_generation_regex_fewshot_and_checker(tmp_path, backend):
    write(tmp_path / "d.jsonl", "".join(json.dumps({"q": f"{a} + {a}", "a": str(2 * a)}) + "\n" for a in range(1, 5)))
    write(tmp_path / "check.py", "def check(output, item):\n    return float(item['a'] in output)\n")
    write(tmp_path / "t.yaml", "name: add\ntype: generation\ndata: d.jsonl\nprompt: 'What is {q}?'\n"
          "target: '{a}'\nscorer: regex\nregex: '(\\d+)'\nregex_match: last\nfewshot: 1\nmax_tokens: 8\n")
    s = run_task(load_task(tmp_path / "t.yaml"), backend, tmp_path / "out")
    recs = [json.loads(l) for l in (tmp_path / "out" / "add" / "items.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and s["n"] == 3  # the first item is the few-shot example
    assert all(r["prompt"].startswith("What is 1 + 1? 2\n\n") for r in recs)
    import re
    for r in recs:
        nums = re.findall(r"(-?\d+)", r["output"])
        assert r["score"] == float(bool(nums) and nums[-1] == r["reference"])
    write(tmp_path / "c.yaml", "name: addc\ntype: generation\ndata: d.jsonl\nprompt: 'What is {q}?'\n"
          "scorer: python\nchecker: check.py:check\nmax_tokens: 8\n")
    s = run_task(load_task(tmp_path / "c.yaml"), backend, tmp_path / "out", limit=2)
    recs = [json.loads(l) for l in (tmp_path / "out" / "addc" / "items.jsonl").read_text().splitlines()]
    items = [json.loads(l) for l in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["score"] for r in recs] == [float(items[i]["a"] in recs[i]["output"]) for i in range(2)]


def test_perplexity_matches_engine(tmp_path, llm, backend):
    text = "The river runs past the mill.\n\nA quiet town sleeps under the snow tonight.\n"
    write(tmp_path / "doc.txt", text)
    write(tmp_path / "p.yaml", "name: ppl\ntype: perplexity\ndata: doc.txt\n")
    s = run_task(load_task(tmp_path / "p.yaml"), backend, tmp_path / "out")
    total, n, nbytes = 0.0, 0, 0
    eos = llm.tokenizer.bos_token_id if llm.tokenizer.bos_token_id is not None else llm.tokenizer.eos_token_id
    for para in ["The river runs past the mill.", "A quiet town sleeps under the snow tonight."]:
        ids = llm.tokenizer.encode(para)
        total += sum(llm.engine.logprobs([eos], ids))
        n += len(ids)
        nbytes += len(para.encode())
    assert s["metrics"]["perplexity"]["mean"] == pytest.approx(math.exp(-total / n), rel=1e-4)
    assert s["metrics"]["bits_per_byte"]["mean"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)


def test_bleu_and_rouge_tasks(tmp_path, backend):
    from llmlab.eval import metrics
    for name in ("bios_facts", "bios_summary"):
        task = load_task(name)
        task.max_tokens = 24
        s = run_task(task, backend, tmp_path, limit=2)
        recs = [json.loads(l) for l in (tmp_path / name / "items.jsonl").read_text().splitlines()]
        outs, refs = [r["output"] for r in recs], [r["reference"] for r in recs]
        if name == "bios_facts":
            corpus, per_item = metrics.bleu(outs, refs)
            assert s["metrics"]["bleu"]["corpus"] == pytest.approx(corpus)
            assert [r["score"] for r in recs] == pytest.approx(per_item)
        else:
            expected = sum(x["rougeL"] for x in metrics.rouge(outs, refs)) / 2
            assert s["metrics"]["rougeL"]["mean"] == pytest.approx(expected)
    from llmlab.eval.report import write_eval_report
    path = write_eval_report([s], tmp_path)
    assert "rougeL" in path.read_text()
