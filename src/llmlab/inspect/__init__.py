"""Interpretability: attention maps, logit and tuned lens, probes, causal tracing, steering, input attribution.

Everything reads the model from outside through forward hooks on its layers (llmlab.inspect.hooks), so it works
on any checkpoint the Transformer loads and does not depend on how a layer computes its output.
"""

from llmlab.inspect.attention import attention_maps
from llmlab.inspect.attribute import gradient_x_input, occlusion
from llmlab.inspect.hooks import hidden_states, run_with_hooks
from llmlab.inspect.lens import logit_lens, train_tuned_lens, tuned_lens
from llmlab.inspect.probe import train_probes
from llmlab.inspect.steer import steering_effect, steering_vector
from llmlab.inspect.trace import causal_trace

__all__ = ["attention_maps", "causal_trace", "gradient_x_input", "hidden_states", "logit_lens", "occlusion",
           "run_with_hooks", "steering_effect", "steering_vector", "train_probes", "train_tuned_lens", "tuned_lens"]
