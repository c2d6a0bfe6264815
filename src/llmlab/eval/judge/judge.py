"""The judge: prompts kept as versioned files, verdicts parsed from fixed markers, parse failures counted.

Every mode returns one record per item with the judge's raw output(s), so the self-report (selfreport.py) is
computed from the raw judgments and can be checked by reading them.

Small judges often explain and then never write the marker. With force_verdict (the default), such a judgment
is finished the way the judge would have finished it: its own transcript (prompt, explanation) is continued
with the marker ("...\n\nRating: [[") and the verdict is the allowed continuation (1..10, or A / B / C) the
judge itself finds most likely. Each judgment says where its verdict came from (verdict_source "parsed" or
"logprob"), and the self-report counts both; when the backend cannot score (an endpoint without logprobs), the
judgment stays a parse failure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmlab.errors import LLMLabError
from llmlab.client import GenParams, as_client

PROMPTS = Path(__file__).parent / "prompts"
DOMAINS = ("general", "coding", "math")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)
# what a forced verdict continues the transcript with: the formats the prompts ask for
POINTWISE_MARKER = "\n\nRating: [["
PAIRWISE_MARKER = "\n\nFinal verdict: [["
RATING_CHOICES = [str(k) for k in range(1, 11)]
VERDICT_CHOICES = {"A": "A", "B": "B", "C": "tie"}  # what the judge writes -> the verdict


@dataclass
class Prompt:
    name: str
    version: str
    text: str

    def render(self, **fields) -> str:
        # plain replacement of known {names}: the prompts and the answers inside them may hold other braces
        out = self.text
        for k, v in fields.items():
            out = out.replace("{" + k + "}", str(v))
        return out


def load_prompt(name: str, directory: str | Path | None = None) -> Prompt:
    path = Path(directory or PROMPTS) / f"{name}.txt"
    if not path.exists():
        raise LLMLabError(f"no judge prompt {path}")
    first, _, text = path.read_text(encoding="utf-8").partition("\n")
    m = re.match(r"#\s*version:\s*(\S+)", first)
    if not m:
        raise LLMLabError(f"{path}: the first line must be '# version: N'")
    return Prompt(name, m.group(1), text.strip() + "\n")


@dataclass
class Rubric:
    name: str
    criteria: str
    scores: dict = field(default_factory=dict)  # score -> description

    def text(self) -> str:
        lines = [f"\nEvaluation criteria ({self.name}): {self.criteria.strip()}"]
        for k in sorted(self.scores, key=float):
            lines.append(f"Score {k}: {str(self.scores[k]).strip()}")
        return "\n".join(lines) + "\n"


def load_rubric(path: str | Path | None) -> Rubric | None:
    """A YAML rubric: name, criteria (text), scores (score: description), usable by every judge mode."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise LLMLabError(f"rubric file {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise LLMLabError(f"{path}: a rubric is a YAML mapping")
    for key in ("name", "criteria"):
        if key not in spec:
            raise LLMLabError(f"{path}: missing field {key!r}")
    scores = spec.get("scores") or {}
    if not isinstance(scores, dict):
        raise LLMLabError(f"{path}: 'scores' must map a score to its description")
    return Rubric(spec["name"], spec["criteria"], scores)


def parse_rating(text: str, low: float = 1, high: float = 10) -> float | None:
    """The last [[N]] in the judge's output, or None when there is none or it is out of range."""
    found = RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if low <= value <= high else None


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the last [[A]] / [[B]] / [[C]] marker, or None."""
    found = VERDICT.findall(text)
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("C", "TIE") else v


def swap(verdict: str | None) -> str | None:
    return {"A": "B", "B": "A"}.get(verdict, verdict)


class Judge:
    """A judge model behind any backend. Greedy by default (temperature 0), as MT-bench does.

    force_verdict: when an output has no [[...]] marker, read the verdict from the judge's log-probabilities
    after its own transcript continued with the marker (see the module docstring); off, it is a parse failure.
    """

    def __init__(self, backend, rubric: Rubric | str | Path | None = None, temperature: float = 0.0,
                 max_tokens: int = 256, seed: int = 0, samples: int = 5, prompts_dir: str | Path | None = None,
                 force_verdict: bool = True):
        self.backend = as_client(backend)
        self.rubric = rubric if isinstance(rubric, Rubric) or rubric is None else load_rubric(rubric)
        self.temperature, self.max_tokens, self.seed, self.samples = temperature, max_tokens, seed, samples
        self.force_verdict = force_verdict
        self.prompts_dir = prompts_dir
        self.name = getattr(self.backend, "name", "judge")

    def prompt(self, name: str) -> Prompt:
        return load_prompt(name, self.prompts_dir)

    def _rubric(self) -> str:
        return self.rubric.text() if self.rubric else ""

    def _ask(self, prompts: list[str], **overrides) -> list:
        params = GenParams(max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed)
        for k, v in overrides.items():
            setattr(params, k, v)
        return self.backend.generate(prompts, params, chat=True)

    def versions(self, *names) -> dict:
        return {n: self.prompt(n).version for n in names}

    # ---- forced verdicts -----------------------------------------------------------------------------------

    def force(self, prompts: list[str], outputs: list[str], marker: str, choices: list[str]) -> list[dict | None]:
        """Per (prompt, output): the judge's transcript (the chat-rendered prompt, its output, then `marker`)
        scored with each choice + "]]" as its continuation. Returns {"choice": the most likely, "probs": the
        choices' probabilities renormalized, "mass": their total probability (how sure the judge is that one of
        them comes next)}, or None for all when the backend cannot render the transcript or score text."""
        render = getattr(self.backend, "chat_text", None)
        try:
            contexts = [render(p) for p in prompts] if render else []
            if not contexts or any(c is None for c in contexts):
                return [None] * len(prompts)
            contexts = [c + o.rstrip() + marker for c, o in zip(contexts, outputs)]
            lls = self.backend.loglikelihood([(c, ch + "]]") for c in contexts for ch in choices])
        except LLMLabError:  # e.g. an endpoint without logprobs: the judgment stays a parse failure
            return [None] * len(prompts)
        out = []
        for i in range(len(prompts)):
            lp = [lls[i * len(choices) + j].logprob for j in range(len(choices))]
            top = max(lp)
            weights = [math.exp(x - top) for x in lp]
            best = lp.index(top)
            out.append({"choice": choices[best], "mass": sum(math.exp(x) for x in lp),
                        "probs": {ch: w / sum(weights) for ch, w in zip(choices, weights)}})
        return out

    def _force_missing(self, prompts, outputs, parsed, marker, choices) -> list[dict | None]:
        """force() for the outputs whose marker did not parse (when force_verdict is on), None for the rest."""
        missing = [i for i, v in enumerate(parsed) if v is None] if self.force_verdict else []
        forced = [None] * len(outputs)
        if missing:
            for i, f in zip(missing, self.force([prompts[i] for i in missing], [outputs[i] for i in missing],
                                                marker, choices)):
                forced[i] = f
        return forced

    # ---- pointwise -------------------------------------------------------------------------------------

    def pointwise(self, items: list[dict], domain: str = "general") -> list[dict]:
        """A 1-10 score per item {id, question, answer[, reference]}, after an explanation."""
        if domain not in DOMAINS:
            raise LLMLabError(f"unknown judge domain {domain!r} (one of {', '.join(DOMAINS)})")
        p = self.prompt(f"pointwise_{domain}")
        prompts = [self.pointwise_prompt(it, domain, p) for it in items]
        outs = [g.text for g in self._ask(prompts)]
        scores = [parse_rating(t) for t in outs]
        forced = self._force_missing(prompts, outs, scores, POINTWISE_MARKER, RATING_CHOICES)
        records = []
        for i, (it, text, score, f) in enumerate(zip(items, outs, scores, forced)):
            source = "parsed" if score is not None else None
            if f is not None:
                score, source = float(f["choice"]), "logprob"
            rec = {"id": it.get("id", i), "mode": "pointwise", "domain": domain, "prompt_version": p.version,
                   "reference_guided": bool(it.get("reference")), "judge": self.name, "output": text,
                   "score": score, "verdict_source": source, "parse_error": score is None, **_carry(it)}
            if f is not None:
                rec.update(forced_probs=f["probs"], forced_mass=f["mass"])
            records.append(rec)
        return records

    def pointwise_prompt(self, item: dict, domain: str = "general", prompt: Prompt | None = None) -> str:
        p = prompt or self.prompt(f"pointwise_{domain}")
        _need(item, ("question", "answer"))
        ref = item.get("reference")
        math_instruction = ("First solve the problem yourself, step by step, to find the correct answer."
                            if not ref else "Use the reference solution as the correct answer.")
        return p.render(question=item["question"], answer=item["answer"], rubric=self._rubric(),
                        reference_block=_reference_block(ref), math_instruction=math_instruction)

    # ---- pairwise ---------------------------------------------------------------------------------------

    def pairwise(self, items: list[dict]) -> list[dict]:
        """A, B or tie per item {id, question, answer_a, answer_b[, reference]}, judged in both orders.

        The second order shows B's answer first; its verdict is mapped back. Orders that disagree make a tie
        and count as position-inconsistent; an order with no verdict (not parsed, not forced) makes the item a
        parse failure. forced_probs, when present, are per order over the letters as shown in that order.
        """
        p = self.prompt("pairwise")
        prompts = [text for it in items for text in self.pairwise_prompts(it, p)]
        outs = [g.text for g in self._ask(prompts)]
        raw = [parse_verdict(t) for t in outs]  # as shown: the second order's "A" is the item's B
        sources = ["parsed" if v is not None else None for v in raw]
        forced = self._force_missing(prompts, outs, raw, PAIRWISE_MARKER, list(VERDICT_CHOICES))
        for k, f in enumerate(forced):
            if f is not None:
                raw[k], sources[k] = VERDICT_CHOICES[f["choice"]], "logprob"
                f["probs"] = {VERDICT_CHOICES[ch]: q for ch, q in f["probs"].items()}
        records = []
        for i, it in enumerate(items):
            v1, v2 = raw[2 * i], swap(raw[2 * i + 1])
            parse_error = v1 is None or v2 is None
            consistent = None if parse_error else v1 == v2
            verdict = None if parse_error else (v1 if consistent else "tie")
            pair_sources = sources[2 * i:2 * i + 2]
            rec = {"id": it.get("id", i), "mode": "pairwise", "prompt_version": p.version,
                   "reference_guided": bool(it.get("reference")), "judge": self.name,
                   "outputs": outs[2 * i:2 * i + 2], "verdicts": [v1, v2], "verdict": verdict,
                   "verdict_sources": pair_sources,
                   "verdict_source": None if parse_error else "parsed" if pair_sources == ["parsed"] * 2 else "logprob",
                   "consistent": consistent, "parse_error": parse_error, **_carry(it)}
            if forced[2 * i] or forced[2 * i + 1]:
                rec["forced_probs"] = [f["probs"] if f else None for f in forced[2 * i:2 * i + 2]]
                rec["forced_mass"] = [f["mass"] if f else None for f in forced[2 * i:2 * i + 2]]
            records.append(rec)
        return records

    def pairwise_prompts(self, item: dict, prompt: Prompt | None = None) -> list[str]:
        """The two prompts of a pairwise item: A's answer shown first, then B's."""
        p = prompt or self.prompt("pairwise")
        _need(item, ("question", "answer_a", "answer_b"))
        common = dict(question=item["question"], rubric=self._rubric(),
                      reference_block=_reference_block(item.get("reference")))
        return [p.render(answer_a=item["answer_a"], answer_b=item["answer_b"], **common),
                p.render(answer_a=item["answer_b"], answer_b=item["answer_a"], **common)]

    # ---- G-Eval ----------------------------------------------------------------------------------------

    def geval_steps(self, criterion: str) -> str:
        p = self.prompt("geval_steps")
        return self._ask([p.render(criterion=criterion, rubric=self._rubric())])[0].text.strip()

    def geval(self, items: list[dict], criterion: str, criterion_name: str = "Score", steps: str | None = None,
              scale: tuple[int, int] = (1, 5)) -> list[dict]:
        """G-Eval: evaluation steps written by the judge for `criterion`, then a form-filling score per item.

        The score is the probability-weighted mean over the score tokens when the backend returns
        log-probabilities, else (e.g. EndpointClient(..., logprobs=False)) the mean of `samples` sampled scores
        (temperature 1), each sample's output and parsed score kept in the record.
        """
        steps = steps if steps is not None else self.geval_steps(criterion)
        p = self.prompt("geval_score")
        prompts = []
        for it in items:
            _need(it, ("question", "answer"))
            prompts.append(p.render(criterion=criterion, rubric=self._rubric(), steps=steps, question=it["question"],
                                    answer=it["answer"], criterion_name=criterion_name))
        low, high = scale
        gens = None
        try:
            gens = self._ask(prompts, max_tokens=4, temperature=0.0, top_logprobs=20)
        except LLMLabError:
            gens = None  # e.g. an endpoint that refuses logprobs: fall back to sampling
        records = []
        for i, it in enumerate(items):
            base = {"id": it.get("id", i), "mode": "geval", "prompt_version": p.version, "judge": self.name,
                    "criterion": criterion, "steps": steps, **_carry(it)}
            g = gens[i] if gens else None
            if g is not None and g.top_logprobs:
                score, probs = weighted_score(g.tokens, g.top_logprobs, low, high)
                records.append({**base, "method": "logprobs", "output": g.text, "score": score,
                                "score_probs": probs, "parse_error": score is None})
            else:
                records.append({**base, "method": "samples"})
        todo = [j for j, r in enumerate(records) if r["method"] == "samples"]
        if todo:
            outs = []
            for s in range(self.samples):  # one seed per round, so samples differ but runs repeat
                outs.append(self._ask([prompts[j] for j in todo], max_tokens=4, temperature=1.0, seed=self.seed + s))
            for k, j in enumerate(todo):
                texts = [outs[s][k].text for s in range(self.samples)]
                values = [_first_int(t, low, high) for t in texts]
                ok = [v for v in values if v is not None]
                records[j].update(outputs=texts, samples=values, sample_parse_errors=len(values) - len(ok),
                                  score=sum(ok) / len(ok) if ok else None, parse_error=not ok)
        return records


def weighted_score(tokens: list[str], top: list[dict[str, float]], low: int, high: int):
    """Probability-weighted mean score at the first generated token that is a score, and its distribution."""
    for tok, alternatives in zip(tokens, top):
        if _as_int(tok, low, high) is None:
            continue
        probs: dict[int, float] = {}
        for t, lp in alternatives.items():
            v = _as_int(t, low, high)
            if v is not None:
                probs[v] = probs.get(v, 0.0) + math.exp(lp)
        total = sum(probs.values())
        if total <= 0:
            return None, {}
        return sum(v * p for v, p in probs.items()) / total, {str(k): p / total for k, p in sorted(probs.items())}
    return None, {}


def _as_int(token: str, low: int, high: int) -> int | None:
    t = token.strip()
    if t.isdigit() and low <= int(t) <= high:
        return int(t)
    return None


def _first_int(text: str, low: int, high: int) -> int | None:
    m = re.search(r"\d+", text)
    if not m:
        return None
    v = int(m.group(0))
    return v if low <= v <= high else None


def _reference_block(ref) -> str:
    if not ref:
        return ""
    return f"\n[The Start of Reference Answer]\n{ref}\n[The End of Reference Answer]\n"


def _need(item: dict, keys):
    for k in keys:
        if k not in item:
            raise LLMLabError(f"judge item {item.get('id', '?')} has no field {k!r}")


def _carry(item: dict) -> dict:
    """Fields of the item kept in its judgment record (for win rates, ratings, agreement)."""
    return {k: item[k] for k in ("question", "answer", "answer_a", "answer_b", "model", "model_a", "model_b",
                                 "reference", "label") if k in item}
