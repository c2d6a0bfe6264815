"""Tokenizer: a thin wrapper over Hugging Face `tokenizers` (byte-level BPE) plus chat templates.

It loads from a Hugging Face checkpoint directory (tokenizer.json + tokenizer_config.json), or wraps any
`tokenizers` backend (llmlab.checkpoint.gguf builds one from a GGUF file's metadata), and saves back to the
Hugging Face layout so transformers can read it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text

# Tokens that end a turn in the common chat formats; whichever exist in a vocabulary stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "</s>", "<end_of_turn>")


def _token_str(tok) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as a serialised AddedToken."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None,
                 add_bos: bool = False, model_max_length: int | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos = add_bos  # whether the file asks for BOS in front of every sequence
        self.model_max_length = model_max_length
        self._compiled_template = None

    # ---- loading -----------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a Hugging Face checkpoint directory (fast tokenizers only: tokenizer.json)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise LLMLabError(f"{path} has no tokenizer.json (llmlab reads Hugging Face 'fast' tokenizers only)")
        try:
            backend = BackendTokenizer.from_file(str(file))
        except Exception as e:
            raise LLMLabError(f"{file} is not a valid tokenizer.json: {e}") from None
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (path / name).is_file():
                try:
                    config.update(json.loads((path / name).read_text()))
                except json.JSONDecodeError as e:
                    raise LLMLabError(f"{path / name} is not valid JSON: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():  # newer transformers write the template on its own
            template = (path / "chat_template.jinja").read_text()
        max_len = config.get("model_max_length")
        return cls(
            backend, bos_token=_token_str(config.get("bos_token")), eos_token=_token_str(config.get("eos_token")),
            pad_token=_token_str(config.get("pad_token")), unk_token=_token_str(config.get("unk_token")),
            chat_template=template, add_bos=bool(config.get("add_bos_token", False)),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
        )

    # ---- encoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special tokens written in the text (e.g. <|im_start|>) become their single id;
        add_special_tokens adds what the tokenizer puts around every sequence (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def stop_token_ids(self) -> set[int]:
        """Ids that end generation: EOS plus the end-of-turn tokens of common chat formats found in the vocab."""
        ids = {self._id(t) for t in (self.eos_token, *END_OF_TURN_TOKENS)}
        ids.discard(None)
        return ids

    # ---- chat --------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: a chat (list of messages) or a user message rendered with the chat template,
        or the text as is when raw=True or there is no template."""
        if isinstance(prompt, str) and (raw or not self.chat_template):
            return self.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation with the model's Jinja2 chat template, exactly as transformers does."""
        if not self.chat_template:
            raise LLMLabError("this tokenizer has no chat template; use a chat/instruct model or plain prompts")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "",
                **kwargs)
        except Exception as e:
            raise LLMLabError(f"chat template failed: {e}") from None

    # ---- saving ------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (each atomically) so transformers' AutoTokenizer loads it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": self.unk_token, "add_bos_token": self.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length or int(1e30),
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _compile_template(source: str):
    """Compile a chat template in the environment transformers uses: sandboxed, trim/lstrip blocks, helpers."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for training masks; render it as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates want plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LLMLabError(f"invalid chat template: {e}") from None
