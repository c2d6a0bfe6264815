"""AdamW with weight decay only on matrices, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8):
    """AdamW whose decay skips norms, biases and embeddings: shrinking those towards 0 only hurts.

    Embedding rows are looked up, not multiplied, so decay would pull rare tokens to zero; a tied lm_head
    shares the embedding tensor and therefore goes undecayed too.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one pass over each parameter for the whole update (on CPUs too since torch 2.4; measured ~4x faster
    # than foreach on a 48M-parameter model). Sharded (FSDP2 DTensor) parameters keep foreach: one kernel per op
    # over all tensors instead of a Python loop per parameter.
    plain = all(type(p.data) is torch.Tensor for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=plain, foreach=not plain)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr, then cosine decay to min_lr at max_steps (step counts from 0)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
