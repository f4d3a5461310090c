"""Small offline tasks for the SIMULATED LM: tests, tutorials and benchmarks.

Every task is generated from a seed (no files, no downloads) and comes with the
"knowledge" the simulated LM uses to answer it: a solver that computes the ground truth
from the input text, a way to be plausibly wrong, and the instruction keywords that make
the simulated LM more accurate on this task. Nothing here calls a real language model.

Tasks:

- ``arithmetic``: ``question -> answer`` word problems ("What is 17 + 25?"), solved with
  ``dspy.ChainOfThought``; exact numeric match.
- ``sentiment``: ``review -> sentiment`` (positive/negative) on synthetic reviews, some with
  a "..., but ..." contrast; ``dspy.Predict``; exact label match.
- ``capitals``: ``country -> capital`` from a built-in table; ``dspy.Predict``; exact match.

Each task also has a feedback metric (``Task.feedback_metric``, importable as e.g.
``dspex_jupyter.testing.tasks:arithmetic_feedback``) for optimizers that read text feedback,
such as GEPA: it returns ``dspy.Prediction(score=, feedback=)``, and the feedback on a wrong
answer carries one of the task's lessons, which the simulated reflection LM turns into a
better instruction.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dspy

if TYPE_CHECKING:
    from dspex_jupyter.testing.simulated import SimulatedLM

__all__ = [
    "TASK_NAMES",
    "Task",
    "TaskKnowledge",
    "arithmetic",
    "arithmetic_feedback",
    "capitals",
    "capitals_feedback",
    "get_task",
    "knowledge_for",
    "lookup_knowledge",
    "sentiment",
    "sentiment_feedback",
]


def _pick(options: tuple[str, ...] | list[str], k: int) -> str:
    return options[k % len(options)]


@dataclass(frozen=True)
class TaskKnowledge:
    """What the simulated LM "knows" about a task, so it can be right or plausibly wrong.

    ``solve`` returns the ground truth for an input text (None when the text is not from
    this task); ``wrong`` returns a plausible answer that differs from the truth (``k`` is a
    deterministic choice index); ``check`` decides whether an answer is correct (used to
    judge demos in the prompt); ``explain`` writes the simulated reasoning for CoT.
    ``hints`` are task-specific instruction phrases that raise the simulated accuracy,
    ``misleading`` ones lower it, and ``proposals`` are task-specific instruction
    candidates the simulated proposer can return. ``lessons`` are the sentences a feedback
    metric gives on a wrong answer; each names one helpful phrase, so an optimizer that
    reads feedback (GEPA) can learn the phrase from it.
    """

    name: str
    input_field: str
    output_field: str
    base_accuracy: float
    solve: Callable[[str], str | None]
    wrong: Callable[[str, str, int], str]
    check: Callable[[str, str], bool]
    explain: Callable[[str, str], str]
    hints: tuple[str, ...] = ()
    misleading: tuple[str, ...] = ()
    proposals: tuple[str, ...] = ()
    lessons: tuple[str, ...] = ()


# --------------------------------------------------------------------------- arithmetic

_NAMES = ("Maya", "Liam", "Ana", "Kenji", "Zoe", "Omar", "Ines", "Tom")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")

_ARITH_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[int, int], int], str], ...] = (
    (re.compile(r"^What is (\d+) \+ (\d+)\?$"), lambda a, b: a + b, "{a} + {b} = {r}"),
    (re.compile(r"^What is (\d+) - (\d+)\?$"), lambda a, b: a - b, "{a} - {b} = {r}"),
    (re.compile(r"^What is (\d+) \* (\d+)\?$"), lambda a, b: a * b, "{a} * {b} = {r}"),
    (
        re.compile(r"^\w+ has (\d+) (\w+) and buys (\d+) more\. How many \2 does \w+ have now\?$"),
        lambda a, b: a + b,
        "Start with {a}, add {b}: {a} + {b} = {r}",
    ),
    (
        re.compile(r"^\w+ had (\d+) (\w+) and gave away (\d+)\. How many \2 are left\?$"),
        lambda a, b: a - b,
        "Start with {a}, remove {b}: {a} - {b} = {r}",
    ),
    (
        re.compile(r"^A box holds (\d+) (\w+)\. How many \2 are in (\d+) boxes\?$"),
        lambda a, b: a * b,
        "{b} boxes of {a} each: {a} * {b} = {r}",
    ),
)


def _arith_operands(question: str) -> tuple[int, int, Callable[[int, int], int], str] | None:
    text = question.strip()
    for pattern, op, explanation in _ARITH_PATTERNS:
        m = pattern.match(text)
        if m:
            nums = [g for g in m.groups() if g.isdigit()]
            return int(nums[0]), int(nums[1]), op, explanation
    return None


def _arith_solve(question: str) -> str | None:
    parsed = _arith_operands(question)
    if parsed is None:
        return None
    a, b, op, _ = parsed
    return str(op(a, b))


def _first_number(text: Any) -> int | None:
    m = re.search(r"-?\d+", str(text).replace(",", ""))
    return int(m.group()) if m else None


def _arith_check(question: str, answer: str) -> bool:
    truth = _arith_solve(question)
    return truth is not None and _first_number(answer) == int(truth)


def _arith_wrong(question: str, correct: str, k: int) -> str:
    value = int(correct)
    offsets = (1, -1, 2, -2, 10, -10, 3, -3)
    return str(value + offsets[k % len(offsets)])


def _arith_explain(question: str, answer: str) -> str:
    parsed = _arith_operands(question)
    if parsed is None:
        return f"The answer is {answer}."
    a, b, _, explanation = parsed
    return explanation.format(a=a, b=b, r=answer) + "."


def _arith_question(rng: random.Random) -> str:
    kind = rng.randrange(6)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        return f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"
    if kind == 1:
        a = rng.randint(30, 99)
        return f"What is {a} - {rng.randint(1, a - 1)}?"
    if kind == 2:
        return f"What is {rng.randint(2, 19)} * {rng.randint(2, 12)}?"
    if kind == 3:
        return (
            f"{name} has {rng.randint(5, 60)} {item} and buys {rng.randint(2, 40)} more. "
            f"How many {item} does {name} have now?"
        )
    if kind == 4:
        a = rng.randint(20, 90)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    a = rng.randint(3, 24)
    b = rng.randint(2, 9)
    return f"A box holds {a} {item}. How many {item} are in {b} boxes?"


def _arith_metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    """Exact numeric match on the first integer in the predicted answer."""
    return _first_number(getattr(pred, "answer", "")) == int(example.answer)


ARITHMETIC = TaskKnowledge(
    name="arithmetic",
    input_field="question",
    output_field="answer",
    base_accuracy=0.30,
    solve=_arith_solve,
    wrong=_arith_wrong,
    check=_arith_check,
    explain=_arith_explain,
    hints=("arithmetic", "each quantity", "number only"),
    misleading=("estimate", "round"),
    proposals=(
        "Compute the exact arithmetic result and reply with the number only.",
        "Solve the word problem step by step, tracking each quantity, and verify the final number.",
        "Estimate the answer; rounding is fine.",
        "Read the problem and write down the result.",
    ),
    lessons=(
        "Work through the problem step by step.",
        "Track each quantity in the word problem.",
        "Verify the arithmetic before answering.",
        "Reply with the number only.",
    ),
)


# --------------------------------------------------------------------------- sentiment

_POSITIVE = ("great", "delightful", "excellent", "friendly", "superb", "charming", "fantastic")
_NEGATIVE = ("awful", "bland", "disappointing", "rude", "terrible", "dull", "overpriced")
_ASPECTS = ("food", "service", "plot", "acting", "room", "staff", "music", "price", "design")
_SUBJECTS = ("restaurant", "movie", "hotel", "album", "phone", "cafe", "novel", "concert")


def _polarity(clause: str) -> int:
    words = re.findall(r"[a-z]+", clause.lower())
    return sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)


def _sentiment_solve(review: str) -> str | None:
    text = review.strip()
    if not any(w in text.lower() for w in _POSITIVE + _NEGATIVE):
        return None
    # A contrast ("..., but ...") is decided by the clause after the last "but".
    clause = re.split(r"\bbut\b", text, flags=re.IGNORECASE)[-1]
    score = _polarity(clause) or _polarity(text)
    return "positive" if score > 0 else "negative"


def _norm_label(text: Any) -> str:
    return re.sub(r"[^a-z]", "", str(text).strip().lower())


def _sentiment_check(review: str, answer: str) -> bool:
    truth = _sentiment_solve(review)
    return truth is not None and _norm_label(answer) == truth


def _sentiment_wrong(review: str, correct: str, k: int) -> str:
    return "negative" if correct == "positive" else "positive"


def _sentiment_explain(review: str, answer: str) -> str:
    return f"Weighing the opinions in the review, the overall tone reads as {answer}."


def _sentiment_review(rng: random.Random) -> str:
    subject = rng.choice(_SUBJECTS)
    a1, a2 = rng.sample(_ASPECTS, 2)
    pos, neg = rng.choice(_POSITIVE), rng.choice(_NEGATIVE)
    kind = rng.randrange(4)
    if kind == 0:
        return f"The {subject} was {pos} and the {a1} was {rng.choice(_POSITIVE)}."
    if kind == 1:
        return f"The {subject} was {neg} and the {a1} was {rng.choice(_NEGATIVE)}."
    if kind == 2:
        return f"The {a1} was {pos}, but the {a2} was {neg}."
    return f"The {a1} was {neg}, but the {a2} was {pos}."


def _sentiment_metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    """Exact label match (case and punctuation ignored)."""
    return _norm_label(getattr(pred, "sentiment", "")) == example.sentiment


SENTIMENT = TaskKnowledge(
    name="sentiment",
    input_field="review",
    output_field="sentiment",
    base_accuracy=0.50,
    solve=_sentiment_solve,
    wrong=_sentiment_wrong,
    check=_sentiment_check,
    explain=_sentiment_explain,
    hints=("overall tone", "contrast", "positive or negative"),
    misleading=("first sentence", "first clause"),
    proposals=(
        "Decide whether the overall tone of the review is positive or negative; when the review "
        "draws a contrast with 'but', the clause after 'but' decides.",
        "Label the review by the sentiment of its first clause.",
        "Classify the review as positive or negative, weighing its overall tone.",
        "Say how the reviewer feels.",
    ),
    lessons=(
        "Judge the overall tone of the whole review.",
        "When the review draws a contrast with 'but', the clause after 'but' decides.",
        "Answer positive or negative.",
        "Read every clause carefully.",
    ),
)


# --------------------------------------------------------------------------- capitals

# (country, capital, a plausible wrong answer: usually the largest or best-known city)
_CAPITALS: tuple[tuple[str, str, str], ...] = (
    ("Australia", "Canberra", "Sydney"),
    ("Canada", "Ottawa", "Toronto"),
    ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Switzerland", "Bern", "Zurich"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Morocco", "Rabat", "Casablanca"),
    ("New Zealand", "Wellington", "Auckland"),
    ("South Africa", "Pretoria", "Johannesburg"),
    ("India", "New Delhi", "Mumbai"),
    ("China", "Beijing", "Shanghai"),
    ("United States", "Washington, D.C.", "New York"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("France", "Paris", "Lyon"),
    ("Japan", "Tokyo", "Osaka"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Tanzania", "Dodoma", "Dar es Salaam"),
    ("Ivory Coast", "Yamoussoukro", "Abidjan"),
    ("Bolivia", "Sucre", "La Paz"),
    ("Ecuador", "Quito", "Guayaquil"),
    ("Colombia", "Bogota", "Medellin"),
    ("Argentina", "Buenos Aires", "Cordoba"),
    ("Chile", "Santiago", "Valparaiso"),
    ("Peru", "Lima", "Cusco"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("Cuba", "Havana", "Santiago de Cuba"),
    ("Norway", "Oslo", "Bergen"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Finland", "Helsinki", "Tampere"),
    ("Denmark", "Copenhagen", "Aarhus"),
    ("Poland", "Warsaw", "Krakow"),
    ("Netherlands", "Amsterdam", "Rotterdam"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Portugal", "Lisbon", "Porto"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Austria", "Vienna", "Salzburg"),
    ("Hungary", "Budapest", "Debrecen"),
    ("Czechia", "Prague", "Brno"),
    ("Romania", "Bucharest", "Cluj-Napoca"),
    ("Ukraine", "Kyiv", "Kharkiv"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("Ireland", "Dublin", "Cork"),
    ("Scotland", "Edinburgh", "Glasgow"),
    ("Iceland", "Reykjavik", "Akureyri"),
    ("Israel", "Jerusalem", "Tel Aviv"),
    ("Saudi Arabia", "Riyadh", "Jeddah"),
    ("United Arab Emirates", "Abu Dhabi", "Dubai"),
    ("Iran", "Tehran", "Isfahan"),
    ("Iraq", "Baghdad", "Basra"),
    ("Kazakhstan", "Astana", "Almaty"),
    ("Uzbekistan", "Tashkent", "Samarkand"),
    ("Myanmar", "Naypyidaw", "Yangon"),
    ("Thailand", "Bangkok", "Chiang Mai"),
    ("Malaysia", "Kuala Lumpur", "George Town"),
    ("Indonesia", "Jakarta", "Surabaya"),
    ("Philippines", "Manila", "Cebu City"),
    ("South Korea", "Seoul", "Busan"),
    ("Mongolia", "Ulaanbaatar", "Erdenet"),
    ("Nepal", "Kathmandu", "Pokhara"),
    ("Sri Lanka", "Sri Jayawardenepura Kotte", "Colombo"),
    ("Bangladesh", "Dhaka", "Chittagong"),
    ("Ethiopia", "Addis Ababa", "Dire Dawa"),
    ("Ghana", "Accra", "Kumasi"),
    ("Senegal", "Dakar", "Touba"),
    ("Cameroon", "Yaounde", "Douala"),
    ("Angola", "Luanda", "Huambo"),
    ("Zimbabwe", "Harare", "Bulawayo"),
    ("Benin", "Porto-Novo", "Cotonou"),
    ("Malta", "Valletta", "Birkirkara"),
    ("Montenegro", "Podgorica", "Niksic"),
    ("Slovenia", "Ljubljana", "Maribor"),
    ("Croatia", "Zagreb", "Split"),
    ("Serbia", "Belgrade", "Novi Sad"),
    ("Bulgaria", "Sofia", "Plovdiv"),
    ("Estonia", "Tallinn", "Tartu"),
)
_CAPITAL_OF = {country.lower(): (capital, decoy) for country, capital, decoy in _CAPITALS}


def _norm_city(text: Any) -> str:
    return re.sub(r"[^a-z]", "", str(text).strip().lower())


def _capital_solve(country: str) -> str | None:
    found = _CAPITAL_OF.get(country.strip().rstrip("?.").lower())
    return found[0] if found else None


def _capital_check(country: str, answer: str) -> bool:
    truth = _capital_solve(country)
    return truth is not None and _norm_city(answer) == _norm_city(truth)


def _capital_wrong(country: str, correct: str, k: int) -> str:
    decoy = _CAPITAL_OF[country.strip().rstrip("?.").lower()][1]
    if k % 3:
        return decoy
    other = _CAPITALS[k % len(_CAPITALS)][1]
    return other if other != correct else decoy


def _capital_explain(country: str, answer: str) -> str:
    return f"The seat of government of {country.strip()} is {answer}."


def _capital_metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    """Exact city match (case, spaces and punctuation ignored)."""
    return _norm_city(getattr(pred, "capital", "")) == _norm_city(example.capital)


CAPITALS = TaskKnowledge(
    name="capitals",
    input_field="country",
    output_field="capital",
    base_accuracy=0.40,
    solve=_capital_solve,
    wrong=_capital_wrong,
    check=_capital_check,
    explain=_capital_explain,
    hints=("capital city", "seat of government", "not the largest city"),
    misleading=("most famous", "best-known"),
    proposals=(
        "Name the official capital city (the seat of government), which is often not the "
        "largest city.",
        "Name the most famous city of the country.",
        "Answer with a city.",
        "Give the capital city of the country, the seat of government.",
    ),
    lessons=(
        "Give the official capital city.",
        "The capital is the seat of government.",
        "The capital is often not the largest city.",
        "Verify the answer before replying.",
    ),
)


# --------------------------------------------------------------------------- lookup tables


def lookup_knowledge(name: str, answers: Mapping[str, str]) -> TaskKnowledge:
    """Knowledge from a question -> answer table, for ad-hoc tasks (the SIMULATED LM knows
    exactly the table's answers; a wrong answer is another answer from the table)."""
    table = {str(q).strip(): str(a) for q, a in answers.items()}
    values = sorted(set(table.values())) or ["unknown"]

    def solve(text: str) -> str | None:
        return table.get(text.strip())

    def wrong(text: str, correct: str, k: int) -> str:
        others = [v for v in values if v != correct]
        return others[k % len(others)] if others else f"not {correct}"

    def check(text: str, answer: str) -> bool:
        truth = solve(text)
        return truth is not None and _norm_city(answer) == _norm_city(truth)

    return TaskKnowledge(
        name=name,
        input_field="question",
        output_field="answer",
        base_accuracy=0.5,
        solve=solve,
        wrong=wrong,
        check=check,
        explain=lambda text, answer: f"From what I know, the answer is {answer}.",
    )


# --------------------------------------------------------------------------- feedback metrics


def _feedback(
    knowledge: TaskKnowledge, metric: Callable[..., bool], gold: dspy.Example, pred: Any
) -> dspy.Prediction:
    """Score and text feedback; a wrong answer gets one of the task's lessons, chosen by
    the input (so different examples teach different lessons)."""
    expected = gold[knowledge.output_field]
    given = getattr(pred, knowledge.output_field, None)
    if metric(gold, pred):
        return dspy.Prediction(score=1.0, feedback=f"Correct: {given} is the expected answer.")
    text = str(gold[knowledge.input_field]).strip()
    lesson = knowledge.lessons[zlib.crc32(text.encode("utf-8")) % len(knowledge.lessons)]
    return dspy.Prediction(
        score=0.0, feedback=f"Incorrect: the expected answer is {expected}, not {given}. {lesson}"
    )


def arithmetic_feedback(
    gold: dspy.Example, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> dspy.Prediction:
    """GEPA feedback metric for ``arithmetic``: exact numeric match plus a lesson when wrong."""
    return _feedback(ARITHMETIC, _arith_metric, gold, pred)


def sentiment_feedback(
    gold: dspy.Example, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> dspy.Prediction:
    """GEPA feedback metric for ``sentiment``: exact label match plus a lesson when wrong."""
    return _feedback(SENTIMENT, _sentiment_metric, gold, pred)


def capitals_feedback(
    gold: dspy.Example, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> dspy.Prediction:
    """GEPA feedback metric for ``capitals``: exact city match plus a lesson when wrong."""
    return _feedback(CAPITALS, _capital_metric, gold, pred)


_KNOWLEDGE = {k.name: k for k in (ARITHMETIC, SENTIMENT, CAPITALS)}
TASK_NAMES: tuple[str, ...] = tuple(_KNOWLEDGE)


def knowledge_for(name: str) -> TaskKnowledge:
    """The built-in knowledge of the simulated LM for task ``name``."""
    try:
        return _KNOWLEDGE[name]
    except KeyError:
        raise ValueError(
            f"unknown simulated task {name!r}; known: {', '.join(TASK_NAMES)}"
        ) from None


# --------------------------------------------------------------------------- Task objects


@dataclass(frozen=True)
class Task:
    """A small offline task: data, metric, a program factory and the matching SIMULATED LM.

    ``good_instruction`` is an instruction with the task's helpful keywords, so tests and
    tutorials can show that wording changes the simulated accuracy.
    """

    name: str
    signature: str
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    metric: Callable[..., bool]
    seed: int
    program_kind: Literal["predict", "cot"]
    good_instruction: str
    knowledge: TaskKnowledge = field(repr=False)
    #: ``(gold, pred, trace, pred_name, pred_trace) -> dspy.Prediction(score=, feedback=)``
    feedback_metric: Callable[..., dspy.Prediction] | None = field(default=None, repr=False)

    def make_program(self) -> dspy.Module:
        """A fresh, unoptimised program for this task (Predict or ChainOfThought)."""
        if self.program_kind == "cot":
            return dspy.ChainOfThought(self.signature)
        return dspy.Predict(self.signature)

    def lm(self, **kwargs: Any) -> SimulatedLM:
        """The SIMULATED LM that knows this task (keyword arguments go to ``simulated_lm``)."""
        from dspex_jupyter.testing.simulated import simulated_lm

        kwargs.setdefault("seed", self.seed)
        return simulated_lm(self.name, **kwargs)

    def evaluate(
        self,
        program: dspy.Module | None = None,
        *,
        lm: dspy.LM | None = None,
        devset: list[dspy.Example] | None = None,
        num_threads: int = 1,
    ) -> float:
        """Score (0-100) of ``program`` (default: a fresh one) on ``devset`` (default: valset)."""
        program = program if program is not None else self.make_program()
        evaluator = dspy.Evaluate(
            devset=devset if devset is not None else self.valset,
            metric=self.metric,
            num_threads=num_threads,
            display_progress=False,
        )
        with dspy.context(lm=lm if lm is not None else self.lm()):
            return float(evaluator(program).score)


def _split(
    make: Callable[[random.Random], dspy.Example], seed: int, n_train: int, n_val: int, key: str
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    rng = random.Random(f"dspex-simulated-task:{seed}")
    seen: set[str] = set()
    examples: list[dspy.Example] = []
    attempts = 0
    while len(examples) < n_train + n_val:
        attempts += 1
        if attempts > 100 * (n_train + n_val) + 1000:
            raise ValueError(f"cannot generate {n_train + n_val} distinct examples")
        ex = make(rng)
        if ex[key] not in seen:
            seen.add(ex[key])
            examples.append(ex)
    return examples[:n_train], examples[n_train:]


def arithmetic(seed: int = 0, n_train: int = 50, n_val: int = 40) -> Task:
    """Small arithmetic word problems (``question -> answer``) solved with ChainOfThought."""

    def make(rng: random.Random) -> dspy.Example:
        q = _arith_question(rng)
        return dspy.Example(question=q, answer=_arith_solve(q)).with_inputs("question")

    train, val = _split(make, seed, n_train, n_val, "question")
    return Task(
        name="arithmetic",
        signature="question -> answer",
        trainset=train,
        valset=val,
        metric=_arith_metric,
        seed=seed,
        program_kind="cot",
        good_instruction=(
            "Solve the arithmetic problem step by step, carefully tracking each quantity, and "
            "verify the result. Reply with the number only."
        ),
        knowledge=ARITHMETIC,
        feedback_metric=arithmetic_feedback,
    )


def sentiment(seed: int = 0, n_train: int = 50, n_val: int = 40) -> Task:
    """Synthetic short reviews labelled positive/negative (``review -> sentiment``)."""

    def make(rng: random.Random) -> dspy.Example:
        r = _sentiment_review(rng)
        return dspy.Example(review=r, sentiment=_sentiment_solve(r)).with_inputs("review")

    train, val = _split(make, seed, n_train, n_val, "review")
    return Task(
        name="sentiment",
        signature="review -> sentiment",
        trainset=train,
        valset=val,
        metric=_sentiment_metric,
        seed=seed,
        program_kind="predict",
        good_instruction=(
            "Read the review carefully and decide whether its overall tone is positive or "
            "negative; when it draws a contrast with 'but', the clause after 'but' decides."
        ),
        knowledge=SENTIMENT,
        feedback_metric=sentiment_feedback,
    )


def capitals(seed: int = 0, n_train: int = 40, n_val: int = 30) -> Task:
    """Country -> capital city from a built-in table of 80 countries (``dspy.Predict``)."""
    if n_train + n_val > len(_CAPITALS):
        raise ValueError(f"capitals has {len(_CAPITALS)} countries; asked for {n_train + n_val}")
    rows = list(_CAPITALS)
    random.Random(f"dspex-simulated-task:{seed}").shuffle(rows)
    examples = [
        dspy.Example(country=country, capital=capital).with_inputs("country")
        for country, capital, _ in rows[: n_train + n_val]
    ]
    return Task(
        name="capitals",
        signature="country -> capital",
        trainset=examples[:n_train],
        valset=examples[n_train:],
        metric=_capital_metric,
        seed=seed,
        program_kind="predict",
        good_instruction=(
            "Carefully name the official capital city, the seat of government, which is often "
            "not the largest city. Verify before answering."
        ),
        knowledge=CAPITALS,
        feedback_metric=capitals_feedback,
    )


_FACTORIES: dict[str, Callable[..., Task]] = {
    "arithmetic": arithmetic,
    "sentiment": sentiment,
    "capitals": capitals,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task called ``name`` (see ``TASK_NAMES``) with factory keyword arguments."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown simulated task {name!r}; known: {', '.join(TASK_NAMES)}"
        ) from None
    return factory(**kwargs)
