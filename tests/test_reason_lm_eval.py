"""lm-evaluation-harness task YAMLs as questions: prompts, targets, filters and refusals; end to end on SmolLM2."""

import json
import shutil
from pathlib import Path

import pytest

from llmlab.errors import LLMLabError
from llmlab.reason import cot, extract_answer, make_items
from llmlab.reason.lm_eval_task import apply_filters, normalise, render

DATA = Path(__file__).parent / "data" / "lm_eval_gsm8k"
TASK = DATA / "gsm8k_style.yaml"


@pytest.fixture
def task_dir(tmp_path):
    """A copy of the GSM8K-style task, so variants can `include:` it and sit beside its data files."""
    for f in DATA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def variant(task_dir, text: str) -> str:
    path = task_dir / "variant.yaml"
    path.write_text("include: gsm8k_style.yaml\n" + text)
    return str(path)


def test_a_gsm8k_style_yaml_reads_as_lm_eval_would():
    items = make_items(str(TASK), 3)
    docs = [json.loads(line) for line in (DATA / "gsm8k_style_test.jsonl").read_text().splitlines()]
    assert len(items) == 3
    for item, doc in zip(items, docs):
        assert item["question"] == f"Q: {doc['question']}\nA: Let's think step by step."  # doc_to_text rendered
        # doc_to_target is the whole worked answer; exact_match's regexes_to_ignore keep what follows "#### "
        assert item["answer"] == doc["answer"].rsplit("#### ", 1)[1]
        assert item["stop"] == ["Q:", "</s>", "<|im_end|>"] and item["task"] == "gsm8k_style_local#strict-match"
    assert len(make_items(str(TASK), 100)) == len(docs)  # the first n, or all there are


def test_answer_extraction_follows_the_chosen_filter():
    strict = make_items(str(TASK), 1)[0]
    assert extract_answer("9 * 5 = 45.\nThe answer is 1,048.", strict) == "1048"  # "," ignored by exact_match
    assert extract_answer("9 * 5 = 45, plus 3 is 48", strict) is None  # no "The answer is": the fallback
    flexible = make_items(f"{TASK}#flexible-extract", 1)[0]
    assert flexible["task"] == "gsm8k_style_local#flexible-extract"
    assert extract_answer("9 * 5 = 45, plus 3 is $48.", flexible) == "48"  # group_select -1: the last number
    with pytest.raises(LLMLabError, match="no filter pipeline 'nope'"):
        make_items(f"{TASK}#nope", 1)


def test_templates_filters_and_normalisation():
    doc = {"question": "What is 2+2?", "answer": "4", "choices": ["a", "b"]}
    assert render("question", doc) == "What is 2+2?"  # a field name
    assert render("Q: {{question}} ({{ choices | join('/') }})", doc) == "Q: What is 2+2? (a/b)"
    assert render("{{ question | regex_replace('[0-9]', '#') }}", doc) == "What is #+#?"
    with pytest.raises(LLMLabError, match="undefined"):
        render("{{missing}}", doc)
    regex = [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}]
    assert apply_filters("so #### 12 and #### 13", regex) == "12"  # group_select 0: the first match
    assert apply_filters("nothing", regex) is None
    assert apply_filters("nothing", [{**regex[0], "fallback": "0"}]) == "0"
    assert apply_filters(" Yes", [{"function": "remove_whitespace"}, {"function": "lowercase"}]) == "yes"
    match = {"regexes_to_ignore": [",", r"\$"], "ignore_case": True, "ignore_punctuation": True}
    assert normalise("$1,000 Dollars.", match) == "1000 dollars"


def test_few_shot_examples_are_the_first_documents_of_the_few_shot_split(task_dir):
    text = 'num_fewshot: 2\nfewshot_config: {sampler: first_n}\ndescription: "Solve.\\n\\n"\n'
    item = make_items(variant(task_dir, text), 1)[0]
    train = [json.loads(line) for line in (task_dir / "gsm8k_style_train.jsonl").read_text().splitlines()]
    shots = "".join(f"Q: {d['question']}\nA: Let's think step by step. {d['answer']}\n\n" for d in train[:2])
    assert item["question"] == "Solve.\n\n" + shots + make_items(str(TASK), 1)[0]["question"]


@pytest.mark.parametrize("text, message", [
    ("dataset_path: openai/gsm8k\n", "Hugging Face Hub dataset"),
    ("doc_to_text: !function utils.doc_to_text\n", "!function utils.doc_to_text"),
    ("process_docs: !function utils.process\n", "!function"),
    ("process_results: foo\n", "'process_results' is not supported"),
    ("output_type: multiple_choice\n", "output_type 'multiple_choice' is not supported"),
    ("repeats: 8\n", "repeats 8 is not supported"),
    ("metric_list:\n  - metric: acc\n", "one exact_match"),
    ("filter_list:\n  - name: x\n    filter:\n      - function: majority_vote\n", "'majority_vote' is not supported"),
    ("fewshot_config:\n  sampler: default\n", "first_n"),
    ("num_fewshot: 5\n", "sampler: first_n"),  # lm-eval would draw 5 random examples: not what first_n gives
    ("generation_kwargs:\n  until: ['Q:']\n  max_length: 9\n", "max_length"),
    ("dataset_kwargs:\n  data_files: {test: nope.jsonl}\n", "no such data file"),
    ("test_split: validation\n", "test_split 'validation' is not among"),
    ("num_fewshot: 2\nfewshot_split: test\nfewshot_config: {sampler: first_n}\n", "other than the test split"),
])
def test_what_cannot_be_honoured_is_refused(task_dir, text, message):
    with pytest.raises(LLMLabError, match=message.replace("(", r"\(").replace("$", r"\$")):
        make_items(variant(task_dir, text), 2)


def test_until_stops_generation(smollm2, task_dir):
    from llmlab.client import LocalClient
    item = make_items(variant(task_dir, 'generation_kwargs:\n  until: ["\\n"]\n'), 1)[0]
    assert item["stop"] == ["\n"]
    r = cot(LocalClient(smollm2), item, max_tokens=16)
    assert r.trace.samples and "\n" not in r.trace.samples[0].strip()
    assert r.answer == extract_answer(r.trace.samples[0], item)


def test_cli_runs_a_task_yaml_end_to_end(smollm2_gguf, tmp_path, capsys):
    from llmlab.cli.main import main
    assert main(["reason", "--task", str(TASK), "--strategy", "self-consistency", "-k", "2", "--questions", "2",
                 "--max-tokens", "16", "--model", str(smollm2_gguf), "--out", str(tmp_path)]) == 0
    assert "accuracy" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["answer"] for r in rows] == [i["answer"] for i in make_items(str(TASK), 2)]
    assert main(["reason", "--task", f"{tmp_path}/none.yaml", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such task file" in err and len(err.splitlines()) == 1
