"""Evaluating through an OpenAI-compatible endpoint (llmlab's own server on localhost): same scores as in-process,
and bad endpoints: down (retries with backoff, then one clear error; completed items kept, the run resumes)
or returning errors."""

import socket

import pytest

from llmlab.errors import LLMLabError
from llmlab.client import GenParams, LocalClient, EndpointClient
from llmlab.eval.tasks import load_task, run_task


@pytest.fixture(scope="module")
def llm(smollm2_gguf, fp32_decode):  # log-likelihoods of two paths are compared
    import llmlab
    return llmlab.load(smollm2_gguf)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_endpoint_scores_like_in_process(llm):
    from llmlab.serve.testing import running_server
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a big city")]
    local = LocalClient(llm).loglikelihood(pairs)
    with running_server(llm) as url:
        remote = EndpointClient(url, "smollm2").loglikelihood(pairs)
        g = EndpointClient(url, "smollm2").generate(["Say hi."], GenParams(max_tokens=6, temperature=0.0))
    for a, b in zip(local, remote):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-3) and b.n_tokens == a.n_tokens
    assert g[0].text == LocalClient(llm).generate(["Say hi."], GenParams(max_tokens=6, temperature=0.0))[0].text


def test_endpoint_down_then_resume(llm, tmp_path):
    from llmlab.serve.testing import running_server
    task = load_task("bios_mc")
    with running_server(llm) as url:
        run_task(task, EndpointClient(url, "smollm2"), tmp_path, limit=2)
    done = (tmp_path / "bios_mc" / "items.jsonl").read_text()
    # the server is gone: every request is retried with backoff, then one error names the endpoint
    down = EndpointClient(url, "smollm2", retries=2, backoff=0.01)
    with pytest.raises(LLMLabError, match=r"127\.0\.0\.1.*failed after 3 attempt"):
        run_task(task, down, tmp_path, limit=4)
    assert (tmp_path / "bios_mc" / "items.jsonl").read_text() == done  # completed items are kept
    with running_server(llm) as url:
        s = run_task(task, EndpointClient(url, "smollm2"), tmp_path, limit=4)
    lines = (tmp_path / "bios_mc" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "\n".join(lines[:2]) + "\n" == done and s["n"] == 4
    local = run_task(task, LocalClient(llm), tmp_path / "local", limit=4)
    assert s["metrics"]["acc"] == local["metrics"]["acc"]


def test_endpoint_nothing_listening():
    b = EndpointClient(f"http://127.0.0.1:{free_port()}/v1", retries=1, backoff=0.01)
    with pytest.raises(LLMLabError, match="failed after 2 attempt"):
        b.generate(["hi"], GenParams(max_tokens=2))


def test_endpoint_returning_errors(llm):
    from llmlab.serve.testing import running_server
    with running_server(llm, api_keys=["secret"]) as url:
        # 401 is the client's fault: not retried, reported at once with the server's message
        with pytest.raises(LLMLabError, match="HTTP 401"):
            EndpointClient(url, "smollm2", retries=3, backoff=5.0).generate(["hi"], GenParams(max_tokens=2))
        with pytest.raises(LLMLabError, match="HTTP 404.*does not exist"):
            EndpointClient(url, "no-such-model", api_key="secret", retries=3, backoff=5.0).generate(
                ["hi"], GenParams(max_tokens=2))
        ok = EndpointClient(url, "smollm2", api_key="secret").generate(["hi"], GenParams(max_tokens=2))
        assert ok[0].completion_tokens > 0
