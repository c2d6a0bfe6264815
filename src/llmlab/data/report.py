"""What a cleaning run did: documents and bytes in, kept, removed per rule, with examples; as JSON and markdown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.io import atomic_write_text


def _snippet(text: str, n: int = 200) -> str:
    s = " ".join(text.split())
    return s if len(s) <= n else s[:n] + "…"


@dataclass
class CleanReport:
    max_examples: int = 3
    docs_in: int = 0
    bytes_in: int = 0
    docs_kept: int = 0
    bytes_kept: int = 0
    boilerplate_lines_dropped: int = 0
    bad_lines_skipped: int = 0
    unreadable_files_skipped: int = 0
    bad_input_examples: list[str] = field(default_factory=list)
    removed: dict[str, dict] = field(default_factory=dict)  # reason -> {"docs", "bytes", "examples"}

    def add_in(self, text: str) -> None:
        self.docs_in += 1
        self.bytes_in += len(text.encode("utf-8"))

    def add_kept(self, text: str) -> None:
        self.docs_kept += 1
        self.bytes_kept += len(text.encode("utf-8"))

    def add_removed(self, reason: str, text: str, source: str, detail: str) -> None:
        r = self.removed.setdefault(reason, {"docs": 0, "bytes": 0, "examples": []})
        r["docs"] += 1
        r["bytes"] += len(text.encode("utf-8"))
        if len(r["examples"]) < self.max_examples:
            r["examples"].append({"source": source, "detail": detail, "text": _snippet(text)})

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "max_examples"}
        d["removed"] = dict(sorted(self.removed.items(), key=lambda kv: -kv[1]["docs"]))
        return d

    def to_markdown(self) -> str:
        def pct(a, b):
            return f"{100 * a / b:.1f}%" if b else "-"

        out = ["# Corpus cleaning report", "",
               "| | documents | bytes |", "|---|---:|---:|",
               f"| in | {self.docs_in} | {self.bytes_in} |",
               f"| kept | {self.docs_kept} ({pct(self.docs_kept, self.docs_in)}) | "
               f"{self.bytes_kept} ({pct(self.bytes_kept, self.bytes_in)}) |"]
        for reason, r in self.to_dict()["removed"].items():
            out.append(f"| removed: {reason} | {r['docs']} | {r['bytes']} |")
        out += ["", f"Boilerplate lines dropped: {self.boilerplate_lines_dropped}",
                f"Bad JSONL lines skipped: {self.bad_lines_skipped}",
                f"Unreadable files skipped: {self.unreadable_files_skipped}"]
        for msg in self.bad_input_examples:
            out.append(f"- {msg}")
        for reason, r in self.to_dict()["removed"].items():
            out += ["", f"## {reason}", ""]
            for ex in r["examples"]:
                out.append(f"- `{ex['source']}` ({ex['detail']}): {ex['text']}")
        return "\n".join(out) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        j, m = out_dir / "report.json", out_dir / "report.md"
        atomic_write_text(j, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(m, self.to_markdown())
        return j, m

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v['docs']}" for k, v in self.to_dict()["removed"].items())
        return (f"{self.docs_in} documents in ({self.bytes_in} bytes), {self.docs_kept} kept "
                f"({self.bytes_kept} bytes)" + (f"; removed: {parts}" if parts else ""))
