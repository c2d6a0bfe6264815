"""Prompt-lookup speculative decoding: greedy output identical to plain decoding on SmolLM2, the sampled token
distributed as the plain sampler's (chi-square on a tiny model), stop rules honoured exactly."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from helpers import ByteTokenizer, assert_greedy_up_to_ties, decode_logits
from llmlab.engine import Engine, SamplingParams
from llmlab.engine.speculative import SpeculativeDecoder, lookup_draft, speculative_generate, target_probs
from llmlab.errors import LLMLabError

PASSAGE = ("The lighthouse keeper, Mara Quill, logged the storm at 03:40 on 12 March 1911. The beam failed twice, "
           "and the supply boat Heron arrived three days late with oil, bread and a letter from Dublin.")
PROMPTS = ["Repeat this text exactly: " + PASSAGE,
           PASSAGE + "\n\nFrom the passage: who was the lighthouse keeper, and when was the storm logged?",
           "Write one sentence about autumn."]


def test_lookup_draft_takes_the_latest_longest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3], k=2) == [7, 8]  # (2, 3) last seen before 7 8
    assert lookup_draft([5, 1, 2, 3, 4, 6, 2, 3], k=3, max_ngram=3) == [4, 6, 2]
    assert lookup_draft([1, 2, 3], k=4) == []  # the suffix never occurred before
    assert lookup_draft([4, 4], k=3) == [4]  # what followed is all there is
    assert lookup_draft([7], k=3) == []


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_identical_to_plain_on_smollm2(smollm2, prompt):
    ids = smollm2.prompt_ids(prompt)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    plain = smollm2.engine.generate([ids], params)[0]
    spec, stats = speculative_generate(smollm2.engine, ids, params)
    assert spec.finish_reason == plain.finish_reason and spec.completion_tokens == plain.completion_tokens
    if spec.token_ids != plain.token_ids:
        # a verify forward of k + 1 tokens rounds differently from a one-token step (~1e-5 on these logits);
        # where the two best logits are that close either may win, so check each token is greedy up to that
        assert_greedy_up_to_ties(decode_logits(smollm2.model, ids, spec.token_ids), spec.token_ids, margin=1e-3)
    assert stats.tokens == spec.completion_tokens
    if prompt.startswith("Repeat"):  # the copy is drafted from the prompt and the drafts are kept
        assert stats.accepted >= 8 and stats.tokens_per_step > 1.5, stats


def test_stop_string_text_and_finish_reason_match_plain(smollm2):
    ids = smollm2.prompt_ids(PROMPTS[0])
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=["Heron"])
    plain = smollm2.engine.generate([ids], params)[0]
    spec, _ = speculative_generate(smollm2.engine, ids, params)
    assert "Heron" not in spec.text and (spec.text, spec.finish_reason) == (plain.text, plain.finish_reason)
    assert plain.finish_reason == "stop"  # the stop string was really reached, not the budget
    streamed = "".join(SpeculativeDecoder(smollm2.engine).stream(ids, params))
    assert streamed == plain.text


# ---- a tiny model with a 16-token vocabulary --------------------------------------------------------------

VOCAB = 16


@pytest.fixture(scope="module")
def tiny_engine():
    from llmlab.model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64)
    # a scaled output layer makes the next-token distribution far from uniform, as a trained model's is
    model = Transformer(cfg).init_weights(seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(15)
    return Engine(model, ByteTokenizer())


def test_max_new_tokens_and_greedy_on_a_repetitive_prompt(tiny_engine):
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    for limit in (1, 2, 7, 13):
        params = SamplingParams(temperature=0, max_new_tokens=limit)
        plain = tiny_engine.generate([prompt], params)[0]
        spec, stats = speculative_generate(tiny_engine, prompt, params, draft_tokens=4)
        assert spec.token_ids == plain.token_ids and len(spec.token_ids) == limit
        assert spec.finish_reason == "length" and stats.tokens == limit


def test_stop_token_ends_like_plain(tiny_engine):
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    plain = tiny_engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20))[0]
    stop = plain.token_ids[3]  # a token the greedy path reaches, possibly inside an accepted draft
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids={stop})
    plain = tiny_engine.generate([prompt], params)[0]
    spec, _ = speculative_generate(tiny_engine, prompt, params, draft_tokens=4)
    assert (spec.token_ids, spec.finish_reason, spec.completion_tokens) == \
        (plain.token_ids, plain.finish_reason, plain.completion_tokens)
    assert spec.finish_reason == "stop"


def test_drafting_turns_off_when_acceptance_is_low(tiny_engine):
    from llmlab.engine.speculative import JUDGE_AFTER
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    params = SamplingParams(temperature=0, max_new_tokens=50)
    plain = tiny_engine.generate([prompt], params)[0]
    always = SpeculativeDecoder(tiny_engine, draft_tokens=4, min_acceptance=0.0)
    never_enough = SpeculativeDecoder(tiny_engine, draft_tokens=4, min_acceptance=1.01)  # no rate reaches it
    assert always.generate(prompt, params).token_ids == plain.token_ids
    assert never_enough.generate(prompt, params).token_ids == plain.token_ids
    assert always.stats.drafted > JUDGE_AFTER + 4 >= never_enough.stats.drafted >= JUDGE_AFTER


def test_bad_draft_length_is_refused(tiny_engine):
    with pytest.raises(LLMLabError, match="draft_tokens"):
        SpeculativeDecoder(tiny_engine, draft_tokens=0)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=8, top_p=0.9)])
def test_sampled_first_token_keeps_the_target_distribution(tiny_engine, options):
    # the prompt ends with (a, b), seen before followed by c: the first new token is drafted as c (a budget of 2
    # leaves room for one draft), kept with probability p(c), else drawn from p without c. Its distribution must be p, what the plain sampler draws from
    a, b = 5, 9
    best = None
    for c in range(VOCAB):  # pick c so that both branches (kept, rejected) happen often
        prompt = [a, b, c, 2, a, b]
        reference, _ = tiny_engine.prefill(prompt)
        p = target_probs(reference, SamplingParams(**options))[0]
        if best is None or abs(float(p[c]) - 0.4) < abs(float(best[2][best[0]]) - 0.4):
            best = (c, prompt, p)
    c, prompt, p = best
    assert lookup_draft(prompt, 5)[0] == c and 0.1 < float(p[c]) < 0.8
    runs = 800  # enough to see a shift of ~0.07 in p(c); quick on a tiny model
    counts = np.zeros(VOCAB)
    decoder = SpeculativeDecoder(tiny_engine, draft_tokens=3)
    for seed in range(runs):
        counts[decoder.generate(prompt, SamplingParams(max_new_tokens=2, seed=seed, **options)).token_ids[0]] += 1
    assert 0 < decoder.stats.accepted < runs  # both branches ran
    kept = p.numpy() > 0
    assert counts[~kept].sum() == 0  # a filtered-out token is never produced
    expected = p.double().numpy()
    expected = expected / expected.sum() * runs  # float32 probabilities sum to 1 only to ~1e-7
    big = expected >= 5  # chi-square wants >= 5 expected per cell: pool the rare kept tokens into one cell
    rare = kept & ~big

    def cells(c):
        return np.append(c[big], c[rare].sum()) if rare.any() else c[big]

    assert chisquare(cells(counts), cells(expected)).pvalue > 0.001
    # and the plain sampler, same seeds, agrees with the same p (so both draw from one distribution)
    plain = np.zeros(VOCAB)
    for seed in range(runs):
        plain[tiny_engine.generate([prompt], SamplingParams(max_new_tokens=2, seed=seed, **options))[0].token_ids[0]] += 1
    assert chisquare(cells(plain), cells(expected)).pvalue > 0.001


def test_cli_speculate_matches_plain_and_refuses_beam_and_endpoint(tiny_ckpt, capsys):
    from llmlab.cli.main import main
    args = ["generate", "-m", str(tiny_ckpt), "--raw", "-t", "0", "-n", "12", "the cat the cat the cat the"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculate", "lookup"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "drafted tokens accepted" in captured.err
    assert main(args + ["--speculate", "lookup", "--beam", "2"]) == 2
    assert "cannot be combined with --beam" in capsys.readouterr().err
    assert main(args[:1] + ["--endpoint", "http://127.0.0.1:9/v1", "--speculate", "lookup", "x"]) == 2
    assert "cannot be combined with --endpoint" in capsys.readouterr().err
