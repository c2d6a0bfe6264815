"""llmlab.inspect on the real SmolLM2: attention maps, logit lens, steering and attribution, checked against the
model's own outputs, transformers and nnsight on the same weights."""

import json

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.inspect import (attention_maps, gradient_x_input, hidden_states, logit_lens, occlusion,
                            steering_effect, steering_vector)
from llmlab.inspect.hooks import check_layer, encode, run_with_hooks
from llmlab.inspect.trace import corrupted_run

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ids(smollm2):
    return encode(smollm2.tokenizer, PROMPT)


@pytest.fixture(scope="module")
def hf_model(smollm2, tmp_path_factory):
    """The same weights as an HF directory, loaded by transformers (fp32, eager attention)."""
    transformers = pytest.importorskip("transformers")
    from llmlab.checkpoint.hf import save_hf_dir

    path = save_hf_dir(smollm2.model, tmp_path_factory.mktemp("smol_hf") / "model", tokenizer=smollm2.tokenizer)
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def test_attention_maps_reproduce_the_layers_output(smollm2, ids):
    maps = attention_maps(smollm2.model, ids)
    n, heads, T = len(smollm2.model.model.layers), smollm2.model.config.n_heads, len(ids)
    assert maps.weights.shape == (n, heads, T, T)
    # the recomputed weights, applied to V and o_proj, give each layer's attention output (fp32, different
    # kernel order from SDPA: agreement to ~1e-5 on values of size ~1)
    assert maps.max_error < 1e-4
    assert torch.allclose(maps.weights.sum(-1), torch.ones(n, heads, T), atol=1e-5)
    assert (maps.weights.triu(1) == 0).all()  # causal: no query looks ahead


def test_logit_lens_last_layer_is_the_models_logits(smollm2, ids):
    lens = logit_lens(smollm2.model, ids)
    with torch.no_grad():
        own = smollm2.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert lens.shape[0] == len(smollm2.model.model.layers) + 1
    # the same final norm and head on the same tensor: equal up to float rounding of the log-softmax
    assert (lens[-1] - own).abs().max().item() < 1e-5
    # and it tells something: the top token of the last layer is " Paris", of the embeddings it is not
    paris = smollm2.tokenizer.encode(" Paris")[0]
    assert lens[-1, -1].argmax() == paris and lens[0, -1].argmax() != paris


def test_hidden_states_match_transformers(smollm2, ids, hf_model):
    ours = hidden_states(smollm2.model, ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(ours[:-1], theirs[:-1])):
        # fp32 through different kernels; the residual stream grows to ~100s in later layers, so the bound is
        # relative to each state's size
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-5, f"state {i}"
    # transformers' last hidden state is after the final norm
    final = smollm2.model.model.norm(ours[-1])
    assert (final - theirs[-1]).abs().max() <= 1e-4 * theirs[-1].abs().max()


