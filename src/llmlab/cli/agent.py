"""CLI: `llmlab agent run TASK` (the function-calling loop with built-in tools) and `llmlab agent show TRACE`."""

from __future__ import annotations

from llmlab.client import add_client_args


def _run(args) -> int:
    from llmlab.agent.loop import format_trace, run_agent
    from llmlab.agent.tools import builtin_tools
    from llmlab.client import client_from_args

    names = [n.strip() for n in args.tools.split(",") if n.strip()] if args.tools else None
    tools = builtin_tools(args.workspace, names)  # unknown tool names are refused before the model loads
    client = client_from_args(args)
    r = run_agent(client, args.task, tools, max_steps=args.max_steps, max_tokens=args.max_tokens,
                  step_tokens=args.step_tokens, trace_path=args.trace)
    print(format_trace(r.trace))
    if args.trace:
        print(f"trace: {args.trace}")
    return 0 if r.ok else 1


def _show(args) -> int:
    from llmlab.agent.loop import format_trace, read_trace
    print(format_trace(read_trace(args.trace)))
    return 0


def add_commands(sub):
    p = sub.add_parser("agent", help="agents: a tool-calling loop (calculator, sandboxed Python, workspace files) "
                                     "and its traces")
    commands = p.add_subparsers(dest="agent_command", required=True)
    run = commands.add_parser("run", help="run the function-calling agent on a task")
    run.add_argument("task")
    run.add_argument("--tools", default=None, help="comma-separated: calculate, run_python, read_file, write_file "
                                                   "(default: all; the file tools need --workspace)")
    run.add_argument("--workspace", default=None, help="directory the file tools may read and write")
    run.add_argument("--max-steps", type=int, default=6, help="most model calls")
    run.add_argument("--max-tokens", type=int, default=2000, help="most generated tokens over the whole run")
    run.add_argument("--step-tokens", type=int, default=128, help="most generated tokens per model call")
    run.add_argument("--trace", default=None, help="write the run's trace here (JSONL)")
    add_client_args(run)
    run.set_defaults(func=_run)
    show = commands.add_parser("show", help="print a saved trace")
    show.add_argument("trace")
    show.set_defaults(func=_show)
