"""Training: one plain loop (loop.py) that every objective plugs into, and pretraining on token shards."""

from llmlab.train.config import PRESETS, TrainConfig

__all__ = ["PRESETS", "Objective", "TrainConfig", "train"]


def __getattr__(name):
    # the loop needs torch: imported on first use of llmlab.train.train / Objective, so that importing
    # llmlab.train.config (the CLI's flags) or llmlab.train.tasks stays cheap
    if name in ("Objective", "train"):
        from llmlab.train import loop
        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
