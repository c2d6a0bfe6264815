"""The agent suite's table: success (Wilson 95%), steps, tokens per style, and from the traces the share of steps
that made a usable action, from runs of `llmlab agent suite builtin --out DIR/report.json --trace-dir DIR/traces`.

    llmlab agent suite builtin --max-steps 3 --step-tokens 64 --max-tokens 192 --out runs/tools/report.json \
        --trace-dir runs/tools/traces          # and --style react, --plan
    python experiments/agent_suite.py runs/tools runs/react runs/plan --out experiments/results/agent_suite

A usable action: a step that called a tool of the task (not final_answer) and got an observation that is not an
error or an empty search ("no passage matches"); a well-formed step: one that called any known tool or, in the
tools style, answered in text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402


def trace_stats(traces: Path) -> dict:
    """Counts over every step of every task's trace."""
    steps = well_formed = usable = echoed = 0
    for path in sorted(traces.glob("*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for e in events:
            if e["type"] == "model":
                steps += 1
                echoed += "<tool_response>" in (e["message"].get("content") or "")
            elif e["type"] == "answer":
                well_formed += 1
            elif e["type"] == "tool":
                known = not e["observation"].startswith("Error: there is no tool")
                well_formed += known
                usable += (known and e["name"] != "final_answer" and not e["observation"].startswith("Error")
                           and "no passage matches" not in e["observation"].lower())
    return {"model_steps": steps, "well_formed": well_formed, "usable_actions": usable, "echoed_tags": echoed}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="directories holding report.json and traces/")
    p.add_argument("--out", default="experiments/results/agent_suite")
    p.add_argument("--note", default="", help="prepended to the table's note (the command, the machine)")
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for run in map(Path, args.runs):
        report = json.loads((run / "report.json").read_text())
        stats = trace_stats(run / "traces")
        lo, hi = report["wilson95"]
        rows.append({"run": run.name, "style": report["style"], "success": f"{report['succeeded']}/{report['tasks']}",
                     "rate": round(report["success_rate"], 3), "wilson95": f"{lo:.2f}-{hi:.2f}",
                     "by_kind": " ".join(f"{k} {v}" for k, v in report["by_kind"].items()),
                     "steps": round(report["mean_steps"], 2), "gen_tokens": round(report["mean_completion_tokens"]),
                     "prompt_tokens": round(report["mean_prompt_tokens"]),
                     "well_formed_steps": f"{stats['well_formed']}/{stats['model_steps']}",
                     "usable_actions": f"{stats['usable_actions']}/{stats['model_steps']}",
                     "echoed_tool_response": stats["echoed_tags"],
                     "ended_by": " ".join(f"{k} {v}" for k, v in report["reasons"].items())})
        print(rows[-1], flush=True)
    write_results(out, "agent_suite", rows, args.note)
    for run in map(Path, args.runs):  # each run's report beside the table (traces stay out: they are large)
        shutil.copyfile(run / "report.json", out / f"{run.name}.json")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
