"""A SIMULATED, offline language model for tests, tutorials and benchmarks.

No real model is called. ``SimulatedEngine`` implements DSPy 3.4's engine contract
(``complete(Request) -> Response``, ``stream``, ``close``) and ``SimulatedLM`` is a real
``dspy.LM`` built on it, so switching a tutorial to a real model is one line::

    lm = simulated_lm("arithmetic")          # simulated, offline
    # lm = dspy.LM("openai/gpt-4o-mini")     # the real thing

How it answers (see ``accuracy`` and ``SimulatedEngine.complete``):

- It parses the prompt DSPy's ChatAdapter (or JSONAdapter) builds: the instruction in the
  system message, few-shot demos as earlier user/assistant turns, and the input fields of
  the final user message. It replies in the adapter's format for the requested output
  fields (``[[ ## field ## ]]`` blocks ending with ``[[ ## completed ## ]]``, or JSON).
- For a known task it computes the ground truth from the input itself (arithmetic, a
  sentiment lexicon, a capitals table, or a lookup table you pass in) and answers correctly
  with probability ``p``: higher when the instruction contains helpful keywords ("step by
  step", "carefully", "verify", task hints) and when the prompt has correct demos, lower
  with misleading phrases ("guess", "first instinct", task-specific ones) or wrong demos.
  Whether one example is right is ``stable_hash(seed, input, instruction, demos, sample) < p``,
  so accuracy depends on the prompt and an optimizer such as MIPROv2 can improve it.
- Asked to propose an instruction (an output field called ``proposed_instruction``, as in
  MIPROv2's GroundedProposer), it returns a phrasing drawn from a fixed pool by hash of the
  prompt, temperature and rollout id; some phrasings carry helpful keywords, some do not.
- Asked to reflect (GEPA's instruction-proposal prompt: ``current_instruction`` and
  ``examples_with_feedback`` in, ``new_instruction`` out; or gepa's plain-text template), it
  reads the feedback: sentences naming a helpful phrase the current instruction lacks are
  lessons, and the new instruction is the current one, minus sentences with misleading
  phrases, plus every lesson (in an order chosen by hash of the prompt and sample).
  Feedback with no lesson leaves the instruction as it is. So GEPA improves a program only
  through the feedback its metric writes.
- Asked for SIMBA's advice (``OfferFeedback``: ``module_advice`` out), it advises each
  module named in ``module_names`` with a helpful phrase its instruction lacks, phrased as
  "If the module receives ..., then it should ...".
- Any other signature gets every output field filled with a plausible placeholder.

Determinism and thread safety: the answer is a pure function of (request messages,
temperature, rollout id, seed). The engine is an immutable dataclass with no counters or
iterators, so it can be shared by any number of threads. ``rollout_id`` never reaches an
engine in DSPy 3.4 (the LM layer strips it from the Request), so ``SimulatedLM.copy`` binds
it into the engine: that is how ``lm.copy(rollout_id=..., temperature=...)`` (used by
MIPROv2's proposer, BootstrapFewShot rounds, BestOfN, Refine) yields different samples.
At ``temperature=0`` the rollout id is ignored, as DSPy documents for real providers.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import re
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from dspex_jupyter.testing.tasks import TaskKnowledge, knowledge_for, lookup_knowledge

__all__ = [
    "GENERAL_KEYWORDS",
    "GENERAL_MISLEADING",
    "AsyncSimulatedEngine",
    "ParsedPrompt",
    "SimulatedEngine",
    "SimulatedLM",
    "accuracy",
    "parse_prompt",
    "simulated_lm",
]

SIMULATED_PREFIX = "simulated/"

#: Instruction phrases that make the simulated LM more accurate on any task.
GENERAL_KEYWORDS: tuple[str, ...] = (
    "step by step",
    "carefully",
    "verify",
    "double-check",
    "precise",
)

#: Instruction phrases that make it less accurate on any task.
GENERAL_MISLEADING: tuple[str, ...] = ("first instinct", "guess", "quick")

KEYWORD_WEIGHT = 0.15  # per distinct keyword found in the instruction
MAX_KEYWORD_HITS = 3
MISLEADING_WEIGHT = 0.15  # per distinct misleading phrase
MAX_MISLEADING_HITS = 2
DEMO_WEIGHT = 0.05  # per correct demo in the prompt
MAX_DEMOS = 4
WRONG_DEMO_PENALTY = 0.15  # per demo whose answer is wrong
REASONING_BONUS = 0.05  # when the signature asks for `reasoning` (ChainOfThought)
MIN_ACCURACY, MAX_ACCURACY = 0.03, 0.97
DEFAULT_BASE_ACCURACY = 0.5

# Instruction candidates of the simulated proposer, for any task. Mixed on purpose: some
# carry helpful keywords and some do not, so a search over them has something to find.
_GENERIC_PROPOSALS: tuple[str, ...] = (
    "Answer the question.",
    "Respond with your first instinct; do not overthink it.",
    "Think step by step, then give the final answer.",
    "Work carefully and verify your answer before responding.",
    "Carefully reason step by step and double-check the result.",
    "Be precise, check each part of the input and verify the final answer.",
)

# Output fields of reflective optimizers' prompts (DSPy's GEPA proposer, its multimodal
# variant, the length compressor) and gepa's plain-text reflection template.
_REFLECTION_FIELDS = ("new_instruction", "improved_instruction")
_GEPA_TEXT_TEMPLATE_END = "Provide the new instructions within ``` blocks."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# SIMBA advice for any task, one helpful phrase each (task lessons come first).
_GENERAL_ADVICE: tuple[str, ...] = (
    "Work step by step.",
    "Read the input carefully.",
    "Verify the answer before replying.",
    "Be precise.",
)

_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.+?)\):", re.MULTILINE)
_NOT_SUPPLIED = "Not supplied for this particular example."
# The adapters end the final user message with a reminder of the output format.
_REMINDER = re.compile(
    r"\n\s*Respond with (?:the corresponding output fields|a JSON object).*\Z", re.DOTALL
)


# --------------------------------------------------------------------------- hashing


def _digest(*parts: object) -> bytes:
    text = "\x1f".join(repr(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).digest()


def stable_unit(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts`` (sha256, not ``hash()``)."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def stable_int(*parts: object) -> int:
    """A non-negative integer that depends only on ``parts``."""
    return int.from_bytes(_digest(*parts)[8:16], "big")


# --------------------------------------------------------------------------- prompt parsing


@dataclass(frozen=True)
class ParsedPrompt:
    """What the simulated LM reads from an adapter-built prompt."""

    instruction: str
    input_fields: tuple[str, ...]
    output_fields: tuple[tuple[str, str], ...]  # (name, type as the adapter wrote it)
    demos: tuple[tuple[dict[str, str], dict[str, str]], ...]  # (inputs, outputs) pairs
    inputs: dict[str, str]
    json_mode: bool
    structured: bool  # False: not a DSPy adapter prompt (e.g. lm("hello"))

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.output_fields)


def _sections(text: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` sections of a message (first occurrence wins)."""
    out: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        m = _HEADER.match(line.strip())
        if m:
            if current is not None and current not in out:
                out[current] = "\n".join(lines).strip()
            current, lines = m.group(1), [line.strip()[m.end() :]]
        else:
            lines.append(line)
    if current is not None and current not in out:
        out[current] = "\n".join(lines).strip()
    return out


