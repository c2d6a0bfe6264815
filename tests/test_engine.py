"""Engine tests on tiny models: cache decoding, ragged batches, sampling, stops, streaming, beams, scoring."""

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmlab.engine import (Engine, IncrementalText, SamplingParams, apply_repetition_penalty, min_p_filter,
                           top_k_filter, top_p_filter)
from llmlab.errors import LLMLabError
from llmlab.model import ModelConfig, Transformer

EOS = "<|endoftext|>"
# English only: emoji and CJK characters are left as single-byte tokens, so their tokens end mid-character
TOKENIZER_CORPUS = ["the quick brown fox jumps over the lazy dog and sleeps. hello world, stop here please"] * 3
# what the small model memorises: multi-byte characters a byte-level tokenizer splits into 3 or 4 tokens
MEMORISED = "the quick brown fox 😀 jumps over the lazy dog 猫 and sleeps. "


class ByteBPE:
    """The three things the engine needs from a tokenizer, over a real byte-level BPE from `tokenizers`."""

    def __init__(self):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS)
        self.stop_token_ids = {self.eos_id}
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(ids)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine two threads wait on each other
    (measured: 30x slower); restored afterwards so other test modules keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBPE()


def tiny_config(vocab_size, **kw):
    base = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=256)
    return ModelConfig(**{**base, **kw})


KINDS = {
    "dense": {},
    "moe": dict(n_experts=4, n_experts_per_token=2),
    "learned": dict(pos_embedding="learned", mlp="gelu", norm="layernorm", qkv_bias=True, o_bias=True,
                    mlp_bias=True, tie_embeddings=True, n_kv_heads=4, hf_model_type="gpt2"),
}


