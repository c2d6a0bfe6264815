"""The one model client: the same scores and texts in-process, through a real `llmlab serve` endpoint, from the
CLI and from the Python API; sampling defaults from the checkpoint; rolling log-likelihood past the context."""

import json
import subprocess
import sys

import pytest

import llmlab
from llmlab.client import EndpointClient, GenParams, LocalClient, connect
from llmlab.errors import LLMLabError

PROMPT = "Name a colour."
# one greedy and one seeded sample, with options every path (CLI flags, API keywords, OpenAI fields) can carry
CASES = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=7)]


@pytest.fixture(scope="module")
def server(smollm2):
    from llmlab.serve.testing import running_server
    with running_server(smollm2, model_name="smollm2") as url:
        yield url


def cli_generate(options: dict, n: int) -> str:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    # --exact: the same dense fp32 model as the session fixture (the default decodes with int8 activations)
    r = subprocess.run([sys.executable, "-m", "llmlab.cli", "generate", "--exact", "-n", str(n), *flags, PROMPT],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.rstrip("\n")


@pytest.mark.parametrize("options", CASES, ids=["greedy", "seeded"])
def test_cli_api_and_server_give_the_same_text(smollm2, server, options):
    import openai
    n = 16
    api = smollm2.generate(PROMPT, max_new_tokens=n, **options)
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    served = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=n, **options).choices[0].message.content
    via_client = EndpointClient(server, "smollm2").generate([PROMPT], GenParams(max_tokens=n, **options))[0].text
    assert api == served == via_client
    assert cli_generate(options, n) == api
    if options.get("seed") is not None:  # the seed matters: another one gives another sample (checked, not assumed)
        other = smollm2.generate(PROMPT, max_new_tokens=n, **{**options, "seed": options["seed"] + 1})
        assert other != api


def test_eval_task_scores_the_same_in_process_and_through_the_endpoint(smollm2, server, tmp_path):
    from llmlab.eval.tasks import load_task, run_task
    task = load_task("bios_mc")
    local = run_task(task, LocalClient(smollm2), tmp_path / "local", limit=6)
    remote = run_task(task, EndpointClient(server, "smollm2"), tmp_path / "remote", limit=6)
    rows = [[json.loads(line) for line in (tmp_path / d / "bios_mc" / "items.jsonl").read_text().splitlines()]
            for d in ("local", "remote")]
    for a, b in zip(*rows):
        # the server scores the whole sequence in one forward, in-process scoring reuses a context cache: the
        # same fp32 arithmetic in another order, so equal up to float rounding
        assert b["logliks"] == pytest.approx(a["logliks"], abs=1e-4)
    assert remote["metrics"]["acc"] == local["metrics"]["acc"]


def test_pairwise_judgment_is_the_same_in_process_and_through_the_endpoint(smollm2, server):
    from llmlab.eval.judge import Judge
    items = [{"id": 0, "question": "What is 2 + 2?", "answer_a": "4", "answer_b": "5"},
             {"id": 1, "question": "Capital of France?", "answer_a": "Berlin", "answer_b": "Paris"}]
    local = Judge(LocalClient(smollm2), max_tokens=24).pairwise(items)
    remote = Judge(EndpointClient(server, "smollm2"), max_tokens=24).pairwise(items)
    for a, b in zip(local, remote):
        assert a["outputs"] == b["outputs"] and a["verdicts"] == b["verdicts"]
        assert a["verdict_sources"] == b["verdict_sources"]
        for x, y in zip(a.get("forced_probs") or [], b.get("forced_probs") or []):
            if x is not None:  # a forced verdict: the choices' probabilities from the same log-likelihoods
                assert y == pytest.approx(x, abs=1e-4)


def test_samples_of_one_prompt_share_a_seed_sequence(smollm2, server):
    """n samples of a prompt: sample i uses seed + i, so in-process and the server agree sample by sample."""
    params = GenParams(max_tokens=8, temperature=1.0, seed=11, n=3)
    local = [g.text for g in LocalClient(smollm2).complete([PROMPT], params)[0]]
    remote = [g.text for g in EndpointClient(server, "smollm2").complete([PROMPT], params)[0]]
    assert local == remote
    assert len(set(local)) > 1  # three different samples, not one repeated


def test_sampling_defaults_come_from_generation_config(tiny_ckpt, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    assert llmlab.load(ckpt).params().temperature == 1.0  # nothing declared: the neutral distribution
    config = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.3, "top_k": 5}))
    llm = llmlab.load(ckpt)
    p = llm.params()
    assert (p.temperature, p.top_k, p.top_p) == (0.3, 5, 1.0)
    assert llm.params(temperature=0.0).temperature == 0.0  # an explicit option wins
    assert llmlab.load("smollm2").sampling_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_rolling_loglikelihood_scores_texts_longer_than_the_context(tiny_ckpt):
    client = LocalClient(llmlab.load(tiny_ckpt))
    window = client.context_len
    short = "the cat sat on the mat"
    assert client.loglikelihood_rolling([short])[0].logprob == pytest.approx(
        client.loglikelihood([("", short)])[0].logprob, abs=1e-4)
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
    n_tokens = client.count_tokens(long)
    assert n_tokens > 2 * window
    with pytest.raises(LLMLabError, match="loglikelihood_rolling"):
        client.loglikelihood([("", long)])
    rolled = client.loglikelihood_rolling([long])[0]
    assert rolled.n_tokens == n_tokens  # every token scored exactly once
    # the same windows scored one by one by the engine's plain full-forward scorer (no cache, no batching):
    # tokens [start, start + stride) with the window - (end - start) tokens before them as context
    ids = [client.prefix_id] + client.llm.tokenizer.encode(long)
    stride, expected = window // 2, 0.0
    for start in range(1, len(ids), stride):
        end = min(start + stride, len(ids))
        expected += sum(client.llm.engine.logprobs(ids[max(0, end - window):start], ids[start:end]))
    assert rolled.logprob == pytest.approx(expected, abs=1e-3)


def test_connect_refuses_options_it_cannot_honour():
    with pytest.raises(LLMLabError, match="not both"):
        connect(model="smollm2", endpoint="http://127.0.0.1:1")
    with pytest.raises(LLMLabError, match="in-process"):
        connect(endpoint="http://127.0.0.1:1", int4=True)
    with pytest.raises(LLMLabError, match="--endpoint"):
        connect(model="smollm2", api_key="k")
    with pytest.raises(LLMLabError, match="n must be"):
        GenParams(n=0).validate()
