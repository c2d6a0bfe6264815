"""Red-teaming through the model client: jailbreak probe families, behaviour sets (built-in, HarmBench,
JailbreakBench), judges calibrated on a labelled set, defences, extraction probes and prompt injection."""

from llmlab.safety.redteam.behaviours import Behaviour, builtin_behaviours, load_behaviours
from llmlab.safety.redteam.defences import DEFENCES, INJECTION_DEFENCES, SystemPromptClient, respond
from llmlab.safety.redteam.harness import BUDGETS, run_redteam
from llmlab.safety.redteam.judges import Judge, calibrate_judge
from llmlab.safety.redteam.probes import FAMILIES, build_prompts

__all__ = ["BUDGETS", "Behaviour", "DEFENCES", "FAMILIES", "INJECTION_DEFENCES", "Judge", "SystemPromptClient",
           "build_prompts", "builtin_behaviours", "calibrate_judge", "load_behaviours", "respond", "run_redteam"]
