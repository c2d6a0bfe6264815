"""metrics.jsonl: the training loop writes it, plots, scaling fits, reports and tests read it."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.io import atomic_write_text


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed (a torn last line is skipped on read)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int):
        """On resume, drop lines a killed run logged after its last checkpoint, so the curve has no repeats."""
        if self.enabled and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
