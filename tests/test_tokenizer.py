"""Tokenizer: GGUF and HF-directory loading agree with transformers; chat templates; save/load round trip."""

import pytest

from llmlab.checkpoint.gguf import tokenizer_from_gguf
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer
from helpers import tiny_backend, write_tokenizer_gguf

TEXTS = [
    "Hello world!",
    "12345 678 3.14159 and 1,000,000 dollars in 2024",
    "naïve café — 日本語のテキスト 😀🎉 👩‍👩‍👧",
    "def f(x):\n    return x**2  # square\n\n\n\tindented\ttabs",
    "   lots   of\t\twhitespace \n\n  \r\n trailing   ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "I'm 'quoted' don't they'll WE'VE",
    "ÅÄÖ ß ∑ ∫ ≠ \u200b zero-width, Ελληνικά, русский, עברית, العربية",
    "<|endoftext|>text after<|im_end|>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "  spaces \n and newlines \n"}, {"role": "assistant", "content": "ok 😀"}],
]


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smol_tok(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_gguf_tokenizer_encodes_like_transformers(smol_tok, hf_smol_tok):
    for text in TEXTS:
        ids = smol_tok.encode(text)
        assert ids == hf_smol_tok.encode(text, add_special_tokens=False), text
        assert smol_tok.decode(ids) == text
        assert smol_tok.decode(ids, skip_special_tokens=True) == hf_smol_tok.decode(ids, skip_special_tokens=True)
    assert smol_tok.vocab_size == len(hf_smol_tok)


def test_special_tokens_and_ids(smol_tok, hf_smol_tok):
    ids = smol_tok.encode("<|im_start|>user")
    assert ids[0] == smol_tok.token_to_id("<|im_start|>") and smol_tok.decode(ids[1:]) == "user"
    assert smol_tok.bos_token_id == hf_smol_tok.bos_token_id
    assert smol_tok.eos_token_id == hf_smol_tok.eos_token_id
    assert smol_tok.pad_token_id == hf_smol_tok.pad_token_id
    assert smol_tok.eos_token == "<|im_end|>"
    assert smol_tok.stop_token_ids == {smol_tok.token_to_id("<|im_end|>"), smol_tok.token_to_id("<|endoftext|>")}
    assert smol_tok.id_to_token(smol_tok.token_to_id("<|im_end|>")) == "<|im_end|>"
    assert smol_tok.token_to_id("<|not a token|>") is None


def test_chat_template_matches_transformers(smol_tok, hf_smol_tok):
    assert smol_tok.chat_template == hf_smol_tok.chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = smol_tok.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_smol_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs


def test_chat_template_helpers():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
                         "{% endif %}{{ bos_token }}{{ m | tojson }}\n{% endfor %}")
    text = tok.apply_chat_template([{"role": "user", "content": "é<b>"}])
    assert text == '<s>{"role": "user", "content": "é<b>"}\n'
    with pytest.raises(LLMLabError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    # the sandbox refuses access to Python internals
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    tok._compiled_template = None
    with pytest.raises(LLMLabError):
        tok.apply_chat_template([])


def test_no_chat_template_is_a_clear_error():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(LLMLabError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_save_loads_in_transformers_and_back(smol_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol_tok.save(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        ids = smol_tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.encode(text) == ids  # no BOS for SmolLM2, in both
        assert back.encode(text) == ids
        assert hf.decode(ids) == smol_tok.decode(ids)
    assert hf.eos_token == back.eos_token == smol_tok.eos_token
    assert hf.bos_token == back.bos_token == smol_tok.bos_token
    assert hf.pad_token_id == back.pad_token_id == smol_tok.pad_token_id
    for messages in CONVERSATIONS:
        assert (back.apply_chat_template(messages)
                == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == smol_tok.apply_chat_template(messages))


def test_from_dir_reads_separate_chat_template_file(tmp_path):
    tok = tiny_tokenizer()
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    back = Tokenizer.from_dir(tmp_path)
    assert back.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_from_dir_errors(tmp_path):
    with pytest.raises(LLMLabError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LLMLabError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---- tiny GGUF tokenizers: llama-bpe pre-tokenizer, BOS, unsupported models ------------------------------

def tiny_tokenizer():
    from tokenizers import decoders
    backend = tiny_backend()
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_token="<s>", eos_token="<|end_of_text|>")


def test_llama_bpe_gguf_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    write_tokenizer_gguf(path, pre="llama-bpe", add_bos=False)
    ours = tokenizer_from_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # (transformers' GPT2Tokenizer appends its default "<|endoftext|>" to a vocabulary lacking it; skip that text)
    for text in [t for t in TEXTS if "<|endoftext|>" not in t] + ["<|begin_of_text|>hi<|eot_id|>", "a 1234567 b"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    assert ours.stop_token_ids == {ours.token_to_id("<|end_of_text|>"), ours.token_to_id("<|eot_id|>")}
    # llama-bpe splits digits in runs of up to three, unlike GPT-2's split
    digits = [ours.decode([i]) for i in ours.encode("1234567")]
    assert all(len(d) <= 3 for d in digits)


def test_gguf_add_bos_token(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tokenizer_gguf(path, add_bos=True)
    tok = tokenizer_from_gguf(path)
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.bos_token_id == bos
    assert tok.encode("hello", add_special_tokens=True) == [bos] + tok.encode("hello")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi<|eot_id|>"
    # saved, transformers adds the BOS too, and llmlab reads it back the same
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    back = Tokenizer.from_dir(tmp_path / "saved")
    for text in ("hello world", "<|eot_id|>x"):
        assert hf.encode(text) == back.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, model="llama")
    with pytest.raises(LLMLabError, match="unsupported GGUF tokenizer 'llama'"):
        tokenizer_from_gguf(path)
