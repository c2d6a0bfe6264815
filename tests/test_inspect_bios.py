"""llmlab.inspect on a tiny model trained on the bios world in this test: causal tracing finds the fact at the
subject, probes stay at chance on what the input cannot tell, the tuned lens beats the logit lens, and the CLI."""

import json
import random

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.inspect import causal_trace, logit_lens, train_tuned_lens
from llmlab.inspect.bios_model import answer_id, fact_prompt, train_bios_model
from llmlab.inspect.hooks import hidden_states
from llmlab.inspect.probe import probe_name_mentions, probe_prompts, train_probes

# names from 7 first names per gender and 7 last names (pooled_names): no one token of a name says who it is, so the
# model must combine the name's tokens to recall a fact, which puts the fact at the name's last token
PEOPLE, STEPS, LAYERS, NAME_POOL = 48, 300, 4, 7


@pytest.fixture(scope="module")
def bios(tmp_path_factory):
    """Trained once for this module (~15 s of 1 CPU core when the machine is quiet)."""
    torch.manual_seed(0)
    return train_bios_model(tmp_path_factory.mktemp("bios"), people=PEOPLE, steps=STEPS, layers=LAYERS,
                            name_pool=NAME_POOL)


def test_the_model_learned_the_facts(bios):
    hits = []
    for p in bios.world.people:
        ids, _ = fact_prompt(bios.tokenizer, p.name)
        with torch.no_grad():
            hits.append(int(bios.model(torch.tensor([ids]))[0, -1].argmax()) == answer_id(bios.tokenizer, p.birth_city))
    assert sum(hits) / len(hits) > 0.5  # 40 cities: a model that did not memorise gets ~1/40


def test_causal_trace_finds_the_fact_at_the_subjects_last_token(bios):
    """ROME's measurement, person by person: restoring the subject's last token in the middle layers (block outputs
    1..n-1) brings back more of the answer than restoring a position between the subject and the last token (the
    relation's " was", " born"), by more than twice the standard error of the paired differences."""
    tok, rng = bios.tokenizer, random.Random(0)
    diffs = []
    for p in bios.world.people[:16]:
        ids, subject = fact_prompt(tok, p.name)
        result = causal_trace(bios.model, ids, list(subject), answer_id(tok, p.birth_city), samples=6)
        middle = slice(1, LAYERS)  # neither the embeddings nor the last block
        other = rng.choice(range(subject[-1] + 1, len(ids) - 1))
        diffs.append(result.effect[middle, subject[-1]].mean().item() - result.effect[middle, other].mean().item())
    diffs = torch.tensor(diffs)
    mean, stderr = diffs.mean().item(), diffs.std().item() / len(diffs) ** 0.5
    assert mean > 2 * stderr and mean > 0.005, diffs.tolist()


def test_causal_trace_where_the_fact_travels(bios):
    """What the tiny model does show: the name's embeddings and the last position's states carry the fact, a
    position before the subject carries nothing, and restoring every state restores the clean output."""
    tok = bios.tokenizer

    def clean_prob(p):
        ids, _ = fact_prompt(tok, p.name)
        with torch.no_grad():
            return bios.model(torch.tensor([ids]))[0, -1].softmax(-1)[answer_id(tok, p.birth_city)].item()

    p = max(bios.world.people[:8], key=clean_prob)  # a person whose birth city the model knows well
    ids, subject = fact_prompt(tok, p.name)
    result = causal_trace(bios.model, ids, list(subject), answer_id(tok, p.birth_city), samples=6)
    assert result.corrupted_prob < result.clean_prob - 0.1
    # the last block's output at the last position is all the head reads: restoring it restores the answer
    assert result.scores[-1, -1].item() == pytest.approx(result.clean_prob, abs=1e-5)
    assert (result.effect[:, 0].abs() < 1e-6).all()  # <eos> comes before the subject: the noise never reaches it
    assert result.effect[0, list(subject)].max() > 0.1  # un-corrupting one name token's embedding helps
    clean = hidden_states(bios.model, ids)
    noise = torch.randn(2, len(subject), bios.model.config.dim, generator=torch.Generator().manual_seed(1)) * 0.5
    everywhere = list(range(len(ids)))
    from llmlab.inspect.trace import corrupted_run
    with torch.no_grad():
        own = bios.model(torch.tensor([ids]))[0]
        rows = corrupted_run(bios.model, ids, list(subject), noise, clean,
                             [{s: everywhere for s in range(LAYERS + 1)}, {0: list(subject)}])
    assert (rows - own).abs().max() < 1e-4  # batched fp32 rounding only


def test_logit_lens_last_layer_is_the_models_logits(bios):
    ids, _ = fact_prompt(bios.tokenizer, bios.world.people[1].name)
    with torch.no_grad():
        own = bios.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert (logit_lens(bios.model, ids)[-1] - own).abs().max() < 1e-5


