"""The compiled decode step (torch.compile, frozen weights, fused matrix-vector products) decodes like eager."""

import torch

from llmlab.engine import Engine, SamplingParams
from llmlab.model import ModelConfig, Transformer
from helpers import ByteTokenizer


def test_compiled_decode_matches_eager_greedy():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=512)
    model = Transformer(cfg).init_weights(seed=3).eval()
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    params = SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)
    eager = Engine(model, ByteTokenizer()).generate(prompts, params)
    compiled = Engine(model, ByteTokenizer(), compile=True).generate(prompts, params)
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids
        assert max(abs(a - b) for a, b in zip(c.logprobs, e.logprobs)) < 1e-4
