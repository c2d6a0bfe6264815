"""An MCP client (the `mcp` SDK) lists and calls llmlab's tools served over stdio; the agent uses an MCP server's tools
(llmlab's own server as the external one) through agent/mcp_client.py."""

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


def test_agent_uses_an_mcp_servers_tools(tmp_path, smollm2):
    from llmlab.agent.loop import run_agent
    from llmlab.agent.mcp_client import MCPTools
    from llmlab.client import LocalClient

    # llmlab's own MCP server plays the external server: its tools are listed, wrapped and called over stdio
    with MCPTools([sys.executable, "-m", "llmlab.agent.mcp", "--workspace", str(tmp_path)]) as tools:
        by_name = {t.name: t for t in tools}
        assert sorted(by_name) == ["calculate", "read_file", "run_python", "write_file"]
        assert by_name["calculate"]({"expression": "(12 + 30) * 2"}) == "84"
        assert by_name["write_file"]({"path": "b.txt", "content": "yo"}).startswith("wrote 2")
        assert (tmp_path / "b.txt").read_text() == "yo"
        assert "not allowed" in by_name["run_python"]({"code": "import socket; socket.socket()"})
        assert by_name["calculate"]({"expression": 5}).startswith("Error: bad arguments")  # the schema it listed
        r = run_agent(LocalClient(smollm2), "What is 123 * 45? Use calculate.", [by_name["calculate"]],
                      max_steps=1, step_tokens=40)
    (call,) = [e for e in r.trace if e["type"] == "tool"]
    # decoded under the schema the MCP server published; the observation came back from the server
    assert call["name"] in ("calculate", "final_answer") and not call["observation"].startswith("Error: there is")
