"""Train a byte-level BPE tokenizer (with the `tokenizers` library) and save it as a Hugging Face tokenizer directory."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.io import new_temp_dir, replace_dir

# Reserved first, so they get ids 0, 1, 2. <|endoftext|> ends every pretraining document; chat turns are
# wrapped in <|im_start|>role ... <|im_end|> (ChatML), so a chat model stops generating at <|im_end|>.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The Llama 3 pre-tokenization split (a refinement of GPT-2's): contractions, words with at most one leading
# non-letter, numbers in groups of up to three digits, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer_config(model_max_length: int = 2048) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # documents are separated by <|endoftext|> at their end; nothing is prepended
        "eos_token": "<|endoftext|>",  # end of a pretraining document; chat turns end with <|im_end|>
        "pad_token": "<|endoftext|>",
        "unk_token": None,  # byte-level: every string is representable, there is no unknown token
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back exactly the text that was encoded
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2,
              model_max_length: int = 2048) -> Path:
    """Learn `vocab_size` tokens (256 bytes + 3 special tokens + merges) from `texts`; write tokenizer.json and
    tokenizer_config.json into `out_dir` (replaced atomically). Returns `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise LLMLabError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {minimum} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")

    tok = Tokenizer(models.BPE())
    # Split text with the regex first (merges never cross those boundaries), then map every byte to a printable
    # character (the GPT-2 byte-to-unicode table) so BPE works on bytes and any Unicode string round-trips.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones absent from the corpus
        show_progress=False,
    )

    seen = 0

    def counted(it):
        nonlocal seen
        for t in it:
            if t:
                seen += 1
                yield t

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen == 0:
        raise LLMLabError("cannot train a tokenizer on an empty corpus")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))

    out_dir = Path(out_dir)
    tmp = new_temp_dir(out_dir)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(build_tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    replace_dir(tmp, out_dir)
    return out_dir


def _encoder(tokenizer):
    """A function text -> list of ids, from a tokenizer.json path, a directory holding one, or any object with
    .encode (a `tokenizers.Tokenizer`, an llmlab or transformers tokenizer)."""
    if isinstance(tokenizer, (str, Path)):
        from tokenizers import Tokenizer

        p = Path(tokenizer)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise LLMLabError(f"tokenizer not found: {p}")
        tokenizer = Tokenizer.from_file(str(p))

    def encode(text: str) -> list[int]:
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
        return list(getattr(out, "ids", out))

    return encode


def bytes_per_token(tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher = the tokenizer compresses this kind of text better)."""
    encode = _encoder(tokenizer)
    n_bytes = n_tokens = 0
    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        n_tokens += len(encode(t))
    if n_tokens == 0:
        raise LLMLabError("bytes per token: no text to measure")
    return n_bytes / n_tokens
