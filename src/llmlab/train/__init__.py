"""Training: one plain loop (loop.py) that every objective plugs into, and pretraining on token shards."""

from llmlab.train.config import PRESETS, TrainConfig
from llmlab.train.loop import Objective, train

__all__ = ["PRESETS", "Objective", "TrainConfig", "train"]
