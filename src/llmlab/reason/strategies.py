"""Test-time strategies: direct, chain of thought, self-consistency, best-of-N, revision, routing and debate.

Each is a plain function (client, item, **options) -> Result(answer, trace). The client is any llmlab model
client (in-process or an OpenAI-compatible endpoint); every token it spends is counted in the trace, and an
optional `budget` caps the generated tokens (a call is charged its worst case before it is made).
"""

from __future__ import annotations

from llmlab.client import GenParams
from llmlab.errors import LLMLabError
from llmlab.reason import prompts
from llmlab.reason.scorers import make_scorer
from llmlab.reason.tasks import extract_answer
from llmlab.reason.trace import Meter, Result, Trace, check_budget
from llmlab.reason.vote import majority_vote, mean_logprob, weighted_vote


def _check_k(name: str, k: int):
    if k < 1:
        raise LLMLabError(f"{name} must be at least 1, got {k}")


def sample(meter: Meter, item: dict, prompt, n: int = 1, max_tokens: int = 256, temperature: float | None = 0.0,
           seed: int | None = 0, logprobs: bool = False):
    """n generations for one prompt, recorded in the trace with their extracted answers."""
    params = GenParams(max_tokens=max_tokens, temperature=temperature, seed=seed, n=n, logprobs=logprobs,
                       stop=list(item.get("stop") or []))  # an lm-eval task's `until`
    gens = meter.complete([prompt], params)[0]
    meter.trace.samples += [g.text for g in gens]
    meter.trace.sample_tokens += [g.completion_tokens for g in gens]
    meter.trace.answers += [extract_answer(g.text, item) for g in gens]
    return gens


def direct(client, item, max_tokens: int = 32, seed: int = 0, budget: int | None = None) -> Result:
    """Ask for the answer alone, greedily."""
    check_budget(budget, max_tokens)
    meter = Meter(client, budget=budget)
    sample(meter, item, prompts.direct_prompt(item), max_tokens=max_tokens, seed=seed)
    return meter.finish(meter.trace.answers[-1])


def cot(client, item, shots: int = 0, max_tokens: int = 256, seed: int = 0, budget: int | None = None) -> Result:
    """Chain of thought, greedily: "think step by step" (shots=0) or after `shots` worked examples."""
    check_budget(budget, max_tokens)
    meter = Meter(client, budget=budget)
    sample(meter, item, prompts.reasoning_prompt(item, shots), max_tokens=max_tokens, seed=seed)
    return meter.finish(meter.trace.answers[-1])


def self_consistency(client, item, k: int = 8, temperature: float = 0.7, weighted: bool = False, shots: int = 0,
                     max_tokens: int = 256, seed: int = 0, budget: int | None = None) -> Result:
    """k chains of thought sampled at once (one prompt, n=k: the prefill is shared), answers by majority vote,
    or by a vote weighted with each sample's probability (weighted=True). With a budget, as many samples as it
    pays for, up to k."""
    _check_k("k", k)
    check_budget(budget, max_tokens)
    meter = Meter(client, budget=budget)
    k = min(k, meter.affordable(max_tokens))
    gens = sample(meter, item, prompts.reasoning_prompt(item, shots), n=k, max_tokens=max_tokens,
                  temperature=temperature, seed=seed, logprobs=weighted)
    answers = meter.trace.answers
    if weighted:
        meter.trace.scores = [mean_logprob(g.logprobs) for g in gens]
        answer, share = weighted_vote(answers, meter.trace.scores)
    else:
        answer, share = majority_vote(answers)
    meter.trace.steps.append({"agreement": share})
    return meter.finish(answer)


def best_of_n(client, item, n: int = 8, scorer="likelihood", temperature: float = 0.7, shots: int = 0,
              max_tokens: int = 256, seed: int = 0, budget: int | None = None) -> Result:
    """n chains of thought; the one the scorer rates highest (the first of equals) gives the answer."""
    _check_k("n", n)
    check_budget(budget, max_tokens)
    score = make_scorer(scorer)
    meter = Meter(client, budget=budget)
    n = min(n, meter.affordable(max_tokens))
    gens = sample(meter, item, prompts.reasoning_prompt(item, shots), n=n, max_tokens=max_tokens,
                  temperature=temperature, seed=seed, logprobs=True)
    scores = score(item, [g.text for g in gens], meter, [g.logprobs for g in gens])
    meter.trace.scores = list(scores)
    best = max(range(len(gens)), key=lambda i: (scores[i], -i))
    return meter.finish(meter.trace.answers[best])


def critique_passes(critique: str) -> bool:
    """The critic approves when its reply opens with CORRECT (and does not say INCORRECT)."""
    head = critique.strip().upper()[:40]
    return "CORRECT" in head and "INCORRECT" not in head and "NOT CORRECT" not in head


