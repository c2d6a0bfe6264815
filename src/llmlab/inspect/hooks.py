"""Reading and changing the residual stream from outside the model, with forward hooks on its layers.

The residual stream has n_layers + 1 states per token: index 0 is the embedding output (with learned positions
added, for GPT-2-style models), index i the output of block i - 1. Hugging Face's `output_hidden_states` has the
same states except the last, which it returns after the final norm.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from llmlab.errors import LLMLabError

# edit(layer_index, hidden (B, T, D)) -> new hidden or None (keep); layer_index counts like hidden_states
Edit = Callable[[int, torch.Tensor], torch.Tensor | None]


def n_layers(model) -> int:
    return len(model.model.layers)


def check_layer(model, layer: int, what: str = "layer", allow_embeddings: bool = True) -> int:
    """A residual-stream index (0 = embeddings .. n_layers); negative counts from the end. Refuses the rest."""
    n = n_layers(model)
    low = 0 if allow_embeddings else 1
    index = layer + n + 1 if layer < 0 else layer
    if not low <= index <= n:
        raise LLMLabError(f"{what} {layer} does not exist: the model has residual states {low}..{n} "
                          f"(0 = embeddings, {n} = last block)")
    return index


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a raw prompt (with the tokenizer's BOS if it adds one); an empty prompt is refused."""
    if not prompt or not prompt.strip():
        raise LLMLabError("the prompt is empty")
    return tokenizer.encode(prompt, add_special_tokens=True)


def as_batch(ids) -> torch.Tensor:
    x = torch.as_tensor(ids, dtype=torch.long)
    return x[None] if x.dim() == 1 else x


def _state_modules(model) -> list[torch.nn.Module]:
    """The modules whose outputs are the residual states: the embedding (plus positions) and every block."""
    return [model.model.embed_tokens, *model.model.layers]


@contextmanager
def edit_hooks(model, edit: Edit):
    """While inside, every residual state passes through edit(index, hidden) as the model runs."""
    learned = "embed_positions" in model.model
    handles = []
    for index, module in enumerate(_state_modules(model)):
        if index == 0 and learned:
            # learned positions are added after embed_tokens: edit the sum, at the first block's input
            def pre(mod, args, kwargs, index=index):
                new = edit(index, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            handles.append(model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            continue

        def post(mod, args, output, index=index):
            return edit(index, output)
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_hooks(model, ids, edit: Edit | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (B, T, V) and the n_layers + 1 residual states (B, T, D) of one forward pass, after any edits."""
    states: list[torch.Tensor | None] = [None] * (n_layers(model) + 1)

    def record(index, hidden):
        new = edit(index, hidden) if edit is not None else None
        states[index] = hidden if new is None else new
        return new

    with edit_hooks(model, record):
        logits = model(as_batch(ids))
    return logits, states


@torch.no_grad()
def hidden_states(model, ids) -> list[torch.Tensor]:
    """The residual stream of a prompt: n_layers + 1 tensors (B, T, D), index 0 the embeddings."""
    return run_with_hooks(model, ids)[1]


def final_norm_and_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """What the model does after its last block: final norm, then the output head (logits)."""
    return model.lm_head(model.model.norm(hidden))


def token_span(tokenizer, prompt: str, substring: str) -> list[int]:
    """Positions of the tokens of encode(prompt, add_special_tokens=True) that overlap the first `substring`."""
    start = prompt.find(substring) if substring else -1
    if start < 0:
        raise LLMLabError(f"{substring!r} does not occur in the prompt {prompt!r}")
    end = start + len(substring)
    enc = tokenizer.backend.encode(prompt, add_special_tokens=True)
    positions = [i for i, ((a, b), special) in enumerate(zip(enc.offsets, enc.special_tokens_mask))
                 if not special and b > a and a < end and b > start]
    if not positions:
        raise LLMLabError(f"no token of the prompt covers {substring!r}")
    return positions


def single_token(tokenizer, text: str, what: str = "token") -> int:
    """The id of text if it is exactly one token (" Paris" with its leading space); refuses anything else."""
    ids = tokenizer.encode(text) if text else []
    if len(ids) != 1:
        raise LLMLabError(f"{what} {text!r} is {len(ids)} tokens, not one: give its first token instead "
                          f"({tokenizer.decode(ids[:1])!r})" if ids else f"{what} is empty")
    return ids[0]
