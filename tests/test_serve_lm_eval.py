"""lm-evaluation-harness (model type local-completions) scores a small local multiple-choice task through the server."""

import json

import pytest

from llmlab.api import load
from llmlab.serve.testing import running_server

QUESTIONS = [
    ("What color is the sky on a clear day?", ["green", "blue", "red"], 1),
    ("How many legs does a dog have?", ["four", "two", "eight"], 0),
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris"], 2),
    ("Which animal says meow?", ["cat", "cow", "duck"], 0),
    ("What do bees make?", ["milk", "honey", "silk"], 1),
    ("What is frozen water called?", ["steam", "sand", "ice"], 2),
]

TASK = """task: llmlab_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_multiple_choice(smollm2_gguf, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "llmlab_tiny_mc.yaml").write_text(TASK.format(data=data))

    llm = load(smollm2_gguf)
    with running_server(llm, model_name="smollm2", max_batch=4, max_len=512) as url:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            # the "remote" tokenizer backend asks the server (/tokenize, /detokenize): nothing from the hub
            model_args=f"model=smollm2,base_url={url}/v1/completions,tokenizer_backend=remote,"
                       "num_concurrent=2,max_retries=1,tokenized_requests=True",
            tasks=["llmlab_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)), limit=len(QUESTIONS),
        )
    acc = results["results"]["llmlab_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # independent check of the harness's answer: score each choice with the engine directly
    correct = 0
    for q, choices, answer in QUESTIONS:
        context = f"Question: {q}\nAnswer:"
        scores = [sum(llm.logprobs(context, " " + c)) for c in choices]
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
    assert acc == pytest.approx(correct / len(QUESTIONS))
