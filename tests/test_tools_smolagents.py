"""smolagents' ToolCallingAgent, through its OpenAI-compatible model class, runs to a checkable answer on
`llmlab serve` with SmolLM2: the server's constrained tool calls are what make a 135M model succeed."""

import pytest

smolagents = pytest.importorskip("smolagents")

from llmlab.api import load  # noqa: E402
from llmlab.serve.testing import running_server  # noqa: E402


def test_smolagents_tool_calling_agent(smollm2_gguf):
    calls = []

    @smolagents.tool
    def add(a: int, b: int) -> str:
        """Add two integers; returns a message with their sum.

        Args:
            a: the first integer
            b: the second integer
        """
        calls.append((a, b))
        return f"The sum is {a + b}. Now call final_answer with answer {a + b}."

    class FinalAnswer(smolagents.Tool):  # replaces smolagents' own (answer of type "any"): a number is checkable
        name = "final_answer"
        description = "Gives the final answer: a whole number."
        inputs = {"answer": {"type": "integer", "description": "the final answer"}}
        output_type = "integer"

        def forward(self, answer):
            return answer

    with running_server(load(smollm2_gguf), model_name="smollm2", max_len=2048) as url:
        model = smolagents.OpenAIServerModel(model_id="smollm2", api_base=url + "/v1", api_key="unused",
                                             temperature=0, max_tokens=100, parallel_tool_calls=False)
        agent = smolagents.ToolCallingAgent(tools=[add, FinalAnswer()], model=model, max_steps=4, verbosity_level=0)
        answer = agent.run("What is 123 + 456? Call add, then give the final answer.")
    assert calls == [(123, 456)]
    assert answer == 579
