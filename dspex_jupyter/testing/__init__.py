"""Offline, SIMULATED language model and small tasks for tests, tutorials and benchmarks.

Nothing here calls a real model. ``simulated_lm("arithmetic")`` returns a real ``dspy.LM``
(model ``simulated/arithmetic``) whose accuracy depends on the instruction and demos in the
prompt, so DSPy optimizers such as MIPROv2 measurably improve programs that use it. To switch
a tutorial to a real model, replace it with e.g. ``dspy.LM("openai/gpt-4o-mini")``.
"""

from dspex_jupyter.testing.simulated import (
    GENERAL_KEYWORDS,
    AsyncSimulatedEngine,
    ParsedPrompt,
    SimulatedEngine,
    SimulatedLM,
    accuracy,
    parse_prompt,
    simulated_lm,
)
from dspex_jupyter.testing.tasks import (
    TASK_NAMES,
    Task,
    TaskKnowledge,
    arithmetic,
    capitals,
    get_task,
    sentiment,
)

__all__ = [
    "GENERAL_KEYWORDS",
    "TASK_NAMES",
    "AsyncSimulatedEngine",
    "ParsedPrompt",
    "SimulatedEngine",
    "SimulatedLM",
    "Task",
    "TaskKnowledge",
    "accuracy",
    "arithmetic",
    "capitals",
    "get_task",
    "parse_prompt",
    "sentiment",
    "simulated_lm",
]
