"""Process reward model: Math-Shepherd step labels from rollouts, a per-step score head trained through the one
training loop, and a scorer that values partial solutions for tree search and whole ones for best-of-N.

A solution is a list of steps (its lines). The PRM is llmlab's reward model (train/reward.py: the transformer with
a scalar head, saved as a transformers sequence classifier) read at the end of every step instead of only at the
end of the reply: each step is tokenized on its own and ends with a newline token, the step tag whose score says
"is everything so far still on the way to the right answer". Because the model is causal, the score at a step's
tag is the same whether the rest of the solution follows or not, so one forward pass scores every prefix.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.client import GenParams
from llmlab.errors import LLMLabError
from llmlab.reason.prompts import cot_prompt
from llmlab.reason.tasks import FINAL, extract_answer, is_correct


@dataclass
class StepTrace:
    """A solution of one question, step by step, with a label in [0, 1] per step (1: still on a right path)."""
    item: dict
    steps: list[str]
    labels: list[float]


def split_steps(text: str) -> list[str]:
    """A solution's steps: its non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- Math-Shepherd labels ----------------------------------------------------------------------------------------


def label_steps(client, item: dict, steps: list[str], rollouts: int = 4, threshold: float | None = 0.5,
                max_tokens: int = 64, temperature: float = 0.7, seed: int = 0) -> list[float]:
    """Math-Shepherd (Wang et al. 2024) labels: step i is as good as the fraction of `rollouts` completions
    sampled after steps[:i+1] that reach the right answer; with a threshold, 1.0 when that fraction reaches it
    ("often enough"), else 0.0. A step that states a final answer is labelled by checking it, with no rollouts.
    All the rollouts of one solution go out as one request per prefix with n=rollouts (the prefill is shared)."""
    if rollouts < 1:
        raise LLMLabError(f"rollouts must be at least 1, got {rollouts}")
    if not steps:
        raise LLMLabError("a solution to label needs at least one step")
    head = client.chat_text(cot_prompt(item))
    if head is None:
        raise LLMLabError("Math-Shepherd labels continue raw text: they need the model's chat template")
    reached: list[float | None] = [None] * len(steps)
    open_prefixes = []
    for i, step in enumerate(steps):
        if FINAL.search(step):
            reached[i] = float(is_correct(extract_answer(step, item), item))
        else:
            open_prefixes.append(i)
    if open_prefixes:
        params = GenParams(max_tokens=max_tokens, temperature=temperature, seed=seed, n=rollouts)
        texts = [head + "".join(s + "\n" for s in steps[:i + 1]) for i in open_prefixes]
        for i, gens in zip(open_prefixes, client.complete(texts, params, chat=False)):
            reached[i] = sum(is_correct(extract_answer(g.text, item), item) for g in gens) / rollouts
    if threshold is None:
        return [float(r) for r in reached]
    return [float(r >= threshold) for r in reached]


# ---- step-labelled traces with exact labels, for tests and a PRM that starts from nothing -----------------------

EXPRESSION = re.compile(r"(?:Compute|What is) (.+?)(?:, working from left to right\.|\?)$")


SLIPS = (-3, -2, -1, 1, 2, 3)


