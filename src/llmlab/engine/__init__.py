"""Inference: sampling parameters, the generation engine (batched, n samples, streaming, beam search),
constrained decoding and scoring."""

from llmlab.engine.detokenize import IncrementalText
from llmlab.engine.engine import Engine
from llmlab.engine.sampling import (SamplingParams, apply_repetition_penalty, draw, min_p_filter, new_generator,
                                    row_generator, sample_next, sampling_probs, top_k_filter, top_p_filter)
from llmlab.engine.sequence import Completion, Sequence, TokenInfo

__all__ = ["Completion", "Engine", "IncrementalText", "SamplingParams", "Sequence", "TokenInfo",
           "apply_repetition_penalty", "draw", "min_p_filter", "new_generator", "row_generator", "sample_next",
           "sampling_probs", "top_k_filter", "top_p_filter"]
