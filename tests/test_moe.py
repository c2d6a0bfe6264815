"""Mixture-of-experts layer: Switch routing, expert capacity (what happens past it) and the load-balancing loss."""

import math

import pytest
import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.model.transformer import MoE


def switch_layer(capacity_factor):
    """A 2-expert top-1 layer without renormalisation whose router reads the first two input dimensions."""
    cfg = ModelConfig(vocab_size=16, dim=4, n_layers=1, n_heads=1, hidden_dim=8, n_experts=2, n_experts_per_token=1,
                      moe_normalize_topk=False, moe_capacity_factor=capacity_factor)
    torch.manual_seed(0)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    return layer


# router logits (ln 3, 0) give probabilities (3/4, 1/4), (ln 4, 0) give (4/5, 1/5)
TOKENS = torch.tensor([[math.log(3), 0, 0.5, -1.0],   # expert 0, p = 3/4
                       [0, math.log(3), -0.5, 1.0],   # expert 1, p = 3/4
                       [math.log(4), 0, 1.0, 0.3],    # expert 0, p = 4/5
                       [math.log(3), 0, -1.0, 0.2]])  # expert 0, p = 3/4: the third token for expert 0
CHOICE, WEIGHT = [0, 1, 0, 0], [3 / 4, 3 / 4, 4 / 5, 3 / 4]


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_switch_routing_capacity_and_load_balancing_loss(capacity_factor):
    layer = switch_layer(capacity_factor)
    with torch.no_grad():
        out = layer(TOKENS[None])[0]
        # each token gets its one expert's output times the router probability (Switch: not renormalised to 1)
        expected = torch.stack([WEIGHT[t] * layer.experts[CHOICE[t]](TOKENS[t:t + 1])[0] for t in range(4)])
    if capacity_factor:
        # capacity = ceil(1.0 * 4 tokens * top-1 / 2 experts) = 2 per expert, first come first served:
        # the last token is expert 0's third and gets nothing (the residual carries it through the block)
        expected[3] = 0
        assert layer.dropped_fraction == 1 / 4
    else:
        assert layer.dropped_fraction == 0
    # the experts run on a gathered batch instead of one row: equal up to fp32 rounding (~1e-7 here)
    assert torch.allclose(out, expected, atol=1e-6)
    # Switch loss = experts * sum_e (share of tokens routed to e) * (mean router probability of e), counting
    # the dropped token too: 2 * (3/4 * (3/4 + 1/4 + 4/5 + 3/4) / 4 + 1/4 * (1/4 + 3/4 + 1/5 + 1/4) / 4)
    assert layer.aux_loss.item() == pytest.approx(2 * (0.75 * 2.55 / 4 + 0.25 * 1.45 / 4), rel=1e-6)


def test_capacity_queues_tokens_in_order_for_top_2():
    """With k=2 a token's two assignments queue in token order; over capacity only that assignment is lost."""
    cfg = ModelConfig(vocab_size=16, dim=4, n_layers=1, n_heads=1, hidden_dim=8, n_experts=3, n_experts_per_token=2,
                      moe_capacity_factor=0.5)  # capacity = ceil(0.5 * 3 tokens * 2 / 3) = 1 per expert
    torch.manual_seed(0)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3, 4) * 10)  # logits = 10 * the first three input dimensions
        x = torch.tensor([[1.0, 0.5, 0, 0],    # experts 0 then 1: both kept (first in each queue)
                          [1.0, 0, 0.5, 0.3],  # experts 0 then 2: 0 is full, 2 is kept
                          [0, 1.0, 0.5, -0.2]])  # experts 1 then 2: both full, the token gets nothing
        out = layer(x[None])[0]
        probs = torch.softmax(layer.router(x), -1)

        def part(t, e):  # renormalised over the token's two experts (Mixtral routing)
            top = probs[t].topk(2).values.sum()
            return probs[t, e] / top * layer.experts[e](x[t:t + 1])[0]

        expected = torch.stack([part(0, 0) + part(0, 1), part(1, 2), torch.zeros(4)])
    assert torch.allclose(out, expected, atol=1e-6)
    assert layer.dropped_fraction == 3 / 6


def test_model_aux_loss_sums_the_layers_and_trains_the_router():
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, hidden_dim=24, n_experts=4, n_experts_per_token=1)
    model = Transformer(cfg).init_weights(seed=0)
    model(torch.randint(0, 32, (2, 8)))
    layers = [b.mlp.aux_loss for b in model.model.layers]
    assert model.aux_loss.item() == pytest.approx(sum(x.item() for x in layers))
    # perfectly balanced routing gives 1 per layer; random routing of 16 tokens over 4 experts is near it
    assert all(0.9 < x.item() < 4 for x in layers)
    model.aux_loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
