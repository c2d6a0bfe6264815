"""Read and write Hugging Face checkpoint directories (config.json + safetensors), the interface between stages.

Inside llmlab every model uses the Llama parameter names. Llama, Mistral and Qwen2 files load by name;
GPT-2 (fused, transposed Conv1D weights) and Mixtral (block_sparse_moe.*) are renamed here, both ways.
Pickled weights (.bin/.pt/.pth) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmlab.errors import LLMLabError
from llmlab.io import new_temp_dir, replace_dir
from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer, rope_inv_freq

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LLMLabError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def refuse_pickle(path: Path):
    raise LLMLabError(
        f"{path} is a pickle checkpoint, which llmlab never loads (unpickling can run arbitrary code); "
        "convert it once in a trusted environment, e.g. "
        "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`")


# ---- reading ------------------------------------------------------------------------------------------------


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("adapter_")]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise LLMLabError(f"{path}: shard {missing[0].name} named in the index is missing")
    if not files:
        pickles = [f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise LLMLabError(f"{path} has no model.safetensors")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    tensors[name] = st.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise LLMLabError(f"{f} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def from_hf_names(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> llmlab names (which are HF Llama's)."""
    if cfg.hf_model_type == "gpt2":
        return from_gpt2_names(sd, cfg)
    out = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = re.match(r"(model\.layers\.\d+)\.block_sparse_moe\.(.*)", name)
        if m:
            layer, rest = m.groups()
            rest = rest.replace("gate.weight", "router.weight")
            rest = re.sub(r"experts\.(\d+)\.w1", r"experts.\1.gate_proj", rest)
            rest = re.sub(r"experts\.(\d+)\.w2", r"experts.\1.down_proj", rest)
            rest = re.sub(r"experts\.(\d+)\.w3", r"experts.\1.up_proj", rest)
            name = f"{layer}.mlp.{rest}"
        m = re.match(r"(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$", name)
        if m and cfg.n_experts:  # transformers 5 in-memory fused expert layout
            layer, kind = m.groups()
            if kind == "gate.weight":
                out[f"{layer}.mlp.router.weight"] = t
            elif kind == "experts.gate_up_proj":
                for e, (gate, up) in enumerate(t.chunk(2, dim=1) for t in t.unbind(0)):
                    out[f"{layer}.mlp.experts.{e}.gate_proj.weight"] = gate
                    out[f"{layer}.mlp.experts.{e}.up_proj.weight"] = up
            else:
                for e, down in enumerate(t.unbind(0)):
                    out[f"{layer}.mlp.experts.{e}.down_proj.weight"] = down
            continue
        out[name] = t
    return out


