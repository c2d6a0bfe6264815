"""A green-list watermark (Kirchenbauer et al. 2023): bias generation towards a keyed pseudo-random "green" share of
the vocabulary, then detect the bias in a text with a one-sided z-test, without the model.

At each step a pseudo-random function of the key, the last tokens and the candidate token marks a share gamma of
the vocabulary green, and delta is added to the green tokens' logits before sampling. A text of T scored tokens
holds about gamma*T green tokens by chance; a watermarked one many more: z = (G - gamma*T) / sqrt(T*gamma*(1-gamma)).

Two seeding schemes:
- "lefthash": the green list depends on the previous `context_width` tokens (h = 1 is the paper's main setting);
- "selfhash" (Kirchenbauer et al. 2023b, "On the reliability of watermarks"): anchored min-hash over a window of
  `context_width` tokens that includes the candidate itself; only the smallest token hash in the window and the
  previous token decide, so an edit elsewhere in the window rarely changes the list (more robust to edits).

The hash is a keyed 32-bit integer mix (murmur3's finaliser), fast enough to mark the whole vocabulary at every
step; it is not a cryptographic PRF. Detection needs the same key, scheme, gamma, context width and tokenizer:
with a wrong key the green share is gamma by chance and z is about 0 (a plain text cannot tell a wrong key from
no watermark). A record written by `watermark_record` carries a key fingerprint and the tokenizer's hash, and
detecting it with another key or tokenizer is refused with one clear error.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from llmlab.errors import LLMLabError

SCHEMES = ("lefthash", "selfhash")
MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 in int64 without overflow: multiply by c's two 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values < 2**32: every input bit moves every output bit."""
    x = x & MASK32
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def key_to_int(key: str) -> int:
    if not isinstance(key, str) or not key:
        raise LLMLabError("a watermark key must be a non-empty string")
    return int.from_bytes(hashlib.sha256(f"llmlab-watermark:{key}".encode()).digest()[:4], "big")


def key_fingerprint(key: str) -> str:
    """A short public hash of the key (another domain than key_to_int): records carry it so that a detection with
    another key is refused. It helps guess a weak key offline: use a long random key where that matters."""
    return hashlib.sha256(f"llmlab-watermark-fingerprint:{key}".encode()).hexdigest()[:12]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend", None)
    data = backend.to_str() if backend is not None else repr(tokenizer)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WatermarkConfig:
    key: str
    gamma: float = 0.25  # the green share of the vocabulary
    delta: float = 2.0  # added to green logits
    context_width: int = 1  # h: previous tokens (lefthash), or the window including the candidate (selfhash)
    scheme: str = "lefthash"

    def __post_init__(self):
        key_to_int(self.key)
        if not 0 < self.gamma < 1:
            raise LLMLabError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        if not 0 <= self.delta <= 50:
            raise LLMLabError(f"watermark delta must be in [0, 50], got {self.delta}")
        if not isinstance(self.context_width, int) or not 1 <= self.context_width <= 16:
            raise LLMLabError(f"watermark context width must be an integer in 1..16, got {self.context_width}")
        if self.scheme not in SCHEMES:
            raise LLMLabError(f"unknown watermark scheme {self.scheme!r} (one of {', '.join(SCHEMES)})")

    @property
    def needs(self) -> int:
        """Tokens of context before a position can be marked or scored."""
        return self.context_width if self.scheme == "lefthash" else max(1, self.context_width - 1)

    def public(self) -> dict:
        """The settings without the key (what a record may show)."""
        d = asdict(self)
        d.pop("key")
        d["key_fingerprint"] = key_fingerprint(self.key)
        return d


class GreenList:
    """green(context, candidates): which candidate tokens are green after `context` (a list of token ids)."""

    def __init__(self, config: WatermarkConfig):
        self.config = config
        self.key = key_to_int(config.key)
        self._token_hash = None  # mix(key ^ token) for every token id, built on first use

    def token_hash(self, n: int) -> torch.Tensor:
        if self._token_hash is None or len(self._token_hash) < n:
            self._token_hash = mix32(torch.arange(max(n, 1), dtype=torch.int64) ^ self.key)
        return self._token_hash

    def green(self, context: list[int], candidates: torch.Tensor) -> torch.Tensor:
        """Bool mask over candidates (int64 ids); context holds at least config.needs tokens."""
        cfg = self.config
        hashes = self.token_hash(int(candidates.max()) + 1 if len(candidates) else 1)
        cand_hash = hashes[candidates]
        if cfg.scheme == "lefthash":
            seed = self.key
            for t in context[-cfg.context_width:]:
                seed = int(mix32(torch.tensor(seed ^ t)))  # order-sensitive hash of the h previous tokens
            seeds = torch.full_like(cand_hash, seed)
        else:
            window = context[-(cfg.context_width - 1):] if cfg.context_width > 1 else []
            prev_min = min((int(mix32(torch.tensor(self.key ^ t))) for t in window), default=MASK32)
            anchor = int(mix32(torch.tensor(self.key ^ context[-1] ^ 0x9E3779B9)))
            seeds = mix32(torch.minimum(cand_hash, torch.tensor(prev_min)) ^ anchor)
        value = mix32(seeds ^ cand_hash)
        return value < int(cfg.gamma * 2 ** 32)


