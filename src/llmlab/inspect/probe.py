"""Linear probes on the residual stream, with a control task so that accuracy means something.

A probe is a multinomial logistic regression from one layer's hidden state to a label, trained on some examples
and scored on held-out ones. Its accuracy alone can reflect the probe's capacity to memorise rather than what the
layer encodes, so each probe is paired with a control task (Hewitt & Liang 2019): every token type gets a random
label, the same wherever it occurs; selectivity = task accuracy - control accuracy.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmlab.errors import LLMLabError
from llmlab.inspect.hooks import check_layer, hidden_states


@dataclass
class ProbeResult:
    layers: list[int]  # residual-state indices (0 = embeddings)
    accuracy: list[float]  # held-out accuracy of the task probe per layer
    control_accuracy: list[float]  # held-out accuracy of the control probe (random label per token type)
    majority: float  # held-out accuracy of always answering the most common training label
    n_train: int
    n_test: int
    n_classes: int
    extra: dict = field(default_factory=dict)

    @property
    def selectivity(self) -> list[float]:
        return [a - c for a, c in zip(self.accuracy, self.control_accuracy)]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "accuracy": self.accuracy, "control_accuracy": self.control_accuracy,
                "selectivity": self.selectivity, "majority": self.majority, "n_train": self.n_train,
                "n_test": self.n_test, "n_classes": self.n_classes, **self.extra}


def fit_probe(x_train, y_train, x_test, y_test, n_classes: int, steps: int = 300, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a logistic regression (features standardised on the training set, full-batch L-BFGS)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], n_classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), y_train) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(-1) == y_test).float().mean().item()


def control_labels(token_types: list[int], labels: list[int], seed: int = 0) -> list[int]:
    """A random label per token type, drawn from the task's label distribution (Hewitt & Liang's control task)."""
    rng = random.Random(seed)
    per_type = {t: rng.choice(labels) for t in sorted(set(token_types))}
    return [per_type[t] for t in token_types]


def split(n: int, test_fraction: float, seed: int, groups: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out and training example indices: at random, or by whole groups (a person's every example on one side,
    so a probe cannot pass by recognising the person)."""
    generator = torch.Generator().manual_seed(seed)
    if groups is None:
        order = torch.randperm(n, generator=generator)
        n_test = max(1, round(test_fraction * n))
        return order[:n_test], order[n_test:]
    names = sorted(set(groups), key=str)
    if len(names) < 2:
        raise LLMLabError("a split by groups needs at least 2 groups")
    picked = torch.randperm(len(names), generator=generator)[:max(1, round(test_fraction * len(names)))]
    held = {names[i] for i in picked.tolist()}
    test = [i for i, g in enumerate(groups) if g in held]
    return torch.tensor(test), torch.tensor([i for i, g in enumerate(groups) if g not in held])


def train_probes(features: list[torch.Tensor], labels: list[int], token_types: list[int], test_fraction: float = 0.3,
                 layers: list[int] | None = None, seed: int = 0, groups: list | None = None) -> ProbeResult:
    """Probe every residual state (features[l]: (N, D), one row per example) for labels, and its control task.

    token_types[i] is the token the probed state sits on (the control task's unit). Examples are split into
    train and held-out at random (seeded), or by groups (groups[i]: e.g. the person example i is about); layers
    defaults to all states.
    """
    n = len(labels)
    if n < 4 or len(token_types) != n or any(len(f) != n for f in features):
        raise LLMLabError(f"a probe needs at least 4 examples with one feature row and token type each (got {n})")
    if groups is not None and len(groups) != n:
        raise LLMLabError(f"{len(groups)} groups for {n} probe examples")
    layers = list(range(len(features))) if layers is None else layers
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    control = control_labels(token_types, labels, seed)
    yc = torch.tensor([classes.index(v) for v in control])
    test, train = split(n, test_fraction, seed, groups)
    n_test = len(test)
    majority_label = Counter(y[train].tolist()).most_common(1)[0][0]
    acc, ctrl = [], []
    for layer in layers:
        x = features[layer].float()
        acc.append(fit_probe(x[train], y[train], x[test], y[test], len(classes)))
        ctrl.append(fit_probe(x[train], yc[train], x[test], yc[test], len(classes)))
    return ProbeResult(layers, acc, ctrl, (y[test] == majority_label).float().mean().item(), len(train), n_test,
                       len(classes))


