"""The synthetic biographies world: determinism, attributes, QA consistency, splits, augmentations."""

import json
import re

import pytest

from llmlab.data.bios import ATTRIBUTES, EMPLOYERS, make_bios_world
from llmlab.errors import LLMLabError


def sentences(bio):
    return re.split(r"(?<=\.) (?=[A-Z])", bio)


def test_deterministic_by_seed():
    a, b, c = make_bios_world(40, seed=7), make_bios_world(40, seed=7), make_bios_world(40, seed=8)
    assert a.people == b.people
    assert list(a.biographies("multi,permute")) == list(b.biographies("multi,permute"))
    assert a.qa("test") == b.qa("test")
    assert [p.name for p in a.people] != [p.name for p in c.people]


def test_people_have_all_attributes_and_unique_names():
    world = make_bios_world(300, seed=1)
    assert len({p.name for p in world.people}) == 300
    for p in world.people:
        assert all(getattr(p, a) for a in ATTRIBUTES)
        assert p.employer_city == EMPLOYERS[p.employer]  # employer determines its city
        assert re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", p.birth_date)


def test_qa_answers_are_stated_in_the_biographies():
    world = make_bios_world(60, seed=2)
    bios = list(world.biographies("multi,permute", multi=5))
    assert len(bios) == 5 * 60
    by_person = {p.name: bios[5 * i:5 * i + 5] for i, p in enumerate(world.people)}
    qa = world.qa("train") + world.qa("test")
    assert len(qa) == 60 * len(ATTRIBUTES)
    for item in qa:
        assert item["person"] in item["question"]
        for bio in by_person[item["person"]]:
            assert item["answer"] in bio  # every biography of the person states every fact
    q = next(x for x in qa if x["attribute"] == "birth_city")
    assert q["question"] == f"What is the birth city of {q['person']}?"


def test_train_and_test_people_are_disjoint():
    world = make_bios_world(100, seed=3, test_fraction=0.3)
    train = {x["person"] for x in world.qa("train")}
    test = {x["person"] for x in world.qa("test")}
    assert not train & test
    assert len(test) == 30 and len(train) == 70
    assert train | test == {p.name for p in world.people}


def test_augmentations():
    world = make_bios_world(20, seed=4)
    plain = list(world.biographies())
    assert len(plain) == 20
    multi = list(world.biographies("multi", multi=4))
    for i in range(20):
        copies = multi[4 * i:4 * i + 4]
        assert len(set(copies)) == 4  # differently worded
    # permute shuffles sentence order, yet the first sentence always names the person
    permuted = list(world.biographies("permute"))

    def order(person, bio):  # which attribute each sentence states
        return [next(a for a in ATTRIBUTES if getattr(person, a) in s) for s in sentences(bio)]

    assert all(order(p, b) == list(ATTRIBUTES) for p, b in zip(world.people, plain))
    orders = [order(p, b) for p, b in zip(world.people, permuted)]
    assert all(sorted(o) == sorted(ATTRIBUTES) for o in orders)
    assert sum(o != list(ATTRIBUTES) for o in orders) >= 15
    for p, bio in zip(world.people, permuted):
        assert p.name in sentences(bio)[0]
    # pronouns by default, the full name in every sentence with fullname
    assert all(any(s.split()[0] in ("He", "She", "His", "Her") for s in sentences(b)) for b in plain)
    for p, bio in zip(world.people, world.biographies("fullname")):
        assert all(p.name in s for s in sentences(bio))
    with pytest.raises(LLMLabError, match="unknown bios augmentation 'shuffle'"):
        list(world.biographies("multi,shuffle"))


def test_write_directory(tmp_path):
    world = make_bios_world(10, seed=5, test_fraction=0.5)
    out = world.write(tmp_path / "bios", augment="multi", multi=3)

    def lines(name):
        return [json.loads(l) for l in (out / name).read_text(encoding="utf-8").splitlines()]

    bios = lines("biographies.jsonl")
    assert len(bios) == 30 and all(r["text"] for r in bios)
    assert all(r["person"] in r["text"] for r in bios)
    assert lines("qa_train.jsonl") == world.qa("train") and lines("qa_test.jsonl") == world.qa("test")
    assert len(lines("qa_test.jsonl")) == 5 * len(ATTRIBUTES)
    assert [r["name"] for r in lines("people.jsonl")] == [p.name for p in world.people]


def test_bad_parameters():
    with pytest.raises(LLMLabError):
        make_bios_world(0)
    with pytest.raises(LLMLabError, match="test fraction"):
        make_bios_world(10, test_fraction=1.5)


def test_qa_chat_template_renders_plain_text_qa(tmp_path):
    """The speedrun's SFT format: "<eos>question answer<eos>", loss on " answer<eos>" only, and the prompt the
    model answers at inference is exactly the text before the answer."""
    from llmlab.data.bios import QA_CHAT_TEMPLATE
    from llmlab.tokenizer import Tokenizer
    from llmlab.tokenizer.train import train_bpe
    from llmlab.train.chat_data import render_conversation, render_prompt

    world = make_bios_world(20, seed=3)
    tok = Tokenizer.from_dir(train_bpe(list(world.biographies("multi")), 400, tmp_path / "tok"))
    tok.chat_template = QA_CHAT_TEMPLATE
    qa = world.qa("train")[0]
    messages = [{"role": "user", "content": qa["question"]}]
    ids, mask = render_conversation(tok, messages + [{"role": "assistant", "content": qa["answer"]}])
    assert tok.decode(ids, skip_special_tokens=False) == f"<|endoftext|>{qa['question']} {qa['answer']}<|endoftext|>"
    prompt = render_prompt(tok, messages)
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and all(mask[len(prompt):])
    assert tok.decode(ids[len(prompt):], skip_special_tokens=True).strip() == qa["answer"]
    assert ids[-1] in tok.stop_token_ids  # generation ends after the answer


def test_other_value_is_a_wrong_answer_of_the_right_kind():
    import random

    world = make_bios_world(50, seed=2)
    rng = random.Random(0)
    for attr in ATTRIBUTES:
        values = {getattr(p, attr) for p in world.people}
        for p in world.people[:10]:
            wrong = world.other_value(attr, getattr(p, attr), rng)
            assert wrong in values and wrong != getattr(p, attr)
    one = make_bios_world(1, seed=2)
    with pytest.raises(LLMLabError, match="no wrong answer"):
        one.other_value("major", one.people[0].major, rng)