class WatermarkProcessor:
    """A logits processor for SamplingParams.logits_processors: adds delta to the green tokens' logits."""

    def __init__(self, config: WatermarkConfig):
        self.config = config
        self.greens = GreenList(config)

    def __call__(self, context: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(context) < self.config.needs:
            return logits
        V = logits.shape[-1]
        green = self.greens.green(context, torch.arange(V, dtype=torch.int64)).to(logits.device)
        return logits + self.config.delta * green.to(logits.dtype)


def z_score(green: int, total: int, gamma: float) -> float:
    """One-proportion z statistic of `green` successes in `total` trials against the null share gamma."""
    if total <= 0:
        raise LLMLabError("no tokens to test for a watermark")
    return (green - gamma * total) / math.sqrt(total * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """One-sided: P(Z >= z) under the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def detect_ids(ids: list[int], config: WatermarkConfig, ignore_repeated: bool = True) -> dict:
    """Count green tokens in a token sequence. ignore_repeated scores each (context, token) n-gram once: repeated
    text would otherwise count the same coin toss many times and inflate |z| (Kirchenbauer et al. 2023b)."""
    greens = GreenList(config)
    seen, flags = set(), []
    green = total = 0
    for i in range(config.needs, len(ids)):
        window = tuple(ids[i - config.needs:i + 1])
        if ignore_repeated and window in seen:
            flags.append(None)
            continue
        seen.add(window)
        g = bool(greens.green(ids[:i], torch.tensor([ids[i]]))[0])
        flags.append(g)
        green += g
        total += 1
    if total == 0:
        raise LLMLabError(f"the text is too short to test for a watermark: it needs more than {config.needs} tokens")
    z = z_score(green, total, config.gamma)
    return {"tokens": len(ids), "scored": total, "green": green, "green_fraction": green / total, "z": z,
            "p_value": p_value(z), "flags": flags, **config.public()}


def detect(text: str, tokenizer, config: WatermarkConfig, ignore_repeated: bool = True) -> dict:
    """z-score and p-value of a text (tokenized by the generating model's tokenizer) under the key."""
    return detect_ids(tokenizer.encode(text), config, ignore_repeated)


def watermark_record(text: str, tokenizer, config: WatermarkConfig) -> dict:
    """A text with what detection needs to check it is using the right key and tokenizer (not the key itself)."""
    return {"text": text, "watermark": {**config.public(), "tokenizer": tokenizer_fingerprint(tokenizer)}}


def check_record(meta: dict, tokenizer, config: WatermarkConfig) -> WatermarkConfig:
    """Refuse a detection whose key or tokenizer differ from the record's; the record's other settings win."""
    fp = meta.get("key_fingerprint")
    if fp is not None and fp != key_fingerprint(config.key):
        raise LLMLabError(f"watermark key mismatch: the text was marked with the key whose fingerprint is {fp}, "
                          f"the given key's is {key_fingerprint(config.key)}")
    tk = meta.get("tokenizer")
    if tk is not None and tk != tokenizer_fingerprint(tokenizer):
        raise LLMLabError(f"tokenizer mismatch: the text was marked with tokenizer {tk}, this model's is "
                          f"{tokenizer_fingerprint(tokenizer)}; detect it with the model that generated it (--model)")
    return WatermarkConfig(config.key, meta.get("gamma", config.gamma), meta.get("delta", config.delta),
                           meta.get("context_width", config.context_width), meta.get("scheme", config.scheme))


def install(llm, config: WatermarkConfig) -> WatermarkProcessor:
    """Watermark everything an in-process LLM samples from now on (the CLI, the Python API, the server): the
    processor joins the model's sampling defaults, which every request starts from."""
    if not hasattr(llm, "sampling_defaults"):
        raise LLMLabError("a watermark needs an in-process model: an endpoint samples on its own server "
                          "(start it with `llmlab serve --watermark KEY`)")
    processor = WatermarkProcessor(config)
    llm.sampling_defaults["logits_processors"] = [processor]
    return processor


# ---- generation and the audit card's section ----------------------------------------------------------------------

PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how a bicycle works to a ten-year-old.", "Describe a busy market in a city you like.",
           "Write a letter to a friend about your last holiday.", "What makes a good teacher? Give several reasons.",
           "Tell the history of the printing press in a few paragraphs.",
           "Write a product review of a pair of running shoes.", "Describe your ideal weekend, hour by hour.",
           "Explain why the sky is blue and why sunsets are red.", "Write a speech for a school graduation.",
           "Describe how to plan a vegetable garden.", "Write a news report about a new public library opening."]


class SuppressTokens:
    """A logits processor that forbids some tokens (e.g. the stop tokens, to get texts of a fixed length, as the
    paper's T = 200 tokens)."""

    def __init__(self, ids):
        self.ids = sorted(set(ids))

    def __call__(self, context, logits):
        logits = logits.clone()
        logits[..., self.ids] = float("-inf")
        return logits


def sample(llm, prompts: list[str], config: WatermarkConfig | None, max_new_tokens: int = 200,
           temperature: float = 1.0, seed: int = 0, top_p: float = 1.0, fixed_length: bool = True):
    """Chat completions of the prompts, watermarked under config (None: plain), through the one sampler; with
    fixed_length the stop tokens are suppressed so each answer has max_new_tokens tokens."""
    from llmlab.engine import SamplingParams
    processors = [SuppressTokens(llm.tokenizer.stop_token_ids)] if fixed_length else []
    if config is not None:
        processors.append(WatermarkProcessor(config))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            logits_processors=processors)
    return llm.engine.generate([llm.prompt_ids(p) for p in prompts], params)


def audit_section(llm_or_client, budget: str = "small", out_dir=None) -> dict:
    """Watermark strength on this model: z of watermarked and plain answers (gamma 0.25, delta 2, lefthash h=1),
    the detection rate at z > 4 with Wilson intervals, and a plot of z by text. Needs an in-process model."""
    from llmlab.safety.perplexity import _local_llm
    from llmlab.safety.stats import bootstrap_mean_interval, wilson_interval
    title = "Watermark (Kirchenbauer et al. 2023)"
    llm = _local_llm(llm_or_client)
    if llm is None:
        return {"title": title, "markdown": "Not measured: the watermark lives in llmlab's sampler, so it needs an "
                "in-process model (or a server started with `llmlab serve --watermark KEY`).", "data": {}, "plots": []}
    n, length = (4, 100) if budget == "small" else (12, 200)
    config = WatermarkConfig("audit-key")
    prompts = PROMPTS[:n]
    zs = {}
    for name, cfg in (("watermarked", config), ("plain", None)):
        done = sample(llm, prompts, cfg, length, temperature=1.0, seed=0)
        zs[name] = [detect_ids(c.token_ids, config)["z"] for c in done]
    hit = sum(z > 4 for z in zs["watermarked"])
    false = sum(z > 4 for z in zs["plain"])
    data = {"config": config.public(), "tokens": length, "z": zs,
            "detected": {"rate": hit / n, "ci": wilson_interval(hit, n)},
            "false_positive": {"rate": false / n, "ci": wilson_interval(false, n)}}
    lo, hi = data["detected"]["ci"]
    flo, fhi = data["false_positive"]["ci"]
    data["mean_z_ci95"] = {k: bootstrap_mean_interval(v) for k, v in zs.items()}
    cell = {k: f"{np.mean(v):.2f} [{data['mean_z_ci95'][k][0]:.2f}, {data['mean_z_ci95'][k][1]:.2f}]"
            for k, v in zs.items()}
    markdown = (f"gamma {config.gamma}, delta {config.delta}, {config.scheme} h={config.context_width}; {n} answers of "
                f"{length} tokens at temperature 1. The paper (OPT-1.3B, T = 200): z > 4 detects with a false-positive "
                f"rate of 3e-5.\n\n| | mean z [95% bootstrap] | z > 4 (95% Wilson) |\n|---|---|---|\n"
                f"| watermarked | {cell['watermarked']} | {hit}/{n} [{lo:.2f}, {hi:.2f}] |\n"
                f"| plain | {cell['plain']} | {false}/{n} [{flo:.2f}, {fhi:.2f}] |\n")
    plots = [_z_plot(zs, out_dir)]
    return {"title": title, "markdown": markdown, "data": data, "plots": plots}


def save_plot(fig, out_dir, name: str) -> str:
    """Write a matplotlib figure atomically as out_dir/name (a fresh temporary directory when out_dir is None)."""
    import tempfile
    from pathlib import Path

    import matplotlib.pyplot as plt
    out = Path(out_dir or tempfile.mkdtemp(prefix="llmlab-safety-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".tmp" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def _z_plot(zs: dict, out_dir) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for i, (name, values) in enumerate(zs.items()):
        ax.scatter([i] * len(values), values, label=name)
    ax.axhline(4, color="gray", ls=":", label="z = 4")
    ax.set_xticks(range(len(zs)), list(zs))
    ax.set_ylabel("z")
    ax.set_title("Watermark detection z per answer")
    fig.tight_layout()
    return save_plot(fig, out_dir, "watermark_z.png")
