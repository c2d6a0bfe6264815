"""One speedrun: every stage in order, each timed, then summary.json and report.md."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text
from llmlab.speedrun.config import AUGMENT, BIOS_PER_PERSON, SpeedrunConfig, preset_config
from llmlab.speedrun.loop import run_loop
from llmlab.speedrun.post_training import copy_model, dpo_model, score_checkpoints, sft_model
from llmlab.speedrun.pretraining import (build_corpus, pretrain_model, pretrain_summary, read_texts,
                                         shuffle_epochs, plan_steps, time_steps,
                                         train_tokenizer)


class Stages:
    """Wall-clock time and a throughput figure per stage, printed as each one ends."""

    def __init__(self, log):
        self.records: dict[str, dict] = {}
        self.log = log

    def run(self, name: str, fn, *args, **kwargs):
        self.log(f"[{len(self.records) + 1}] {name} ...")
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.records[name] = {"seconds": time.perf_counter() - t}
        return out

    def note(self, name: str, amount: float, unit: str):
        r = self.records[name]
        r["throughput"], r["unit"] = amount / max(r["seconds"], 1e-9), unit
        self.log(f"    {name}: {r['seconds']:.1f} s, {r['throughput']:,.0f} {unit}")


def prepare_run_dir(run_dir: Path, force: bool):
    if run_dir.exists() and not run_dir.is_dir():
        raise LLMLabError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise LLMLabError(f"{run_dir} is not empty; choose another --out or pass --force to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def speedrun(out_dir: str | Path, preset: str = "default", force: bool = False, log=print,
             **overrides) -> Path:
    """Run every stage into `out_dir` and return the path of its report.md. Keyword overrides are
    SpeedrunConfig fields (people=..., max_steps=..., seed=...)."""
    import torch

    cfg = preset_config(preset, **overrides)
    run_dir = Path(out_dir)
    prepare_run_dir(run_dir, force)
    threads = torch.get_num_threads()
    try:
        return Run(run_dir, preset, cfg, log, cores=threads).go()
    finally:
        torch.set_num_threads(threads)


class Run:
    """One speedrun: the stages in order, each timed, then the summary and the report."""

    def __init__(self, run_dir: Path, preset: str, cfg: SpeedrunConfig, log, cores: int):
        self.run_dir, self.preset, self.cfg, self.log, self.cores = run_dir, preset, cfg, log, cores
        self.stages = Stages(log)
        self.summary = {"run_dir": str(run_dir), "preset": preset, "load_average_start": load_average()}
        self.t_start = time.perf_counter()

    def go(self) -> Path:
        world = self.data()
        result, tcfg, mcfg = self.pretrain()
        self.post_train(world)
        self.summary["loop"] = self.stages.run("loop", run_loop, self.run_dir, self.cfg, world)
        self.summary["pretrain"] |= pretrain_summary(self.run_dir, result, tcfg, mcfg,
                                                     self.summary["pretrain"]["data_tokens"]["train"])
        return self.finish()

    def data(self):
        cfg, run, stages = self.cfg, self.run_dir, self.stages
        world, clean = stages.run("corpus", build_corpus, run, cfg)
        stages.note("corpus", clean.docs_in, "documents/s")
        texts = read_texts(run / "corpus" / "clean.jsonl")
        rng = random.Random(cfg.seed + 7)
        self.eval_idx = sorted(rng.sample(range(cfg.people), min(cfg.eval_people, cfg.people)))
        from llmlab.eval.knowledge import heldout_biographies
        from llmlab.train.tasks import bios_qa_items
        self.known_bios = heldout_biographies(world, self.eval_idx, AUGMENT, BIOS_PER_PERSON)
        questions = [f"{it['messages'][0]['content']} {it['answer']}" for it in bios_qa_items(world, "train")]
        tok_stats = stages.run("tokenizer", train_tokenizer, run, cfg, texts, questions, self.known_bios)
        stages.note("tokenizer", clean.bytes_kept, "bytes/s")
        from llmlab.data.pack import pack_documents
        manifest = stages.run("pack", pack_documents, texts, run / "tokenizer", run / "shards", val_fraction=0.05,
                              seed=cfg.seed)
        stages.note("pack", sum(manifest["tokens"].values()), "tokens/s")
        data_tokens = shuffle_epochs(run / "shards", cfg)
        self.summary |= {"corpus": clean.to_dict(), "tokenizer": tok_stats, "pretrain": {"data_tokens": data_tokens}}
        return world

    def pretrain(self):
        """Trial steps (when there is a budget to plan or a thread count to choose), then pretraining."""
        cfg, stages = self.cfg, self.stages
        planned, auto = {k: getattr(cfg, k) for k in ("max_steps", "sft_steps", "dpo_steps")}, not cfg.threads
        counts = sorted({1, max(1, self.cores // 2), self.cores}) if auto else [cfg.threads]
        timings = {}
        if cfg.time_budget or len(counts) > 1:
            timings = stages.run("trial steps", time_steps, self.run_dir, cfg, counts)
            fastest = min(timings, key=timings.get)
            self.log(f"    trial steps: {stages.records['trial steps']['seconds']:.1f} s; seconds per step: "
                     + ", ".join(f"{n} threads {s:.3f}" for n, s in timings.items()))
            cfg.threads = fastest
        cfg.threads = cfg.threads or 1
        if cfg.time_budget:
            step_s = timings[cfg.threads]
            steps = plan_steps(cfg, cfg.time_budget - (time.perf_counter() - self.t_start), step_s)
            if steps["max_steps"] < cfg.max_steps:
                self.log(f"    a step takes {step_s:.2f} s here: only {steps} fit the {cfg.time_budget:.0f} s budget")
                cfg.max_steps, cfg.sft_steps, cfg.dpo_steps = steps["max_steps"], steps["sft_steps"], steps["dpo_steps"]
                cfg.eval_every = max(1, min(cfg.eval_every, cfg.max_steps // 4))
        import torch
        torch.set_num_threads(cfg.threads)
        self.summary["threads"] = f"{cfg.threads}{' (fastest in the trial steps)' if auto else ''}"
        self.summary["trial_seconds_per_step"] = {str(n): s for n, s in timings.items()}
        self.summary["pretrain"] |= {"planned_steps": planned}
        result, tcfg, mcfg = stages.run("pretrain", pretrain_model, self.run_dir, cfg)
        stages.note("pretrain", result.step * tcfg.tokens_per_step, "tokens/s")
        return result, tcfg, mcfg

    def post_train(self, world):
        from llmlab.eval.knowledge import knowledge_report, unseen_biographies
        from llmlab.train.tasks import bios_qa_items

        cfg, run, stages = self.cfg, self.run_dir, self.stages
        unseen = unseen_biographies(world, len(self.eval_idx), AUGMENT)
        ev = stages.run("evaluate", knowledge_report, run / "pretrain" / "model", world, self.eval_idx,
                        self.known_bios, unseen, cfg.seed)
        stages.note("evaluate", ev["facts"]["probes"], "fact probes/s")
        # questions about the training people teach how to answer (SFT), then preferences (DPO); the held-out
        # people's questions test whether the model can say what it read but was never asked about
        n_qa = min(cfg.eval_people, cfg.people // 2)
        heldout_qa, trained_qa = bios_qa_items(world, "test")[:6 * n_qa], bios_qa_items(world, "train")[:6 * n_qa]
        sft = stages.run("sft", sft_model, run, cfg, world)
        stages.note("sft", sft["tokens"], "tokens/s")
        dpo = stages.run("dpo", dpo_model, run, cfg, world, heldout_qa)
        stages.note("dpo", dpo["steps"] * cfg.micro_batch, "pairs/s")
        rows = stages.run("evaluate QA", score_checkpoints, run, world, trained_qa, heldout_qa, self.known_bios)
        stages.note("evaluate QA", 3 * (len(trained_qa) + len(heldout_qa)), "questions/s")
        copy_model(run / "dpo" / "model", run / "model")  # RUN_DIR/model is the run's final model
        self.summary |= {"eval": ev, "post_training": {"rows": rows, "qa_people": n_qa, "sft": sft, "dpo": dpo}}

    def finish(self) -> Path:
        from llmlab.speedrun.report import plot_stages, render_report

        s, run = self.summary, self.run_dir
        s |= {"config": self.cfg.to_dict(), "augment": AUGMENT, "bios_per_person": BIOS_PER_PERSON,
              "stages": self.stages.records, "machine": platform.processor() or platform.machine(),
              "load_average": load_average(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        t = time.perf_counter()
        plot_stages(self.stages.records, run / "stages.png")
        s["stages"]["report"] = {"seconds": time.perf_counter() - t}
        s["total_seconds"] = time.perf_counter() - self.t_start
        atomic_write_text(run / "summary.json", json.dumps(s, indent=2, ensure_ascii=False) + "\n")
        # last: a run directory with a report.md is a finished run
        atomic_write_text(run / "report.md", render_report(s))
        rows = s["post_training"]["rows"]
        self.log(f"done in {s['total_seconds']:.0f} s on {s['threads']} threads: val "
                 f"{s['pretrain']['val_bpb']:.3f} bits/byte, held-out QA " +
                 " -> ".join(f"{r['stage']} {r['qa_heldout']:.1%}" for r in rows) +
                 f"; report {run / 'report.md'}; chat: llmlab chat --model {run}")
        return run / "report.md"
