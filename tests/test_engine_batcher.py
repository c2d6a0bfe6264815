"""The Engine and the continuous batcher (the server) share one decode step: the same seed and parameters give the
same tokens, with or without a JSON constraint, and a request's n samples are seed, seed + 1, ..."""

import json

import pytest
import torch

from llmlab.api import load
from llmlab.engine import SamplingParams
from llmlab.engine.batcher import PREFIX_MIN_TOKENS, ContinuousBatcher, Request, common_prefix_len
from llmlab.engine.constraint import TokenVocab, json_constraint_factory

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"]}


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return load(smollm2_gguf)


def through_batcher(engine, requests: list[Request]) -> list[Request]:
    """Run requests to the end in this thread (step() is what the batcher's loop thread calls)."""
    batcher = ContinuousBatcher(engine, max_batch=4, max_len=256)
    for req in requests:
        batcher.submit(req)
    while not all(r.done for r in requests):
        batcher.step()
    return requests


def request(ids, params, n=1, factory=None):
    events = []
    return Request(prompt_ids=ids, params=params, sink=events.append, n=n, constraint_factory=factory)


# Both paths batch the same rows here (one request of n alone in the batcher, the same prompt × n in the Engine) and
# round their cache to the same 64 slots, so the logits match bit for bit and the seeded draws can be compared
# exactly. With different batch shapes the logits may differ by float noise (~1e-6), which could, rarely, move a
# draw across a token boundary; tests/test_engine.py checks batch-shape independence exactly on a tiny model.


@pytest.mark.parametrize("n", [1, 3])
def test_seeded_samples_equal_between_engine_and_batcher(llm, n):
    ids = llm.prompt_ids("Write a short poem about the sea.")
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=10, logprobs=True)
    engine_out = llm.engine.generate([ids], params, n=n)
    (req,) = through_batcher(llm.engine, [request(ids, params, n)])
    for i, seq in enumerate(req.sequences):
        assert seq.index == i
        assert seq.token_ids == engine_out[i].token_ids
        assert seq.text.text == engine_out[i].text and seq.finish_reason == engine_out[i].finish_reason
        assert [t.logprob for t in seq.tokens] == pytest.approx(engine_out[i].logprobs, abs=1e-4)
    if n > 1:
        assert len({tuple(s.token_ids) for s in req.sequences}) > 1


def test_seeded_json_samples_equal_between_engine_and_batcher(llm):
    ids = llm.prompt_ids("Give a city and its population as JSON.")
    params = SamplingParams(temperature=0.9, top_k=40, repetition_penalty=1.1, seed=7, max_new_tokens=24)
    factory = json_constraint_factory(TokenVocab(llm.tokenizer), SCHEMA, params.max_new_tokens)
    engine_out = llm.engine.generate([ids], params, constraint_factory=factory)[0]
    (req,) = through_batcher(llm.engine, [request(ids, params, 1, factory)])
    seq = req.sequences[0]
    assert seq.token_ids == engine_out.token_ids and seq.finish_reason == engine_out.finish_reason
    value = json.loads(seq.text.text)
    assert isinstance(value["city"], str) and isinstance(value["population"], int)


def test_batcher_sink_events(llm):
    ids = llm.prompt_ids("Say hello.")
    req = request(ids, SamplingParams(temperature=0, max_new_tokens=8, logprobs=True, top_logprobs=2), n=2)
    through_batcher(llm.engine, [req])
    events = req.sink.__self__
    finishes = [e for e in events if e[0] == "finish"]
    assert sorted(e[1] for e in finishes) == [0, 1]
    for index in (0, 1):
        deltas = [e for e in events if e[0] == "delta" and e[1] == index]
        assert "".join(e[2] for e in deltas) == req.sequences[index].text.text
        infos = [info for e in deltas for info in e[3]]
        assert [i.id for i in infos] == req.sequences[index].token_ids
        assert all(len(i.top) == 2 and i.logprob <= 0 for i in infos)
    with torch.no_grad():  # greedy: both samples are the argmax path
        assert req.sequences[0].token_ids == req.sequences[1].token_ids


