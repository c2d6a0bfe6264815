"""Tools from an MCP server over stdio (the `mcp` SDK's client), as agent Tools.

The SDK is asynchronous and the agent loop is not: a background thread runs an event loop that holds the session
open, and each tool call is sent to it and waited for. Use it as a context manager, which stops the server:

    with MCPTools(["python", "-m", "llmlab.agent.mcp"]) as tools:
        run_agent(client, task, tools)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from llmlab.agent.tools import Tool
from llmlab.errors import LLMLabError


class MCPTools:
    def __init__(self, command: list[str], timeout: float = 60.0, env: dict[str, str] | None = None):
        if not command:
            raise LLMLabError("an MCP server needs a command to run")
        self.command, self.timeout, self.env = list(command), timeout, env
        self.tools: list[Tool] = []
        self._loop = self._thread = self._session = self._stop = self._held = None

    def start(self) -> list[Tool]:
        """Start the server, list its tools and wrap each as a Tool."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp-client", daemon=True)
        self._thread.start()
        listed: concurrent.futures.Future = concurrent.futures.Future()
        self._held = asyncio.run_coroutine_threadsafe(self._hold(listed), self._loop)
        try:
            tools = listed.result(self.timeout)
        except Exception as e:  # noqa: BLE001 - whatever stopped the server from starting, said in one line
            self.close()
            raise LLMLabError(f"MCP server {' '.join(self.command)!r} did not start: {type(e).__name__}: {e}") \
                from None
        self.tools = [self._wrap(t) for t in tools]
        return self.tools

    async def _hold(self, listed: concurrent.futures.Future):
        """Open the session, list the tools, then keep the session open until close() (one task: the SDK's
        context managers must be left in the task that entered them)."""
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client
        params = StdioServerParameters(command=self.command[0], args=self.command[1:], env=self.env)
        try:
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    tools = (await session.list_tools()).tools
                    self._session, self._stop = session, asyncio.Event()
                    listed.set_result(tools)
                    await self._stop.wait()
        except BaseException as e:
            if not listed.done():
                listed.set_exception(e)
            raise

    def _wrap(self, spec) -> Tool:
        name = spec.name

        def call(**arguments) -> str:
            future = asyncio.run_coroutine_threadsafe(self._session.call_tool(name, arguments), self._loop)
            try:
                r = future.result(self.timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                return f"Error: the MCP tool {name} gave no answer within {self.timeout:g} s"
            text = "\n".join(c.text for c in r.content if getattr(c, "text", None) is not None)
            if not text and r.structured_content is not None:
                text = str(r.structured_content)
            return f"Error: {text}" if r.is_error and not text.startswith("Error") else text

        schema = spec.input_schema or {"type": "object", "properties": {}}
        return Tool(name, spec.description or name, schema, call)

    def close(self):
        """Stop the session and the server, then the thread."""
        if self._loop is None:
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._held is not None:
            try:
                self._held.result(self.timeout)
            except Exception:  # noqa: BLE001 - the server is going away; its last error is not ours to raise
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        self._loop.close()
        self._loop = self._thread = self._session = self._stop = self._held = None

    def __enter__(self) -> list[Tool]:
        return self.start()

    def __exit__(self, *exc):
        self.close()
