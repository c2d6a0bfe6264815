"""Plain helpers shared by several test modules: tiny checkpoints, JSONL files, tiny GGUF tokenizers, CLI args."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch


class ByteTokenizer:
    """The smallest tokenizer the engine accepts: ids are bytes, nothing stops generation."""

    stop_token_ids = set()

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def decode_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """fp32 logits before each of tokens, computed as the engine does eagerly: the prompt in one call, then
    one token at a time through a KV cache."""
    cache = model.new_cache(1, len(prompt) + len(tokens))
    with torch.no_grad():
        rows = [model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)[0, -1]]
        for i, t in enumerate(tokens[:-1]):
            rows.append(model(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache)[0, -1])
    return torch.stack(rows).float()


def assert_greedy_up_to_ties(reference_logits: torch.Tensor, token_ids: list[int], margin: float):
    """Each token is the greedy choice of reference_logits (one row per token), or within margin of it.

    Two code paths (batched or alone, compiled or eager, llmlab or transformers) round differently, by up to
    about the tolerance their logits are compared with; where the two best logits are closer than that, either
    may win, so exact token equality fails by chance on another CPU. margin is twice that tolerance.
    """
    rows = reference_logits[:len(token_ids)].float()
    chosen = rows[torch.arange(len(token_ids)), torch.tensor(token_ids)]
    short = rows.max(-1).values - chosen
    assert (short <= margin).all(), f"token {int(short.argmax())} is {short.max().item():.2e} below the greedy choice"


def make_tiny_chat_checkpoint(root: Path, seed: int = 0, vocab: int = 400, dim: int = 64) -> Path:
    """A tiny random Llama with a ChatML BPE tokenizer trained on task texts, saved as an HF directory."""
    from llmlab.checkpoint.hf import save_hf_dir
    from llmlab.model import ModelConfig, Transformer
    from llmlab.tokenizer import Tokenizer
    from llmlab.tokenizer.train import train_bpe
    from llmlab.train import tasks

    texts = [m["content"] for r in tasks.sft_conversations(tasks.make_tasks("all", 400, seed=99))
             for m in r["messages"]]
    tok_dir = train_bpe(texts, vocab, root / "tok", min_frequency=1)
    tokenizer = Tokenizer.from_dir(tok_dir)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=dim, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=256,
                      eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    model = Transformer(cfg).init_weights(seed=seed)
    return save_hf_dir(model, root / "model", tokenizer=tokenizer)


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_args(ckpt, data, out, *extra):
    """`llmlab sft` arguments for a few fast fp32 steps on one thread."""
    return ["sft", str(ckpt), str(data), "--out-dir", str(out), "--seq-len", "128", "--micro-batch", "4",
            "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "2", "--no-progress", "--dtype", "float32",
            "--threads", "1", "--peak-flops", "1e12", *extra]


# ---- a tiny GGUF tokenizer: a real byte-level BPE with llama.cpp's special tokens in front ----------------

CORPUS = ["the quick brown fox jumps over the lazy dog 1234567", "hello hello world, it's 2024!\n\n  indented",
          "ünïcödé text and more text"] * 20
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def tiny_backend(pre=None):
    """A small byte-level BPE, trained for real, with the GGUF special tokens in front."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre or pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer_gguf(path, model="gpt2", pre="llama-bpe", add_bos=True, arch="llama"):
    """A GGUF holding only the tiny BPE tokenizer (and a dummy embedding); returns its token list."""
    spec = json.loads(tiny_backend().to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{{ '<|eot_id|>' }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@contextmanager
def running_arena(llms: dict, db, seed=0):
    """An arena server (`llmlab arena serve`) over llms ({name: LLM}) on a free local port, votes in db; yields its
    base URL."""
    from llmlab.serve.app import create_app
    from llmlab.serve.routes_arena import install_arena
    from llmlab.serve.state import ServerOptions
    from llmlab.serve.testing import serving

    first = next(iter(llms))
    options = ServerOptions(model_name=first, max_batch=2, max_len=512, db=str(db))
    app = create_app(llms[first], options)
    install_arena(app, llms, options, seed=seed)
    with serving(app) as url:
        yield url


def arena_battle(client, prompt="Hi", max_tokens=8, seed=None):
    """Run one arena battle over HTTP (an httpx client on the arena's URL); returns its id and the streamed texts.
    Fails if any event names a model before the vote."""
    texts, battle_id = {"a": "", "b": ""}, None
    with client.stream("POST", "/arena/battle", json={"messages": [{"role": "user", "content": prompt}],
                                                      "max_tokens": max_tokens, "seed": seed}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                assert "model_a" not in data and "error" not in data
                if "side" in data:
                    texts[data["side"]] += data["delta"]
                battle_id = data.get("battle_id", battle_id)
    return battle_id, texts
