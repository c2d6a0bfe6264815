"""An agent's memory: a running summary of older steps, written by the model when the transcript nears its token
budget, plus BM25 recall (bm25s) over the observations of the steps the summary replaced.

A small model's summary loses details (the exact number a tool returned); recall brings back the earlier
observations that share the most words with the task and the latest step, verbatim, beside the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmlab.client.base import GenParams
from llmlab.errors import LLMLabError

SUMMARISE = ("Summarise what has been done so far in this task, in at most three sentences. Keep every number, "
             "name and result that may be needed later.\n\nTask: {task}\n\n{previous}Steps:\n{steps}\n\nSummary:")


def step_text(step: list[dict]) -> str:
    """One step as text: the model's words and calls, then what came back."""
    lines = []
    for m in step:
        if m["role"] == "assistant":
            if m.get("content"):
                lines.append(m["content"])
            for c in m.get("tool_calls") or []:
                lines.append(f"called {c['function']['name']}({c['function'].get('arguments', '')})")
        else:
            content = m.get("content") or ""
            lines.append(content if content.startswith("Observation:") else f"Observation: {content}")
    return "\n".join(lines)


def observations(step: list[dict]) -> list[str]:
    return [m.get("content") or "" for m in step if m["role"] != "assistant"]


@dataclass
class Memory:
    budget_tokens: int = 1024  # the transcript's size (tokens of its messages) that starts a summary
    keep_steps: int = 2  # the most recent steps always stay verbatim
    recall_k: int = 2  # earlier observations recalled beside the summary
    summary_tokens: int = 96  # most tokens of one summary
    summary: str = ""
    folded: int = 0  # steps the summary covers
    notes: list[str] = field(default_factory=list)  # their observations, for recall

    def __post_init__(self):
        if self.budget_tokens < 1 or self.keep_steps < 0 or self.recall_k < 0 or self.summary_tokens < 1:
            raise LLMLabError("memory: budget_tokens and summary_tokens must be >= 1, keep_steps and recall_k >= 0")

    def size(self, client, messages: list[dict]) -> int:
        return sum(client.count_tokens(m.get("content") or "") + client.count_tokens(str(m.get("tool_calls") or ""))
                   for m in messages)

    def prompt(self, client, head: list[dict], steps: list[list[dict]], result, trace, left: int) -> list[dict]:
        """The messages for the next step: folds older steps into the summary first when the transcript is over
        budget (the summary's tokens are charged to `result`; `left` caps them)."""
        messages = self.render(head, steps)
        foldable = len(steps) - self.keep_steps
        if self.size(client, messages) > self.budget_tokens and foldable > self.folded and left > 1:
            fold = steps[self.folded:foldable]
            g = client.generate([SUMMARISE.format(
                task=head[-1]["content"], previous=f"Earlier summary: {self.summary}\n\n" if self.summary else "",
                steps="\n\n".join(step_text(s) for s in fold))],
                GenParams(max_tokens=min(self.summary_tokens, left - 1), temperature=0))[0]
            result.spend(g.prompt_tokens, g.completion_tokens)
            self.summary = g.text.strip()
            self.notes += [o for s in fold for o in observations(s)]
            self.folded = foldable
            trace.add("summary", folded=self.folded, summary=self.summary, prompt_tokens=g.prompt_tokens,
                      completion_tokens=g.completion_tokens)
            messages = self.render(head, steps)
        return messages

    def recall(self, query: str) -> list[str]:
        """The earlier observations that best match `query` (BM25), best first."""
        if not self.notes or self.recall_k == 0:
            return []
        from llmlab.rag.search import SparseIndex
        hits = SparseIndex.build(self.notes).search(query, self.recall_k)
        return [self.notes[row] for row, _ in hits]

    def render(self, head: list[dict], steps: list[list[dict]]) -> list[dict]:
        """head (system, task) with the summary and recalled observations joined to the task, then the steps
        the summary does not cover."""
        recent = [m for step in steps[self.folded:] for m in step]
        if not self.folded:
            return head + recent
        last = step_text(steps[-1]) if steps else ""
        recalled = self.recall(f"{head[-1]['content']}\n{last}")
        note = f"\n\nSummary of steps 1-{self.folded}: {self.summary}"
        if recalled:
            note += "\nEarlier observations:\n" + "\n".join(f"- {o[:400]}" for o in recalled)
        task = {**head[-1], "content": head[-1]["content"] + note}
        return head[:-1] + [task] + recent
