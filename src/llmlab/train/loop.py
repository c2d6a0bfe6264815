"""The one training loop. Pretraining, SFT, reward modelling, DPO and RL all run through train().

An objective is two things: a loss function (model, batch) -> (loss, metrics) and a source of micro-batches
that can say where it is (state_dict) and go back there (load_state_dict). Everything else is the loop's:
AdamW + warmup/cosine, gradient accumulation and clipping, bf16 autocast over fp32 master weights,
DDP/FSDP2 under torchrun, evaluation, metrics, checkpoints, exact resume and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from llmlab.errors import LLMLabError
from llmlab.train import distributed as D
from llmlab.train.ckpt import load_checkpoint, save_checkpoint, set_rng_state, step_dir_name
from llmlab.train.config import RESUMABLE_CHANGES, TrainConfig
from llmlab.train.flops import flops_per_token, peak_flops
from llmlab.train.metrics import MetricsLog, read_metrics  # noqa: F401 (read_metrics: for the loop's callers)
from llmlab.train.optim import lr_at, make_optimizer, set_lr
from llmlab.train.plots import plot_metrics


class Batches(Protocol):
    """This rank's micro-batches, in order; resumable."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Objective:
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]  # mean loss of one micro-batch, metrics
    batches: Batches
    evaluate: Callable[[nn.Module], dict] | None = None  # validation metrics (every rank calls it)
    sample: Callable[[nn.Module, int], list[str]] | None = None  # text to show a person (rank 0 only)
    count_tokens: Callable[[Any], int] = lambda batch: batch[0].numel()  # for tokens/s
    # checkpoints and Ctrl-C stops fall only on multiples of this many steps: RL's batch source serves one rollout
    # for several optimizer steps and can say where it is (state_dict) only between rollouts
    steps_per_round: int = 1


@dataclass
class Result:
    step: int
    interrupted: bool
    model: nn.Module


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_same_config(saved: dict, current: dict, where: str, what: str, free=frozenset()):
    for key in sorted(set(saved) | set(current)):
        if key in free:
            continue
        if saved.get(key) != current.get(key):
            raise LLMLabError(f"cannot resume from {where}: its {what} {key} was {saved.get(key)!r}, "
                              f"this run has {current.get(key)!r} (use another --out-dir for a new run)")


def wrap_model(model: nn.Module, cfg: TrainConfig, d: D.Dist) -> nn.Module:
    """Replicate (DDP) or shard (FSDP2) the model across ranks; unchanged in a single process."""
    if not d.enabled:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def full_state(model, optimizer, cfg: TrainConfig) -> tuple[dict, dict]:
    """Unsharded model and optimizer state, gathered on every rank (collective under FSDP)."""
    if cfg.fsdp and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    raw = model.module if hasattr(model, "module") else model
    return raw.state_dict(), optimizer.state_dict()