def random_engine(tokenizer, kind="dense", seed=0):
    model = Transformer(tiny_config(tokenizer.vocab_size, **KINDS[kind])).init_weights(seed).eval()
    return Engine(model, tokenizer)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return random_engine(tokenizer)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A model trained until it recites MEMORISED then EOS: real text, real multi-byte characters."""
    model = Transformer(tiny_config(tokenizer.vocab_size)).init_weights(0)
    ids = tokenizer.encode(MEMORISED) + [tokenizer.eos_id]
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return Engine(model.eval(), tokenizer)


def greedy(**kw):
    return SamplingParams(temperature=0, **kw)


PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]


# ---- the KV cache -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_cache_decoding_equals_full_recomputation(tokenizer, kind):
    engine = random_engine(tokenizer, kind)
    out = engine.generate([PROMPT], greedy(max_new_tokens=30, stop_token_ids=set(), logprobs=True))[0]
    ids = list(PROMPT)
    with torch.no_grad():
        for token, lp in zip(out.token_ids, out.logprobs):
            logits = engine.model(torch.tensor([ids]))[0, -1]
            assert token == logits.argmax().item()
            assert lp == pytest.approx(F.log_softmax(logits, -1)[token].item(), abs=1e-4)
            ids.append(token)
    assert len(out.token_ids) == 30 and out.finish_reason == "length"


def test_ragged_batch_equals_one_at_a_time(engine):
    prompts = [[1, 2, 3], PROMPT + [8], PROMPT[:7]]
    params = greedy(max_new_tokens=20, stop_token_ids=set())
    batched = engine.generate(prompts, params)
    for prompt, got in zip(prompts, batched):
        alone = engine.generate([prompt], params)[0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.prompt_tokens == len(prompt)


def test_finished_rows_do_not_disturb_the_others(engine):
    base = engine.generate([PROMPT[:4], PROMPT], greedy(max_new_tokens=20, stop_token_ids=set()))
    # stop the first row early on one of its own tokens; the second must not change
    stop_token = base[0].token_ids[3]
    first_at = base[0].token_ids.index(stop_token)
    out = engine.generate([PROMPT[:4], PROMPT], greedy(max_new_tokens=20, stop_token_ids={stop_token}))
    assert out[0].token_ids == base[0].token_ids[:first_at] and out[0].finish_reason == "stop"
    if stop_token not in base[1].token_ids:
        assert out[1].token_ids == base[1].token_ids


# ---- sampling -------------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy(engine):
    want = engine.generate([PROMPT], greedy(max_new_tokens=15, stop_token_ids=set()))[0].token_ids
    got = engine.generate([PROMPT], SamplingParams(top_k=1, seed=3, max_new_tokens=15, stop_token_ids=set()))
    assert got[0].token_ids == want


def test_same_seed_same_sample_other_seed_other_sample(engine):
    def sample(seed):
        params = SamplingParams(seed=seed, max_new_tokens=20, stop_token_ids=set())
        return engine.generate([PROMPT], params)[0].token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])  # sorted: 0.5 (1), 0.25 (3), 0.15 (0), 0.1 (2)
    logits = probs.log()[None]
    for p, keep in [(0.4, {1}), (0.6, {1, 3}), (0.85, {1, 3, 0}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        kept = torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()
        assert set(kept) == keep, p
    # the top token survives even when it alone exceeds p, and rows are independent
    two = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5]]).log()
    kept = torch.isfinite(top_p_filter(two, 0.1))
    assert kept.tolist() == [[True, False, False], [False, False, True]]


def test_min_p_filter_keeps_tokens_near_the_top():
    logits = torch.tensor([0.15, 0.5, 0.1, 0.25]).log()[None]
    for min_p, keep in [(0.1, {0, 1, 2, 3}), (0.25, {0, 1, 3}), (0.4, {1, 3}), (0.6, {1})]:
        kept = torch.isfinite(min_p_filter(logits, min_p))[0].nonzero().flatten().tolist()
        assert set(kept) == keep, min_p


def test_top_k_filter():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_repetition_penalty_hand_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_strong_repetition_penalty_avoids_repeats(engine):
    params = greedy(max_new_tokens=20, stop_token_ids=set(), repetition_penalty=1e6)
    out = engine.generate([PROMPT], params)[0].token_ids
    assert len(set(PROMPT + out)) == len(PROMPT) + len(out)
    plain = engine.generate([PROMPT], greedy(max_new_tokens=20, stop_token_ids=set()))[0].token_ids
    assert len(set(plain)) < len(plain)  # without it this model does repeat, so the test means something


# ---- stopping ------------------------------------------------------------------------------------------------


def test_eos_stops_and_ignore_eos_does_not(trained, tokenizer):
    prompt = tokenizer.encode("the quick")
    out = trained.generate([prompt], greedy(max_new_tokens=60))[0]
    assert out.finish_reason == "stop"
    assert out.text == MEMORISED[len("the quick"):]
    assert tokenizer.eos_id not in out.token_ids and out.completion_tokens == len(out.token_ids) + 1
    more = trained.generate([prompt], greedy(max_new_tokens=60, ignore_eos=True))[0]
    assert more.finish_reason == "length" and len(more.token_ids) == 60


def test_max_new_tokens_gives_length(engine):
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=7, seed=0, stop_token_ids=set()))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7 == out.completion_tokens


def test_stop_token_ids(engine):
    base = engine.generate([PROMPT], greedy(max_new_tokens=20, stop_token_ids=set()))[0].token_ids
    stop_token = base[5]
    out = engine.generate([PROMPT], greedy(max_new_tokens=20, stop_token_ids={stop_token}))[0]
    assert out.token_ids == base[:base.index(stop_token)] and out.finish_reason == "stop"


def test_stop_string_across_two_tokens(trained, tokenizer):
    prompt = tokenizer.encode("the quick")
    full = trained.generate([prompt], greedy(max_new_tokens=60))[0]
    # a two-character stop string made of the last character of one token and the first of the next
    for k in range(1, len(full.token_ids)):
        before = tokenizer.decode(full.token_ids[:k])
        nxt = tokenizer.decode(full.token_ids[k:k + 1])
        stop = before[-1:] + nxt[:1]
        if len(stop) == 2 and "\ufffd" not in stop and full.text.find(stop) == len(before) - 1:
            break
    else:
        pytest.fail("no token boundary to test on")
    params = greedy(max_new_tokens=60, stop=["never appears", stop])
    out = trained.generate([prompt], params)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert len(out.token_ids) == k + 1  # generation ended on the token that completed the stop string
    pieces = list(trained.stream(prompt, params))
    assert "".join(pieces) == out.text


def test_stop_string_in_one_token(trained, tokenizer):
    prompt = tokenizer.encode("the quick")
    out = trained.generate([prompt], greedy(max_new_tokens=60, stop=["lazy"]))[0]
    assert out.text == MEMORISED[len("the quick"):MEMORISED.find("lazy")] and out.finish_reason == "stop"


# ---- streaming ---------------------------------------------------------------------------------------------


def test_stream_never_splits_a_character(trained, tokenizer):
    prompt = tokenizer.encode("the quick")
    params = SamplingParams(temperature=0.8, seed=11, max_new_tokens=60)
    text = trained.generate([prompt], params)[0].text
    pieces = list(trained.stream(prompt, params))
    assert "".join(pieces) == text
    assert "😀" in text and "猫" in text  # the multi-byte characters really were produced
    assert all("\ufffd" not in piece for piece in pieces)
    # and the emoji arrived as several tokens, so something was held back
    assert max(len(tokenizer.tok.encode(ch).ids) for ch in text) >= 3


def test_stream_equals_generate_when_sampling(engine):
    for seed in range(3):
        params = SamplingParams(seed=seed, max_new_tokens=25, top_p=0.9, stop_token_ids=set(), logprobs=True)
        want = engine.generate([PROMPT], params)[0].text
        assert "".join(engine.stream(PROMPT, params)) == want


def test_incremental_text_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    text = "hi 😀 猫 ok go"
    ids = tokenizer.encode(text)
    inc = IncrementalText(tokenizer)
    pieces = []
    for token in ids:
        inc.add(token)
        pieces.append(inc.take())
    inc.close()
    pieces.append(inc.take(final=True))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)

    inc = IncrementalText(tokenizer, stop=[" ok"])
    streamed = ""
    for token in ids:
        inc.add(token)
        streamed += inc.take()
        assert " o" not in streamed  # " o" could still become " ok", so it is held back
    inc.close()
    assert inc.stopped and streamed + inc.take(final=True) == "hi 😀 猫"


# ---- beam search -----------------------------------------------------------------------------------------------


def test_beam_width_1_equals_greedy(engine):
    want = engine.generate([PROMPT], greedy(max_new_tokens=15, stop_token_ids=set()))[0].token_ids
    beams = engine.beam_search(PROMPT, 1, greedy(max_new_tokens=15, stop_token_ids=set()))
    assert len(beams) == 1 and beams[0].token_ids == want


def test_beam_first_step_is_top_k(engine):
    with torch.no_grad():
        first = F.log_softmax(engine.model(torch.tensor([PROMPT]))[0, -1], -1)
    beams = engine.beam_search(PROMPT, 4, greedy(max_new_tokens=1, stop_token_ids=set()))
    assert [b.token_ids[0] for b in beams] == first.topk(4).indices.tolist()


def test_beam_scores_are_sorted_and_match_logprobs(engine):
    length_penalty, stops = 0.7, {7, 11, 99}
    beams = engine.beam_search(PROMPT, 3, greedy(max_new_tokens=8, stop_token_ids=stops),
                               length_penalty=length_penalty)
    assert len(beams) == 3
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    for b in beams:
        lps = engine.logprobs(PROMPT, b.token_ids)
        assert b.logprobs == pytest.approx(lps, abs=1e-4)
        if b.finish_reason == "length":
            assert b.score == pytest.approx(sum(lps) / len(lps) ** length_penalty, abs=1e-4)
        else:  # the stop token that ended it counts in the score
            ends = [sum(engine.logprobs(PROMPT, b.token_ids + [s])) / (len(lps) + 1) ** length_penalty
                    for s in stops]
            assert any(e == pytest.approx(b.score, abs=1e-4) for e in ends)


# ---- scoring -----------------------------------------------------------------------------------------------


def test_logprobs_equal_log_softmax_of_a_full_forward(engine):
    continuation = [4, 8, 15, 16, 23, 42]
    got = engine.logprobs(PROMPT, continuation)
    with torch.no_grad():
        logp = F.log_softmax(engine.model(torch.tensor([PROMPT + continuation]))[0], -1)
    want = [logp[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(continuation)]
    assert got == pytest.approx(want, abs=1e-5)
    echo = engine.prompt_logprobs(PROMPT + continuation)
    assert echo[0] is None and echo[len(PROMPT):] == pytest.approx(want, abs=1e-5)


def test_score_batch_equals_one_at_a_time(engine):
    pairs = [([1, 2, 3], [4, 5]), (PROMPT, [9]), ([7], [3, 1, 4, 1, 5, 9, 2, 6])]
    batched = engine.score_batch(pairs)
    for (prompt, continuation), got in zip(pairs, batched):
        assert got == pytest.approx(engine.logprobs(prompt, continuation), abs=1e-5)
        assert len(got) == len(continuation)


def test_generate_logprobs_are_of_the_raw_distribution(engine):
    # a high temperature and top-k change what is sampled, not the reported log-probabilities
    params = SamplingParams(temperature=1.7, top_k=5, seed=0, max_new_tokens=10, stop_token_ids=set(),
                            logprobs=True, top_logprobs=3)
    out = engine.generate([PROMPT], params)[0]
    assert out.logprobs == pytest.approx(engine.logprobs(PROMPT, out.token_ids), abs=1e-4)
    with torch.no_grad():
        logp = F.log_softmax(engine.model(torch.tensor([PROMPT + out.token_ids]))[0], -1)
    for i, top in enumerate(out.top_logprobs):
        want = logp[len(PROMPT) - 1 + i].topk(3)
        assert list(top) == want.indices.tolist()
        assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-4)


# ---- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1.0), dict(min_p=-0.1),
    dict(repetition_penalty=0.0), dict(max_new_tokens=0), dict(max_new_tokens=10_000),
])
def test_bad_parameters_raise(engine, bad):
    with pytest.raises(LLMLabError):
        engine.generate([PROMPT], SamplingParams(**bad))


def test_prompt_longer_than_context_raises(engine):
    with pytest.raises(LLMLabError, match="300 tokens.*256 tokens"):
        engine.generate([[1] * 300], SamplingParams())
    with pytest.raises(LLMLabError):
        engine.logprobs([1] * 200, [2] * 100)
    with pytest.raises(LLMLabError):
        engine.generate([[]], SamplingParams())


def test_new_tokens_are_capped_by_the_context(engine):
    prompt = [1] * 250
    out = engine.generate([prompt], SamplingParams(seed=0, max_new_tokens=100, stop_token_ids=set()))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 256 - 250


def test_beam_search_finishes_on_eos(trained, tokenizer):
    prompt = tokenizer.encode("the quick")
    beams = trained.beam_search(prompt, 3, greedy(max_new_tokens=60))
    best = beams[0]
    assert best.finish_reason == "stop" and best.text == MEMORISED[len("the quick"):]
    lps = trained.logprobs(prompt, best.token_ids + [tokenizer.eos_id])
    assert best.score == pytest.approx(sum(lps) / len(lps), abs=1e-4)
    assert best.completion_tokens == len(best.token_ids) + 1


# ---- n samples per prompt, one random stream per sample ----------------------------------------------------


def test_n_samples_are_seed_plus_index_and_independent_of_the_batch(engine):
    # Exact equality across batch shapes (1, 3 and 6 rows) is safe here: every row is sampled alone with its own
    # generator, and a float difference between batch shapes (~1e-7 on these fp32 logits) would have to land a
    # uniform draw within that distance of a token's cumulative probability to change a sample.
    prompts = [PROMPT, [1, 2, 3]]
    params = dict(temperature=1.0, max_new_tokens=12, stop_token_ids=set())
    both = engine.generate(prompts, SamplingParams(seed=5, **params), n=3)
    assert len(both) == 6
    for j, prompt in enumerate(prompts):
        alone = engine.generate([prompt], SamplingParams(seed=5, **params), n=3)
        for i in range(3):
            assert both[j * 3 + i].token_ids == alone[i].token_ids
            single = engine.generate([prompt], SamplingParams(seed=5 + i, **params))[0]
            assert single.token_ids == alone[i].token_ids
    assert len({tuple(c.token_ids) for c in both[:3]}) == 3  # the samples of one prompt differ


def test_n_samples_prefill_the_prompt_once(engine, monkeypatch):
    calls = []
    prefill = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda ids, *a: calls.append(len(ids)) or prefill(ids, *a))
    out = engine.generate([PROMPT], SamplingParams(seed=0, max_new_tokens=5, stop_token_ids=set()), n=16)
    assert len(out) == 16 and calls == [len(PROMPT)]
    with pytest.raises(LLMLabError, match="n must be"):
        engine.generate([PROMPT], SamplingParams(), n=0)


# ---- beam search options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(temperature=0.7), dict(temperature=0, top_k=5), dict(temperature=0, top_p=0.9),
                                 dict(temperature=0, min_p=0.1), dict(temperature=0, seed=1),
                                 dict(temperature=0, top_logprobs=2, logprobs=True)])
def test_beam_refuses_what_it_cannot_honour(engine, bad):
    with pytest.raises(LLMLabError, match="beam search .*cannot honour " + next(k for k in bad if k != "logprobs"
                                                                               and bad[k] not in (0,))):
        engine.beam_search(PROMPT, 2, SamplingParams(**bad))


@pytest.mark.parametrize("width", [0, -2])
def test_beam_width_below_one_is_refused(engine, width):
    with pytest.raises(LLMLabError, match="beam width must be >= 1"):
        engine.beam_search(PROMPT, width, greedy())


def test_beam_honours_stop_strings(trained, tokenizer):
    prompt = tokenizer.encode("the quick")
    best = trained.beam_search(prompt, 3, greedy(max_new_tokens=60, stop=["lazy"]))[0]
    assert best.finish_reason == "stop" and best.text == MEMORISED[len("the quick"):MEMORISED.find("lazy")]


def test_beam_honours_the_repetition_penalty(engine):
    plain = engine.beam_search(PROMPT, 2, greedy(max_new_tokens=40, stop_token_ids=set()))[0].token_ids
    assert len(set(PROMPT + plain)) < len(PROMPT) + len(plain)  # without it this model repeats: the test means something
    out = engine.beam_search(PROMPT, 2, greedy(max_new_tokens=40, stop_token_ids=set(), repetition_penalty=1e6))[0]
    assert len(set(PROMPT + out.token_ids)) == len(PROMPT) + len(out.token_ids)
    assert out.logprobs == pytest.approx(engine.logprobs(PROMPT, out.token_ids), abs=1e-4)  # raw logprobs


def test_top_p_by_candidates_equals_the_full_sort_and_draw_follows_the_distribution():
    """top_p_filter ranks a few hundred candidates before it sorts the vocabulary: the kept set must be the full
    sort's, for peaked rows (nucleus inside the candidates) and flat ones (the fallback). draw (inverse transform)
    must sample the given distribution and never a token of probability 0."""
    from llmlab.engine.sampling import draw, top_p_filter

    def by_full_sort(logits, p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= p
        return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))

    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(3, 5000, generator=g) * 8, torch.randn(3, 5000, generator=g) * 0.5])
    for p in (0.5, 0.9):
        kept, reference = top_p_filter(logits, p).isfinite(), by_full_sort(logits, p).isfinite()
        # rows may differ only by a token whose mass sits within float rounding of the boundary
        assert (kept != reference).sum() <= 2 and kept.sum() > 0
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]])
    draws = torch.cat([draw(probs, g) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[1] == 0 and (counts - probs[0]).abs().max() < 0.03


def test_the_native_sampler_draws_the_token_the_pytorch_sampler_draws():
    """llmlab_sample (C++; sample_next uses it once the native library is loaded) against sampling_probs + draw:
    from each uniform of a fine grid, the same token, so the same distribution, for peaked and flat rows under
    every filter; a batch with one generator per row draws what each row draws alone."""
    import ctypes  # noqa: F401 (the library's calls)

    from llmlab.engine.native.library import load_library
    from llmlab.engine.sampling import native_sample, new_generator, sampling_probs
    lib = load_library()
    if lib is None:
        pytest.skip("the native kernel did not build here (no g++?)")
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(2, 3000, generator=g) * 6, torch.randn(2, 3000, generator=g) * 0.5])
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    for kw in [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.5, min_p=0.1),
               dict(temperature=1.3, top_k=40, top_p=0.95, min_p=0.02), dict(temperature=2.0, top_p=0.99)]:
        params = SamplingParams(**kw)
        cdf = sampling_probs(logits, params).double().cumsum(dim=-1)
        for r in range(4):
            want = torch.searchsorted(cdf[r:r + 1].expand(1000, -1).contiguous(), (grid * cdf[r, -1])[:, None],
                                      right=True).squeeze(-1)
            rows = logits[r:r + 1].expand(1000, -1).contiguous()
            got = torch.empty(1000, dtype=torch.long)
            lib.llmlab_sample(rows.data_ptr(), 1000, 3000, params.temperature, params.top_k, params.top_p,
                              params.min_p, grid.data_ptr(), got.data_ptr())
            # float rounding (another exp, sums in another order) may move a boundary by ~1e-7 of the mass
            assert (got != want).sum() <= 1, (kw, r, (got != want).sum())
        batch = native_sample(logits, params, [new_generator(s) for s in range(4)])
        alone = [int(native_sample(logits[r:r + 1], params, new_generator(r))) for r in range(4)]
        assert batch.tolist() == alone
