"""The native decode step: decode.cpp, built and loaded by library.py; its weight layout (layout.py); the decoder of
PyTorch models (decoder.py: NativeDecoder, Packed, NativeLinear); quantized checkpoints (packed.py); and a runner
for a quantized GGUF with no PyTorch in the process (lite.py). Without the library callers keep the PyTorch path.
"""

from llmlab.engine.native.library import (ModelDesc, QMat, half_kv_cache, load_library, release_thread_pool, simd,
                                          threads, unsupported_config)

__all__ = ["ModelDesc", "QMat", "half_kv_cache", "load_library", "release_thread_pool", "simd", "threads",
           "unsupported_config"]


def __getattr__(name):
    # decoder.py (PyTorch) is imported on first use: the lite runner's process never loads PyTorch
    import importlib
    try:
        return getattr(importlib.import_module("llmlab.engine.native.decoder"), name)
    except AttributeError:
        raise AttributeError(f"module 'llmlab.engine.native' has no attribute {name!r}") from None
