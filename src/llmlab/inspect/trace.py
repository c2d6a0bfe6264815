"""Causal tracing (Meng et al. 2022, ROME): where in the network does a fact travel from the subject to the answer?

Three runs of one prompt: clean; corrupted (Gaussian noise added to the subject tokens' embeddings, so the model
no longer knows who it is about); and corrupted but with one residual state (layer l, position t) put back to its
clean value. The probability of the correct answer in that last run, mapped over layers x positions, shows which
states carry the fact: in GPT-2 XL, the subject's last token in the middle layers (the MLPs' key-value store).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmlab.errors import LLMLabError
from llmlab.inspect.hooks import as_batch, hidden_states, run_with_hooks


@dataclass
class TraceResult:
    scores: torch.Tensor  # (n_layers + 1, T): P(answer) with state (l, t) restored, averaged over noise samples
    clean_prob: float
    corrupted_prob: float
    ids: list[int]
    subject: list[int]  # the corrupted positions

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect: how much of the answer's probability restoring each state brings back."""
        return self.scores - self.corrupted_prob

    def to_dict(self) -> dict:
        return {"ids": self.ids, "subject": self.subject, "clean_prob": self.clean_prob,
                "corrupted_prob": self.corrupted_prob, "scores": self.scores.tolist()}


def noise_scale(model) -> float:
    """ROME's corruption strength: three times the standard deviation of the token embeddings."""
    return 3.0 * model.model.embed_tokens.weight.float().std().item()


def corrupted_run(model, ids, subject: list[int], noise: torch.Tensor, clean: list[torch.Tensor],
                  restore: list[dict[int, list[int]]]) -> torch.Tensor:
    """Logits of the corrupted prompt; batch row r puts back the clean states restore[r] = {state: positions}.

    noise: (rows, len(subject), D) added to the subject's embeddings (state 0) of each row.
    """
    rows = len(restore)
    x = as_batch(ids).expand(rows, -1)
    subject_index = torch.tensor(subject)

    def edit(index, hidden):
        hidden = hidden.clone()
        if index == 0:
            hidden[:, subject_index] += noise.to(hidden.dtype)
        for r, states in enumerate(restore):
            if states.get(index):
                hidden[r, states[index]] = clean[index][0, states[index]]
        return hidden

    return run_with_hooks(model, x, edit)[0]


@torch.no_grad()
def causal_trace(model, ids: list[int], subject: list[int] | range, answer_id: int, samples: int = 8,
                 noise: float | None = None, seed: int = 0) -> TraceResult:
    """P(answer at the last position) with each residual state (0..n_layers) at each position restored."""
    subject = sorted(set(subject))
    if not subject or subject[0] < 0 or subject[-1] >= len(ids):
        raise LLMLabError(f"subject positions {subject} are not inside the {len(ids)}-token prompt")
    if not 0 <= answer_id < model.config.vocab_size:
        raise LLMLabError(f"answer token {answer_id} is outside the vocabulary")
    scale = noise_scale(model) if noise is None else noise
    generator = torch.Generator().manual_seed(seed)
    dim = model.model.embed_tokens.weight.shape[1]
    eps = torch.randn(samples, len(subject), dim, generator=generator) * scale
    clean = hidden_states(model, ids)
    clean_prob = model(as_batch(ids))[0, -1].float().softmax(-1)[answer_id].item()
    corrupted = corrupted_run(model, ids, subject, eps, clean, [{}] * samples)
    corrupted_prob = corrupted[:, -1].float().softmax(-1)[:, answer_id].mean().item()
    T = len(ids)
    scores = torch.zeros(len(clean), T)
    for state in range(len(clean)):
        # one batch per layer: row (t, s) restores position t under noise sample s
        restore = [{state: [t]} for t in range(T) for _ in range(samples)]
        logits = corrupted_run(model, ids, subject, eps.repeat(T, 1, 1), clean, restore)
        probs = logits[:, -1].float().softmax(-1)[:, answer_id]
        scores[state] = probs.view(T, samples).mean(-1)
    return TraceResult(scores, clean_prob, corrupted_prob, list(ids), subject)