def _assistant_fields(text: str) -> dict[str, str]:
    sections = _sections(text)
    if sections:
        return sections
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _fields_in(block: str) -> tuple[tuple[str, str], ...]:
    return tuple((m.group(1), m.group(2)) for m in _FIELD_LINE.finditer(block))


def parse_prompt(request: Request) -> ParsedPrompt:
    """Read instruction, field names, demos and inputs from an adapter-built Request."""
    system = request.system
    if isinstance(system, tuple):
        system = "".join(getattr(p, "text", "") or "" for p in system)
    system_text = system or ""
    messages = list(request.messages)
    # A developer-role message carries the system text when use_developer_role is set.
    while messages and messages[0].role == "developer" and not system_text:
        system_text = messages.pop(0).text or ""

    last = messages[-1].text or "" if messages else ""
    inputs_block, _, rest = system_text.partition("Your output fields are:")
    input_fields = tuple(name for name, _ in _fields_in(inputs_block))
    outputs_block = rest.split("All interactions will be structured", 1)[0]
    output_fields = _fields_in(outputs_block)
    if not output_fields:
        # Fall back to the reminder in the final user message.
        names = re.findall(r"`\[\[ ## (\w+) ## \]\]`", last)
        output_fields = tuple((n, "str") for n in names if n != "completed")
    structured = bool(output_fields)

    instruction = ""
    marker = "your objective is:"
    idx = system_text.find(marker)
    if idx >= 0:
        instruction = textwrap.dedent(system_text[idx + len(marker) :]).strip()

    json_mode = (
        "Outputs will be a JSON object" in system_text
        or "Respond with a JSON object" in last
        or request.config.response_format is not None
    )

    demos: list[tuple[dict[str, str], dict[str, str]]] = []
    history = messages[:-1]
    i = 0
    while i + 1 < len(history):
        user, assistant = history[i], history[i + 1]
        if user.role == "user" and assistant.role == "assistant":
            demos.append((_sections(user.text or ""), _assistant_fields(assistant.text or "")))
            i += 2
        else:
            i += 1
    return ParsedPrompt(
        instruction=instruction,
        input_fields=input_fields,
        output_fields=output_fields,
        demos=tuple(demos),
        inputs=_sections(_REMINDER.sub("", last)),
        json_mode=json_mode,
        structured=structured,
    )


