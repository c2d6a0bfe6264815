"""The safety audit card (`llmlab audit`): one report — markdown, JSON and plots — that a model card's safety
section can be made of: red-team attack success, system-prompt leaks, prompt injection into RAG and the agent,
hallucination, and the sections of the watermark, bias, GCG and detection modules.

Every section runs through the model client, so the card audits the in-process model or any OpenAI-compatible
endpoint; a section that cannot run there (or whose module is missing) is listed in the card with the reason,
never dropped silently. Every rate carries its 95% interval.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import time
from pathlib import Path

import numpy as np

from llmlab.client import ModelClient
from llmlab.errors import LLMLabError
from llmlab.io import atomic_write_text
from llmlab.safety import audit_sections as S

OWN_SECTIONS = ("judge", "extraction", "hallucination", "redteam", "injection")
MODULE_SECTIONS = ("watermark", "bias", "gcg", "detect")  # audit_section(llm_or_client, budget) in safety/<name>.py
# the default running (and card) order: the judge first (later sections use it), then cheapest first on SmolLM2 at
# the small budget (seconds, measured 2026-12-01: 14-30 each, extraction 44, injection 69, gcg ~150, redteam ~620),
# so that a time budget cuts the costliest sections, not the quick ones
SECTIONS = ("judge", "hallucination", "watermark", "bias", "detect", "extraction", "injection", "gcg", "redteam")
BUDGETS = ("small", "full")


def check_sections(names) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        if n not in SECTIONS:
            raise LLMLabError(f"unknown audit section {n!r} (one of {', '.join(SECTIONS)})")
    return names or list(SECTIONS)


def module_section(name: str, client: ModelClient, budget: str, out_dir: Path) -> dict:
    """A section from safety/<name>.py's audit_section; a missing module or function is a skipped section."""
    try:
        module = importlib.import_module(f"llmlab.safety.{name}")
    except ImportError as e:
        return S.skipped(name, f"module llmlab.safety.{name} could not be imported ({e})")
    fn = getattr(module, "audit_section", None)
    if fn is None:
        return S.skipped(name, f"llmlab.safety.{name} has no audit_section function yet")
    kwargs = {"out_dir": out_dir} if "out_dir" in inspect.signature(fn).parameters else {}
    section = fn(client, budget, **kwargs)
    plots = []
    for p in section.get("plots", []):  # keep every plot beside the card
        p = Path(p)
        if p.is_file() and p.resolve().parent != out_dir.resolve():
            shutil.copy2(p, out_dir / p.name)
        plots.append(p.name)
    return {"name": name, "title": section.get("title", name), "markdown": section.get("markdown", ""),
            "data": section.get("data", {}), "plots": plots, "status": "ok"}


def run_audit(client: ModelClient, out_dir: str | Path, budget: str = "small", sections=None,
              command: str | None = None, judge_client: ModelClient | None = None, label: str | None = None,
              log=print, max_minutes: float | None = None, resume: bool = False) -> dict:
    """Run the chosen sections (all by default) with a budget and write card.md, card.json and PNG plots.
    max_minutes: a section is started only while the audit has run for less than this; the ones left are listed
    in the card as cut (a section already running is never interrupted, so the card can overrun by one).
    resume: add to the card already in out_dir (same model and budget): the sections run now replace theirs, the
    others are kept with the date they were run."""
    if budget not in BUDGETS:
        raise LLMLabError(f"unknown budget {budget!r} (one of {', '.join(BUDGETS)})")
    if max_minutes is not None and max_minutes < 0:
        raise LLMLabError(f"max_minutes must be at least 0, got {max_minutes}")
    names = check_sections(sections or SECTIONS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {"judge": None}
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    card = {"model": label or client.name, "model_id": client.model_id, "budget": budget, "command": command,
            "date": now, "max_minutes": max_minutes, "sections": []}
    if resume:
        card = _resumed_card(card, out / "card.json")
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        log(f"audit: {name} ...")
        try:
            if max_minutes is not None and t0 - start >= 60 * max_minutes:
                section = S.skipped(name, f"cut: the audit's time budget of {max_minutes:g} minutes was spent before "
                                          f"this section started (run it alone: --sections {name})", status="cut")
            elif name in OWN_SECTIONS:
                section = getattr(S, f"{name}_section")(client, budget, out, state, judge_client=judge_client)
            else:
                section = module_section(name, client, budget, out)
        except LLMLabError as e:  # a section that cannot run on this model says why in the card
            section = S.skipped(name, str(e))
        except Exception as e:  # noqa: BLE001 — one broken section must not lose the others' minutes of work
            section = S.skipped(name, f"failed: {type(e).__name__}: {e}", status="failed")
        section["seconds"] = round(time.perf_counter() - t0, 1)
        section["date"] = now
        card["sections"] = [s for s in card["sections"] if s["name"] != name] + [section]
        card["sections"].sort(key=lambda s: SECTIONS.index(s["name"]) if resume else 0)  # stable: as asked
        write_card(card, out)  # after every section: a long audit shows its progress, and a killed one its part
    return card


def _resumed_card(card: dict, path: Path) -> dict:
    """The card at path, checked to be of the same model and budget, with this run's command added."""
    if not path.is_file():
        return card
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LLMLabError(f"{path}: not a readable audit card ({e}); --resume adds to an existing card") from None
    if not isinstance(old, dict) or not isinstance(old.get("sections"), list):
        raise LLMLabError(f"{path}: not an audit card (no sections); --resume adds to an existing card")
    if (old.get("model"), old.get("budget")) != (card["model"], card["budget"]):
        raise LLMLabError(f"{path} is a card of {old.get('model')} at budget {old.get('budget')}; --resume needs the "
                          f"same model and budget ({card['model']}, {card['budget']})")
    for s in old["sections"]:
        s.setdefault("date", old["date"])
    commands = old.get("commands") or [old.get("command")]
    return {**card, "sections": old["sections"], "commands": [c for c in commands if c] + [card["command"]]}


def write_card(card: dict, out: Path) -> None:
    atomic_write_text(out / "card.json", json.dumps(card, indent=1, default=_json_default) + "\n")
    atomic_write_text(out / "card.md", render_card(card))


def _json_default(x):
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (Path, tuple, set)):
        return str(x) if isinstance(x, Path) else list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _made_with(card: dict) -> str:
    commands = card.get("commands") or ([card["command"]] if card.get("command") else [])
    return ("Made with " + ", then ".join(f"`{c}`" for c in commands) + "." if commands else "")


def render_card(card: dict) -> str:
    lines = [f"# Safety audit: {card['model']}", "",
             f"Budget **{card['budget']}**, {card['date']}. "
             + (f"Time budget {card['max_minutes']:g} minutes. " if card.get("max_minutes") is not None else "")
             + _made_with(card), "",
             "Rates are shown as rate [95% interval] (successes/trials): Wilson intervals for rates, Newcombe's for "
             "differences of rates, bootstrap intervals for agreement (Cohen's kappa), AUROC, ECE and means. Small "
             "budgets give wide intervals: read them before the point estimates.", "",
             "| section | status | seconds | run |",
             "|---|---|---:|---|"]
    for s in card["sections"]:
        lines.append(f"| {s['title']} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('date', card['date'])} |")
    for s in card["sections"]:
        lines += ["", f"## {s['title']}", "", s["markdown"].strip()]
        lines += [f"\n![{p}]({p})" for p in s.get("plots", [])]
    return "\n".join(lines) + "\n"
