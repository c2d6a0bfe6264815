"""The one place log-probabilities of given tokens are computed from logits: serving, eval, DPO, RL and the
speedrun all score through `token_logprobs`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: logits (..., T, V), targets (..., T) -> (..., T) in float32.

    The caller aligns them (the logits at position t predict token t + 1). Computed in float32 whatever the
    logits' dtype, because bf16 log-softmax loses the small differences that DPO and RL ratios live on.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def logprobs_and_top(logits: torch.Tensor, targets: torch.Tensor, k: int = 0):
    """(log p(targets), (top-k values, top-k ids) or None), sharing one log-softmax: what responses report."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not k:
        return chosen, None
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return chosen, (top.values, top.indices)