def test_requests_admitted_together_prefill_as_one_batch(llm):
    """Prompts arriving together run as one left-padded forward pass; each row's logits and cache are its prompt's
    alone up to float noise of a different batch shape (measured ~6e-5 on SmolLM2's logits, which span ~30). Later
    greedy tokens are not compared: that noise can move a near tie, more so through the native kernel's int8 rows."""
    prompts = [llm.prompt_ids(q) for q in ("Say hello.", "Name three colours of the rainbow, please.", "Why?")]
    batcher = ContinuousBatcher(llm.engine, max_batch=4, max_len=256)
    together = batcher._prefill_all(prompts)
    for ids, (last, cache) in zip(prompts, together):
        alone, alone_cache = llm.engine.prefill(ids)
        assert torch.allclose(last, alone, atol=1e-3)
        assert cache.max_len == len(ids)
        assert torch.allclose(cache.k[-1], alone_cache.k[-1], atol=1e-4)
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    requests = through_batcher(llm.engine, [request(ids, greedy) for ids in prompts])
    for ids, req in zip(prompts, requests):
        alone = llm.engine.generate([ids], greedy)[0].token_ids
        assert req.sequences[0].token_ids[0] == alone[0] and len(req.sequences[0].token_ids) == len(alone) == 6


def test_requests_sharing_a_prefix_in_one_round_prefill_it_once(llm):
    system = ("You are a terse assistant for a small bakery in Lyon. Answer in one short sentence, never mention "
              "prices, and suggest the bread of the day when it fits the question.")
    prompts = [llm.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in ("When do you open?", "Do you sell rye bread?")]
    batcher = ContinuousBatcher(llm.engine, max_batch=4, max_len=256)
    out = batcher._prefill_all(prompts)
    assert batcher.stats["prefix_hits"] == 1  # the second prompt ran only past the shared system prompt
    assert torch.allclose(out[1][0], llm.engine.prefill(prompts[1])[0], atol=1e-3)


def test_a_chat_templates_own_system_prompt_is_prefilled_once(llm):
    """Two short questions share only what SmolLM2's template puts before them (its default system prompt, 24 tokens,
    two thirds of each prompt): the second request prefills only its own question."""
    prompts = [llm.prompt_ids(q) for q in ("When do you open?", "Do you sell rye bread?")]
    shared = common_prefix_len(*prompts)
    assert shared >= PREFIX_MIN_TOKENS
    batcher = ContinuousBatcher(llm.engine, max_batch=4, max_len=256)
    out = batcher._prefill_all(prompts)
    assert batcher.stats["prefix_hits"] == 1 and batcher.stats["prefix_tokens_reused"] == shared
    assert torch.allclose(out[1][0], llm.engine.prefill(prompts[1])[0], atol=1e-3)  # (as in the test above)


def test_rows_sampled_together_draw_what_each_draws_alone(llm):
    """The batcher samples rows with the same options in one pass; each row's seeded draw is what it would be alone,
    including a flat row whose nucleus needs more candidates than its neighbours'."""
    from llmlab.engine.sequence import new_sequence, step
    torch.manual_seed(0)
    logits = torch.randn(6, llm.model.config.vocab_size) * torch.tensor([8.0, 8.0, 0.3, 8.0, 8.0, 0.3])[:, None]
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=5)
    ids = llm.prompt_ids("Hi")
    vocab = logits.shape[-1]
    together = [new_sequence(llm.tokenizer, params, ids, 10, i, None, vocab) for i in range(6)]
    alone = [new_sequence(llm.tokenizer, params, ids, 10, i, None, vocab) for i in range(6)]
    for _ in range(3):
        tokens = step(together, list(logits.split(1)))
        assert tokens == [step([seq], [row])[0] for seq, row in zip(alone, logits.split(1))]


def test_the_same_prompt_again_gives_the_same_seeded_samples(llm):
    """A repeated prompt (of PREFIX_MIN_TOKENS or more, so its prefill is stored) reuses the stored logits, not only
    the cache: a re-run of its last token could take another kernel path (the native kernel's int8 rows) and drift the
    draws."""
    ids = llm.prompt_ids("Write a word.")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_new_tokens=10)
    batcher = ContinuousBatcher(llm.engine, max_batch=4, max_len=256)
    runs = []
    for _ in range(2):
        req = batcher.submit(request(ids, params, n=3))
        while not req.done:
            batcher.step()
        runs.append([s.token_ids for s in req.sequences])
    assert len(ids) >= PREFIX_MIN_TOKENS and batcher.stats["prefix_hits"] == 1
    assert runs[0] == runs[1]