def load_full_state(model, optimizer, model_state, optim_state, cfg: TrainConfig):
    if cfg.fsdp and torch.distributed.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    raw = model.module if hasattr(model, "module") else model
    raw.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def train(model: nn.Module, objective: Objective, cfg: TrainConfig, resume: bool = False,
          extra_state: dict | None = None, dist: D.Dist | None = None) -> Result:
    """Train `model` in place on `objective` for cfg.max_steps optimizer steps; checkpoints under cfg.out_dir.

    extra_state (JSON) is stored in every checkpoint and must match on resume (e.g. which data, which tokenizer).
    """
    cfg.validate()
    d = dist or D.setup()
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    raw = model.to(d.device)
    model = wrap_model(raw, cfg, d)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    run_state = {"train_config": cfg.to_dict(), "model_config": raw.config.to_dict(), "world_size": d.world,
                 **(extra_state or {})}
    step = restore(ckpt_dir, resume, model, raw, optimizer, objective, cfg, run_state)
    log = MetricsLog(out / "metrics.jsonl", d.is_main)
    log.truncate_after(step)
    forward_model = torch.compile(model) if cfg.compile else model
    speed = Speed(raw.config, cfg, d)
    ctrl_c, interrupted = CtrlC(), False

    model.train()
    with run_settings(cfg, d, step, ctrl_c) as bar:
        write_line = bar.write if bar is not None else (lambda s: print(s, flush=True))
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            set_lr(optimizer, lr)
            loss_sum, tokens, metric_sums, grad_norm = train_step(model, forward_model, objective, optimizer, cfg)
            step += 1
            record = step_record(step, lr, loss_sum, tokens, metric_sums, grad_norm, time.perf_counter() - t0,
                                 speed, cfg, d)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                log.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_per_s']:,.0f}",
                                mfu=f"{record['mfu']:.1%}")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                evaluate(model, raw, objective, cfg, d, step, log, write_line)
            # a batch source that can say where it is only between rounds (RL: rollouts) is saved only there
            round_end = step % objective.steps_per_round == 0
            interrupted = round_end and D.any_(ctrl_c.pressed, d)
            if interrupted or (round_end and cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                save_state(ckpt_dir, step, model, optimizer, objective, cfg, run_state, d)
            if interrupted:
                write_line(f"interrupted: saved step {step} to {ckpt_dir}; continue with --resume")
                break
    if d.is_main and log.path.exists():
        plot_metrics(log.path, out / "loss.png")
    return Result(step=step, interrupted=interrupted, model=gathered_model(model, raw, cfg, d))


def restore(ckpt_dir: Path, resume: bool, model, raw, optimizer, objective: Objective, cfg: TrainConfig,
            run_state: dict) -> int:
    """Load the latest checkpoint into the model, optimizer, batch source and RNGs; the step it was saved at
    (0: nothing to resume). Refuses a checkpoint of another setting, and a used directory without resume."""
    saved = load_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if saved is None:
        return 0
    if not resume:
        raise LLMLabError(f"{ckpt_dir.parent} already holds a training run; pass --resume to continue it or choose "
                          "another --out-dir")
    model_state, optim_state, rng, state = saved
    where = ckpt_dir / step_dir_name(state["step"])
    check_same_config(state["train_config"], cfg.to_dict(), where, "training setting", RESUMABLE_CHANGES)
    check_same_config(state["model_config"], raw.config.to_dict(), where, "model setting")
    others = [k for k in run_state if k not in ("train_config", "model_config")]
    check_same_config({k: state.get(k) for k in others}, {k: run_state[k] for k in others}, where, "run setting")
    load_full_state(model, optimizer, model_state, optim_state, cfg)
    objective.batches.load_state_dict(state["data"])
    set_rng_state(rng)
    return state["step"]


def save_state(ckpt_dir: Path, step: int, model, optimizer, objective: Objective, cfg: TrainConfig,
               run_state: dict, d: D.Dist):
    model_state, optim_state = full_state(model, optimizer, cfg)
    if d.is_main:
        save_checkpoint(ckpt_dir, step, model_state, optim_state,
                        {**run_state, "data": objective.batches.state_dict()}, cfg.keep_last)
    D.barrier(d)


class Speed:
    """Tokens per second and model FLOPs utilisation against the device's measured matmul peak."""

    def __init__(self, model_config, cfg: TrainConfig, d: D.Dist):
        self.flops_per_token = flops_per_token(model_config, cfg.seq_len)
        self.peak = cfg.peak_flops or peak_flops(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                                                 d.device.type)
        self.world = d.world

    def __call__(self, tokens: int, seconds: float) -> tuple[float, float]:
        tok_s = tokens * self.world / seconds
        return tok_s, self.flops_per_token * tok_s / (self.peak * self.world)


def step_record(step, lr, loss_sum, tokens, metric_sums, grad_norm, seconds, speed: Speed, cfg: TrainConfig,
                d: D.Dist) -> dict:
    """The metrics line of one step, averaged over micro-batches and ranks."""
    tok_s, mfu = speed(tokens, seconds)
    record = {"step": step, "loss": D.mean(loss_sum / cfg.grad_accum, d), "lr": lr,
              "tokens": step * tokens * d.world, "tok_per_s": tok_s, "mfu": mfu}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    record.update({k: D.mean(v / cfg.grad_accum, d) for k, v in metric_sums.items()})
    return record


def evaluate(model, raw, objective: Objective, cfg: TrainConfig, d: D.Dist, step: int, log: MetricsLog,
             write_line):
    """Validation metrics (every rank), samples (rank 0), one metrics line, a printed summary and the plot."""
    if objective.evaluate is None:
        return
    model.eval()
    with torch.no_grad(), autocast(cfg, d.device):
        metrics = objective.evaluate(model)
    model.train()
    record = {"step": step, **metrics}
    if d.is_main and objective.sample is not None and (cfg.sample_every == 0 or step % cfg.sample_every == 0):
        with torch.no_grad(), autocast(cfg, d.device):
            record["samples"] = objective.sample(raw, step)
    log.write(record)
    if d.is_main:
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        write_line(f"step {step}: {shown}")
        for text in record.get("samples", []):
            write_line(f"  sample: {text!r}")
        plot_metrics(log.path, Path(cfg.out_dir) / "loss.png")


@contextlib.contextmanager
def run_settings(cfg: TrainConfig, d: D.Dist, step: int, ctrl_c: "CtrlC"):
    """For the length of a run: threads, deterministic algorithms, the Ctrl-C handler and (rank 0) a progress
    bar, which it yields (None without one); all put back afterwards."""
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(cfg.deterministic or was_deterministic)
    previous_handler = signal.signal(signal.SIGINT, ctrl_c) if _in_main_thread() else None
    bar = None
    if d.is_main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def gathered_model(model, raw: nn.Module, cfg: TrainConfig, d: D.Dist) -> nn.Module:
    """The trained model as a plain module: `raw` itself, or under FSDP a fresh one holding the gathered weights
    (on rank 0; the gather is a collective every rank joins)."""
    if not (cfg.fsdp and d.enabled):
        return raw
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = type(raw)(raw.config)
    if d.is_main:
        plain.load_state_dict(full)
    return plain


def train_step(model, forward_model, objective: Objective, optimizer, cfg: TrainConfig):
    """One optimizer step: grad_accum micro-batches forward and backward, clip, AdamW. Returns the summed
    micro-batch losses, tokens seen, summed metrics and the gradient norm before clipping (None: no clipping).

    `model` is what owns the parameters (possibly DDP-wrapped); `forward_model` is what to call (possibly
    torch.compile'd)."""
    device = next(model.parameters()).device
    loss_sum, tokens, metric_sums = 0.0, 0, {}
    for micro in range(cfg.grad_accum):
        batch = next(objective.batches)
        # DDP: all-reduce gradients only after the last micro-batch
        sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(cfg, device):
                loss, metrics = objective.loss_fn(forward_model, batch)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
        tokens += objective.count_tokens(batch)
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens, metric_sums, grad_norm


class CtrlC:
    """SIGINT handler for training loops: the first Ctrl-C asks to finish the step in flight, save and leave
    (`pressed`); a second one aborts at once."""

    def __init__(self):
        self.pressed = False

    def __call__(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