# --------------------------------------------------------------------------- accuracy


def keyword_hits(instruction: str, phrases: tuple[str, ...]) -> int:
    """How many of ``phrases`` the instruction contains (case-insensitive substrings)."""
    text = instruction.lower()
    return sum(1 for phrase in phrases if phrase in text)


def accuracy(
    base: float,
    instruction: str,
    *,
    hints: tuple[str, ...] = (),
    misleading: tuple[str, ...] = (),
    correct_demos: int = 0,
    wrong_demos: int = 0,
    reasoning: bool = False,
) -> float:
    """Probability that the simulated LM answers correctly, given what the prompt contains.

    ``clip(base + 0.15*min(hits, 3) - 0.15*min(misleading_hits, 2)
    + 0.05*min(correct_demos, 4) - 0.15*wrong_demos + 0.05*reasoning, 0.03, 0.97)``, where
    ``hits`` counts ``GENERAL_KEYWORDS`` and ``hints`` in the instruction and
    ``misleading_hits`` counts ``GENERAL_MISLEADING`` and ``misleading``.
    """
    hits = keyword_hits(instruction, (*GENERAL_KEYWORDS, *hints))
    bad = keyword_hits(instruction, (*GENERAL_MISLEADING, *misleading))
    p = (
        base
        + KEYWORD_WEIGHT * min(hits, MAX_KEYWORD_HITS)
        - MISLEADING_WEIGHT * min(bad, MAX_MISLEADING_HITS)
        + DEMO_WEIGHT * min(correct_demos, MAX_DEMOS)
        - WRONG_DEMO_PENALTY * wrong_demos
        + (REASONING_BONUS if reasoning else 0.0)
    )
    return min(MAX_ACCURACY, max(MIN_ACCURACY, p))


# --------------------------------------------------------------------------- reflection


def _sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def _lessons(feedback: str, current: str, helpful: tuple[str, ...]) -> list[str]:
    """Feedback sentences that name a helpful phrase the current instruction lacks (once each)."""
    have = current.lower()
    found: list[str] = []
    # Feedback arrives as JSON (DSPy's JSONAdapter) or markdown; unescape quotes first.
    text = feedback.replace('\\"', '"').replace("\\'", "'")
    for piece in re.split(r'["\n]', text):
        for sentence in _sentences(piece):
            lowered = sentence.lower()
            new = [p for p in helpful if p in lowered and p not in have]
            if new and sentence not in found:
                found.append(sentence)
    return found


def _first_int(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def _shorten(instruction: str, limit: int | None) -> str:
    """Drop trailing sentences until the instruction fits (never cut inside a sentence)."""
    parts = _sentences(instruction)
    while limit is not None and len(parts) > 1 and len(" ".join(parts)) > limit:
        parts.pop()
    return " ".join(parts)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --------------------------------------------------------------------------- output values


def _literal_options(type_name: str) -> list[str]:
    m = re.search(r"Literal\[(.*)\]", type_name)
    if not m:
        return []
    try:
        values = ast.literal_eval("[" + m.group(1) + "]")
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in values]


