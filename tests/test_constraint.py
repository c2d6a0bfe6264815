"""Constrained decoding on SmolLM2: the grammar's mask comes before the one sampler, so every sampling option works
under a JSON schema; the output always parses and validates, also when the token budget runs out."""

import json
import re

import jsonschema
import pytest
import torch

from llmlab.api import load
from llmlab.engine import SamplingParams, apply_repetition_penalty
from llmlab.engine.constraint import (GrammarConstraint, TokenVocab, compile_grammar, compile_schema,
                                      grammar_constraint_factory, json_constraint_factory)
from llmlab.errors import LLMLabError

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "role": {"type": "string", "enum": ["admin", "user"]}, "tags": {"type": "array", "items": {"type": "string"}},
    "active": {"type": "boolean"}}, "required": ["name", "age", "role"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(smollm2_gguf, fp32_decode):  # decoded log-probs are compared with the scoring path's
    return load(smollm2_gguf)


@pytest.fixture(scope="module")
def vocab(llm):
    return TokenVocab(llm.tokenizer)


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.prompt_ids("Describe a user of a website as JSON.")


def run(llm, vocab, prompt, schema=PERSON, n=1, **options):
    params = SamplingParams(**options)
    factory = json_constraint_factory(vocab, schema, params.max_new_tokens)
    return llm.engine.generate([prompt], params, n=n, constraint_factory=factory)


@pytest.fixture(scope="module")
def greedy(llm, vocab, prompt):
    return run(llm, vocab, prompt, temperature=0, max_new_tokens=MAX)[0]


MAX = 24


def test_top_k_1_and_a_high_min_p_equal_greedy_under_a_schema(llm, vocab, prompt, greedy):
    # the JSON sampler this replaced drew among 16 valid candidates and ignored top_k and min_p
    jsonschema.validate(json.loads(greedy.text), PERSON)
    top_k = run(llm, vocab, prompt, temperature=1.5, top_k=1, seed=1, max_new_tokens=MAX)[0]
    min_p = run(llm, vocab, prompt, temperature=1.5, min_p=0.999, seed=1, max_new_tokens=MAX)[0]
    assert top_k.token_ids == greedy.token_ids and min_p.token_ids == greedy.token_ids
    free = run(llm, vocab, prompt, temperature=1.5, seed=1, max_new_tokens=MAX)[0]
    assert free.token_ids != greedy.token_ids  # sampling really is on, so the equalities mean something
    jsonschema.validate(json.loads(free.text), PERSON)


def test_repetition_penalty_applies_under_a_schema(llm, vocab, prompt):
    out = run(llm, vocab, prompt, schema=None, temperature=0, repetition_penalty=3.0, max_new_tokens=MAX)[0]
    assert isinstance(json.loads(out.text), dict)
    # each token is the best under (mask, then penalty) of one full forward; a fresh constraint replays the mask
    constraint = json_constraint_factory(vocab, None, MAX)()
    ids = list(prompt) + out.token_ids
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))[0, len(prompt) - 1:].float()
    seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
    seen[0, torch.tensor(prompt)] = True
    penalty_decided = 0
    for k, token in enumerate(out.token_ids):
        if constraint.plan is None or len(constraint.plan) + 8 >= MAX - k:
            break  # near the budget a token may be refused for its closing, and the closing is forced
        masked = logits[k:k + 1].masked_fill(~constraint.allowed(MAX - k)[None], float("-inf"))
        scores = apply_repetition_penalty(masked, seen, 3.0)
        # 1e-3: the cached decode and this full forward differ by float noise, not by a whole logit
        assert scores[0, token] >= scores.max() - 1e-3, k
        penalty_decided += int(masked[0].argmax()) != token  # without the penalty another token would have won
        assert constraint.accept(token, MAX - k)
        seen[0, token] = True
    assert k >= 8 and penalty_decided >= 1  # enough free choices were checked, and the penalty changed one


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_budget_forces_a_valid_close_with_real_logprobs(llm, vocab, prompt, temperature):
    out = run(llm, vocab, prompt, temperature=temperature, seed=3, max_new_tokens=18, logprobs=True)[0]
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.finish_reason == "length" and out.completion_tokens <= 18
    # every token, forced ones included, reports its logprob under the raw model distribution
    assert None not in out.logprobs
    assert out.logprobs == pytest.approx(llm.engine.logprobs(prompt, out.token_ids), abs=1e-3)


def test_a_value_that_closes_on_its_own_stops(llm, vocab, prompt):
    out = run(llm, vocab, prompt, schema=None, temperature=0, max_new_tokens=60)[0]
    assert isinstance(json.loads(out.text), dict) and out.finish_reason == "stop"
    assert out.completion_tokens < 60


def test_n_samples_under_a_schema(llm, vocab, prompt):
    outs = run(llm, vocab, prompt, n=3, temperature=1.0, seed=7, max_new_tokens=MAX)
    for out in outs:
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 1


def test_regex_and_lark_grammars(llm, vocab):
    ids = llm.prompt_ids("What is a phone number?")
    factory = grammar_constraint_factory(vocab, compile_grammar("regex", r"[0-9]{3}-[0-9]{4}"), 20)
    out = llm.engine.generate([ids], SamplingParams(temperature=0.8, seed=1, max_new_tokens=20),
                              constraint_factory=factory)[0]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out.text) and out.finish_reason == "stop"
    lark = 'start: "get_weather(" CITY ")"\nCITY: /[A-Z][a-z]+/'
    factory = grammar_constraint_factory(vocab, compile_grammar("lark", lark), 20)
    ids = llm.prompt_ids("Call a tool to get the weather in Paris.")
    out = llm.engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=20), constraint_factory=factory)[0]
    assert re.fullmatch(r"get_weather\([A-Z][a-z]+\)", out.text)


def test_unsupported_keywords_and_tiny_budgets_are_refused(vocab):
    with pytest.raises(LLMLabError, match="'uniqueItems'"):
        compile_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(LLMLabError, match="'not'"):
        json_constraint_factory(vocab, {"not": {"type": "string"}}, 10)
    needed = GrammarConstraint(compile_schema(PERSON), vocab).min_tokens()
    with pytest.raises(LLMLabError, match=f"max_tokens is 2.*takes {needed} tokens"):
        json_constraint_factory(vocab, PERSON, 2)
    # keywords the old hand-written parser refused now work
    for schema in ({"type": "string", "pattern": "^a+$"}, {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                   {"type": "string", "minLength": 2, "maxLength": 5}):
        json_constraint_factory(vocab, schema, 20)
