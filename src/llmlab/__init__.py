"""llmlab: a hackable toolkit for the whole life of a language model, from scratch, in Python."""

__version__ = "0.1.0"


def load(name_or_path="smollm2", dtype=None, compile=False, int4=False, exact=False, announce=True,
         rope_scaling=None, self_extend=None):
    """Load a model by registry name, checkpoint directory or .gguf file: see llmlab.api.load."""
    from llmlab.api import load as _load  # lazy: `import llmlab` stays cheap for the CLI and tools
    return _load(name_or_path, dtype=dtype, compile=compile, int4=int4, exact=exact, announce=announce,
                 rope_scaling=rope_scaling, self_extend=self_extend)