def _placeholder(name: str, type_name: str, parsed: ParsedPrompt) -> Any:
    """A plausible value of the declared type for a field the simulator has no truth for."""
    t = type_name.strip()
    options = _literal_options(t)
    if options:
        return options[0]
    if t == "int":
        return 0
    if t == "float":
        return 0.0
    if t == "bool":
        return False
    if t.startswith(("list", "tuple", "set")):
        return []
    if t.startswith("dict"):
        return {}
    if name == "observations" and "prior_observations" in parsed.inputs:
        return "COMPLETE"  # lets MIPROv2's dataset summariser stop early
    topic = next(iter(parsed.inputs.values()), "").strip().splitlines()
    about = f" about: {topic[0][:80]}" if topic else ""
    return f"Simulated {name.replace('_', ' ')}{about} (offline simulated LM, no real model)."


def _render(parsed: ParsedPrompt, values: Mapping[str, Any]) -> str:
    if parsed.json_mode:
        return json.dumps({name: values[name] for name in parsed.output_names}, indent=2)
    blocks = []
    for name in parsed.output_names:
        value = values[name]
        text = value if isinstance(value, str) else json.dumps(value)
        blocks.append(f"[[ ## {name} ## ]]\n{text}")
    return "\n\n".join([*blocks, "[[ ## completed ## ]]"])


# --------------------------------------------------------------------------- the engine


@lru_cache(maxsize=64)
def _resolve_knowledge(
    task: str | None, answers: tuple[tuple[str, str], ...]
) -> TaskKnowledge | None:
    if answers:
        return lookup_knowledge(task or "lookup", dict(answers))
    return knowledge_for(task) if task else None