def arithmetic_trace(item: dict, rng: random.Random, wrong_step: int | None = None, slips=SLIPS) -> StepTrace:
    """The worked solution of an arithmetic item, with the result of step `wrong_step` off by one of `slips`
    and every later step computed from the wrong value (a realistic slip). Its exact labels are what
    Math-Shepherd's rollouts estimate: 1 up to the slip, 0 from it on (no completion reaches the right answer)."""
    m = EXPRESSION.match(item["question"])
    if m is None or not item.get("task", "").startswith("arithmetic"):
        raise LLMLabError("arithmetic_trace needs an item of the arithmetic tasks")
    tokens = m.group(1).split()
    value, steps, labels = int(tokens[0]), [], []
    for j in range(1, len(tokens), 2):
        op, x = tokens[j], int(tokens[j + 1])
        new = {"+": value + x, "-": value - x, "*": value * x}[op]
        if j // 2 == wrong_step:
            new += rng.choice(slips)
        steps.append(f"{value} {op} {x} = {new}.")
        value = new
        labels.append(0.0 if wrong_step is not None and j // 2 >= wrong_step else 1.0)
    steps.append(f"The answer is {value}.")
    labels.append(float(str(value) == item["answer"]))
    return StepTrace(item, steps, labels)


def arithmetic_traces(items: list[dict], seed: int = 0, p_wrong: float = 0.5, slips=SLIPS) -> list[StepTrace]:
    """One trace per item: right, or (with probability p_wrong) with a slip at a random step."""
    rng = random.Random(f"prm/{seed}")
    out = []
    for item in items:
        n_ops = len(item["solution"]) - 1
        wrong = rng.randrange(n_ops) if rng.random() < p_wrong else None
        out.append(arithmetic_trace(item, rng, wrong, slips))
    return out


# ---- the PRM: rows, loss, training, scoring ----------------------------------------------------------------------


def encode_trace(tokenizer, item: dict, steps: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of the chain-of-thought prompt and the steps (each tokenized on its own, ending with a newline),
    and the position of every step's last token (its tag)."""
    from llmlab.train.chat_data import render_prompt
    ids = render_prompt(tokenizer, [{"role": "user", "content": cot_prompt(item)}])
    ends = []
    for step in steps:
        ids += tokenizer.encode(step + "\n")
        ends.append(len(ids) - 1)
    return ids, ends


def trace_rows(traces: list[StepTrace], tokenizer, seq_len: int) -> list[tuple]:
    """(ids, step-tag positions, labels) per trace, cut to seq_len by dropping the start of the prompt."""
    rows = []
    for t in traces:
        if len(t.steps) != len(t.labels):
            raise LLMLabError(f"a trace has {len(t.steps)} steps but {len(t.labels)} labels")
        ids, ends = encode_trace(tokenizer, t.item, t.steps)
        cut = max(0, len(ids) - seq_len)
        kept = [(e - cut, y) for e, y in zip(ends, t.labels) if e >= cut]
        rows.append((ids[cut:], [e for e, _ in kept], [y for _, y in kept]))
    return rows


def collate_steps(rows, pad_id: int):
    """(ids (B, T) right-padded, tag positions (B, S) padded with 0, labels (B, S), mask (B, S))."""
    T, S = max(len(r[0]) for r in rows), max(1, max(len(r[1]) for r in rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), S), dtype=torch.long)
    labels = torch.zeros((len(rows), S))
    mask = torch.zeros((len(rows), S), dtype=torch.bool)
    for b, (seq, ends, ys) in enumerate(rows):
        ids[b, :len(seq)] = torch.tensor(seq)
        pos[b, :len(ends)] = torch.tensor(ends, dtype=torch.long)
        labels[b, :len(ys)] = torch.tensor(ys)
        mask[b, :len(ends)] = True
    return ids, pos, labels, mask


def step_logits(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The score head's output at each step tag: (B, S)."""
    return model(ids)[..., 0].float().gather(1, pos)


def prm_loss(model, batch):
    """Binary cross-entropy at every step tag (soft labels welcome), as Math-Shepherd trains its PRM."""
    from llmlab.train.pretrain import model_device
    ids, pos, labels, mask = (x.to(model_device(model)) for x in batch)
    logits = step_logits(model, ids, pos)
    loss = F.binary_cross_entropy_with_logits(logits[mask], labels[mask])
    accuracy = ((logits[mask] > 0) == (labels[mask] >= 0.5)).float().mean().item()
    return loss, {"step_accuracy": accuracy}


def train_prm(model_path: str | Path, traces: list[StepTrace], cfg, val_traces: list[StepTrace] | None = None,
              trainable_blocks: int | None = None) -> dict:
    """Train a PRM from a checkpoint on step-labelled traces; writes cfg.out_dir/prm (a reward-model directory
    that RewardModel.load and PRMScorer read). trainable_blocks=k trains only the last k blocks and the head
    (cheap on a CPU); None trains everything. Returns {"path", "steps", "seconds", "val" (ranking, when given)}."""
    from llmlab.train.chat_data import RowBatches
    from llmlab.train.loop import Objective, train
    from llmlab.train.reward import save_reward_model, to_reward_model
    from llmlab.train.sft import load_base, pad_id_of
    if not traces:
        raise LLMLabError("training a PRM needs at least one step-labelled trace")
    model, tokenizer, _ = load_base(model_path)
    pad = pad_id_of(tokenizer)
    to_reward_model(model).train()
    for p in model.parameters():
        p.requires_grad_(trainable_blocks is None)
    if trainable_blocks is not None:
        layers = model.model.layers
        for module in [*layers[len(layers) - trainable_blocks:], model.model.norm, model.lm_head]:
            for p in module.parameters():
                p.requires_grad_(True)
    rows = trace_rows(traces, tokenizer, cfg.seq_len)
    batches = RowBatches(rows, cfg.micro_batch, cfg.grad_accum, cfg.seed,
                         collate=lambda picked: collate_steps(picked, pad))
    objective = Objective(loss_fn=prm_loss, batches=batches, count_tokens=lambda batch: int(batch[0].numel()))
    t0 = time.perf_counter()
    result = train(model, objective, cfg)
    model = result.model.eval()
    out = save_reward_model(model, Path(cfg.out_dir) / "prm", tokenizer, pad)
    prm = PRM(model, tokenizer, pad)
    return {"path": out, "steps": result.step, "seconds": time.perf_counter() - t0,
            "val": ranking_accuracy(prm, val_traces) if val_traces else None}


class PRM:
    """A trained PRM: per-step scores (probabilities that the solution is still on a right path)."""

    def __init__(self, model, tokenizer, pad_id: int):
        self.model, self.tokenizer, self.pad_id = model.eval(), tokenizer, pad_id

    @classmethod
    def load(cls, path: str | Path) -> "PRM":
        from llmlab.train.reward import RewardModel
        rm = RewardModel.load(path)
        return cls(rm.model, rm.tokenizer, rm.pad_id)

    @torch.no_grad()
    def step_scores(self, item: dict, solutions: list[list[str]], batch: int = 16) -> list[list[float]]:
        from llmlab.train.pretrain import model_device
        out = []
        for i in range(0, len(solutions), batch):
            rows = [(*encode_trace(self.tokenizer, item, s), [0.0] * len(s)) for s in solutions[i:i + batch]]
            ids, pos, _, mask = collate_steps(rows, self.pad_id)
            probs = torch.sigmoid(step_logits(self.model, ids.to(model_device(self.model)), pos.to(ids.device)))
            out += [p[m].tolist() for p, m in zip(probs.cpu(), mask)]
        return out


def ranking_accuracy(prm: PRM, traces: list[StepTrace]) -> float:
    """How often a good step (label >= 0.5) scores above a bad one, over all (good, bad) pairs of the traces' steps
    (the AUROC of the step scores; ties count half; 0.5 is chance)."""
    good, bad = [], []
    for t in traces:
        for s, y in zip(prm.step_scores(t.item, [t.steps])[0], t.labels):
            (good if y >= 0.5 else bad).append(s)
    if not good or not bad:
        raise LLMLabError("ranking accuracy needs both good and bad steps")
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


AGGREGATES = {"min": min, "last": lambda xs: xs[-1], "prod": math.prod}


class PRMScorer:
    """A scorer (item, texts, meter, logprobs) -> floats: each text split into steps and valued by the PRM, the
    steps' probabilities aggregated by their minimum (a solution is as good as its weakest step, as Math-Shepherd
    ranks candidates), the last one, or their product. A text with no step scores 0."""

    def __init__(self, path: str | Path, aggregate: str = "min"):
        if aggregate not in AGGREGATES:
            raise LLMLabError(f"unknown PRM aggregate {aggregate!r} (choose from {', '.join(AGGREGATES)})")
        self.prm, self.aggregate = PRM.load(path), AGGREGATES[aggregate]

    def __call__(self, item, texts, meter=None, logprobs=None) -> list[float]:
        solutions = [split_steps(t) for t in texts]
        scored = self.prm.step_scores(item, [s for s in solutions if s]) if any(solutions) else []
        out, it = [], iter(scored)
        for s in solutions:
            out.append(self.aggregate(next(it)) if s else 0.0)
        if meter is not None:
            meter.trace.scored_tokens += sum(len(encode_trace(self.prm.tokenizer, item, s)[0]) for s in solutions)
        return out
