"""lm-evaluation-harness task YAML as a question source: local JSON/JSONL data, Jinja2 prompts, `until`, regex filters.

What a local, offline generate_until task needs is read the way lm-eval reads it (v0.4 task configs): the data
(`dataset_path: json` with `dataset_kwargs.data_files`, relative paths from the YAML's folder), the test split,
`description`, `doc_to_text` / `doc_to_target` (a field name or a Jinja2 template), `num_fewshot` (with
`fewshot_config: {sampler: first_n}`: the first N documents of the few-shot split), `generation_kwargs.until`
(stop strings), the `filter_list` that extracts the answer (regex, take_first, remove_whitespace, lowercase,
uppercase) and the exact_match options (regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers),
applied to the target and to the extracted answer alike. Anything else that would change a result (a Hub dataset,
`!function` hooks, another metric, repeats, lm-eval's default random few-shot sampler) is refused with one line,
never skipped. Sampling options in generation_kwargs (do_sample, temperature, top_p, top_k, max_gen_toks) are the
strategy's to choose (--temperature, --max-tokens): a self-consistency run samples whatever the task's greedy
default says. Each strategy adds its own instruction after the rendered prompt. A task with several filter
pipelines uses the first unless PATH.yaml#NAME picks one (the task's name then carries it).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import yaml

from llmlab.errors import LLMLabError

# keys that only name, group or document a task
DESCRIPTIVE = {"task", "task_alias", "tag", "group", "group_alias", "reference", "metadata", "dataset_name",
               "should_decontaminate", "doc_to_decontamination_query", "output_type", "include"}
HANDLED = {"dataset_path", "dataset_kwargs", "training_split", "validation_split", "test_split", "fewshot_split",
           "description", "doc_to_text", "doc_to_target", "target_delimiter", "fewshot_delimiter", "num_fewshot",
           "fewshot_config", "generation_kwargs", "filter_list", "metric_list", "repeats"}
SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k", "max_gen_toks"}  # the strategy's to choose
MATCH_OPTIONS = {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"}
FILTERS = {"regex", "take_first", "remove_whitespace", "lowercase", "uppercase"}


class _Function:
    """A `!function module.name` hook: Python code from the task's folder, which llmlab does not run."""

    def __init__(self, name):
        self.name = name


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def read_config(path: Path, depth: int = 0) -> dict:
    """The YAML as a dict, with `include:` (another YAML, relative to this one) merged under it."""
    if not path.is_file():
        raise LLMLabError(f"no such task file: {path}")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise LLMLabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise LLMLabError(f"{path}: a task YAML is a mapping of fields")
    if "include" in cfg:
        if depth > 4:
            raise LLMLabError(f"{path}: includes nested too deep")
        cfg = {**read_config(path.parent / str(cfg["include"]), depth + 1), **cfg}
    return cfg


