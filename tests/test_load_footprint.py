"""What a loaded model costs its process: no compiler stack imported by building it on the meta device, and no idle
OpenMP pool left in a thread that hands decoding to another (the server)."""

import os
import subprocess
import sys

CHECK = """
import sys, llmlab
llm = llmlab.load(sys.argv[1], announce=False)
assert llm.generate("Hi", max_new_tokens=2, temperature=0)
heavy = sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)
print("heavy:", ",".join(heavy) or "none")
"""


def test_loading_smollm2_does_not_import_the_compiler_stack(smollm2_gguf):
    # torch._dynamo + sympy are 70 MiB resident and ~1 s of start-up; a meta-device normal_/arange used to import them
    done = subprocess.run([sys.executable, "-c", CHECK, str(smollm2_gguf)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "heavy: none"


RELEASE = """
import os, sys, llmlab
from llmlab.engine.native import release_thread_pool
llm = llmlab.load(sys.argv[1], announce=False)
llm.generate("Hi", max_new_tokens=2, temperature=0)  # native steps in this thread: an OpenMP pool of 2
before = len(os.listdir("/proc/self/task"))
release_thread_pool()
print(before, len(os.listdir("/proc/self/task")))
"""


def test_release_thread_pool_frees_this_threads_openmp_workers(smollm2_gguf):
    # the server frees its main thread's pool so the batcher thread's is the only one (else libgomp sleeps at barriers)
    env = {**os.environ, "LLMLAB_NATIVE_THREADS": "2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", RELEASE, str(smollm2_gguf)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert after < before
