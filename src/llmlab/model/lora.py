"""LoRA: low-rank adapters on the transformer's linear layers, saved in the PEFT layout so `peft` loads them.

A LoRALinear keeps the frozen nn.Linear (`base`) and adds scaling * B(A(dropout(x))), with A (r x in) random
and B (out x r) zero, so at initialisation the layer computes exactly what the base layer does. Only A and B
train. Merging folds scaling * B @ A into the base weight; the adapter can also stay unmerged (and be switched
off, which is how DPO and RL get the reference model for free).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from llmlab.errors import LLMLabError
from llmlab.io import new_temp_dir, replace_dir

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = DEFAULT_TARGETS


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise LLMLabError(f"LoRA rank must be at least 1, got {r}")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        # PEFT's initialisation: A as nn.Linear's default (Kaiming uniform), B zero -> the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    @property
    def weight(self):  # what code that inspects `layer.weight` (the engine's device lookup) expects
        return self.base.weight

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight."""
        with torch.no_grad():
            w = self.base.weight
            self.base.weight.copy_((w.float() + self.delta_weight()).to(w.dtype))
        return self.base


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze every parameter of `model` and wrap the nn.Linear layers whose name ends in one of `targets`."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in DEFAULT_TARGETS and t != "lm_head"]
    if unknown:
        raise LLMLabError(f"unknown LoRA target module {unknown[0]!r} (choose from {', '.join(DEFAULT_TARGETS)})")
    if lora_layers(model):
        raise LLMLabError("this model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        raise LLMLabError(f"no linear layer of the model is named {', '.join(targets)}")
    return model


def set_adapter_enabled(model: nn.Module, enabled: bool):
    for layer in lora_layers(model).values():
        layer.enabled = enabled


class adapter_disabled:
    """`with adapter_disabled(model):` runs the base model (the reference policy under LoRA)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        set_adapter_enabled(self.model, False)

    def __exit__(self, *exc):
        set_adapter_enabled(self.model, True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back; parameters become trainable."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---- the PEFT file layout --------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's names: base_model.model.<module path>.lora_A.weight / .lora_B.weight."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base architecture (config.json fields), to refuse an adapter for another model."""
    cfg = model.config.to_hf()
    keep = {k: cfg.get(k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str = "") -> Path:
    """adapter_config.json + adapter_model.safetensors, which peft.PeftModel.from_pretrained reads."""
    layers = lora_layers(model)
    if not layers:
        raise LLMLabError("the model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base_model_name_or_path), "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    path = Path(path)
    tmp = new_temp_dir(path)
    try:
        save_file(tensors, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt", "llmlab_base_fingerprint": base_fingerprint(model)})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        replace_dir(tmp, path)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise LLMLabError(f"{path} is not a LoRA adapter directory (needs adapter_config.json and "
                          "adapter_model.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{cfg_file} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise LLMLabError(f"{path}: peft_type is {config.get('peft_type')!r}; llmlab reads LORA adapters only")
    with safe_open(weights, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return config, tensors, metadata


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Wrap `model` with the adapter saved at `path` (unmerged); refuses an adapter made for another base."""
    config, tensors, metadata = read_adapter(path)
    fingerprint = metadata.get("llmlab_base_fingerprint")
    if fingerprint and fingerprint != base_fingerprint(model):
        raise LLMLabError(f"{path} was trained on a different base model (architecture "
                          f"{fingerprint} vs this model's {base_fingerprint(model)})")
    targets = config.get("target_modules") or DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [targets]
    apply_lora(model, r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=0.0, targets=targets)
    layers = lora_layers(model)
    expected = set(lora_state_dict(model))
    # PEFT sometimes writes the adapter name into the key (lora_A.default.weight): accept that too
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected) or sorted(expected - set(tensors))
        raise LLMLabError(f"{path} does not fit this base model (e.g. {extra[0]} has no counterpart)")
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            t = tensors[f"{PEFT_PREFIX}{name}.{part}.weight"]
            mine = getattr(layer, part).weight
            if t.shape != mine.shape:
                raise LLMLabError(f"{path} does not fit this base model: {name}.{part} is {tuple(t.shape)}, "
                                  f"the model needs {tuple(mine.shape)}")
            with torch.no_grad():
                mine.copy_(t.to(mine.dtype))
    return model
