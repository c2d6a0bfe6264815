"""SFT with TrainConfig.compile: the block-by-block compiled loss computes what the eager one does."""

from __future__ import annotations

import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.train.chat_data import IGNORE
from llmlab.train.sft import sft_loss


def loss_and_grads(model, loss_model, x, y):
    model.zero_grad(set_to_none=True)
    loss, metrics = sft_loss(loss_model, (x, y))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, metrics


def test_compiled_sft_loss_matches_eager_loss_and_gradients():
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
    model = Transformer(cfg).init_weights(seed=0).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    y[:, :20] = IGNORE  # loss on the last 12 positions of each row only
    # the reference: full logits through Transformer.forward, cross-entropy over the unmasked targets
    reference = torch.nn.functional.cross_entropy(model(x).view(-1, cfg.vocab_size), y.view(-1), ignore_index=IGNORE)

    eager_loss, eager_grads, metrics = loss_and_grads(model, model, x, y)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled_loss, compiled_grads, _ = loss_and_grads(model, torch.compile(model), x, y)  # as train() wraps it
    assert counters["stats"]["unique_graphs"] == 1  # compiled once: no recompilation per layer
    assert metrics["loss_tokens"] == 24
    assert torch.allclose(eager_loss, reference, atol=1e-5)
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, atol=1e-5, rtol=1e-4), name