def _refuse_functions(value, where: str):
    if isinstance(value, _Function):
        raise LLMLabError(f"{where} is a `!function {value.name}` hook: llmlab runs no task code (write it as a "
                          f"Jinja2 template or a field name)")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_functions(v, f"{where}.{k}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_functions(v, f"{where}[{i}]")


def check_config(cfg: dict, path: Path):
    """Refuse, with one line, every field that would change a result and that llmlab cannot honour."""
    for key, value in cfg.items():
        _refuse_functions(value, f"{path.name}: {key}")
        if key not in DESCRIPTIVE | HANDLED:
            raise LLMLabError(f"{path.name}: the task field {key!r} is not supported by llmlab's task reader")
    if cfg.get("output_type", "generate_until") != "generate_until":
        raise LLMLabError(f"{path.name}: output_type {cfg['output_type']!r} is not supported: test-time strategies "
                          f"generate answers (generate_until)")
    if cfg.get("repeats", 1) != 1:
        raise LLMLabError(f"{path.name}: repeats {cfg['repeats']} is not supported: sample with a strategy instead "
                          f"(--strategy self-consistency -k N)")
    fewshot = cfg.get("fewshot_config") or {}
    if fewshot and (fewshot.get("sampler") != "first_n" or set(fewshot) - {"sampler"}):
        raise LLMLabError(f"{path.name}: fewshot_config supports only `sampler: first_n` (got {fewshot})")
    if int(cfg.get("num_fewshot") or 0) > 0 and fewshot.get("sampler") != "first_n":
        # lm-eval's default sampler draws the examples at random (its own seed): other examples, other results
        raise LLMLabError(f"{path.name}: num_fewshot {cfg['num_fewshot']} takes its examples with lm-eval's "
                          f"`fewshot_config: {{sampler: first_n}}` only: add it, or set num_fewshot: 0")
    extra = set(cfg.get("generation_kwargs") or {}) - SAMPLING_KEYS - {"until"}
    if extra:
        raise LLMLabError(f"{path.name}: generation_kwargs {sorted(extra)} are not supported (until and the "
                          f"sampling options are)")


# ---- data -------------------------------------------------------------------------------------------------------


def _split_files(cfg: dict, path: Path) -> dict[str, list[Path]]:
    """Split name -> data files, as `datasets.load_dataset("json", data_files=...)` reads them: a file or a list
    of files is the split "train"; a mapping names the splits."""
    if cfg.get("dataset_path") != "json":
        raise LLMLabError(f"{path.name}: dataset_path {cfg.get('dataset_path')!r} is a Hugging Face Hub dataset, "
                          f"which llmlab does not download: use `dataset_path: json` with local "
                          f"`dataset_kwargs: {{data_files: ...}}`")
    kwargs = cfg.get("dataset_kwargs") or {}
    if set(kwargs) != {"data_files"}:
        raise LLMLabError(f"{path.name}: dataset_kwargs must hold data_files only (got {sorted(kwargs) or 'none'})")
    files = kwargs["data_files"]
    files = files if isinstance(files, dict) else {"train": files}
    out = {}
    for split, names in files.items():
        out[split] = []
        for name in [names] if isinstance(names, str) else names:
            p = Path(name) if Path(name).is_absolute() else path.parent / name
            if not p.is_file():
                raise LLMLabError(f"{path.name}: no such data file {p} (relative paths start at the YAML's folder)")
            out[split].append(p)
    return out


def read_docs(files: list[Path]) -> list[dict]:
    """Records of JSON Lines files, or of JSON files holding a list of records."""
    docs = []
    for p in files:
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise LLMLabError(f"{p}:{i}: not valid JSON") from None
        if not all(isinstance(r, dict) for r in records):
            raise LLMLabError(f"{p}: every record must be a JSON object")
        docs += records
    return docs


# ---- prompts and targets ----------------------------------------------------------------------------------------


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, find, replace: re.sub(find, replace, s)  # lm-eval's one extra filter
    return env


def render(template, doc: dict, env=None) -> str:
    """lm-eval's doc_to_text / doc_to_target: a field of the document when the string names one, else a Jinja2
    template over the document's fields."""
    if not isinstance(template, str):
        raise LLMLabError(f"a prompt or target must be a field name or a Jinja2 template, got {template!r}")
    if template in doc:
        return str(doc[template])
    from jinja2 import TemplateError
    try:
        return (env or _environment()).from_string(template).render(**doc)
    except TemplateError as e:
        raise LLMLabError(f"template {template!r}: {e}") from None


def normalise(text: str, match: dict) -> str:
    """exact_match's normalisation (Hugging Face evaluate, as lm-eval calls it): drop regexes_to_ignore, then
    optionally case, punctuation and digits. Applied to the target and to the extracted answer alike."""
    for pattern in match.get("regexes_to_ignore") or []:
        text = re.sub(pattern, "", text)
    if match.get("ignore_case"):
        text = text.lower()
    if match.get("ignore_punctuation"):
        text = text.translate(str.maketrans("", "", string.punctuation))
    if match.get("ignore_numbers"):
        text = text.translate(str.maketrans("", "", string.digits))
    return text


def _match_options(cfg: dict, path: Path) -> dict:
    metrics = cfg.get("metric_list") or [{"metric": "exact_match"}]
    if len(metrics) != 1 or metrics[0].get("metric") != "exact_match":
        raise LLMLabError(f"{path.name}: metric_list must be one exact_match (got "
                          f"{[m.get('metric') for m in metrics]}): answers are checked by exact match")
    extra = set(metrics[0]) - MATCH_OPTIONS - {"metric", "aggregation", "higher_is_better"}
    if extra or metrics[0].get("aggregation", "mean") != "mean":
        raise LLMLabError(f"{path.name}: exact_match options {sorted(extra) or ['aggregation']} are not supported")
    return {k: v for k, v in metrics[0].items() if k in MATCH_OPTIONS}


def _filter_steps(cfg: dict, path: Path, name: str | None) -> tuple[str | None, list[dict]]:
    """The chosen filter pipeline (the first, or the one called `name`) as a list of steps."""
    pipelines = cfg.get("filter_list") or []
    if not pipelines:
        if name:
            raise LLMLabError(f"{path.name} has no filter_list to pick {name!r} from")
        return None, []
    names = [p.get("name") for p in pipelines]
    if name is not None and name not in names:
        raise LLMLabError(f"{path.name} has no filter pipeline {name!r} (it has {', '.join(map(str, names))})")
    chosen = pipelines[names.index(name) if name is not None else 0]
    steps = []
    for step in chosen.get("filter") or []:
        fn = step.get("function")
        if fn not in FILTERS:
            raise LLMLabError(f"{path.name}: filter function {fn!r} is not supported (supported: "
                              f"{', '.join(sorted(FILTERS))})")
        extra = set(step) - {"function", "regex_pattern", "group_select", "fallback"}
        if extra or (fn != "regex" and len(step) > 1):
            raise LLMLabError(f"{path.name}: options {sorted(set(step) - {'function'})} of filter {fn!r} are not "
                              f"supported")
        steps.append(dict(step))
    return chosen.get("name"), steps


def apply_filters(text: str, steps: list[dict]) -> str | None:
    """lm-eval's filters on one response; None where a regex finds nothing and its fallback is the default."""
    for step in steps:
        fn = step["function"]
        if fn == "regex":
            found = re.findall(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), text)
            if not found:
                fallback = step.get("fallback", "[invalid]")
                if fallback == "[invalid]":
                    return None
                text = fallback
                continue
            match = found[step.get("group_select", 0)]
            text = ([m for m in match if m] or [""])[0] if isinstance(match, tuple) else match
            text = text.strip()
        elif fn == "remove_whitespace":
            text = text[1:] if text.startswith(" ") else text
        elif fn == "lowercase":
            text = text.lower()
        elif fn == "uppercase":
            text = text.upper()
        # take_first picks the first of a document's repeats: there is one response here
    return text


