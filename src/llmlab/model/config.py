"""ModelConfig: every architecture choice of the transformer, and its mapping to Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.errors import LLMLabError


class ConfigError(LLMLabError, ValueError):
    """A config.json that llmlab cannot represent."""


# MoE settings Hugging Face's Mixtral config has no key for (Switch routing, expert capacity), written under
# llmlab's own names in config.json
LLMLAB_MOE_KEYS = ("llmlab_moe_normalize_topk", "llmlab_moe_capacity_factor")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 512  # width of the residual stream
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention; 1: multi-query
    head_dim: int | None = None  # defaults to dim // n_heads
    hidden_dim: int = 1376  # feed-forward inner width (per expert for MoE)
    max_seq_len: int = 2048
    # positions
    pos_embedding: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling: {"rope_type": "linear"|"yarn"|"llama3", "factor": ...}
    # blocks
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    # Mixture-of-Experts feed-forward (n_experts == 0: dense)
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_normalize_topk: bool = True  # renormalise the top-k router probabilities (Mixtral); False: Switch
    moe_capacity_factor: float = 0.0  # 0: no capacity limit; else tokens past capacity skip that expert
    moe_aux_loss_coef: float = 0.01
    # token ids that matter to the model family (the tokenizer owns the rest)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # which Hugging Face family this config came from / will be written as
    hf_model_type: str = "llama"
    extra_hf: dict = field(default_factory=dict)  # HF fields we do not model, kept for the round trip

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.pos_embedding not in ("rope", "learned"):
            raise ConfigError(f"pos_embedding must be 'rope' or 'learned', not {self.pos_embedding!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"mlp must be 'swiglu' or 'gelu', not {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"norm must be 'rmsnorm' or 'layernorm', not {self.norm!r}")
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ConfigError("n_experts_per_token must be between 1 and n_experts")

    # ---- parameter counting -------------------------------------------------

    def n_params(self, include_embeddings: bool = True) -> int:
        d, h = self.dim, self.hidden_dim
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += d
        mats = 3 if self.mlp == "swiglu" else 2
        ffn = mats * d * h + (h * (mats - 1) + d if self.mlp_bias else 0)
        if self.n_experts:
            ffn = self.n_experts * ffn + d * self.n_experts
        norm = d * (2 if self.norm == "layernorm" else 1)
        per_layer = attn + ffn + 2 * norm
        total = self.n_layers * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.pos_embedding == "learned":
                total += self.max_seq_len * d
        return total

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- Hugging Face config.json -----------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type", "")
        if model_type == "gpt2":
            return cls(
                vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                hidden_dim=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf["n_positions"],
                pos_embedding="learned", mlp="gelu", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"), hf_model_type="gpt2",
            )
        if model_type not in ("llama", "mistral", "qwen2", "mixtral"):
            raise ConfigError(
                f"unsupported model_type {model_type!r} in config.json "
                "(llmlab reads llama, mistral, qwen2, mixtral and gpt2)")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {act!r} for {model_type} (expected silu)")
        rope = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] not in ("linear", "llama3", "yarn"):
                raise ConfigError(f"unsupported rope scaling {scaling['rope_type']!r} (llmlab: linear, yarn, llama3; "
                                  "for dynamic NTK load with --rope-scaling ntk:FACTOR, see llmlab.model.rope)")
            if scaling["rope_type"] == "yarn":
                scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        n_heads = hf["num_attention_heads"]
        known = {
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta", "rope_scaling",
            "rope_parameters", "rms_norm_eps", "attention_bias", "mlp_bias", "tie_word_embeddings",
            "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "bos_token_id", "eos_token_id",
            "pad_token_id", "model_type", "architectures", "hidden_act", "torch_dtype", "dtype",
            "transformers_version", *LLMLAB_MOE_KEYS,
        }
        # keep unknown fields for the round trip, but not in-memory artefacts or a quantization that we undid
        extra = {k: v for k, v in hf.items()
                 if k not in known and not k.startswith("_") and k not in ("quantization_config", "id2label", "label2id")}
        attention_bias = hf.get("attention_bias", model_type == "qwen2")
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim"),
            hidden_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta), rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=bool(attention_bias), o_bias=bool(attention_bias) and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            n_experts=hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            n_experts_per_token=hf.get("num_experts_per_tok", 2),
            moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01),
            moe_normalize_topk=bool(hf.get("llmlab_moe_normalize_topk", True)),
            moe_capacity_factor=float(hf.get("llmlab_moe_capacity_factor", 0.0)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"), hf_model_type=model_type, extra_hf=extra,
        )

    def to_hf(self) -> dict:
        tokens = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                  "pad_token_id": self.pad_token_id}
        if self.hf_model_type == "gpt2" or self.pos_embedding == "learned":
            if not (self.mlp == "gelu" and self.norm == "layernorm" and self.n_experts == 0):
                raise ConfigError("learned positions are written as GPT-2, which needs a GELU MLP and LayerNorm")
            return {
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab_size,
                "n_embd": self.dim, "n_layer": self.n_layers, "n_head": self.n_heads, "n_inner": self.hidden_dim,
                "n_positions": self.max_seq_len, "n_ctx": self.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": self.norm_eps, "tie_word_embeddings": self.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **tokens,
            }
        if self.mlp != "swiglu" or self.norm != "rmsnorm":
            raise ConfigError("a RoPE model is written in the Llama family, which needs SwiGLU and RMSNorm")
        model_type = self.hf_model_type
        if self.n_experts:
            model_type = "mixtral"
        elif model_type == "mixtral":
            model_type = "llama"
        if model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            model_type = "llama"
        if model_type in ("mistral", "mixtral") and (self.qkv_bias or self.o_bias or self.mlp_bias):
            model_type = "llama"
        if model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ConfigError("the Llama family has one attention_bias flag: qkv_bias and o_bias must agree")
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mixtral": "MixtralForCausalLM"}[model_type]
        hf = dict(self.extra_hf)
        hf.update({
            "architectures": [arch], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": self.tie_embeddings, **tokens,
        })
        if model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        if model_type == "mixtral":
            hf.update(num_local_experts=self.n_experts, num_experts_per_tok=self.n_experts_per_token,
                      router_aux_loss_coef=self.moe_aux_loss_coef)
            # Mixtral has no key for these: llmlab's own keys, which transformers keeps but does not use
            # (its Mixtral always renormalises and has no capacity, so it computes such a model differently)
            hf.update(llmlab_moe_normalize_topk=self.moe_normalize_topk,
                      llmlab_moe_capacity_factor=self.moe_capacity_factor)
        return hf

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        try:
            return cls.from_hf(hf)
        except KeyError as e:
            raise ConfigError(f"{file} lacks the field {e.args[0]!r}") from None
