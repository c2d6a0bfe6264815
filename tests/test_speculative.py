"""Speculative decoding (prompt lookup, a draft model, the model's own 4-bit copy): greedy output identical to plain
decoding on SmolLM2, the sampled token distributed as the plain sampler's (chi-square on a tiny model, point-mass and
full-distribution drafts), stop rules honoured exactly, auto-off, the CLI and the server (usage and /metrics)."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from helpers import ByteTokenizer, assert_greedy_up_to_ties, decode_logits
from llmlab.engine import Engine, SamplingParams
from llmlab.engine.draft import ModelDrafter, self_drafter
from llmlab.engine.speculative import (SpeculativeDecoder, SpeculativeStats, lookup_draft, speculation_loses,
                                       speculative_generate)
from llmlab.engine.sampling import sampling_probs
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
    assert lookup_draft([4, 4], k=3) == [4, 4, 4]  # what followed runs into the end: it repeats with its period
    assert lookup_draft([1, 2, 9, 1, 2, 9, 1, 2], k=5) == [9, 1, 2, 9, 1]
    assert lookup_draft([7], k=3) == []


def test_the_incremental_lookup_drafts_what_lookup_draft_does():
    import random
    from llmlab.engine.draft import LookupDrafter
    for seed in range(200):  # small vocabularies repeat n-grams often; longer contexts than any one step sees
        rng = random.Random(seed)
        vocab = rng.choice([3, 5, 20])
        draft, context = LookupDrafter(3).start([0], 100), []
        for token in [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]:
            context.append(token)
            k = rng.randrange(1, 6)
            assert draft.propose(context, k, None)[0] == lookup_draft(context, k, 3), (seed, context, k)
            longest = max((n for n in range(1, min(3, len(context) - 1) + 1)  # the matched suffix's length
                           if any(context[s:s + n] == context[-n:] for s in range(len(context) - n))), default=0)
            strength = draft.strength(context)  # 0 also for a 1-token match whose occurrences disagree (no draft)
            assert min(strength, 3) == longest or (strength == 0 and longest == 1 and not lookup_draft(context, 1))
    copy = [7, 1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5]  # a whole 3-gram match's strength: how far back it runs (5 tokens)
    assert LookupDrafter(3).start(copy, 100).strength(copy) == 5


def test_best_draft_length_weighs_acceptance_against_measured_cost():
    from llmlab.engine.speculative import best_draft_length
    assert best_draft_length(0.3, 0.35, 7) == 0  # drafts mostly rejected: plain steps win
    assert best_draft_length(0.9, 0.05, 7) == 7  # a verify row costs little: draft all the room there is
    assert 1 <= best_draft_length(0.9, 0.5, 7) < best_draft_length(0.9, 0.3, 7) < 7  # dearer rows: shorter drafts
    assert best_draft_length(0.99, 1.0, 7) == 0  # a row costs a whole step: nothing can pay
    assert best_draft_length(0.9, 0.05, 3) == 3  # never more than the room


@pytest.fixture(scope="module")
def smollm2_drafters(smollm2):
    """The three draft kinds for SmolLM2: lookup, its own 4-bit copy, and a small random model with its vocabulary
    (a poor draft: it exercises rejections at every position)."""
    from llmlab.model import ModelConfig, Transformer
    cfg = smollm2.model.config
    small = Transformer(ModelConfig(vocab_size=cfg.vocab_size, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                    max_seq_len=cfg.max_seq_len, tie_embeddings=True)).init_weights(seed=0)
    return {"lookup": None, "self": self_drafter(smollm2.model), "draft": ModelDrafter(small.eval())}


@pytest.fixture(scope="module")
def plain_greedy(smollm2):
    params = SamplingParams(temperature=0, max_new_tokens=24)
    return {p: smollm2.engine.generate([smollm2.prompt_ids(p)], params)[0] for p in PROMPTS}


@pytest.mark.parametrize("kind", ["lookup", "self", "draft"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_identical_to_plain_on_smollm2(smollm2, smollm2_drafters, plain_greedy, kind, prompt):
    if kind != "lookup" and prompt == PROMPTS[1]:
        pytest.skip("two prompts per model draft keep the file fast; lookup runs all three")
    ids = smollm2.prompt_ids(prompt)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    plain = plain_greedy[prompt]
    decoder = SpeculativeDecoder(smollm2.engine, smollm2_drafters[kind], min_acceptance=0.0, auto_off=False)
    spec, stats = decoder.generate(ids, params), decoder.stats
    assert spec.finish_reason == plain.finish_reason and spec.completion_tokens == plain.completion_tokens
    if spec.token_ids != plain.token_ids:
        # a verify forward of k + 1 tokens rounds differently from a one-token step (~1e-5 on these logits);
        # where the two best logits are that close either may win, so check each token is greedy up to that
        assert_greedy_up_to_ties(decode_logits(smollm2.model, ids, spec.token_ids), spec.token_ids, margin=1e-3)
    assert stats.tokens == spec.completion_tokens and stats.drafted > 0
    if prompt.startswith("Repeat") and kind == "lookup":  # the copy is drafted from the prompt and kept
        assert stats.accepted >= 8 and stats.tokens_per_step > 1.5, stats
    if kind == "self":  # the 4-bit copy of a Q4_1 file is the same weights, up to bf16 scales: most drafts are kept
        assert stats.acceptance_rate > 0.6 and stats.tokens_per_step > 2, stats


@pytest.fixture(scope="module")
def packed_smollm2(smollm2_gguf):
    """llmlab.load's default for the Q4_1 file: packed weights, the native decode step (None without g++)."""
    import llmlab
    llm = llmlab.load("smollm2")
    if llm.engine.native_step is None:
        pytest.skip("the native kernel did not build here")
    return llm


