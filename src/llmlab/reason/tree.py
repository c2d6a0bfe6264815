"""Tree of thoughts: breadth-first beam search over reasoning steps, scored by a value function, within a budget.

beam_search() is the search alone, over any states (tested on toy problems with a known optimum);
tree_of_thoughts() runs it over lines of a model's chain of thought.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.client import GenParams
from llmlab.errors import LLMLabError
from llmlab.reason import prompts
from llmlab.reason.scorers import make_scorer
from llmlab.reason.tasks import FINAL, extract_answer
from llmlab.reason.trace import Meter, Result, check_budget


def beam_search(root, expand, score, done, beam: int = 1, max_depth: int = 8):
    """Keep the `beam` best unfinished states per depth; every finished state is set aside with its score.

    expand(states) -> a list of children for each state (empty lists when the budget is spent: the search stops);
    score(states) -> a float per state, higher is better; done(state) -> is it a complete solution.
    With one child per state (breadth 1) this is greedy step-by-step generation. Returns (best state, its score,
    log), the best finished state, or the best state of the last depth when none finished.
    """
    if beam < 1:
        raise LLMLabError(f"beam must be at least 1, got {beam}")
    live, finished, log = [root], [], []
    ranked = []
    for depth in range(max_depth):
        children = [c for cs in expand(live) for c in cs]
        if not children:
            break
        scores = score(children)
        ranked = sorted(zip(scores, range(len(children)), children), key=lambda x: (-x[0], x[1]))
        live = []
        for s, _, child in ranked:
            if done(child):
                finished.append((s, child))
            elif len(live) < beam:
                live.append(child)
        log.append({"depth": depth + 1, "scores": [s for s, _, _ in ranked], "kept": len(live)})
        if not live:
            break
    if finished:
        s, best = max(finished, key=lambda x: x[0])  # the first of equals: max keeps the earliest
        return best, s, log
    if ranked:
        return ranked[0][2], ranked[0][0], log
    return root, float("-inf"), log


@dataclass(frozen=True)
class Partial:
    """A partial chain of thought: its lines (each with its newline, but a final one) and their log-probabilities."""
    steps: tuple[str, ...] = ()
    logprob: float = 0.0
    n_tokens: int = 0
    complete: bool = False

    @property
    def text(self) -> str:
        return "".join(self.steps)




def tree_of_thoughts(client, item, breadth: int = 3, beam: int = 2, scorer="likelihood", temperature: float = 0.7,
                     max_steps: int = 8, step_tokens: int = 48, seed: int = 0, budget: int | None = None) -> Result:
    """Beam search over the lines of a chain of thought: each kept partial solution is continued by `breadth`
    sampled next lines (one call, n=breadth, the prompt's prefill shared), the scorer values every partial
    solution ("likelihood": mean token log-probability so far; "value": the model's own Yes/No judgement; a
    verifier or a callable (item, texts, meter, logprobs)), and the `beam` best go on. A line that states the
    answer, or generation that ends without a newline, completes a solution. breadth=1 with temperature 0 is
    greedy decoding, line by line."""
    if breadth < 1:
        raise LLMLabError(f"breadth must be at least 1, got {breadth}")
    check_budget(budget, step_tokens)
    score_fn = make_scorer(scorer)
    meter = Meter(client, budget=budget)
    head = meter.chat_text(prompts.cot_prompt(item))
    if head is None:
        raise LLMLabError("tree of thoughts continues raw text: it needs the model's chat template")

    def expand(states):
        affordable = meter.affordable(step_tokens) // breadth
        states = states[:affordable]  # the best ones first: the beam is sorted
        if not states:
            return []
        params = GenParams(max_tokens=step_tokens, temperature=temperature, seed=seed + 1000 * len(states[0].steps),
                           n=breadth, stop=["\n"] + list(item.get("stop") or []), logprobs=True)
        out = meter.complete([head + s.text for s in states], params, chat=False)
        children = []
        for state, gens in zip(states, out):
            kids = []
            for g in gens:
                # a line ends at a newline (the stop string: the newline's token is the last token); anything
                # else (the end-of-text token, the length limit) ends the solution
                newline = g.finish_reason == "stop" and bool(g.tokens) and "\n" in g.tokens[-1]
                line = g.text + ("\n" if newline else "")
                meter.trace.samples.append(g.text)
                kids.append(Partial(state.steps + (line,), state.logprob + sum(g.logprobs or []),
                                    state.n_tokens + len(g.logprobs or []),
                                    complete=not newline or bool(FINAL.search(g.text))
                                    or len(state.steps) + 1 >= max_steps))
            children.append(kids)
        return children

    def score(states):
        if scorer == "likelihood":
            return [s.logprob / max(1, s.n_tokens) for s in states]
        return list(score_fn(item, [s.text for s in states], meter, None))

    best, best_score, log = beam_search(Partial(), expand, score, lambda s: s.complete, beam=beam,
                                        max_depth=max_steps)
    meter.trace.steps = log
    meter.trace.scores = [best_score]
    meter.trace.answers.append(extract_answer(best.text, item))
    meter.trace.samples.append(best.text)
    return meter.finish(meter.trace.answers[-1])
