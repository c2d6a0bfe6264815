"""CLI: `llmlab agent run TASK` (tools or ReAct, optional plan and memory, built-in and MCP tools), `llmlab agent
suite builtin` (the task suite's success rate) and `llmlab agent show TRACE`."""

from __future__ import annotations

import shlex

from llmlab.client import add_client_args


def _memory(args):
    from llmlab.agent.memory import Memory
    return Memory(budget_tokens=args.memory_tokens) if args.memory_tokens else None


def _budget(args) -> dict:
    return {"max_steps": args.max_steps, "max_tokens": args.max_tokens, "step_tokens": args.step_tokens}


def _run(args) -> int:
    from llmlab.agent.loop import format_trace, make_style, run_agent
    from llmlab.agent.mcp_client import MCPTools
    from llmlab.agent.plan import run_planned
    from llmlab.agent.tools import builtin_tools
    from llmlab.client import client_from_args

    make_style(args.style)  # an unknown style is refused before the model loads
    names = [n.strip() for n in args.tools.split(",") if n.strip()] if args.tools is not None else None
    tools = builtin_tools(args.workspace, names, index=args.index) if names != [] else []
    memory = _memory(args)
    servers = [MCPTools(shlex.split(cmd)) for cmd in args.mcp]
    try:
        for server in servers:
            tools += server.start()
        client = client_from_args(args)
        run = run_planned if args.plan else run_agent
        r = run(client, args.task, tools, style=args.style, memory=memory, trace_path=args.trace, **_budget(args))
    finally:
        for server in servers:
            server.close()
    print(format_trace(r.trace))
    if args.trace:
        print(f"trace: {args.trace}")
    return 0 if r.ok else 1


def _suite(args) -> int:
    import json
    import tempfile

    from llmlab.agent.loop import make_style
    from llmlab.agent.suite import format_report, prepare_suite, run_suite
    from llmlab.client import client_from_args
    from llmlab.io import atomic_write_text

    make_style(args.style)
    only = [n.strip() for n in args.tasks.split(",") if n.strip()] if args.tasks else None
    with tempfile.TemporaryDirectory(prefix="llmlab-agent-suite-") as workdir:
        tasks, index = prepare_suite(workdir, args.suite, only)
        client = client_from_args(args)
        report = run_suite(client, tasks, workdir, index, style=args.style, plan=args.plan, memory=_memory(args),
                           trace_dir=args.trace_dir, **_budget(args))
    print(format_report(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
        print(f"report: {args.out}")
    return 0


def _show(args) -> int:
    from llmlab.agent.loop import format_trace, read_trace
    print(format_trace(read_trace(args.trace)))
    return 0


def _agent_options(p, max_steps: int, max_tokens: int):
    p.add_argument("--style", default="tools", help="tools: the model calls tools (decoded under their schemas "
                                                    "on llmlab); react: Thought/Action/Observation as text")
    p.add_argument("--plan", action="store_true", help="plan-then-execute: a numbered plan, each step run in turn, "
                                                       "replanning once on failure")
    p.add_argument("--memory-tokens", type=int, default=0, help="fold older steps into a running summary (plus "
                                                                 "BM25 recall) past this many transcript tokens")
    p.add_argument("--max-steps", type=int, default=max_steps, help="most model calls")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most generated tokens over the whole run")
    p.add_argument("--step-tokens", type=int, default=128, help="most generated tokens per model call")
    add_client_args(p)


def add_commands(sub):
    p = sub.add_parser("agent", help="agents: tool calling or ReAct loops (calculator, sandboxed Python, files, "
                                     "search, MCP tools), the task suite, traces")
    commands = p.add_subparsers(dest="agent_command", required=True)
    run = commands.add_parser("run", help="run an agent on a task")
    run.add_argument("task")
    run.add_argument("--tools", default=None, help="comma-separated: calculate, run_python, read_file, write_file, "
                                                   "search (default: all available; the file tools need "
                                                   "--workspace, search needs --index; '' for none)")
    run.add_argument("--workspace", default=None, help="directory the file tools may read and write")
    run.add_argument("--index", default=None, help="a RAG index (llmlab rag index) for the search tool")
    run.add_argument("--mcp", action="append", default=[], metavar="COMMAND",
                     help="also use the tools of this MCP server over stdio, e.g. 'python -m llmlab.agent.mcp' "
                          "(repeatable)")
    run.add_argument("--trace", default=None, help="write the run's trace here (JSONL)")
    _agent_options(run, max_steps=6, max_tokens=2000)
    run.set_defaults(func=_run)
    suite = commands.add_parser("suite", help="run the agent task suite: success rate (Wilson 95%), steps, tokens")
    suite.add_argument("suite", nargs="?", default="builtin", help="the suite (builtin)")
    suite.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    suite.add_argument("--out", default=None, help="write the report here (JSON)")
    suite.add_argument("--trace-dir", default=None, help="write each task's trace here (JSONL)")
    _agent_options(suite, max_steps=4, max_tokens=600)
    suite.set_defaults(func=_suite)
    show = commands.add_parser("show", help="print a saved trace")
    show.add_argument("trace")
    show.set_defaults(func=_show)