def test_attention_maps_match_transformers(smollm2, ids, hf_model):
    """transformers' eager attention returns its softmax weights (output_attentions): the same maps, from an
    independent implementation of the same weights."""
    ours = attention_maps(smollm2.model, ids).weights
    with torch.no_grad():
        theirs = torch.stack(hf_model(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]
    assert theirs.shape == ours.shape
    # probabilities after 30 fp32 layers of two implementations (the inputs agree to ~1e-4 relative, above)
    assert (ours - theirs).abs().max() < 1e-3


def test_logit_lens_matches_nnsight(smollm2, ids, hf_model):
    nnsight = pytest.importorskip("nnsight")
    wrapped = nnsight.NNsight(hf_model)
    layers = [3, 15, 29]
    saved = []
    with torch.no_grad(), wrapped.trace(torch.tensor([ids])):
        for l in layers:  # the logit lens written in nnsight: the layer's output through the final norm and head
            saved.append(wrapped.lm_head(wrapped.model.norm(wrapped.model.layers[l].output)).save())
    ours = logit_lens(smollm2.model, ids)
    for l, logits in zip(layers, saved):
        theirs = logits.reshape(len(ids), -1).float().log_softmax(-1)
        # log-probabilities through 49k-way softmax after up to 30 fp32 layers of two implementations
        assert (ours[l + 1] - theirs).abs().max() < 1e-3, f"layer {l}"
        assert (ours[l + 1].argmax(-1) == theirs.argmax(-1)).all()


def test_restoring_every_state_recovers_the_clean_output(smollm2, ids):
    model = smollm2.model
    clean = hidden_states(model, ids)
    subject = [ids.index(smollm2.tokenizer.encode(" France")[0])]
    noise = torch.randn(3, 1, model.config.dim, generator=torch.Generator().manual_seed(0)) * 3
    everywhere = list(range(len(ids)))
    with torch.no_grad():
        own = model(torch.tensor([ids]))[0]
        rows = corrupted_run(model, ids, subject, noise, clean,
                             [{}, {s: everywhere for s in range(len(clean))}, {0: everywhere}])
    assert (rows[0] - own).abs().max() > 1.0  # the noise on " France" alone changes the output
    # every state put back, or only the embeddings: the clean computation, up to the rounding of a batch of
    # 3 rows against 1 in fp32 matmuls (logits of size ~10: 1e-4 is ~100x the observed differences)
    assert (rows[1] - own).abs().max() < 1e-4
    assert (rows[2] - own).abs().max() < 1e-4


def test_steering_moves_a_token_both_ways(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    positive = ["I love this. It is wonderful", "This is great, I like it", "What a delightful, happy day"]
    negative = ["I hate this. It is awful", "This is terrible, I dislike it", "What a miserable, sad day"]
    vector = steering_vector(model, [encode(tok, p) for p in positive], [encode(tok, n) for n in negative], 10)
    great, terrible = tok.encode(" great")[0], tok.encode(" terrible")[0]
    effect = steering_effect(model, encode(tok, "I think the movie was"), vector, 10, [-2.0, 0.0, 2.0],
                             [great, terrible])
    base = effect[0.0]
    assert effect[2.0][1] < base[1] / 2 < base[1] * 2 < effect[-2.0][1]  # " terrible": down with +, up with -
    odds = {s: p[0] / p[1] for s, p in effect.items()}  # " great" against " terrible"
    assert odds[-2.0] < odds[0.0] / 2 and odds[2.0] > odds[0.0] * 2


def test_attribution(smollm2, ids):
    model, tok = smollm2.model, smollm2.tokenizer
    paris = tok.encode(" Paris")[0]
    occ = occlusion(model, ids, paris, tok.encode(" the")[0])
    assert max(range(len(ids)), key=lambda i: occ[i]) == ids.index(tok.encode(" France")[0])
    gxi = gradient_x_input(model, ids, paris)
    # gradient x input is the derivative along each token's own embedding: scaling embedding t by (1 + eps)
    # changes log P(Paris) by eps * gxi[t] to first order (central difference, fp32, eps 1e-3)
    t, eps = ids.index(tok.encode(" France")[0]), 1e-3

    def scaled(factor):
        def edit(index, hidden):
            if index == 0:
                hidden = hidden.clone()
                hidden[:, t] *= factor
                return hidden
        with torch.no_grad():
            return run_with_hooks(model, ids, edit)[0][0, -1].double().log_softmax(-1)[paris].item()

    slope = (scaled(1 + eps) - scaled(1 - eps)) / (2 * eps)
    assert slope == pytest.approx(gxi[t], rel=0.05, abs=0.02)


def test_bad_layers_and_prompts_are_refused(smollm2):
    with pytest.raises(LLMLabError, match="layer 31 does not exist"):
        check_layer(smollm2.model, 31)
    with pytest.raises(LLMLabError, match="attention layer 30 does not exist"):
        attention_maps(smollm2.model, [1, 2], layers=[30])
    with pytest.raises(LLMLabError, match="prompt is empty"):
        encode(smollm2.tokenizer, "  ")


def test_cli_writes_png_and_json_and_refuses_bad_input(smollm2, tmp_path, capsys):
    from llmlab.cli.main import main

    out = tmp_path / "attr"
    assert main(["inspect", "attribute", "--prompt", PROMPT, "--target", " Paris", "--out", str(out)]) == 0
    assert (out / "attribute.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((out / "attribute.json").read_text())
    assert data["target"] == " Paris" and len(data["occlusion"]) == len(data["tokens"])
    capsys.readouterr()
    for argv, message in [(["inspect", "attention", "--prompt", PROMPT, "--layers", "40"], "layer 40 does not exist"),
                          (["inspect", "lens", "--prompt", ""], "prompt is empty"),
                          (["inspect", "steer", "--prompt", "x", "--positive", "a", "--negative", "b", "--layer", "99",
                            "--token", " a"], "layer 99 does not exist")]:
        assert main(argv + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()  # nothing half-written
