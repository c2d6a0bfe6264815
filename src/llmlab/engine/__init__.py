"""Inference: sampling parameters, the generation engine (batched, n samples, streaming, beam search),
constrained decoding and scoring."""

from llmlab.engine.detokenize import IncrementalText

# where each name lives: imported on first use, so a process that only needs a torch-free part (llmlab.engine.native's
# library and lite runner, detokenize) never loads PyTorch
_HOMES = {"Engine": "engine", "Completion": "sequence", "Sequence": "sequence", "TokenInfo": "sequence",
          "SamplingParams": "params",
          **{name: "sampling" for name in ("apply_repetition_penalty", "draw", "min_p_filter", "new_generator",
                                           "row_generator", "sample_next", "sampling_probs", "top_k_filter",
                                           "top_p_filter")}}

__all__ = ["IncrementalText", *_HOMES]


def __getattr__(name):
    if name in _HOMES:
        import importlib
        return getattr(importlib.import_module(f"llmlab.engine.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'llmlab.engine' has no attribute {name!r}")