def from_gpt2_names(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old causal-mask buffers
        if name == "lm_head.weight":
            out[name] = t
            continue
        if name.startswith(("wte.", "wpe.", "ln_f.")):
            new = {"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm"}
            out[new[name.split(".")[0]] + "." + name.split(".", 1)[1]] = t
            continue
        m = re.match(r"h\.(\d+)\.(\w+)\.(\w+)\.?(\w*)", name)
        if not m:
            raise LLMLabError(f"unexpected GPT-2 tensor {name!r}")
        layer, part, sub, kind = m.groups()
        prefix = f"model.layers.{layer}"
        if part in ("ln_1", "ln_2"):
            norm = "input_layernorm" if part == "ln_1" else "post_attention_layernorm"
            out[f"{prefix}.{norm}.{sub}"] = t
            continue
        # GPT-2's Conv1D stores weights as (in, out): transpose to nn.Linear's (out, in)
        t = t.t() if kind == "weight" else t
        if part == "attn" and sub == "c_attn":
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"{prefix}.self_attn.{proj}.{kind}"] = chunk.contiguous()
        elif part == "attn" and sub == "c_proj":
            out[f"{prefix}.self_attn.o_proj.{kind}"] = t.contiguous()
        elif part == "mlp":
            out[f"{prefix}.mlp.{'up_proj' if sub == 'c_fc' else 'down_proj'}.{kind}"] = t.contiguous()
        else:
            raise LLMLabError(f"unexpected GPT-2 tensor {name!r}")
    return out


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32, source="") -> Transformer:
    """A Transformer holding exactly these weights, built without a wasted random initialisation."""
    if cfg.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            detail.append(f"unexpected {sorted(unexpected)[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise LLMLabError(f"{source}: weights do not match config.json ({'; '.join(detail)})")
    for name, t in model.state_dict().items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(t.shape):
            raise LLMLabError(f"{source}: {name} has shape {tuple(state_dict[name].shape)}, "
                              f"config.json implies {tuple(t.shape)}")
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    return model.eval()


def load_hf_dir(path: str | Path, dtype: str | torch.dtype | None = None) -> Transformer:
    """The model of a Hugging Face directory (config.json + model.safetensors or shards)."""
    path = Path(path)
    if not path.exists():
        raise LLMLabError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        raise LLMLabError(f"{path} is a file; give a checkpoint directory or a .gguf file")
    if not (path / "config.json").exists():
        raise LLMLabError(f"{path} is not a checkpoint directory (no config.json)")
    cfg = ModelConfig.load(path)
    sd = from_hf_names(read_safetensors(safetensors_files(path)), cfg)
    if cfg.tie_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" not in sd:
        raise LLMLabError(f"{path}: no token embedding in the weights")
    if not cfg.tie_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        cfg.tie_embeddings = True  # some exports drop a tied head without saying so
    return build_model(cfg, sd, parse_dtype(dtype), source=str(path))


# ---- writing ------------------------------------------------------------------------------------------------


def to_hf_names(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    if cfg.pos_embedding == "learned":
        return to_gpt2_names(sd, cfg)
    out = {}
    for name, t in sd.items():
        m = re.match(r"(model\.layers\.\d+)\.mlp\.(router|experts)\.(.*)", name)
        if m:
            layer, kind, rest = m.groups()
            if kind == "router":
                name = f"{layer}.block_sparse_moe.gate.{rest}"
            else:
                e, proj, param = rest.split(".")
                w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
                name = f"{layer}.block_sparse_moe.experts.{e}.{w}.{param}"
        out[name] = t
    return out


def to_gpt2_names(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    top = {"model.embed_tokens": "transformer.wte", "model.embed_positions": "transformer.wpe",
           "model.norm": "transformer.ln_f"}
    for name, t in sd.items():
        base, param = name.rsplit(".", 1)
        if base in top:
            out[f"{top[base]}.{param}"] = t
        elif name == "lm_head.weight":
            out[name] = t
    for i in range(cfg.n_layers):
        p, h = f"model.layers.{i}", f"transformer.h.{i}"
        for param in ("weight", "bias"):
            out[f"{h}.ln_1.{param}"] = sd[f"{p}.input_layernorm.{param}"]
            out[f"{h}.ln_2.{param}"] = sd[f"{p}.post_attention_layernorm.{param}"]
            qkv = torch.cat([sd[f"{p}.self_attn.{x}_proj.{param}"] for x in "qkv"], dim=0)
            pairs = {"attn.c_attn": qkv, "attn.c_proj": sd[f"{p}.self_attn.o_proj.{param}"],
                     "mlp.c_fc": sd[f"{p}.mlp.up_proj.{param}"], "mlp.c_proj": sd[f"{p}.mlp.down_proj.{param}"]}
            for hf_name, t in pairs.items():
                out[f"{h}.{hf_name}.{param}"] = t.t() if param == "weight" else t
    return out


def save_hf_dir(model: Transformer, path: str | Path, dtype: str | torch.dtype = "float32", tokenizer=None,
                generation_config: dict | None = None) -> Path:
    """Write a checkpoint directory that transformers, vLLM and llmlab all open; atomically replaces `path`."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    cfg = model.config
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    sd = to_hf_names({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    sd = {k: v.to("cpu", dtype).contiguous() for k, v in sd.items()}
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    gen.update(generation_config or {})
    return write_checkpoint_dir(path, sd, hf_cfg, tokenizer, {"generation_config.json": gen})


def write_checkpoint_dir(path: str | Path, tensors: dict[str, torch.Tensor], hf_config: dict, tokenizer=None,
                         json_files: dict[str, dict] | None = None) -> Path:
    """Write model.safetensors, config.json, extra JSON files and the tokenizer into a temporary directory,
    then move it over `path`: a crash leaves the old checkpoint (or none), never half of one."""
    path = Path(path)
    tmp = new_temp_dir(path)
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
