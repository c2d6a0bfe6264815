"""llmlab's built-in tools as an MCP server over stdio (the `mcp` SDK): `python -m llmlab.agent.mcp`."""

from __future__ import annotations

import argparse


def build_server(workspace: str | None = None, index: str | None = None):
    """An MCP server offering calculate, run_python (the sandbox), with a workspace read_file/write_file, and with
    a RAG index search."""
    from mcp.server.mcpserver import MCPServer

    from llmlab.agent.tools import builtin_tools

    server = MCPServer("llmlab-tools", instructions="llmlab's built-in agent tools")
    for tool in builtin_tools(workspace, index=index):
        server.add_tool(tool.fn, name=tool.name, description=tool.description)
    return server


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llmlab.agent.mcp", description=__doc__)
    p.add_argument("--workspace", default=None, help="directory read_file/write_file may use")
    p.add_argument("--index", default=None, help="a RAG index (llmlab rag index) for the search tool")
    args = p.parse_args(argv)
    build_server(args.workspace, args.index).run("stdio")


if __name__ == "__main__":
    main()
