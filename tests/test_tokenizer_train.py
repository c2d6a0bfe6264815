"""Byte-level BPE training: special tokens, Unicode round trip, loading with transformers, bytes per token."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from llmlab.data.bios import make_bios_world
from llmlab.errors import LLMLabError
from llmlab.tokenizer.train import SPECIAL_TOKENS, bytes_per_token, train_bpe

CORPUS = list(make_bios_world(60, seed=0).biographies("multi")) + [
    "Grüße aus München! Ça va? 東京は雨です。 Привет, мир. 🙂🚀 x = 3.14159 * r**2\n\tindent",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe(CORPUS, 400, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def test_layout_and_special_tokens(tok_dir, tok):
    assert tok.get_vocab_size() == 400
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["eos_token"] == "<|endoftext|>"
    # learned merges: a frequent word of the corpus is a single token
    assert len(tok.encode(" University").ids) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_transformers_loads_identically(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    samples = CORPUS[:5] + [CORPUS[-1], "<|im_start|>user\nhi<|im_end|>\n", "  spaces   and\n\n\nnewlines ", ""]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert hf.encode(s, add_special_tokens=False) == ids
        assert hf.encode(s) == ids  # nothing is added around a sequence
        assert hf.decode(ids) == s
    assert hf.eos_token_id == 0
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                  tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_bytes_per_token(tmp_path, tok_dir, tok):
    text = ["Plain ASCII text about a university and a company."]
    # with no merges every byte is one token
    bare = train_bpe(CORPUS, 256 + len(SPECIAL_TOKENS), tmp_path / "bare")
    assert bytes_per_token(bare, text) == 1.0
    bpt = bytes_per_token(tok_dir, text)
    assert bpt == len(text[0].encode()) / len(tok.encode(text[0]).ids)
    assert bpt > 1.5
    assert bytes_per_token(tok, text) == bpt  # any object with .encode works too


def test_bad_parameters(tmp_path):
    with pytest.raises(LLMLabError, match="vocab size 258 is too small"):
        train_bpe(CORPUS, 258, tmp_path / "t")
    with pytest.raises(LLMLabError, match="empty corpus"):
        train_bpe([], 300, tmp_path / "t")
    assert not (tmp_path / "t").exists()
