"""Inference: sampling parameters, the generation engine (batched, streaming, beam search) and scoring."""

from llmlab.engine.detokenize import IncrementalText
from llmlab.engine.engine import Completion, Engine
from llmlab.engine.sampling import (SamplingParams, apply_repetition_penalty, min_p_filter, new_generator,
                                    sample_next, top_k_filter, top_p_filter)

__all__ = ["Completion", "Engine", "IncrementalText", "SamplingParams", "apply_repetition_penalty",
           "min_p_filter", "new_generator", "sample_next", "top_k_filter", "top_p_filter"]
