"""The sandbox for model-written Python: a separate, limited process in a fresh directory, with a clear verdict.

What each layer does, and what it does not stop (be honest: this is a guard rail for a small model's mistakes and
casual misbehaviour, not a security boundary against a determined attacker — use a VM or gVisor for that):

- A separate process (`python -I`, no user site, no environment variables of ours) in a fresh temporary directory
  that is deleted afterwards. The host's Python is never touched by the code (unlike smolagents' in-process
  executor, whose escapes were CVE-2025-5120 and CVE-2025-9959).
- resource.setrlimit: CPU seconds (SIGXCPU), address space (a large allocation fails with MemoryError), file size
  (SIGXFSZ / EFBIG), number of processes (only binds a non-root user, hence the next point).
- Running as the unprivileged user `nobody` when the host runs as root: the code cannot read files only root may
  read, and cannot write outside its directory except where anyone may (/tmp...). Not done when not root, or when
  no Python is runnable by that user. The sandbox then runs a Python that user may run (the system's when this
  one lives under /root): model code gets the standard library, not this virtualenv's packages.
- A new network namespace (unshare(CLONE_NEWNET), only possible as root): no interface but a down loopback, so no
  connection can be made, even by code that gets past the audit hook.
- An audit hook (sys.addaudithook, installed before the code runs, cannot be removed from Python): opening a file
  outside the working directory (except reading Python's own installation, which imports need), creating a
  socket, fork/exec/subprocess/os.system, and loading ctypes are refused. It does NOT stop code that reaches
  native code some other way (a C extension already importable, memory corruption); that is what the process,
  user, limits and namespace are for.
- A wall-clock timeout: the whole process group is killed.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NOBODY = 65534
CLONE_NEWNET = 0x40000000

# runs before the model's code, in the sandboxed interpreter
GUARD = r'''
import os, sys
_cwd = os.path.realpath(os.getcwd())
_py = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
_BLOCKED = ("socket.__new__", "socket.connect", "socket.bind", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn",
            "os.spawn", "os.system", "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.cdata",
            "os.chdir", "os.symlink", "os.link", "pty.spawn", "sys.remote_exec")

def _inside(path, roots):
    return any(path == r or path.startswith(r + os.sep) for r in roots)

def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        writing = any(c in mode for c in "wax+")
        if not _inside(path, (_cwd,)) and (writing or not _inside(path, _py)):
            raise PermissionError(f"sandbox: access outside the working directory is not allowed: {path}")
    elif event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(_hook)
del _hook
_code = open("main.py").read()
exec(compile(_code, "main.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 10 << 20  # largest file it may write
    processes: int = 32  # processes of the sandbox user (binds only a non-root user)
    max_output: int = 20_000  # characters of stdout/stderr kept


@dataclass
class SandboxResult:
    ok: bool
    stdout: str
    stderr: str
    reason: str  # "ok" | "error" | "timeout" | "cpu_limit" | "memory_limit" | "file_limit" | "blocked" | "killed"
    returncode: int | None

    def observation(self) -> str:
        """What an agent is told: the output, or a clear line on why the code was stopped."""
        if self.ok:
            return self.stdout.strip() or "(no output)"
        why = {"timeout": "stopped: it ran past the wall-clock time limit",
               "cpu_limit": "stopped: it used more CPU time than allowed",
               "memory_limit": "stopped: it tried to use more memory than allowed",
               "file_limit": "stopped: it wrote a file larger than allowed",
               "blocked": "refused by the sandbox (no network, no processes, no files outside its directory)",
               "killed": "killed by a signal"}.get(self.reason, "raised an error")
        last = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        return f"Error: the code was {why}" + (f": {last[0]}" if last else "") if self.reason != "error" else \
            f"Error: {last[0] if last else 'exit code ' + str(self.returncode)}"


def _preexec(limits: SandboxLimits, as_nobody: bool, isolate_network: bool):
    def setup():
        os.setsid()  # its own process group, so a timeout kills everything it started
        if isolate_network:
            import ctypes
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)  # best effort: the audit hook also blocks
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    return setup


def _world_runnable(path: str) -> bool:
    """Whether any user may run `path` (o+x on the file and on every directory above it)."""
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] not in ("/", ""):
        parts.append(os.path.dirname(parts[-1]))
    return os.path.isfile(path) and all(os.stat(p).st_mode & 0o001 for p in parts)


def interpreter(as_nobody: bool) -> str:
    """The Python the sandbox runs: this one, or for the unprivileged user one it may run (the system's)."""
    if not as_nobody:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_runnable(candidate):
            return os.path.realpath(candidate)
    return ""


def run_python(code: str, limits: SandboxLimits | None = None, files: dict[str, str] | None = None) -> SandboxResult:
    """Run `code` in the sandbox (files: extra {name: text} put in its directory first)."""
    limits = limits or SandboxLimits()
    root = os.geteuid() == 0
    python = interpreter(root)
    as_nobody = root and bool(python)  # no Python that user may run: stay root (the other layers still hold)
    python = python or sys.executable
    workdir = tempfile.mkdtemp(prefix="llmlab-sandbox-")
    try:
        for name, text in {"main.py": code, **(files or {})}.items():
            with open(os.path.join(workdir, os.path.basename(name)), "w") as f:
                f.write(text)
        if as_nobody:
            for name in [workdir, *(os.path.join(workdir, n) for n in os.listdir(workdir))]:
                os.chown(name, NOBODY, NOBODY)
        proc = subprocess.Popen([python, "-I", "-c", GUARD], cwd=workdir, env={"PATH": "/usr/bin:/bin"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_preexec(limits, as_nobody, root))
        try:
            out, err = proc.communicate(timeout=limits.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            timed_out = True
        finally:
            _kill_group(proc.pid)  # anything it left running
        return _verdict(proc.returncode, out[-limits.max_output:], err[-limits.max_output:], timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(code: int, out: str, err: str, timed_out: bool) -> SandboxResult:
    if timed_out:
        reason = "timeout"
    elif code == 0:
        reason = "ok"
    elif code == -signal.SIGXCPU or code == -signal.SIGKILL and "MemoryError" not in err:
        reason = "cpu_limit" if code == -signal.SIGXCPU else "killed"
    elif code == -signal.SIGXFSZ or "File too large" in err:
        reason = "file_limit"
    elif "MemoryError" in err:
        reason = "memory_limit"
    elif "sandbox:" in err or "PermissionError" in err:
        reason = "blocked"
    elif code < 0:
        reason = "killed"
    else:
        reason = "error"
    return SandboxResult(reason == "ok", out, err, reason, code)
