"""Sampling parameters and the pure functions that turn a row of logits into the next token."""

from __future__ import annotations

import torch

from llmlab.engine.native.library import loaded_library
from llmlab.engine.params import SamplingParams  # noqa: F401 (imported from here too)
from llmlab.errors import LLMLabError

TOP_P_CANDIDATES = (256, 4096)  # tokens ranked before top-p falls back to a full sort (see top_p_filter)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen (seen: (B, V) bool) less likely: divide positive logits, multiply negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose total probability reaches p.

    The nucleus is usually a few dozen tokens, so only the most likely TOP_P_CANDIDATES are ranked (a top-256 is
    ~30x cheaper than sorting a 49k vocabulary; on SmolLM2's logits at temperature 0.7 it holds the nucleus of
    97% of rows), then more, and the full sort only when those still hold less than p of the mass. The set is the
    same either way: the candidates are the head of the sorted order. Each row ranks only as many as it needs, so
    one flat row does not make the other rows of a batch sort their whole vocabulary."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    rows = probs.reshape(-1, probs.shape[-1])
    flat_keep = keep.view(-1, probs.shape[-1])
    todo = None  # indices of the rows still to settle (None: all)
    for k in (*TOP_P_CANDIDATES, None):
        part = rows if todo is None else rows[todo]
        if k is None or k >= part.shape[-1]:
            head, order = part.sort(dim=-1, descending=True)
            done = None
        else:
            head, order = part.topk(k, dim=-1)
            done = head.sum(dim=-1) >= p
        mass_before = head.cumsum(dim=-1) - head  # probability of the more likely tokens; 0 for the top one
        settled = torch.zeros_like(part, dtype=torch.bool).scatter_(-1, order, mass_before < p)
        if done is None or bool(done.all()):
            ids = slice(None) if todo is None else todo
            flat_keep[ids] = settled
            break
        ids = done.nonzero().squeeze(-1)
        flat_keep[ids if todo is None else todo[ids]] = settled[ids]
        todo = (~done).nonzero().squeeze(-1) if todo is None else todo[~done]
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | list | None = None,
                seen: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). seen (B, V) marks prompt + generated tokens for the penalty;
    allowed (B, V') marks the tokens a constraint permits (V' <= V: tokens past the tokenizer's are never allowed).

    The constraint's mask comes first, so every option below works under it; then, as in Hugging Face,
    repetition penalty, temperature, top-k, top-p, min-p, and one draw (generator: one stream, or a list of one per
    row). Without a constraint or a penalty the native library samples, when it is loaded (native_sample).
    """
    if params.temperature == 0:
        return masked_and_penalised(logits, params, seen, allowed).argmax(dim=-1)
    if allowed is None and (seen is None or params.repetition_penalty == 1.0):
        chosen = native_sample(logits, params, generator)
        if chosen is not None:
            return chosen
    return draw(sampling_probs(logits, params, seen, allowed), generator)


def native_sample(logits: torch.Tensor, params: SamplingParams, generator=None) -> torch.Tensor | None:
    """sample_next without a constraint or a penalty, in C++ (llmlab.engine.native's llmlab_sample: the same
    distribution and, from the same uniforms, the same tokens up to float rounding; 5-10x faster on SmolLM2's 49k);
    None where the native library is not loaded already (this never builds it) or the logits are not on the CPU."""
    lib = loaded_library()
    if lib is None or logits.device.type != "cpu":
        return None
    rows = logits.detach().float().contiguous()
    u = uniforms(rows.shape[0], generator, rows.device).contiguous()
    chosen = torch.empty(rows.shape[0], dtype=torch.long)
    lib.llmlab_sample(rows.data_ptr(), rows.shape[0], rows.shape[1], params.temperature, params.top_k,
                      params.top_p, params.min_p, u.data_ptr(), chosen.data_ptr())
    return chosen


def masked_and_penalised(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                         allowed: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits with the constraint's mask and the repetition penalty applied (what greedy takes the argmax of)."""
    logits = logits.float()
    if allowed is not None:
        if allowed.shape[-1] < logits.shape[-1]:
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[-1]), value=False)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a sample is drawn from (temperature > 0): mask, penalty, temperature, top-k, top-p, min-p."""
    logits = masked_and_penalised(logits, params, seen, allowed) / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return logits.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | list | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), by inverse transform: one uniform per row against the cumulative sum.
    torch.multinomial draws a random number per vocabulary entry (~1 ms a row for 49k tokens, most of a
    16-row serving step); this costs one cumsum. A token of probability 0 is never drawn (its cdf step is empty).
    generator: one stream for all rows, or a list of one per row (the batcher's rows, each drawing exactly what it
    would draw alone)."""
    cdf = probs.double().cumsum(dim=-1)
    u = uniforms(probs.shape[0], generator, probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def uniforms(rows: int, generator=None, device="cpu") -> torch.Tensor:
    """One float64 uniform per row (rows, 1): from one stream, or from each row's own (a list of generators)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.rand(1, 1, generator=g, dtype=torch.float64, device=device) for g in generator])
    return torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=device)


def row_generator(seed: int | None, index: int, device="cpu") -> torch.Generator:
    """The random stream of sample `index` of a prompt: seed + index, so a prompt's samples do not depend on what
    else is batched with it, and the engine, the batcher (the server) and the client agree for the same seed."""
    return new_generator(None if seed is None else seed + index, device)


def new_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A private random stream: the same seed gives the same samples, whatever else uses torch's global RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh, non-deterministic
    else:
        generator.manual_seed(seed)
    return generator
