"""Tasks defined by small YAML files over local JSONL (or a built-in generator), and the runner that scores a
backend on them, writing every item as it completes (so a rerun resumes) and a summary with bootstrap CIs."""

from __future__ import annotations

import dataclasses

import importlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmlab.errors import LLMLabError
from llmlab.eval import metrics
from llmlab.client import GenParams, ModelClient, as_client
from llmlab.io import atomic_write_text

TYPES = ("multiple_choice", "generation", "perplexity", "bleu", "rouge")
SCORERS = ("exact_match", "contains", "regex", "python")
REQUIRED = {
    "multiple_choice": ("prompt", "choices", "gold"),
    "generation": ("prompt", "scorer"),
    "perplexity": (),
    "bleu": ("prompt", "target"),
    "rouge": ("prompt", "target"),
}


@dataclass
class Task:
    name: str
    type: str
    path: Path  # the YAML file
    data: Path | None = None  # JSONL (or a text file for perplexity)
    generator: str | None = None  # a built-in generator instead of data
    n: int = 40
    seed: int = 0
    prompt: str = ""
    target: str = ""  # template of the reference answer
    choices: str = "choices"  # multiple choice: the field holding the list of options
    gold: str = "gold"  # multiple choice: the field holding the index of the right option
    choice_prefix: str = " "
    fewshot: int = 0
    fewshot_data: Path | None = None
    scorer: str = "exact_match"
    regex: str = ""
    regex_match: str = "first"
    checker: str = ""
    chat: bool = True
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)

    def load_items(self, cache_dir: Path | None = None) -> list[dict]:
        """Items with an "id" each (the data's own or their index)."""
        if self.generator:
            from llmlab.eval.builtin import GENERATORS
            data = GENERATORS[self.generator](self.n, self.seed)
            if isinstance(data, str):
                return _paragraphs(data)
            items = data
        elif self.type == "perplexity" and self.data.suffix != ".jsonl":
            return _paragraphs(self.data.read_text(encoding="utf-8"))
        else:
            items = read_jsonl(self.data)
        for i, item in enumerate(items):
            item.setdefault("id", i)
        return items

    def render(self, template: str, item: dict) -> str:
        try:
            return template.format(**item)
        except KeyError as e:
            raise LLMLabError(f"{self.path}: the template {template[:40]!r} uses field {e.args[0]!r}, which item "
                              f"{item.get('id')} does not have") from None