@dataclass(frozen=True)
class SimulatedEngine:
    """SIMULATED engine for ``dspy.LM(engine=...)``: offline, deterministic, stateless.

    ``task`` names built-in knowledge (``dspex_jupyter.testing.tasks.TASK_NAMES``);
    ``answers`` is an optional question -> answer table for ad-hoc tasks; ``seed`` changes
    which examples a given prompt gets right; ``base_accuracy`` overrides the task's base;
    ``latency_s`` sleeps per call to imitate a network LM; ``rollout_id`` is bound by
    ``SimulatedLM.copy`` (DSPy strips it from the Request).
    """

    task: str | None = None
    seed: int = 0
    base_accuracy: float | None = None
    answers: tuple[tuple[str, str], ...] = ()
    latency_s: float = 0.0
    rollout_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.answers, Mapping):
            pairs = tuple(sorted((str(k), str(v)) for k, v in self.answers.items()))
            object.__setattr__(self, "answers", pairs)
        else:
            object.__setattr__(self, "answers", tuple((str(k), str(v)) for k, v in self.answers))
        if self.latency_s < 0:
            raise ValueError("latency_s must be >= 0")
        if self.base_accuracy is not None and not 0.0 <= self.base_accuracy <= 1.0:
            raise ValueError("base_accuracy must be in [0, 1]")
        _resolve_knowledge(self.task, self.answers)  # fail early on an unknown task

    # -- engine contract ------------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        """Answer one request; a pure function of the request and this engine's fields."""
        if self.latency_s > 0:
            time.sleep(self.latency_s)  # imitates a network round trip, nothing else
        return self._respond(request)

    def stream(self, request: Request) -> Iterator[Any]:
        """Stream the same answer as ``complete`` as lm15 events."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to release: the engine holds no connections."""

    # -- persistence (dspy.LM.dump_state records custom engines by class path) -------------

    def dump_state(self) -> dict[str, Any]:
        """JSON-serialisable settings; no secrets."""
        return {
            "task": self.task,
            "seed": self.seed,
            "base_accuracy": self.base_accuracy,
            "answers": [list(pair) for pair in self.answers],
            "latency_s": self.latency_s,
            "rollout_id": self.rollout_id,
        }

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> SimulatedEngine:
        """Rebuild an engine from ``dump_state`` output."""
        data = dict(state)
        data["answers"] = tuple(tuple(pair) for pair in data.get("answers") or ())
        return cls(**data)

    def with_rollout(self, rollout_id: int | None) -> SimulatedEngine:
        """This engine with another rollout id (a different sample at temperature > 0)."""
        return self if rollout_id == self.rollout_id else replace(self, rollout_id=rollout_id)

    # -- answering --------------------------------------------------------------------------

    @property
    def knowledge(self) -> TaskKnowledge | None:
        return _resolve_knowledge(self.task, self.answers)

    def _sample_key(self, request: Request) -> tuple[Any, ...]:
        temperature = request.config.temperature
        if temperature == 0:
            return (0.0,)  # greedy: the rollout id makes no difference
        return (temperature, self.rollout_id)

    def _respond(self, request: Request) -> Response:
        parsed = parse_prompt(request)
        sample = self._sample_key(request)
        if not parsed.structured:
            text = self._unstructured(request, sample)
        else:
            text = _render(parsed, self._values(parsed, request, sample))
        system = request.system
        if isinstance(system, tuple):
            system = "".join(getattr(p, "text", "") or "" for p in system)
        prompt_chars = len(system or "") + sum(len(m.text or "") for m in request.messages)
        usage = Usage(
            input_tokens=max(1, prompt_chars // 4),
            output_tokens=max(1, len(text) // 4),
        )
        return Response(
            id="simulated-" + _digest(self.seed, request.model, text).hex()[:16],
            model=request.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=usage,
            provider_data={"simulated": True, "cost_usd": 0.0},
        )

    def _values(
        self, parsed: ParsedPrompt, request: Request, sample: tuple[Any, ...]
    ) -> dict[str, Any]:
        types = dict(parsed.output_fields)
        values = {name: _placeholder(name, t, parsed) for name, t in parsed.output_fields}
        if "proposed_instruction" in types:
            values["proposed_instruction"] = self._propose(parsed, request, sample)
            return values
        reflection = next((name for name in _REFLECTION_FIELDS if name in types), None)
        if reflection is not None:
            current = parsed.inputs.get("current_instruction", "")
            feedback = parsed.inputs.get("examples_with_feedback", "")
            values[reflection] = self._reflect(current, feedback, sample)
            return values
        if "shortened_instruction" in types:
            limit = _first_int(parsed.inputs.get("length_limit", ""))
            values["shortened_instruction"] = _shorten(parsed.inputs.get("instruction", ""), limit)
            return values
        if "module_advice" in types:
            values["module_advice"] = self._advise(parsed, sample)
            if "discussion" in types:
                values["discussion"] = (
                    "The better trajectory followed the task's conventions more closely; "
                    "each module gets one concrete habit to adopt (simulated advice)."
                )
            return values
        knowledge = self.knowledge
        solved = self._solve(knowledge, parsed.inputs, parsed) if knowledge else None
        if knowledge is None or solved is None:
            return values
        target, question, truth = solved
        p, demo_digest = self._accuracy(knowledge, parsed, target)
        draw = stable_unit(
            self.seed, knowledge.name, question, parsed.instruction, demo_digest, sample
        )
        if draw < p:
            answer = truth
        else:
            k = stable_int(self.seed, "wrong", question, parsed.instruction, demo_digest, sample)
            answer = knowledge.wrong(question, truth, k)
        values[target] = answer
        if "reasoning" in types and target != "reasoning":
            values["reasoning"] = knowledge.explain(question, answer)
        return values

    def _solve(
        self, knowledge: TaskKnowledge, inputs: Mapping[str, str], parsed: ParsedPrompt
    ) -> tuple[str, str, str] | None:
        """(target output field, input text, ground truth), or None if not this task."""
        names = [name for name in parsed.output_names if name != "reasoning"]
        if not names:
            return None
        target = knowledge.output_field if knowledge.output_field in names else names[-1]
        ordered = sorted(inputs.items(), key=lambda kv: kv[0] != knowledge.input_field)
        for _, text in ordered:
            truth = knowledge.solve(text)
            if truth is not None:
                return target, text.strip(), truth
        return None

    def _accuracy(
        self, knowledge: TaskKnowledge, parsed: ParsedPrompt, target: str
    ) -> tuple[float, str]:
        correct = wrong = 0
        for demo_inputs, demo_outputs in parsed.demos:
            answer = demo_outputs.get(target)
            if answer is None or answer.strip() == _NOT_SUPPLIED:
                continue
            solved = self._solve(knowledge, demo_inputs, parsed)
            if solved is None:
                continue
            if knowledge.check(solved[1], answer):
                correct += 1
            else:
                wrong += 1
        demo_digest = _digest(parsed.demos).hex()[:16]
        base = self.base_accuracy if self.base_accuracy is not None else knowledge.base_accuracy
        p = accuracy(
            base,
            parsed.instruction,
            hints=knowledge.hints,
            misleading=knowledge.misleading,
            correct_demos=correct,
            wrong_demos=wrong,
            reasoning="reasoning" in parsed.output_names,
        )
        return p, demo_digest

    def _helpful_phrases(self) -> tuple[str, ...]:
        knowledge = self.knowledge
        return (*GENERAL_KEYWORDS, *(knowledge.hints if knowledge else ()))

    def _misleading_phrases(self) -> tuple[str, ...]:
        knowledge = self.knowledge
        return (*GENERAL_MISLEADING, *(knowledge.misleading if knowledge else ()))

    def _reflect(self, current: str, feedback: str, sample: tuple[Any, ...]) -> str:
        """GEPA's reflection: keep the instruction, drop misleading sentences, add the lessons
        (feedback sentences naming a helpful phrase the instruction lacks)."""
        current = current.strip()
        lessons = _lessons(feedback, current, self._helpful_phrases())
        if not lessons:
            return current
        bad = self._misleading_phrases()
        kept = [s for s in _sentences(current) if not keyword_hits(s, bad)]
        # Every lesson goes in, as the reflection prompt asks; the hash only rotates their
        # order, so different samples word the instruction differently.
        k = stable_int(self.seed, "reflect", current, feedback, sample) % len(lessons)
        return " ".join([*kept, *lessons[k:], *lessons[:k]]).strip()

    def _advise(self, parsed: ParsedPrompt, sample: tuple[Any, ...]) -> dict[str, str]:
        """SIMBA's advice: per module, one helpful phrase its instructions lack."""
        try:
            names = json.loads(parsed.inputs.get("module_names", "[]"))
        except ValueError:
            names = []
        definitions = parsed.inputs.get("modules_defn", "")
        inputs = parsed.inputs.get("program_inputs", "the task's inputs")
        advice: dict[str, str] = {}
        knowledge = self.knowledge
        tips = (*(knowledge.lessons if knowledge else ()), *_GENERAL_ADVICE)
        helpful = self._helpful_phrases()
        have = definitions.lower()
        # Only tips that bring a helpful phrase the module's instructions do not have yet.
        useful = [t for t in tips if any(p in t.lower() and p not in have for p in helpful)]
        for name in [str(n) for n in names] if isinstance(names, list) else []:
            if not useful:
                break
            k = stable_int(self.seed, "advise", name, definitions, inputs, sample) % len(useful)
            tip = useful[k][0].lower() + useful[k][1:]
            advice[name] = (
                f"If the module receives inputs like {_one_line(inputs, 60)}, then it should "
                f"do as the better trajectory did: {tip}"
            )
        return advice

    def _unstructured(self, request: Request, sample: tuple[Any, ...]) -> str:
        """Plain-text prompts: gepa's own reflection template, or a labelled placeholder."""
        last = request.messages[-1].text or "" if request.messages else ""
        if _GEPA_TEXT_TEMPLATE_END in last:
            blocks = re.findall(r"```\n?(.*?)```", last, re.DOTALL)
            current = blocks[0] if blocks else ""
            feedback = blocks[1] if len(blocks) > 1 else ""
            return f"```\n{self._reflect(current, feedback, sample)}\n```"
        return "Simulated response (offline simulated LM; no real model was called)."

    def _propose(self, parsed: ParsedPrompt, request: Request, sample: tuple[Any, ...]) -> str:
        knowledge = self.knowledge
        pool = (*(knowledge.proposals if knowledge else ()), *_GENERIC_PROPOSALS)
        prompt = (request.system or "", tuple(m.text for m in request.messages))
        return pool[stable_int(self.seed, "propose", prompt, sample) % len(pool)]


class AsyncSimulatedEngine:
    """Async counterpart of ``SimulatedEngine`` (for ``acall``); same answers."""

    def __init__(self, sync: SimulatedEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        if self.sync.latency_s > 0:
            await asyncio.sleep(self.sync.latency_s)
        return self.sync._respond(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> AsyncSimulatedEngine:
        return cls(SimulatedEngine.load_state(state))

    def __repr__(self) -> str:
        return f"AsyncSimulatedEngine({self.sync!r})"


# --------------------------------------------------------------------------- the LM


class SimulatedLM(dspy.LM):
    """A real ``dspy.LM`` whose engine is SIMULATED (offline; no real model is called).

    Use it anywhere a ``dspy.LM`` goes (``dspy.context(lm=...)``, ``dspy.configure``,
    MIPROv2's ``task_model``/``prompt_model``). Differences from ``dspy.LM``: the model name
    must start with ``simulated/``; ``copy(rollout_id=...)`` binds the rollout id into the
    engine so optimizers get distinct samples; history entries record ``cost`` 0.0 (DSPy
    prices no custom engine and would record None); DSPy's response cache is off by
    default, because its key ignores the engine's seed and settings.
    """

    def __init__(
        self,
        model: str = "simulated/generic",
        *,
        engine: SimulatedEngine | None = None,
        async_engine: AsyncSimulatedEngine | None = None,
        cache: bool = False,
        **kwargs: Any,
    ) -> None:
        if not model.startswith(SIMULATED_PREFIX):
            raise ValueError(f"a simulated LM's model name starts with {SIMULATED_PREFIX!r}")
        if engine is None:
            name = model[len(SIMULATED_PREFIX) :]
            engine = SimulatedEngine(task=None if name == "generic" else name)
        if not isinstance(engine, SimulatedEngine):
            raise TypeError("SimulatedLM needs a SimulatedEngine")
        engine = engine.with_rollout(kwargs.get("rollout_id"))
        # The async engine always mirrors the sync one (async_engine is accepted for
        # load_state, which passes the saved one back).
        del async_engine
        super().__init__(
            model, engine=engine, async_engine=AsyncSimulatedEngine(engine), cache=cache, **kwargs
        )

    @property
    def simulated_engine(self) -> SimulatedEngine:
        """The engine this LM answers with."""
        return self._engine_spec

    def copy(self, **kwargs: Any) -> SimulatedLM:
        """Like ``dspy.LM.copy``; a ``rollout_id`` is also bound into the engine."""
        if "engine" not in kwargs:
            rollout = kwargs.get("rollout_id", self.kwargs.get("rollout_id"))
            engine = self.simulated_engine.with_rollout(rollout)
            kwargs["engine"] = engine
            kwargs["async_engine"] = AsyncSimulatedEngine(engine)
        if "model" in kwargs and not str(kwargs["model"]).startswith(SIMULATED_PREFIX):
            raise ValueError(f"a simulated LM's model name starts with {SIMULATED_PREFIX!r}")
        return super().copy(**kwargs)

    def update_history(self, entry: dict[str, Any]) -> None:
        """Record cost 0.0 (simulated calls are free) where DSPy records None."""
        if entry.get("cost") is None:
            entry["cost"] = 0.0
            entry["cost_details"] = {"kind": "simulated", "reason": "simulated LM; nothing billed"}
        super().update_history(entry)

    def __repr__(self) -> str:
        e = self.simulated_engine
        return (
            f"SimulatedLM(model={self.model!r}, seed={e.seed}, rollout_id={e.rollout_id}, "
            f"temperature={self.kwargs.get('temperature')}) [simulated: no real LM is called]"
        )


def simulated_lm(
    task: str | None = "arithmetic",
    *,
    seed: int = 0,
    base_accuracy: float | None = None,
    answers: Mapping[str, str] | None = None,
    latency_s: float = 0.0,
    temperature: float | None = None,
    max_tokens: int | None = None,
    cache: bool = False,
    **lm_kwargs: Any,
) -> SimulatedLM:
    """A SIMULATED ``dspy.LM`` named ``simulated/<task>``: offline, deterministic, thread-safe.

    ``task`` is a built-in task name (or None for a generic simulator); ``answers`` adds a
    question -> answer table (model ``simulated/lookup`` when ``task`` is None). Remaining
    keyword arguments go to ``dspy.LM`` (e.g. ``callbacks``, ``num_retries``).
    """
    engine = SimulatedEngine(
        task=task,
        seed=seed,
        base_accuracy=base_accuracy,
        answers=tuple(sorted((answers or {}).items())),
        latency_s=latency_s,
    )
    name = task or ("lookup" if answers else "generic")
    return SimulatedLM(
        SIMULATED_PREFIX + name,
        engine=engine,
        temperature=temperature,
        max_tokens=max_tokens,
        cache=cache,
        **lm_kwargs,
    )
