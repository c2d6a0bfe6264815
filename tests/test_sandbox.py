"""The sandbox stops model-written code that escapes or runs away, with a clear observation, and the host is fine."""

import os
import time

import pytest

from llmlab.agent.sandbox import SandboxLimits, run_python
from llmlab.agent.tools import python_tool

LIMITS = SandboxLimits(timeout=4, cpu_seconds=2)


def test_ordinary_code_runs_and_writes_inside_its_directory():
    r = run_python("open('out.txt', 'w').write('hi')\nimport json, math\nprint(open('out.txt').read(), json.dumps(2))",
                   LIMITS)
    assert r.ok and r.stdout.split() == ["hi", "2"]


@pytest.mark.parametrize("code, reason", [
    ("print(open('/etc/hostname').read())", "blocked"),
    (f"print(open({os.path.abspath(__file__)!r}).read())", "blocked"),  # a file the host's user can read
    ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", "blocked"),
    ("import os\nwhile True:\n    os.fork()", "blocked"),
    ("import subprocess\nsubprocess.run(['ls', '/'])", "blocked"),
    ("x = bytearray(8 * 1024 ** 3)", "memory_limit"),
    ("while True:\n    pass", ("timeout", "cpu_limit")),
])
def test_escapes_and_runaways_are_stopped(code, reason):
    r = run_python(code, LIMITS)
    assert not r.ok and r.reason in (reason if isinstance(reason, tuple) else (reason,)), (r.reason, r.stderr[-300:])
    assert r.observation().startswith("Error: the code was")


def test_the_host_is_unaffected_and_the_directory_is_gone():
    before = set(os.listdir("/tmp"))
    code = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass"
    r = run_python(code, SandboxLimits(timeout=1.5, cpu_seconds=5))
    assert r.reason == "timeout"
    workdir = r.stdout.strip()
    assert workdir.startswith("/tmp/llmlab-sandbox-") and not os.path.exists(workdir)
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("llmlab-sandbox-")}
    os.kill(os.getpid(), 0)  # this process is alive and still ours


def test_the_python_tool_reports_what_happened():
    tool = python_tool(LIMITS)
    assert tool({"code": "print(6 * 7)"}) == "42"
    assert "not allowed" in tool({"code": "import socket; socket.socket()"})
    assert tool({"code": 5}).startswith("Error: bad arguments")
