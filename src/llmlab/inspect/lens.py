"""Logit lens and tuned lens: what each layer's residual stream would predict if the model stopped there.

The logit lens (nostalgebraist 2020) reads state l through the model's own final norm and head. The tuned lens
(Belrose et al. 2023) first maps state l through a learned affine translator A_l h + b_l, trained to make that
read-out match the model's final distribution (KL); it starts from the identity, i.e. from the logit lens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmlab.errors import LLMLabError
from llmlab.inspect.hooks import final_norm_and_head, hidden_states, n_layers


@torch.no_grad()
def logit_lens(model, ids, lens: "TunedLens | None" = None) -> torch.Tensor:
    """Log-probabilities (n_layers + 1, T, V) of the next token read from every residual state of one prompt.
    With a tuned lens, each state goes through its translator first (the last state never does)."""
    states = hidden_states(model, ids)
    rows = []
    for index, h in enumerate(states):
        if lens is not None and index < len(states) - 1:
            h = lens.translate(index, h)
        rows.append(F.log_softmax(final_norm_and_head(model, h)[0].float(), dim=-1))
    return torch.stack(rows)


class TunedLens(torch.nn.Module):
    """One affine translator per residual state except the last (which the head already reads)."""

    def __init__(self, n_states: int, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_states, dim, dim))  # A_l - I: zero is the logit lens
        self.bias = torch.nn.Parameter(torch.zeros(n_states, dim))

    def translate(self, index: int, h: torch.Tensor) -> torch.Tensor:
        return h + h @ self.weight[index].T.to(h.dtype) + self.bias[index].to(h.dtype)


def tuned_lens(model, ids, lens: TunedLens) -> torch.Tensor:
    return logit_lens(model, ids, lens)


def _collect(model, texts_ids: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Residual states (per state index: (N, D)) and final log-probabilities (N, V) of every token of the texts."""
    per_state, final = None, []
    for ids in texts_ids:
        states = hidden_states(model, ids)
        flat = [s[0] for s in states]
        per_state = [[f] for f in flat] if per_state is None else [p + [f] for p, f in zip(per_state, flat)]
        with torch.no_grad():
            final.append(F.log_softmax(final_norm_and_head(model, states[-1][0]).float(), dim=-1))
    return [torch.cat(p) for p in per_state], torch.cat(final)


def kl_per_layer(model, states, final_logp, lens: TunedLens | None, batch: int = 256) -> list[float]:
    """Mean KL(final || read-out of state l) over the tokens, for every state l (the last is 0 by definition)."""
    out = []
    with torch.no_grad():
        for index, h in enumerate(states):
            total = 0.0
            for i in range(0, len(h), batch):
                hb = h[i:i + batch]
                if lens is not None and index < len(states) - 1:
                    hb = lens.translate(index, hb)
                logp = F.log_softmax(final_norm_and_head(model, hb).float(), dim=-1)
                p = final_logp[i:i + batch]
                total += (p.exp() * (p - logp)).sum().item()
            out.append(total / len(h))
    return out


@dataclass
class TunedLensResult:
    lens: TunedLens
    heldout_kl_logit_lens: list[float]  # per residual state, nats per token
    heldout_kl_tuned_lens: list[float]
    train_tokens: int
    heldout_tokens: int


def train_tuned_lens(model, train_ids: list[list[int]], heldout_ids: list[list[int]], steps: int = 100,
                     lr: float = 1e-3, batch: int = 128, seed: int = 0) -> TunedLensResult:
    """Fit one translator per layer on the tokens of train_ids; report held-out KL against the logit lens.

    Each step samples `batch` tokens and updates every translator on its own KL to the model's final
    distribution (the layers do not interact, so one loss sums them). The model's weights are not touched.
    """
    if not train_ids or not heldout_ids:
        raise LLMLabError("the tuned lens needs some training texts and some held-out texts")
    states, final_logp = _collect(model, train_ids)
    dim, n_train = states[0].shape[-1], len(final_logp)
    lens = TunedLens(len(states) - 1, dim).to(states[0].device)
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    head_params = [p for p in model.parameters() if p.requires_grad]
    for p in head_params:  # gradients flow through the head to the translators, not into the model
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    try:
        for _ in range(steps):
            pick = torch.randint(n_train, (min(batch, n_train),), generator=generator)
            target = final_logp[pick]
            loss = 0.0
            for index in range(len(states) - 1):
                logp = F.log_softmax(final_norm_and_head(model, lens.translate(index, states[index][pick])).float(), -1)
                loss = loss + (target.exp() * (target - logp)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for p in head_params:
            p.requires_grad_(True)
    held_states, held_logp = _collect(model, heldout_ids)
    return TunedLensResult(lens, kl_per_layer(model, held_states, held_logp, None),
                           kl_per_layer(model, held_states, held_logp, lens), n_train, len(held_logp))