def extract(text: str, item: dict) -> str | None:
    """A reply's answer for an lm-eval item: its filters, then exact_match's normalisation."""
    answer = apply_filters(text, item["filter"])
    return None if answer is None else normalise(answer, item["match"])


# ---- the task ---------------------------------------------------------------------------------------------------


def load_task(spec: str, n: int) -> list[dict]:
    """The first n test documents of an lm-eval task YAML (PATH.yaml, or PATH.yaml#FILTER to pick a filter
    pipeline) as llmlab items: the rendered prompt is the question, the normalised target the answer."""
    file, _, filter_name = spec.partition("#")
    path = Path(file)
    cfg = read_config(path)
    check_config(cfg, path)
    splits = _split_files(cfg, path)
    test = cfg.get("test_split") or cfg.get("validation_split")
    if test is None or test not in splits:
        raise LLMLabError(f"{path.name}: test_split {test!r} is not among the data files' splits "
                          f"({', '.join(splits)})")
    match = _match_options(cfg, path)
    chosen, steps = _filter_steps(cfg, path, filter_name or None)
    env = _environment()
    text_t, target_t = cfg.get("doc_to_text"), cfg.get("doc_to_target")
    if text_t is None or target_t is None:
        raise LLMLabError(f"{path.name}: doc_to_text and doc_to_target are required")
    prefix = render(cfg["description"], {}, env) if cfg.get("description") else ""
    shots = int(cfg.get("num_fewshot") or 0)
    if shots:
        source = next((cfg[k] for k in ("fewshot_split", "training_split", "validation_split") if cfg.get(k)), None)
        if source not in splits or source == test:
            raise LLMLabError(f"{path.name}: num_fewshot {shots} needs a few-shot split other than the test split "
                              f"among the data files (got {source!r})")
        examples = [render(text_t, d, env) + cfg.get("target_delimiter", " ") + render(target_t, d, env)
                    for d in read_docs(splits[source])[:shots]]
        prefix += "".join(e + cfg.get("fewshot_delimiter", "\n\n") for e in examples)
    until = (cfg.get("generation_kwargs") or {}).get("until") or []
    until = [until] if isinstance(until, str) else [str(u) for u in until]
    name = str(cfg.get("task") or path.stem) + (f"#{chosen}" if len(cfg.get("filter_list") or []) > 1 else "")
    items = []
    for doc in read_docs(splits[test])[:n]:
        items.append({"task": name, "question": prefix + render(text_t, doc, env),
                      "answer": normalise(render(target_t, doc, env), match), "kind": "lm-eval",
                      "filter": steps, "match": match, "stop": until})
    if not items:
        raise LLMLabError(f"{path.name}: the test split {test!r} holds no documents")
    return items
