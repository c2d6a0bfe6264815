"""llmlab's built-in tools as an MCP server over stdio (the `mcp` SDK): `python -m llmlab.agent.mcp`."""

from __future__ import annotations

import argparse


def build_server(workspace: str | None = None):
    """An MCP server offering calculate, run_python (the sandbox) and, with a workspace, read_file/write_file."""
    from mcp.server.mcpserver import MCPServer

    from llmlab.agent.tools import builtin_tools

    server = MCPServer("llmlab-tools", instructions="llmlab's built-in agent tools")
    for tool in builtin_tools(workspace):
        server.add_tool(tool.fn, name=tool.name, description=tool.description)
    return server


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llmlab.agent.mcp", description=__doc__)
    p.add_argument("--workspace", default=None, help="directory read_file/write_file may use")
    args = p.parse_args(argv)
    build_server(args.workspace).run("stdio")


if __name__ == "__main__":
    main()