def test_probe_on_labels_the_input_cannot_tell_stays_at_chance(bios):
    """Random labels drawn per example, independent of the text: no layer can predict them for held-out ones."""
    texts = list(bios.world.biographies())[:40]
    states = [hidden_states(bios.model, bios.tokenizer.encode(t)) for t in texts]
    features = [torch.cat([s[layer][0] for s in states]) for layer in range(LAYERS + 1)]
    tokens = [t for text in texts for t in bios.tokenizer.encode(text)]
    labels = [random.Random(i).randrange(2) for i in range(len(tokens))]
    result = train_probes(features, labels, tokens, seed=0)
    # ~1300 held-out tokens would be ~400: a binomial std of 0.025 around 0.5; 0.1 is 4 std away
    assert result.n_test > 300
    for acc in result.accuracy:
        assert abs(acc - 0.5) < 0.1, result.accuracy


def test_probes_at_name_mentions_held_out_by_person(bios):
    """Probes at the last token of every mention of a person's name, scored on people they never saw, with Hewitt &
    Liang's control task. The pronoun comes from the first name (last names are shared by men and women here), so
    the last name's own embedding cannot tell it and later layers, which attend to the first name, can; a property
    of each person that no text mentions stays at chance at every layer."""
    people = bios.world.people
    pronoun = probe_name_mentions(bios.model, bios.tokenizer, bios.world, [p.pronoun for p in people], seed=0)
    assert pronoun.n_test > 300
    # measured: 0.43 at the embeddings (the last name says nothing of the pronoun), 0.51 after block 1, 0.67 after
    # blocks 2-4 (held-out people; majority 0.47)
    assert max(pronoun.accuracy[1:]) > 0.6 and max(pronoun.accuracy[1:]) > pronoun.accuracy[0] + 0.15, pronoun
    # the control task (a random label per token type) is memorised at every layer (~1.0): the last names are few
    # and shared by training and held-out people, so accuracy on token-type labels says nothing here, and the
    # pronoun probe's gain over the embeddings (not its raw accuracy) is the evidence
    assert min(pronoun.control_accuracy) > 0.9, pronoun
    hidden = [random.Random(f"hidden/{i}").randrange(2) for i in range(len(people))]
    result = probe_name_mentions(bios.model, bios.tokenizer, bios.world, hidden, seed=0)
    # held out by person: ~24 people, so even a probe that guessed each person consistently (its mentions' errors
    # all alike) would have a std of 0.5 / sqrt(24) = 0.1 around 0.5; 0.25 is 2.5 of those
    for acc in result.accuracy:
        assert abs(acc - 0.5) < 0.25, result.accuracy


def test_a_probe_on_a_layer_that_does_not_exist_is_refused(bios):
    ids, _ = fact_prompt(bios.tokenizer, bios.world.people[0].name)
    with pytest.raises(LLMLabError, match=f"layer {LAYERS + 1} does not exist"):
        probe_prompts(bios.model, [ids] * 4, ["a", "b"] * 2, layers=[LAYERS + 1])
    with pytest.raises(LLMLabError, match="labels for"):
        probe_name_mentions(bios.model, bios.tokenizer, bios.world, ["he"])


def test_tuned_lens_beats_the_logit_lens_on_held_out_text(bios):
    bios_texts = list(bios.world.biographies("multi"))
    encode = lambda texts: [[bios.tokenizer.eos_token_id] + bios.tokenizer.encode(t) for t in texts]
    result = train_tuned_lens(bios.model, encode(bios_texts[:200]), encode(bios_texts[-60:]), steps=150, lr=3e-3)
    inner_tuned, inner_logit = result.heldout_kl_tuned_lens[1:-1], result.heldout_kl_logit_lens[1:-1]
    assert result.heldout_kl_tuned_lens[-1] == result.heldout_kl_logit_lens[-1] == pytest.approx(0, abs=1e-6)
    assert sum(inner_tuned) < 0.7 * sum(inner_logit), (inner_tuned, inner_logit)


def test_cli_trace_and_probe_on_a_saved_bios_model(bios, tmp_path, capsys):
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.cli.main import main

    ckpt = save_hf_dir(bios.model, tmp_path / "model", tokenizer=bios.tokenizer)
    p = bios.world.people[2]
    out = tmp_path / "trace"
    answer = bios.tokenizer.decode([answer_id(bios.tokenizer, p.birth_city)])
    assert main(["inspect", "trace", "--model", str(ckpt), "--prompt", f"{p.name} was born in",
                 "--subject", p.name, "--answer", answer, "--samples", "2", "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["scores"]) == LAYERS + 1 and trace["subject"] and (out / "trace.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["inspect", "probe", "--model", str(ckpt), "--bios", "pronoun", "--people", str(PEOPLE),
                 "--out", str(tmp_path / "probe")]) == 0
    data = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert len(data["accuracy"]) == LAYERS + 1 and (tmp_path / "probe" / "probe.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["inspect", "probe", "--model", str(ckpt), "--bios", "pronoun", "--layers", "9",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
