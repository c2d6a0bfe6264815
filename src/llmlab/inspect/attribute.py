"""Input attribution for one prediction: which prompt tokens does the next-token log-probability depend on?

Gradient x input (the first-order Taylor term of each token's embedding, Shrikumar et al. 2016; Denil et al. 2014)
and occlusion (replace one token by a neutral one and measure the drop, Zeiler & Fergus 2014).
"""

from __future__ import annotations

import torch

from llmlab.errors import LLMLabError
from llmlab.inspect.hooks import as_batch, run_with_hooks


def _check(model, ids, target_id):
    if not ids:
        raise LLMLabError("the prompt is empty")
    if not 0 <= target_id < model.config.vocab_size:
        raise LLMLabError(f"target token {target_id} is outside the vocabulary")


def target_logprob(logits: torch.Tensor, target_id: int) -> torch.Tensor:
    """log P(target | prompt) at the last position of every row."""
    return logits[:, -1].float().log_softmax(-1)[:, target_id]


def gradient_x_input(model, ids: list[int], target_id: int) -> list[float]:
    """Per prompt token: (d log P(target) / d embedding) . embedding."""
    _check(model, ids, target_id)
    embedding = {}

    def edit(index, hidden):
        if index == 0:
            embedding["x"] = hidden.detach().requires_grad_(True)
            return embedding["x"]
        return None

    with torch.enable_grad():
        logits, _ = run_with_hooks(model, ids, edit)
        (grad,) = torch.autograd.grad(target_logprob(logits, target_id).sum(), embedding["x"])
    return (grad * embedding["x"].detach()).sum(-1)[0].tolist()


@torch.no_grad()
def occlusion(model, ids: list[int], target_id: int, baseline_id: int) -> list[float]:
    """Per prompt token: log P(target) with the prompt as is, minus with that token replaced by baseline_id."""
    _check(model, ids, target_id)
    x = as_batch(ids)
    occluded = x.repeat(len(ids), 1)
    occluded[torch.arange(len(ids)), torch.arange(len(ids))] = baseline_id
    clean = target_logprob(model(x), target_id)
    return (clean - target_logprob(model(occluded), target_id)).tolist()