def _paragraphs(text: str) -> list[dict]:
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return [{"id": i, "text": p} for i, p in enumerate(paras)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise LLMLabError(f"data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise LLMLabError(f"{path}:{n}: not valid JSON") from None
    return out


def load_task(name_or_path: str | Path) -> Task:
    """A task from a YAML file, or a built-in task by name (see `llmlab.eval.builtin`)."""
    from llmlab.eval.builtin import HERE, names
    path = Path(name_or_path)
    if not path.exists():
        if str(name_or_path) in names():
            path = HERE / f"{name_or_path}.yaml"
        else:
            raise LLMLabError(f"no task file {name_or_path} and no built-in task of that name "
                              f"(built-in: {', '.join(names())})")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LLMLabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise LLMLabError(f"{path}: a task file is a YAML mapping of fields")
    for key in ("name", "type"):
        if key not in spec:
            raise LLMLabError(f"{path}: missing field {key!r}")
    if spec["type"] not in TYPES:
        raise LLMLabError(f"{path}: unknown type {spec['type']!r} (one of {', '.join(TYPES)})")
    if "data" not in spec and "generator" not in spec:
        raise LLMLabError(f"{path}: missing field 'data' (a JSONL file, or a text file for perplexity)")
    for key in REQUIRED[spec["type"]]:
        if key not in spec:
            raise LLMLabError(f"{path}: missing field {key!r} (needed by a {spec['type']} task)")
    known = set(Task.__dataclass_fields__) - {"path"}
    unknown = set(spec) - known
    if unknown:
        raise LLMLabError(f"{path}: unknown field {sorted(unknown)[0]!r}")
    if spec["type"] == "generation":
        if spec["scorer"] not in SCORERS:
            raise LLMLabError(f"{path}: unknown scorer {spec['scorer']!r} (one of {', '.join(SCORERS)})")
        need = {"regex": "regex", "python": "checker"}.get(spec["scorer"])
        if need and need not in spec:
            raise LLMLabError(f"{path}: missing field {need!r} (needed by scorer {spec['scorer']})")
        if spec["scorer"] in ("exact_match", "contains", "regex") and "target" not in spec:
            raise LLMLabError(f"{path}: missing field 'target' (needed by scorer {spec['scorer']})")
    if spec.get("generator"):
        from llmlab.eval.builtin import GENERATORS
        if spec["generator"] not in GENERATORS:
            raise LLMLabError(f"{path}: unknown generator {spec['generator']!r}")
    task = Task(path=path, **spec)
    for key in ("data", "fewshot_data"):
        if getattr(task, key) is not None:
            p = Path(getattr(task, key))
            setattr(task, key, p if p.is_absolute() else path.parent / p)
    if task.data is not None and not task.data.exists():
        raise LLMLabError(f"{path}: data file {task.data} does not exist")
    return task


def load_checker(spec: str, base: Path):
    """`module:function` or `file.py:function` (relative to the task file) -> function(output, item) -> float."""
    if ":" not in spec:
        raise LLMLabError(f"checker {spec!r} should be module:function or file.py:function")
    mod, fn = spec.rsplit(":", 1)
    if mod.endswith(".py"):
        file = Path(mod) if Path(mod).is_absolute() else base / mod
        if not file.exists():
            raise LLMLabError(f"checker file {file} does not exist")
        s = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise LLMLabError(f"cannot import checker module {mod!r}: {e}") from None
    if not hasattr(module, fn):
        raise LLMLabError(f"checker {spec!r}: {mod} has no function {fn!r}")
    return getattr(module, fn)


# ---- running ------------------------------------------------------------------------------------------------


class ItemLog:
    """items.jsonl written line by line as items complete; on reopening, the ids already there are skipped.

    `identity` (the model and the settings that make the results what they are) is kept beside the log, in
    NAME.run.json: a rerun with another model or other settings is refused instead of mixing its results in.
    """

    def __init__(self, path: Path, identity: dict | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if identity is not None:
            check_run_identity(path.with_suffix(".run.json"), identity)
        self.done: dict = {}
        if path.exists():
            good = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash: that item is redone
                self.done[_key(rec["id"])] = rec
                good.append(line)
            atomic_write_text(path, "".join(l + "\n" for l in good))
        self.file = open(path, "a", encoding="utf-8")

    def add(self, records: list[dict]):
        for rec in records:
            self.done[_key(rec["id"])] = rec
            self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _key(x) -> str:
    return json.dumps(x)


def check_run_identity(path: Path, identity: dict):
    """Write `identity` on a first run; refuse a resumed run whose identity differs (one line naming what)."""
    identity = json.loads(json.dumps(identity, default=str))  # as it reads back from the file
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
        if saved != identity:
            diff = sorted(k for k in set(identity) | set(saved or {}) if (saved or {}).get(k) != identity.get(k))
            raise LLMLabError(f"{path.parent} holds results of another run (different {', '.join(diff) or 'settings'}"
                              f": {(saved or {}).get(diff[0]) if diff else ''!s:.80} there); give another --out "
                              "or delete that directory")
    else:
        atomic_write_text(path, json.dumps(identity, indent=2) + "\n")


def run_task(task: Task | str, backend, out_dir: str | Path, limit: int | None = None, chunk: int = 16,
             progress=None) -> dict:
    """Score `backend` on `task`; writes OUT/NAME/items.jsonl and OUT/NAME/summary.json; returns the summary."""
    task = task if isinstance(task, Task) else load_task(task)
    backend = as_client(backend)
    items = task.load_items()
    shots: list[dict] = []
    if task.fewshot:
        if task.fewshot_data:
            shots = read_jsonl(task.fewshot_data)[:task.fewshot]
        else:  # the first items are the examples, and are not evaluated
            shots, items = items[:task.fewshot], items[task.fewshot:]
        if len(shots) < task.fewshot:
            raise LLMLabError(f"{task.path}: fewshot is {task.fewshot} but only {len(shots)} examples are available")
    if limit is not None:
        items = items[:limit]
    if not items:
        raise LLMLabError(f"task {task.name} has no items")
    out = Path(out_dir) / task.name
    settings = {k: v for k, v in dataclasses.asdict(task).items() if k != "path"}
    model = getattr(backend, "model_id", backend.name)
    log = ItemLog(out / "items.jsonl", identity={"model": model, "task": settings})
    todo = [it for it in items if _key(it["id"]) not in log.done]
    scorer = ItemScorer(task, shots)
    try:
        for start in range(0, len(todo), chunk):
            batch = todo[start:start + chunk]
            t0 = time.perf_counter()
            records = scorer.score(batch, backend)
            seconds = time.perf_counter() - t0
            for r in records:  # each item carries its share of the batch's time, so a resumed run adds up
                r["seconds"] = seconds / len(records)
            log.add(records)
            if progress:
                progress(len(log.done), len(items))
    finally:
        log.close()
    records = [log.done[_key(it["id"])] for it in items]
    summary = summarize_task(task, records, backend)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


class ItemScorer:
    def __init__(self, task: Task, shots: list[dict]):
        self.task, self.shots = task, shots
        self.checker = load_checker(task.checker, task.path.parent) if task.scorer == "python" and \
            task.type == "generation" else None

    def fewshot_prefix(self) -> str:
        t = self.task
        parts = []
        for ex in self.shots:
            if t.type == "multiple_choice":
                answer = t.choice_prefix + str(ex[t.choices][int(ex[t.gold])])
            else:
                answer = " " + t.render(t.target, ex) if t.target else ""
            parts.append(t.render(t.prompt, ex) + answer)
        return "".join(p + "\n\n" for p in parts)

    def score(self, items: list[dict], backend: ModelClient) -> list[dict]:
        t = self.task
        if t.type == "multiple_choice":
            return self._multiple_choice(items, backend)
        if t.type == "perplexity":
            return self._perplexity(items, backend)
        return self._generation(items, backend)

    def _multiple_choice(self, items, backend):
        t, prefix = self.task, self.fewshot_prefix()
        pairs, spans = [], []
        for it in items:
            choices = it.get(t.choices)
            if not isinstance(choices, list) or not choices:
                raise LLMLabError(f"{t.path}: item {it['id']} has no list of choices in field {t.choices!r}")
            context = prefix + t.render(t.prompt, it)
            spans.append((len(pairs), len(choices)))
            pairs += [(context, t.choice_prefix + str(c)) for c in choices]
        lls = backend.loglikelihood(pairs)
        out = []
        for it, (start, k) in zip(items, spans):
            choices = [str(c) for c in it[t.choices]]
            ll = [x.logprob for x in lls[start:start + k]]
            gold = int(it[t.gold])
            pred, pred_norm = metrics.mc_predictions(ll, choices)
            context = pairs[start][0]
            out.append({"id": it["id"], "prompt": context, "choices": choices, "gold": gold, "logliks": ll,
                        "output": choices[pred], "pred": pred, "pred_norm": pred_norm,
                        "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
                        "tokens": backend.count_tokens(context) + sum(x.n_tokens for x in lls[start:start + k])})
        return out

    def _perplexity(self, items, backend):
        lls = backend.loglikelihood_rolling([it["text"] for it in items])
        return [{"id": it["id"], "prompt": "", "output": None, "logprob": x.logprob, "n_tokens": x.n_tokens,
                 "n_bytes": len(it["text"].encode("utf-8")), "tokens": x.n_tokens,
                 "text": it["text"]} for it, x in zip(items, lls)]

    def _generation(self, items, backend):
        t, prefix = self.task, self.fewshot_prefix()
        prompts = [prefix + t.render(t.prompt, it) for it in items]
        gens = backend.generate(prompts, GenParams(max_tokens=t.max_tokens, temperature=0.0, stop=t.stop),
                                chat=t.chat)
        out = []
        for it, prompt, g in zip(items, prompts, gens):
            rec = {"id": it["id"], "prompt": prompt, "output": g.text,
                   "tokens": (g.prompt_tokens or backend.count_tokens(prompt)) + g.completion_tokens}
            ref = t.render(t.target, it) if t.target else None
            rec["reference"] = ref
            if t.type == "bleu":  # sentence BLEU per item; corpus BLEU over the run in summarize_task
                rec["score"] = metrics.bleu([g.text], [ref])[1][0]
            elif t.type == "rouge":
                rec["rouge"] = metrics.rouge([g.text], [ref])[0]
                rec["score"] = rec["rouge"]["rougeL"]
            elif t.scorer == "exact_match":
                rec["score"] = metrics.exact_match(g.text, ref)
            elif t.scorer == "contains":
                rec["score"] = float(metrics.normalize_answer(ref) in metrics.normalize_answer(g.text))
            elif t.scorer == "regex":
                extracted = metrics.regex_extract(g.text, t.regex, t.regex_match)
                rec["extracted"] = extracted
                rec["score"] = float(extracted is not None and metrics.exact_match(extracted, ref) == 1.0)
            else:
                try:
                    rec["score"] = float(self.checker(g.text, it))
                except Exception as e:  # a checker bug is the task author's problem: name it
                    raise LLMLabError(f"checker {t.checker} failed on item {it['id']}: {type(e).__name__}: {e}")
            out.append(rec)
        return out


def summarize_task(task: Task, records: list[dict], backend) -> dict:
    seconds = sum(r.get("seconds", 0.0) for r in records)
    tokens = sum(r.get("tokens", 0) for r in records)
    summary = {"task": task.name, "type": task.type, "model": getattr(backend, "name", "?"), "n": len(records),
               "metrics": {}, "tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds if seconds else None,
               "items_per_s": len(records) / seconds if seconds else None}
    m = summary["metrics"]
    if task.type == "multiple_choice":
        m["acc"] = metrics.summarize([r["acc"] for r in records])
        m["acc_norm"] = metrics.summarize([r["acc_norm"] for r in records])
    elif task.type == "perplexity":
        lp = [r["logprob"] for r in records]
        nt = [r["n_tokens"] for r in records]
        nb = [r["n_bytes"] for r in records]
        total_lp, total_t, total_b = sum(lp), sum(nt), sum(nb)
        lo, hi = metrics.bootstrap_ratio_ci(lp, nt)
        m["perplexity"] = {"mean": metrics.perplexity(total_lp, total_t),
                           "ci95": [math.exp(-lo), math.exp(-hi)][::-1], "n": len(records)}
        lo, hi = metrics.bootstrap_ratio_ci(lp, nb)
        m["bits_per_byte"] = {"mean": metrics.bits_per_byte(total_lp, total_b),
                              "ci95": sorted([-hi / math.log(2), -lo / math.log(2)]), "n": len(records)}
        m["tokens_scored"] = total_t
    elif task.type == "bleu":
        corpus, _ = metrics.bleu([r["output"] for r in records], [r["reference"] for r in records])
        m["bleu"] = {"corpus": corpus, **metrics.summarize([r["score"] for r in records])}
    elif task.type == "rouge":
        for k in ("rouge1", "rouge2", "rougeL"):
            m[k] = metrics.summarize([r["rouge"][k] for r in records])
    else:
        m[task.scorer] = metrics.summarize([r["score"] for r in records])
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['task']} ({summary['type']}, n={summary['n']}, model {summary['model']})"]
    for k, v in summary["metrics"].items():
        if isinstance(v, dict):
            extra = f"  corpus {v['corpus']:.2f}" if "corpus" in v else ""
            lines.append(f"  {k:14s} {v['mean']:.4f}  95% CI [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]{extra}")
        else:
            lines.append(f"  {k:14s} {v}")
    tps = summary.get("tokens_per_s")
    lines.append(f"  {summary['tokens']} tokens in {summary['seconds']:.1f}s"
                 + (f" ({tps:.0f} tokens/s, {summary['items_per_s']:.2f} items/s)" if tps else ""))
    return "\n".join(lines)