def revise(client, item, rounds: int = 2, shots: int = 0, max_tokens: int = 256, critique_tokens: int = 96,
           seed: int = 0, budget: int | None = None) -> Result:
    """Self-refine: a chain of thought, then up to `rounds` of (critique, revise), stopping when the critique
    passes. All greedy, so the result is deterministic. The answer is the last solution's."""
    if rounds < 0:
        raise LLMLabError(f"rounds must be >= 0, got {rounds}")
    check_budget(budget, max_tokens)
    meter = Meter(client, budget=budget)
    solution = sample(meter, item, prompts.reasoning_prompt(item, shots), max_tokens=max_tokens, seed=seed)[0].text
    params = GenParams(max_tokens=critique_tokens, temperature=0.0, seed=seed)
    for r in range(rounds):
        if meter.affordable(critique_tokens + max_tokens) < 1:
            break
        critique = meter.generate([prompts.critique_prompt(item, solution)], params)[0].text
        passed = critique_passes(critique)
        meter.trace.steps.append({"round": r + 1, "critique": critique, "passed": passed})
        if passed:
            break
        solution = sample(meter, item, prompts.revise_messages(item, solution, critique, shots),
                          max_tokens=max_tokens, seed=seed)[0].text
    return meter.finish(meter.trace.answers[-1])


def router(cheap, strong, item, k: int = 4, threshold: float = 0.75, temperature: float = 0.7, shots: int = 0,
           max_tokens: int = 256, seed: int = 0, strong_k: int = 1, budget: int | None = None) -> Result:
    """Ask the cheap model k times; if at least `threshold` of its samples agree, answer with their majority,
    else send the question to the strong model (greedy chain of thought, or self-consistency with strong_k
    samples). The trace's steps say which way it went and what each model spent."""
    _check_k("k", k)
    if not 0.0 <= threshold <= 1.0:
        raise LLMLabError(f"threshold must be in [0, 1], got {threshold}")
    first = self_consistency(cheap, item, k=k, temperature=temperature, shots=shots, max_tokens=max_tokens,
                             seed=seed, budget=budget)
    trace = first.trace
    agreement = trace.steps[-1]["agreement"]
    route = {"agreement": agreement, "route": "cheap", "cheap_tokens": trace.completion_tokens, "strong_tokens": 0}
    answer = first.answer
    left = None if budget is None else budget - trace.completion_tokens
    if agreement < threshold and (left is None or left >= max_tokens):  # a spent budget keeps the cheap answer
        if strong_k > 1:
            second = self_consistency(strong, item, k=strong_k, temperature=temperature, shots=shots,
                                      max_tokens=max_tokens, seed=seed, budget=left)
        else:
            second = cot(strong, item, shots=shots, max_tokens=max_tokens, seed=seed, budget=left)
        answer = second.answer
        route.update(route="strong", strong_tokens=second.trace.completion_tokens)
        _merge(trace, second.trace)
    trace.steps.append(route)
    return Result(answer, trace)


def _merge(into: Trace, other: Trace):
    into.samples += other.samples
    into.answers += other.answers
    into.prompt_tokens += other.prompt_tokens
    into.completion_tokens += other.completion_tokens
    into.scored_tokens += other.scored_tokens
    into.calls += other.calls
    into.seconds += other.seconds


def debate(agents, item, rounds: int = 1, judge=None, personas: list[str] | None = None, temperature: float = 0.7,
           max_tokens: int = 256, seed: int = 0, budget: int | None = None) -> Result:
    """Multi-agent debate (Du et al. 2023): each agent (a client; the same one may appear twice, with a different
    persona and seed) solves the problem, then for `rounds` rounds reads the others' latest solutions and updates
    its own. The answer is the majority of the final solutions, or a judge client's verdict over them."""
    if len(agents) < 2:
        raise LLMLabError(f"a debate needs at least 2 agents, got {len(agents)}")
    if rounds < 0:
        raise LLMLabError(f"rounds must be >= 0, got {rounds}")
    if budget is not None and budget < len(agents) * max_tokens:
        raise LLMLabError(f"a budget of {budget} generated tokens is too small for one round of {len(agents)} "
                          f"agents of up to {max_tokens} tokens each")
    trace = Trace()
    meters = [Meter(a, trace, budget) for a in agents]
    personas = personas or [None] * len(agents)

    def ask(i, text):
        messages = ([{"role": "system", "content": personas[i]}] if personas[i] else []) + [
            {"role": "user", "content": text}]
        return sample(meters[i], item, messages, max_tokens=max_tokens, temperature=temperature,
                      seed=seed + 1000 * i)[0].text

    solutions, answers = [], []
    for r in range(rounds + 1):
        if meters[0].affordable(max_tokens) < len(agents):
            break
        if r == 0:
            solutions = [ask(i, prompts.cot_prompt(item)) for i in range(len(agents))]
        else:
            solutions = [ask(i, prompts.debate_prompt(item, s, solutions[:i] + solutions[i + 1:]))
                         for i, s in enumerate(solutions)]
        answers = trace.answers[-len(agents):]
        trace.steps.append({"round": r, "answers": list(answers)})
    answer, _ = majority_vote(answers)
    if judge is not None and meters[0].affordable(max_tokens) >= 1:
        verdict = sample(Meter(judge, trace, budget), item, prompts.judge_prompt(item, solutions),
                         max_tokens=max_tokens, seed=seed)[0].text
        answer = extract_answer(verdict, item)
        trace.steps.append({"judge": answer})
    return meters[0].finish(answer)
