"""An MCP client (the `mcp` SDK) lists and calls llmlab's tools served over stdio."""

import asyncio
import sys

import pytest

pytest.importorskip("mcp")


def test_mcp_client_lists_and_calls_llmlab_tools(tmp_path):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def session():
        params = StdioServerParameters(command=sys.executable,
                                       args=["-m", "llmlab.agent.mcp", "--workspace", str(tmp_path)])
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                names = sorted(t.name for t in (await s.list_tools()).tools)
                calc = await s.call_tool("calculate", {"expression": "(12 + 30) * 2"})
                wrote = await s.call_tool("write_file", {"path": "a.txt", "content": "hi"})
                code = await s.call_tool("run_python", {"code": "import socket; socket.socket()"})
                return names, calc, wrote, code

    names, calc, wrote, code = asyncio.run(session())
    assert names == ["calculate", "read_file", "run_python", "write_file"]
    assert calc.content[0].text == "84"
    assert (tmp_path / "a.txt").read_text() == "hi" and not wrote.is_error
    assert "not allowed" in code.content[0].text
