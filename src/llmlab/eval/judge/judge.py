"""The judge: prompts kept as versioned files, verdicts parsed from fixed markers, parse failures counted.

Every mode returns one record per item with the judge's raw output(s), so the self-report (selfreport.py) is
computed from the raw judgments and can be checked by reading them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmlab.errors import LLMLabError
from llmlab.eval.backend import GenParams, as_backend

PROMPTS = Path(__file__).parent / "prompts"
DOMAINS = ("general", "coding", "math")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)


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
    """A judge model behind any backend. Greedy by default (temperature 0), as MT-bench does."""

    def __init__(self, backend, rubric: Rubric | str | Path | None = None, temperature: float = 0.0,
                 max_tokens: int = 256, seed: int = 0, samples: int = 5, prompts_dir: str | Path | None = None):
        self.backend = as_backend(backend)
        self.rubric = rubric if isinstance(rubric, Rubric) or rubric is None else load_rubric(rubric)
        self.temperature, self.max_tokens, self.seed, self.samples = temperature, max_tokens, seed, samples
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

    # ---- pointwise -------------------------------------------------------------------------------------

    def pointwise(self, items: list[dict], domain: str = "general") -> list[dict]:
        """A 1-10 score per item {id, question, answer[, reference]}, after an explanation."""
        if domain not in DOMAINS:
            raise LLMLabError(f"unknown judge domain {domain!r} (one of {', '.join(DOMAINS)})")
        p = self.prompt(f"pointwise_{domain}")
        prompts = []
        for it in items:
            _need(it, ("question", "answer"))
            ref = it.get("reference")
            math_instruction = ("First solve the problem yourself, step by step, to find the correct answer."
                                if not ref else "Use the reference solution as the correct answer.")
            prompts.append(p.render(question=it["question"], answer=it["answer"], rubric=self._rubric(),
                                    reference_block=_reference_block(ref), math_instruction=math_instruction))
        outs = self._ask(prompts)
        return [{"id": it.get("id", i), "mode": "pointwise", "domain": domain, "prompt_version": p.version,
                 "reference_guided": bool(it.get("reference")), "judge": self.name, "output": g.text,
                 "score": parse_rating(g.text), "parse_error": parse_rating(g.text) is None,
                 **_carry(it)} for i, (it, g) in enumerate(zip(items, outs))]

    # ---- pairwise ---------------------------------------------------------------------------------------

    def pairwise(self, items: list[dict]) -> list[dict]:
        """A, B or tie per item {id, question, answer_a, answer_b[, reference]}, judged in both orders.

        The second order shows B's answer first; its verdict is mapped back. Orders that disagree make a tie
        and count as position-inconsistent; an unparseable order makes the item a parse failure (no verdict).
        """
        p = self.prompt("pairwise")
        prompts = []
        for it in items:
            _need(it, ("question", "answer_a", "answer_b"))
            common = dict(question=it["question"], rubric=self._rubric(), reference_block=_reference_block(it.get("reference")))
            prompts.append(p.render(answer_a=it["answer_a"], answer_b=it["answer_b"], **common))
            prompts.append(p.render(answer_a=it["answer_b"], answer_b=it["answer_a"], **common))
        outs = self._ask(prompts)
        records = []
        for i, it in enumerate(items):
            first, second = outs[2 * i].text, outs[2 * i + 1].text
            v1, v2 = parse_verdict(first), swap(parse_verdict(second))
            parse_error = v1 is None or v2 is None
            consistent = None if parse_error else v1 == v2
            verdict = None if parse_error else (v1 if consistent else "tie")
            records.append({"id": it.get("id", i), "mode": "pairwise", "prompt_version": p.version,
                            "reference_guided": bool(it.get("reference")), "judge": self.name,
                            "outputs": [first, second], "verdicts": [v1, v2], "verdict": verdict,
                            "consistent": consistent, "parse_error": parse_error, **_carry(it)})
        return records

    # ---- G-Eval ----------------------------------------------------------------------------------------

    def geval_steps(self, criterion: str) -> str:
        p = self.prompt("geval_steps")
        return self._ask([p.render(criterion=criterion, rubric=self._rubric())])[0].text.strip()

    def geval(self, items: list[dict], criterion: str, criterion_name: str = "Score", steps: str | None = None,
              scale: tuple[int, int] = (1, 5)) -> list[dict]:
        """G-Eval: evaluation steps written by the judge for `criterion`, then a form-filling score per item.

        The score is the probability-weighted mean over the score tokens when the backend returns
        log-probabilities, else the mean of `samples` sampled scores (temperature 1).
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
