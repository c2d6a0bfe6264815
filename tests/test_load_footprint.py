"""Loading a checkpoint stays light: no compiler stack pulled in by building the model on the meta device."""

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