@torch.no_grad()
def last_token_features(model, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
    """Per residual state, the hidden state at the last token of each prompt (N, D); and those last tokens."""
    rows = [[s[0, -1] for s in hidden_states(model, ids)] for ids in prompts]
    return [torch.stack([r[l] for r in rows]) for l in range(len(rows[0]))], [ids[-1] for ids in prompts]


def probe_prompts(model, prompts: list[list[int]], labels: list, layers: list[int] | None = None,
                  test_fraction: float = 0.3, seed: int = 0) -> ProbeResult:
    """Probe the hidden state at the last token of each prompt for its label, at the given layers (default all)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LLMLabError("every probe example needs a non-empty text")
    layers = None if layers is None else [check_layer(model, l) for l in layers]
    features, last = last_token_features(model, prompts)
    return train_probes(features, list(labels), last, test_fraction, layers, seed)


def birth_year_bucket(birth_date: str, width: int = 10) -> str:
    year = int(birth_date.rsplit(" ", 1)[-1])
    return f"{year - year % width}s"


def bios_probe_examples(tokenizer, world, attribute: str) -> tuple[list[list[int]], list[str]]:
    """One prompt per person, "<eos>{full name}" as a biography starts, labelled with the person's attribute
    (birth_year: the decade of birth). The probe reads the state at the name's last token."""
    eos = tokenizer.eos_token_id
    prompts = [[eos] + tokenizer.encode(p.name) for p in world.people]
    if attribute == "birth_year":
        return prompts, [birth_year_bucket(p.birth_date) for p in world.people]
    if not hasattr(world.people[0], attribute) or attribute in ("name", "split"):
        raise LLMLabError(f"unknown bios attribute {attribute!r} (birth_year, birth_city, university, major, "
                          "employer, employer_city, pronoun)")
    return prompts, [getattr(p, attribute) for p in world.people]


def name_mentions(tokenizer, world, augment: str = "multi,fullname") -> list[tuple[list[int], list[int], int]]:
    """Per biography: "<eos>" + its token ids, the position of the last token of every mention of the person's
    full name in it, and the person's index in world.people."""
    eos, out = tokenizer.eos_token_id, []
    copies = 5 if "multi" in augment else 1
    for k, text in enumerate(world.biographies(augment)):
        person = k // copies
        name = world.people[person].name
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        ends = [m + len(name) for m in _find_all(text, name)]
        positions = [1 + max(i for i, (a, b) in enumerate(enc.offsets) if a < end) for end in ends]
        out.append(([eos] + enc.ids, positions, person))
    return out


def _find_all(text: str, sub: str) -> list[int]:
    starts, i = [], text.find(sub)
    while i >= 0:
        starts.append(i)
        i = text.find(sub, i + 1)
    return starts


@torch.no_grad()
def probe_name_mentions(model, tokenizer, world, labels_by_person: list, layers: list[int] | None = None,
                        test_fraction: float = 0.5, seed: int = 0, augment: str = "multi,fullname") -> ProbeResult:
    """Probe the state at the last token of every mention of a person's name in their biographies for a label of
    the person (labels_by_person[i] for world.people[i]), held out by person: the probe is scored on people it never
    saw, so it passes only where the layer encodes the property in a way shared across people."""
    if len(labels_by_person) != len(world.people):
        raise LLMLabError(f"{len(labels_by_person)} labels for {len(world.people)} people")
    layers = None if layers is None else [check_layer(model, l) for l in layers]
    rows, types, labels, groups = [], [], [], []
    limit = model.config.max_seq_len  # positions the model was trained on
    for ids, positions, person in name_mentions(tokenizer, world, augment):
        ids, positions = ids[:limit], [p for p in positions if p < limit]
        if not positions:
            continue
        states = hidden_states(model, ids)
        rows.append(torch.stack([s[0, positions] for s in states]))  # (states, mentions, D)
        types += [ids[p] for p in positions]
        labels += [labels_by_person[person]] * len(positions)
        groups += [person] * len(positions)
    features = list(torch.cat(rows, dim=1))
    return train_probes(features, labels, types, test_fraction, layers, seed, groups)
