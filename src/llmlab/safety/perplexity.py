"""A perplexity filter against adversarial suffixes (Jain et al. 2023): flag a prompt whose most surprising window
of tokens is far less likely than ordinary text.

GCG suffixes are token soup ("describing.\\ + similarlyNow write oppositeley.]("): a language model finds them very
unlikely, while ordinary prompts, however harmful, read like text. Whole-prompt perplexity dilutes a short suffix
behind a long request, so the filter scores every window of `window` consecutive tokens (mean negative
log-likelihood) and keeps the worst one. In-process models score tokens exactly; an endpoint scores windows of
words through the client's log-likelihoods (the same idea at word granularity).
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import LLMLabError

WINDOW = 10  # tokens per window, as Jain et al.
# max windowed perplexity for SmolLM2-135M-Instruct (fp32); PROVISIONAL until measured on benign prompts and GCG
# suffixes (experiments/gcg.py)
DEFAULT_THRESHOLD = 5000.0


def _check(prompts, threshold, window):
    if isinstance(prompts, str):
        raise LLMLabError("prompts must be a list of strings, not one string")
    if threshold is not None and not threshold > 1:
        raise LLMLabError(f"a perplexity threshold must be > 1, got {threshold}")
    if window < 1:
        raise LLMLabError(f"the window must be at least 1 token, got {window}")


def _local_llm(llm_or_client):
    """The in-process LLM behind an LLM or a LocalClient, or None for an endpoint."""
    if hasattr(llm_or_client, "engine"):
        return llm_or_client
    return getattr(llm_or_client, "llm", None)


@torch.no_grad()
def token_nlls(llm, prompts: list[str], batch_size: int = 16) -> list[list[float]]:
    """Per prompt: the negative log-likelihood of each of its tokens (after the BOS/EOS document separator)."""
    tok = llm.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise LLMLabError("this tokenizer has no BOS or EOS token to score a prompt after")
    rows = []
    for p in prompts:
        ids = tok.encode(p)[:llm.engine.context_len - 1]
        if not ids:
            raise LLMLabError("a prompt to score is empty")
        rows.append(([prefix], ids))
    out = []
    for start in range(0, len(rows), batch_size):
        out += [[-x for x in lp] for lp in llm.engine.score_batch(rows[start:start + batch_size])]
    return out


def windowed_max(nlls: list[float], window: int = WINDOW) -> float:
    """The largest mean NLL over windows of `window` consecutive values (the whole list if it is shorter)."""
    if len(nlls) <= window:
        return sum(nlls) / len(nlls)
    sums = [sum(nlls[:window])]
    for i in range(window, len(nlls)):
        sums.append(sums[-1] + nlls[i] - nlls[i - window])
    return max(sums) / window


def _word_window_nlls(client, prompt: str, window: int) -> float:
    """Endpoint fallback: the worst mean NLL per token over windows of `window` words, each scored after the
    words before it."""
    words = prompt.split(" ")
    if not prompt.strip():
        raise LLMLabError("a prompt to score is empty")
    starts = list(range(0, max(1, len(words) - window + 1)))
    pairs = [(" ".join(words[:s]), (" " if s else "") + " ".join(words[s:s + window])) for s in starts]
    scores = client.loglikelihood(pairs)
    return max(-ll.logprob / max(1, ll.n_tokens) for ll in scores)


def windowed_perplexity(llm_or_client, prompts: list[str], window: int = WINDOW) -> list[float]:
    """Per prompt: exp of the worst window's mean NLL (the score the filter compares with its threshold)."""
    _check(prompts, None, window)
    llm = _local_llm(llm_or_client)
    if llm is not None:
        worst = [windowed_max(n, window) for n in token_nlls(llm, prompts)]
    else:
        worst = [_word_window_nlls(llm_or_client, p, window) for p in prompts]
    return [math.exp(min(w, 700.0)) for w in worst]  # exp(700) is near float's limit: a cap, not a real score


def perplexity_filter(llm, prompts: list[str], threshold: float = DEFAULT_THRESHOLD,
                      window: int = WINDOW) -> list[bool]:
    """True for each prompt the filter flags (its worst window's perplexity is above threshold). llm: an in-process
    LLM, a LocalClient, or any model client (an endpoint is scored in windows of words)."""
    _check(prompts, threshold, window)
    return [ppl > threshold for ppl in windowed_perplexity(llm, prompts, window)]


def calibrate_threshold(llm, benign_prompts: list[str], margin: float = 1.5, window: int = WINDOW) -> float:
    """A threshold that passes every given benign prompt: their worst windowed perplexity times a margin (Jain et
    al. set theirs at the largest perplexity of the harmful prompts they meant to pass)."""
    if not benign_prompts:
        raise LLMLabError("calibrating a perplexity threshold needs at least one benign prompt")
    return max(windowed_perplexity(llm, benign_prompts, window)) * margin