def test_native_verify_equals_single_native_steps_on_smollm2(packed_smollm2):
    llm = packed_smollm2
    ids = llm.tokenizer.encode("The printing press spread across Europe in the fifteenth century. Books became")
    head, fed = ids[:-6], ids[-6:]  # the pending token and five "drafts"
    caches = [llm.model.new_cache(1, len(ids) + 4) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            llm.model(torch.tensor([head]), torch.arange(len(head))[None], cache)
        steps = torch.cat([llm.engine.decode_step(torch.tensor([[t]]), torch.tensor([[len(head) + i]]), caches[0])
                           for i, t in enumerate(fed)])
    verify = SpeculativeDecoder(llm.engine).verify(fed[0], fed[1:], len(head), caches[1])
    # one native call of 6 rows vs 6 calls of 1 row: the same weights and fp32 arithmetic, but 1-2 row projections
    # factor the group minimum out (another summation order); measured ~5e-5 on logits of magnitude ~30
    assert verify.shape == steps.shape and (verify - steps).abs().max() < 1e-3 * steps.abs().max()
    assert torch.equal(verify.argmax(-1), steps.argmax(-1))
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert torch.allclose(a, b, atol=1e-4)


def native_decode_logits(llm, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits before each of tokens as the plain engine computes them: prefill, then one native step a token."""
    cache = llm.model.new_cache(1, len(prompt) + len(tokens))
    with torch.no_grad():
        rows = [llm.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)[0, -1]]
        for i, t in enumerate(tokens[:-1]):
            rows.append(llm.engine.decode_step(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache)[0])
    return torch.stack(rows).float()


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_greedy_identical_to_plain_with_native_verify(packed_smollm2, smollm2_drafters, kind):
    """The default model: drafts verified by one native call of k + 1 rows; output token for token the plain one."""
    llm = packed_smollm2
    params = SamplingParams(temperature=0, max_new_tokens=24)
    for prompt in PROMPTS[:2] if kind == "lookup" else PROMPTS[2:]:  # a random draft: rejections everywhere
        ids = llm.prompt_ids(prompt)
        plain = llm.engine.generate([ids], params)[0]
        decoder = SpeculativeDecoder(llm.engine, smollm2_drafters[kind], min_acceptance=0.0, auto_off=False)
        spec = decoder.generate(ids, params)
        assert spec.finish_reason == plain.finish_reason and spec.completion_tokens == plain.completion_tokens
        if spec.token_ids != plain.token_ids:
            # a verify of k + 1 rows sums in another order than one-row steps (~5e-5 on logits of ~30, see above):
            # where the two best logits are that close either may win, so each token must be greedy up to that
            assert_greedy_up_to_ties(native_decode_logits(llm, ids, spec.token_ids), spec.token_ids, margin=1e-3)
        assert decoder.stats.drafted > 0 and decoder.stats.verify_steps < len(spec.token_ids) + 1
        if kind == "lookup" and prompt.startswith("Repeat"):  # the copy is drafted from the prompt and kept
            assert decoder.stats.tokens_per_step > 1.5, decoder.stats


def test_self_speculation_on_a_packed_model_says_what_to_do(packed_smollm2):
    with pytest.raises(LLMLabError, match="--exact.*--speculate lookup or draft:PATH"):
        SpeculativeDecoder(packed_smollm2.engine, "self")


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
    always = SpeculativeDecoder(tiny_engine, draft_tokens=4, min_acceptance=0.0, auto_off=False)
    # no rate reaches 1.01
    never_enough = SpeculativeDecoder(tiny_engine, draft_tokens=4, min_acceptance=1.01, auto_off=False)
    assert always.generate(prompt, params).token_ids == plain.token_ids
    assert never_enough.generate(prompt, params).token_ids == plain.token_ids
    assert always.stats.drafted > JUDGE_AFTER + 4 >= never_enough.stats.drafted >= JUDGE_AFTER
    assert never_enough.stats.turned_off == 1 and always.stats.turned_off == 0


def test_speculation_loses_when_measured_slower_than_plain():
    slow = SpeculativeStats(drafted=30, accepted=15, spec_tokens=20, spec_seconds=2.0)  # 0.1 s a token
    assert speculation_loses(slow, plain_step_seconds=0.05, min_acceptance=0.15)  # plain: 0.05 s a token
    assert not speculation_loses(slow, plain_step_seconds=0.2, min_acceptance=0.15)
    assert not speculation_loses(slow, plain_step_seconds=None, min_acceptance=0.15)  # nothing to compare with yet
    early = SpeculativeStats(drafted=10, accepted=0, spec_tokens=10, spec_seconds=9.0)
    assert not speculation_loses(early, plain_step_seconds=0.01, min_acceptance=0.15)  # too early to judge
    assert speculation_loses(SpeculativeStats(drafted=30, accepted=3), None, min_acceptance=0.15)
    # none of 30 drafts kept: off, even where a slow plain step makes the drafting steps look cheap
    assert speculation_loses(SpeculativeStats(drafted=30, accepted=0, spec_tokens=20, spec_seconds=1.0), 0.2, 0.15)


def test_auto_off_times_plain_steps_first(tiny_engine):
    from llmlab.engine.speculative import PLAIN_PROBES
    decoder = SpeculativeDecoder(tiny_engine, draft_tokens=4)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    assert decoder.generate(prompt, params).token_ids == tiny_engine.generate([prompt], params)[0].token_ids
    assert decoder.plain_step_seconds() is not None and len(decoder.plain_seconds) >= PLAIN_PROBES


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
        p = sampling_probs(reference, SamplingParams(**options))[0]
        if best is None or abs(float(p[c]) - 0.4) < abs(float(best[2][best[0]]) - 0.4):
            best = (c, prompt, p)
    c, prompt, p = best
    assert lookup_draft(prompt, 5)[0] == c and 0.1 < float(p[c]) < 0.8
    runs = 800  # enough to see a shift of ~0.07 in p(c); quick on a tiny model
    counts = np.zeros(VOCAB)
    decoder = SpeculativeDecoder(tiny_engine, draft_tokens=3, auto_off=False)
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
    assert main(args + ["--speculate", "self"]) == 0  # the model's 4-bit copy drafts: the same greedy text
    captured = capsys.readouterr()
    assert captured.out == plain and "speculative (self)" in captured.err
    assert main(args + ["--speculate", "bogus"]) == 2
    assert "--speculate 'bogus'" in capsys.readouterr().err


def chi_square_cells(counts, p, runs):
    """(observed, expected) with the rare tokens pooled (chi-square wants >= 5 expected per cell)."""
    expected = p.double().numpy()
    expected = expected / expected.sum() * runs  # float32 probabilities sum to 1 only to ~1e-7
    big, rare = expected >= 5, (p.numpy() > 0) & (expected < 5)

    def cells(c):
        return np.append(c[big], c[rare].sum()) if rare.any() else c[big]

    return cells(counts), cells(expected)


def test_sampled_token_keeps_the_target_distribution_with_a_draft_model(tiny_engine):
    options = dict(temperature=0.7, top_k=8, top_p=0.9)  # the filters apply to q as to p
    # the draft is another tiny model: its q differs from p, so both acceptance min(1, p/q) and the residual
    # norm(max(0, p - q)) decide the first token; its distribution must still be p
    from llmlab.model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64)
    draft = Transformer(cfg).init_weights(seed=11).eval()
    with torch.no_grad():
        draft.lm_head.weight.mul_(10)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    p = sampling_probs(tiny_engine.prefill(prompt)[0], SamplingParams(**options))[0]
    runs = 500  # sees a shift of ~0.08 in a probability near 0.4
    counts = np.zeros(VOCAB)
    decoder = SpeculativeDecoder(tiny_engine, ModelDrafter(draft), draft_tokens=3, auto_off=False)
    for seed in range(runs):  # a budget of 2 leaves room for one draft token: the first new token is drafted
        counts[decoder.generate(prompt, SamplingParams(max_new_tokens=2, seed=seed, **options)).token_ids[0]] += 1
    assert decoder.stats.drafted == runs and 0 < decoder.stats.accepted < runs  # both branches ran
    assert counts[(p == 0).numpy()].sum() == 0  # a filtered-out token is never produced
    assert chisquare(*chi_square_cells(counts, p, runs)).pvalue > 0.001


def test_sampled_longer_text_with_a_draft_model_keeps_budget_and_seed(tiny_engine):
    from llmlab.model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64)
    decoder = SpeculativeDecoder(tiny_engine, ModelDrafter(Transformer(cfg).init_weights(seed=5).eval()),
                                 draft_tokens=4, auto_off=False)
    params = SamplingParams(temperature=0.8, max_new_tokens=30, seed=3)
    first = decoder.generate([1, 2, 3], params)
    assert len(first.token_ids) == 30 and first.finish_reason == "length"
    assert decoder.generate([1, 2, 3], params).token_ids == first.token_ids  # seeded: the same sample again


# ---- the server ------------------------------------------------------------------------------------------------


def test_server_speculates_n1_requests_and_reports_usage_and_metrics(tiny_ckpt):
    import httpx
    import openai

    import llmlab
    from llmlab.serve.testing import running_server
    llm = llmlab.load(tiny_ckpt)
    messages = [{"role": "user", "content": "say the cat the cat the cat the cat"}]
    plain = llm.engine.generate([llm.prompt_ids(messages)], SamplingParams(temperature=0, max_new_tokens=16))[0]
    with running_server(llm, model_name="tiny", speculate="lookup") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == plain.text
        usage = reply.usage.model_dump()
        assert usage["completion_tokens"] == plain.completion_tokens
        spec = usage["speculative"]
        assert spec["verify_steps"] >= 1 and 0 <= spec["acceptance_rate"] <= 1 and spec["tokens_per_step"] >= 1
        stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.text
        assert chunks[-1].usage.model_dump()["speculative"]["verify_steps"] >= 1
        two = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8, n=2)
        assert len(two.choices) == 2 and two.usage.model_dump().get("speculative") is None  # n=2: the batcher's
        metrics = httpx.get(url + "/metrics").text
        assert "llmlab_speculative_requests_total 2" in metrics
        assert "llmlab_speculative_tokens_per_step" in metrics and "llmlab_speculative_acceptance_rate" in metrics


def test_server_refuses_an_unknown_draft_kind(tiny_ckpt):
    import llmlab
    from llmlab.serve.app import create_app
    from llmlab.serve.state import ServerOptions
    with pytest.raises(LLMLabError, match="--speculate"):
        create_app(llmlab.load(tiny_ckpt), ServerOptions(speculate="draft:"))
