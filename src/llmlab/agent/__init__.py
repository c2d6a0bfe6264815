"""Agents: tools as typed functions, function-calling and ReAct loops with memory, plans, budgets and traces, the
sandbox, MCP (llmlab's tools as a server, other servers' tools as a client), the task suite."""

from llmlab.agent.loop import AgentResult, format_trace, read_trace, run_agent
from llmlab.agent.memory import Memory
from llmlab.agent.plan import run_planned
from llmlab.agent.sandbox import SandboxLimits, SandboxResult, run_python
from llmlab.agent.tools import Tool, ToolCall, builtin_tools, function_tool, search_tool

__all__ = ["AgentResult", "Memory", "SandboxLimits", "SandboxResult", "Tool", "ToolCall", "builtin_tools",
           "format_trace", "function_tool", "read_trace", "run_agent", "run_planned", "run_python", "search_tool"]
