"""Agents: tools as typed functions, the function-calling loop with budgets and traces, the sandbox, MCP."""

from llmlab.agent.loop import AgentResult, format_trace, read_trace, run_agent
from llmlab.agent.sandbox import SandboxLimits, SandboxResult, run_python
from llmlab.agent.tools import Tool, builtin_tools, function_tool

__all__ = ["AgentResult", "SandboxLimits", "SandboxResult", "Tool", "builtin_tools", "format_trace", "function_tool",
           "read_trace", "run_agent", "run_python"]
