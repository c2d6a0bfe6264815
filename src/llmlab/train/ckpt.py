"""Training-state checkpoints: written whole or not at all, the last K kept, `latest` always loadable.

A checkpoint is a directory checkpoints/step_00000100/ holding
  model.safetensors  the fp32 master weights (llmlab names)
  trainer.pt         optimizer state and RNG states: plain tensors and dicts, read with weights_only=True
  state.json         step, data position, train and model config
It is filled in a temporary directory, fsynced and renamed into place; only then is the `latest` pointer
file rewritten (itself atomically). A crash at any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text, new_temp_dir, replace_dir


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(ckpt_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict,
                    state: dict, keep_last: int = 2) -> Path:
    """Write one checkpoint atomically, point `latest` at it, then prune all but the newest keep_last."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = new_temp_dir(final)
    try:
        # clone: tied weights share storage, which safetensors refuses to write twice
        save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in model_state.items()},
                  tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
        torch.save({"optimizer": optim_state, "rng": rng_state()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckpt_dir / "latest", final.name + "\n")  # last: only now is the new checkpoint "the" one
    prune(ckpt_dir, keep_last)
    return final


def prune(ckpt_dir: Path, keep_last: int):
    latest = read_latest_name(ckpt_dir)
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in ckpt_dir.glob(".step_*.tmp"):  # half-written by a run that was killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)


def read_latest_name(ckpt_dir: Path) -> str | None:
    pointer = Path(ckpt_dir) / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict, dict, dict, dict] | None:
    """(model_state, optimizer_state, rng_state, state) of the checkpoint `latest` names; None if there is none."""
    ckpt_dir = Path(ckpt_dir)
    name = read_latest_name(ckpt_dir)
    if name is None:
        return None
    path = ckpt_dir / name
    if not path.is_dir():
        raise LLMLabError(f"{ckpt_dir}/latest names {name}, which does not exist")
    try:
        model_state = load_file(path / "model.safetensors")
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LLMLabError(f"checkpoint {path} cannot be read: {e}") from None
    return model_state, trainer["optimizer"], trainer["rng"], state
