"""The prompts the strategies send: direct, chain of thought (zero- and few-shot), critique and revision, debate."""

from __future__ import annotations

from llmlab.errors import LLMLabError

PLACEHOLDER = {"number": "<number>", "list": "<comma-separated list>"}


def answer_format(item: dict) -> str:
    return f'"The answer is {PLACEHOLDER.get(item["kind"], "<answer>")}."'


def direct_prompt(item: dict) -> str:
    return f"{item['question']}\nReply with the answer only."


def cot_prompt(item: dict) -> str:
    return f"{item['question']}\nThink step by step, one step per line, then finish with {answer_format(item)}"


def worked_solution(item: dict) -> str:
    return "\n".join(item.get("solution") or [f"The answer is {item['answer']}."])


def fewshot_messages(item: dict, shots: int) -> list[dict]:
    """Chain of thought with `shots` worked examples of the same task as earlier turns of the conversation.
    The examples are generated from a seed no evaluation uses, so they never repeat a question."""
    from llmlab.reason.tasks import GENERATORS, make_items
    if item["task"] not in GENERATORS and item["task"] != "bios":
        raise LLMLabError(f"few-shot chain of thought needs a generated task, not {item['task']!r}")
    messages = []
    for ex in make_items(item["task"], shots, seed=-1):
        messages += [{"role": "user", "content": cot_prompt(ex)}, {"role": "assistant", "content": worked_solution(ex)}]
    return messages + [{"role": "user", "content": cot_prompt(item)}]


def reasoning_prompt(item: dict, shots: int = 0):
    """What chain-of-thought strategies send: the zero-shot prompt, or a few-shot conversation."""
    return fewshot_messages(item, shots) if shots > 0 else cot_prompt(item)


def critique_prompt(item: dict, solution: str) -> str:
    return (f"Problem: {item['question']}\n\nProposed solution:\n{solution}\n\n"
            "Check the solution step by step. If every step and the final answer are right, reply with the single "
            "word CORRECT. Otherwise explain the first mistake.")


def revise_messages(item: dict, solution: str, critique: str, shots: int = 0) -> list[dict]:
    first = reasoning_prompt(item, shots)
    messages = first if isinstance(first, list) else [{"role": "user", "content": first}]
    return messages + [
        {"role": "assistant", "content": solution},
        {"role": "user", "content": f"A reviewer found a problem:\n{critique}\n\nWrite a corrected solution, one "
                                    f"step per line, and finish with {answer_format(item)}"}]


def value_prompt(item: dict, partial: str) -> str:
    """Asked of the model to value a partial solution: the score is log P(Yes) - log P(No)."""
    return (f"Problem: {item['question']}\n\nSolution so far:\n{partial.strip() or '(nothing yet)'}\n\n"
            "Is every step so far correct? Answer Yes or No.")


def debate_prompt(item: dict, own: str, others: list[str]) -> str:
    shown = "\n\n".join(f"Agent {i + 1}:\n{s}" for i, s in enumerate(others))
    return (f"{item['question']}\n\nYour previous solution:\n{own}\n\nSolutions from other agents:\n{shown}\n\n"
            f"Using their reasoning as additional advice, give your updated solution, one step per line, and finish "
            f"with {answer_format(item)}")


def judge_prompt(item: dict, solutions: list[str]) -> str:
    shown = "\n\n".join(f"Solution {i + 1}:\n{s}" for i, s in enumerate(solutions))
    return (f"{item['question']}\n\nSeveral solutions were proposed:\n\n{shown}\n\nDecide which final answer is right. "
            f"Explain briefly, then finish with {answer_format(item)}")
