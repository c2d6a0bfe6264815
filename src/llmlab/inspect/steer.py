"""Steering vectors (activation addition, Turner et al. 2023): push the residual stream along a direction.

The direction is the mean difference of the residual state at layer L between contrasting prompts (the last
token of each; "I love" vs "I hate"), as in contrastive activation addition (Rimsky et al. 2023). Adding
strength * direction to state L at every position changes what the model says; a negative strength pushes the
other way.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from llmlab.errors import LLMLabError
from llmlab.inspect.hooks import check_layer, edit_hooks, hidden_states, as_batch


@torch.no_grad()
def steering_vector(model, positive: list[list[int]], negative: list[list[int]], layer: int) -> torch.Tensor:
    """Mean over pairs of (state L at the last token of positive[i]) - (the same for negative[i])."""
    if not positive or len(positive) != len(negative):
        raise LLMLabError(f"steering needs pairs of contrasting prompts (got {len(positive)} and {len(negative)})")
    if any(len(p) == 0 for p in positive + negative):
        raise LLMLabError("a steering prompt is empty")
    layer = check_layer(model, layer)
    diffs = [hidden_states(model, p)[layer][0, -1] - hidden_states(model, n)[layer][0, -1]
             for p, n in zip(positive, negative)]
    return torch.stack(diffs).mean(0)


@contextmanager
def steering(model, vector: torch.Tensor, layer: int, strength: float):
    """While inside, every forward pass of the model (prefill and decode alike) adds strength * vector to state L."""
    layer = check_layer(model, layer)

    def edit(index, hidden):
        return hidden + strength * vector.to(hidden.dtype) if index == layer else None

    with edit_hooks(model, edit):
        yield


@torch.no_grad()
def steering_effect(model, ids: list[int], vector: torch.Tensor, layer: int, strengths: list[float],
                    token_ids: list[int]) -> dict[float, list[float]]:
    """Next-token probability of each of token_ids after the prompt, for each steering strength."""
    if not ids:
        raise LLMLabError("the prompt is empty")
    out = {}
    for strength in strengths:
        with steering(model, vector, layer, strength):
            probs = model(as_batch(ids))[0, -1].float().softmax(-1)
        out[strength] = [probs[t].item() for t in token_ids]
    return out
