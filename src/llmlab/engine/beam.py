"""Beam search: the few most likely continuations, with the sampling options a deterministic search can honour.

Honoured: max_new_tokens, stop strings, stop_token_ids / ignore_eos, the repetition penalty (applied, as in
Hugging Face, to each beam's log-probabilities before they are added to its score) and a length penalty.
Refused with one error: everything that only makes sense when drawing at random (temperature > 0, top_k,
top_p, min_p, seed) and top_logprobs. Reported logprobs are always the raw model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmlab.engine.sampling import SamplingParams, apply_repetition_penalty
from llmlab.engine.sequence import Completion, stop_ids_of
from llmlab.errors import LLMLabError


def check_beam(beam_width: int, params: SamplingParams) -> SamplingParams:
    """Refuse a beam width below 1 and every option beam search cannot honour; return params."""
    if not isinstance(beam_width, int) or beam_width < 1:
        raise LLMLabError(f"beam width must be >= 1, got {beam_width}")
    params.validate()
    refused = [name for name, off in (("temperature", params.temperature == 0), ("top_k", params.top_k == 0),
                                      ("top_p", params.top_p == 1.0), ("min_p", params.min_p == 0.0),
                                      ("seed", params.seed is None), ("top_logprobs", params.top_logprobs == 0),
                                      ("logits_processors", not params.logits_processors))
               if not off]
    if refused:
        raise LLMLabError(f"beam search is deterministic and cannot honour {', '.join(refused)}: leave them unset "
                          f"(temperature 0); it honours max tokens, stop strings, stop tokens and repetition penalty")
    return params


@torch.no_grad()
def beam_search(engine, prompt: list[int], beam_width: int, params: SamplingParams | None = None,
                length_penalty: float = 1.0) -> list[Completion]:
    """The beam_width best continuations, best first, scored by sum logprob / length ** length_penalty.

    A hypothesis that samples a stop token or completes a stop string is finished and kept; the search ends
    when the best finished hypothesis scores higher than every live beam (Hugging Face's early_stopping=False
    heuristic), or after max_new_tokens (capped to the context window), when live beams finish as "length".
    """
    params = check_beam(beam_width, params or SamplingParams(temperature=0))
    params.validate(engine.context_len)
    engine._check_prompt(prompt)
    stop_ids = stop_ids_of(params, engine.tokenizer)
    stops = [params.stop] if isinstance(params.stop, str) else [s for s in params.stop if s]
    max_new = min(params.max_new_tokens, engine.context_len - len(prompt))
    penalty = params.repetition_penalty

    def score(total: float, length: int) -> float:
        return total / length ** length_penalty

    def stop_cut(ids: list[int]) -> str | None:
        """The text cut before a stop string, if one appears in ids' text."""
        if not stops:
            return None
        text = engine.tokenizer.decode(ids)
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        return text[:min(hits)] if hits else None

    last, cache = engine.prefill(prompt, engine._cache_len(len(prompt) + max_new))
    logits = last  # (live beams, V); one live beam before the first step
    beams = [([], [])]  # per live beam: token ids, their raw logprobs
    seen = None
    if penalty != 1.0:
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=engine.device)
        seen[0, torch.tensor(prompt, device=engine.device)] = True
    totals = torch.zeros(1, device=engine.device)
    finished = []  # (score, token ids, logprobs, finish_reason, tokens sampled, text)
    vocab = logits.shape[-1]
    for t in range(max_new):
        logp = F.log_softmax(logits, dim=-1)
        ranked = logp if seen is None else apply_repetition_penalty(logp, seen, penalty)
        candidates = (totals[:, None] + ranked).view(-1)
        # 2 * width candidates: even if half of them end in a stop token, width beams live on
        top = candidates.topk(min(2 * beam_width, candidates.numel()))
        new_beams, parents, tokens, new_totals = [], [], [], []
        for total, flat in zip(top.values.tolist(), top.indices.tolist()):
            parent, token = divmod(flat, vocab)
            ids, lps = beams[parent]
            token_lp = logp[parent, token].item()
            if token in stop_ids:
                finished.append((score(total, t + 1), ids, lps + [token_lp], "stop", t + 1, None))
                continue
            cut = stop_cut(ids + [token])
            if cut is not None:
                finished.append((score(total, t + 1), ids + [token], lps + [token_lp], "stop", t + 1, cut))
                continue
            new_beams.append((ids + [token], lps + [token_lp]))
            parents.append(parent)
            tokens.append(token)
            new_totals.append(total)
            if len(new_beams) == beam_width:
                break
        beams, totals = new_beams, torch.tensor(new_totals, device=engine.device)
        if t == max_new - 1 or not beams:
            break
        best_live = max(score(x, t + 1) for x in new_totals)
        if finished and max(f[0] for f in finished) > best_live:
            break
        order = torch.tensor(parents, device=engine.device)
        cache.reorder(order)  # each surviving beam takes its parent's cache
        if seen is not None:
            seen = seen[order]
            seen[torch.arange(len(tokens)), torch.tensor(tokens, device=engine.device)] = True
        fed = torch.tensor(tokens, device=engine.device)[:, None]
        logits = engine.decode_step(fed, torch.full_like(fed, len(prompt) + t), cache)
    for (ids, lps), total in zip(beams, totals.tolist()):
        finished.append((score(total, len(ids)), ids, lps, "length", len(ids), None))
    finished.sort(key=lambda f: f[0], reverse=True)
    return [Completion(token_ids=ids, text=engine.tokenizer.decode(ids) if text is None else text, finish_reason=reason,
                       logprobs=lps[:len(ids)], prompt_tokens=len(prompt), completion_tokens=n, score=s)
            for s, ids, lps, reason, n, text in finished[:beam_width]]
