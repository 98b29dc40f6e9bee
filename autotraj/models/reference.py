r"""The reference solver: a scripted teacher and repairer for the built-in tasks (no model).

`reference_generator(tokenizer)` returns a `ScriptedGenerator` whose replies come from
`reference_reply(request)`. It reads only `request.prompt_text`: the question (the last user
turn of the ChatML prompt, or the "Question:" of a repairer prompt built by repair.py) and the
partial assistant turn, whose `<result>` blocks the real tools wrote. Each call writes the next
segment and stops after a closed `</code>`, `</search>` or `</answer>`, so the rollout executes
every tool call for real; the solver then reads the printed number or the retrieved passage
(`tasks.multihop.read_fact`) to go on. It never sees the gold answer or the corpus.

Styles (docs/tasks.md explains why the teacher is imperfect on purpose):
- clean: short plain reasoning, the fewest tool calls, the answer read from the tools (-> HQ);
- hedge: the same steps with hedging words ("maybe", "probably", "I guess") in every `<think>`;
- recheck: hedging plus a redundant second identical tool call (2-hop and arithmetic only; a
  3-hop question has no call to spare, so it falls back to hedge) (hedge, recheck -> AC-LQ);
- wrong: arithmetic done "by hand" with a slipped digit, or a multi-hop chain stopped one hop
  short, answering the city instead of the country (-> AW).
A teacher reply picks a style from sha256(question, the first request's seed), so the candidates
of one query (different trajectory ids, so different seeds) differ; shares are `TEACHER_STYLES`.
A repairer reply (recognised by repair.py's trajectory markers) is an edit of the trajectory in
the prompt, written by models/reference_repairer.py: it keeps the original's right steps and
tool calls and fixes the flaw; a small deterministic share of repairs (`REPAIR_STYLES` there)
stays imperfect for verification to reject. Later calls recover the style from the segments
already written, so the solver keeps no state between calls.

Not here: the task generators (tasks/), stop-string and token-budget handling (ScriptedGenerator).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from autotraj.models.generator import GenerationRequest, GeneratorError
from autotraj.models.reference_repairer import (
    REPAIR_STYLES,
    original_of,
    piece_matches,
    repair_piece,
)
from autotraj.models.scripted import ScriptedGenerator
from autotraj.render import Tokenizer
from autotraj.tasks import arithmetic, multihop

Style = Literal["clean", "hedge", "recheck", "wrong"]
STYLES: tuple[Style, ...] = ("clean", "hedge", "recheck", "wrong")
# Shares aimed at roughly 35% HQ, 30% AC-LQ, 35% AW among teacher trajectories.
TEACHER_STYLES: tuple[tuple[Style, float], ...] = (
    ("clean", 0.35),
    ("hedge", 0.15),
    ("recheck", 0.15),
    ("wrong", 0.35),
)
MAX_TOOL_CALLS = 3  # the rollout's release limit: a redundant call must fit under it

REPAIR_MARKER = "=== TRAJECTORY START ==="  # repair.py's repairer prompt
_REPAIR_QUESTION = re.compile(r"Question:\n(.*?)\n\nThe trajectory below reaches", re.DOTALL)
_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)
_ASSISTANT_START = "<|im_start|>assistant\n"
_RESULT = re.compile(r"\n<result>\n(.*?)\n</result>\n", re.DOTALL)


@dataclass(frozen=True)
class Context:
    """What the solver reads from a prompt: the question and its own partial reply."""

    question: str
    repair: bool
    pieces: tuple[str, ...]  # the segments it wrote so far, one per earlier call
    results: tuple[str, ...]  # the tool outputs that followed them
    original: str = ""  # repairs: the trajectory to repair
    wrong: bool = False  # repairs: the prompt says its answer is wrong (AW)


def read_context(prompt_text: str) -> Context:
    """Split a ChatML prompt (plus partial assistant turn) into question, pieces and results."""
    turns = _USER_TURN.findall(prompt_text)
    start = prompt_text.rfind(_ASSISTANT_START)
    if not turns or start < 0:
        raise GeneratorError("the reference solver needs a ChatML prompt (<|im_start|>user ...)")
    user = turns[-1]
    repair = REPAIR_MARKER in user
    original, wrong = original_of(user) if repair else ("", False)
    if repair:
        match = _REPAIR_QUESTION.search(user)
        if match is None:
            raise GeneratorError("repairer prompt without its 'Question:' block")
        user = match.group(1)
    parts = _RESULT.split(prompt_text[start + len(_ASSISTANT_START) :])
    return Context(user.strip(), repair, tuple(parts[0:-1:2]), tuple(parts[1::2]), original, wrong)


def choose_style(question: str, seed: int | None, repair: bool) -> str:
    """The style of a new reply, fixed by (role, question, first request seed): a teacher
    `Style`, or a repairer's `reference_repairer.RepairStyle`.

    >>> choose_style("What is 2 + 2?", 7, repair=False) == choose_style("What is 2 + 2?", 7, False)
    True
    """
    shares: tuple[tuple[str, float], ...] = REPAIR_STYLES if repair else TEACHER_STYLES
    digest = hashlib.sha256(f"{'repair' if repair else 'teach'}\0{question}\0{seed}".encode())
    u = int.from_bytes(digest.digest()[:8], "big") / 2**64
    for style, share in shares:
        u -= share
        if u < 0:
            return style
    return shares[-1][0]


def reference_reply(request: GenerationRequest) -> str:
    """The next segment of the reference solver's reply to `request` (see the module docstring)."""
    context = read_context(request.prompt_text)
    if context.repair:
        return _repair_reply(context, request.seed)
    if context.pieces:  # later call: the style is the one that wrote the first segment
        style = next(
            (s for s in STYLES if write(context.question, s, ()) == context.pieces[0]), None
        )
        if style is None:
            raise GeneratorError("the partial reply was not written by the reference solver")
    else:
        style = choose_style(context.question, request.seed, context.repair)
    return write(context.question, style, context.results)


def _repair_reply(context: Context, seed: int | None) -> str:
    """The next piece of the repair of `context.original` (reference_repairer.py)."""
    question, original, wrong = context.question, context.original, context.wrong
    if context.pieces:  # later call: the style is the one that wrote the pieces so far
        style = piece_matches(question, original, wrong, context.pieces, context.results)
        if style is None:
            raise GeneratorError("the partial repair was not written by the reference repairer")
    else:
        style = choose_style(question, seed, repair=True)
    return repair_piece(question, original, wrong, style, context.results)  # type: ignore[arg-type]


def write(question: str, style: Style, results: tuple[str, ...]) -> str:
    """The segment a `style` solver writes after `results`; GeneratorError if not a built-in
    task."""
    problem = arithmetic.parse_question(question)
    if problem is not None:
        return _write_arithmetic(problem, style, results)
    parsed = multihop.parse_question(question)
    if parsed is not None:
        return _write_multihop(*parsed, style, results)
    raise GeneratorError(
        f"the reference solver only solves the built-in tasks; not one of them: {question[:80]!r}"
    )


def reference_generator(tokenizer: Tokenizer | None) -> ScriptedGenerator:
    """The reference solver as a Generator (token ids returned when a tokenizer is given)."""
    return ScriptedGenerator(reference_reply, tokenizer, name="reference")


# ---------------------------------------------------------------------------------------------
# Arithmetic


def _boxed(value: str) -> str:
    return f"<answer>\\boxed{{{value}}}</answer>"


def _printed(output: str) -> str:
    """What a tool printed last (the value a reader takes from it)."""
    lines = output.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _write_arithmetic(
    problem: arithmetic.ParsedProblem, style: Style, results: tuple[str, ...]
) -> str:
    expr, plan = problem.expression, problem.plan
    code = f"<code>\nprint({expr})\n</code>"
    value = _printed(results[-1]) if results else ""
    if style == "wrong":
        slipped = _slip(arithmetic.evaluate(expr), expr)
        return (
            f"<think>{plan}: {expr}. I can work this out by hand without running any code. "
            f"Carrying the digits through each step one at a time, the total comes to "
            f"{slipped}.</think>\n{_boxed(str(slipped))}"
        )
    if style == "clean":
        if not results:
            return f"<think>{plan}: {expr}. The numbers are large, so I compute it.</think>\n{code}"
        return f"<think>The result is {value}.</think>\n{_boxed(value)}"
    if not results:
        opening = (
            "I will compute it and then check it again"
            if style == "recheck"
            else "I should probably let Python do the arithmetic"
        )
        return (
            f"<think>Hmm, I think this might be {expr}, but I am not sure. {plan}, I guess? "
            f"That seems right, maybe. {opening}.</think>\n{code}"
        )
    if style == "recheck" and len(results) == 1:
        return (
            f"<think>It prints {value}, but maybe I made a mistake somewhere. Let me recheck "
            f"the same calculation.</think>\n{code}"
        )
    return (
        f"<think>It prints {value}. I think that is probably the answer, but maybe I misread "
        f"the question. It seems fine, I guess, so I will go with {value}.</think>\n"
        f"{_boxed(value)}"
    )


def _slip(value: int, expr: str) -> int:
    """A plausible mental-arithmetic slip: one digit off, or two neighbouring digits swapped.

    >>> _slip(381170728, "x") != 381170728
    True
    """
    rng = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big")
    digits = list(str(value))
    pos = 1 + rng % (len(digits) - 1)  # never the leading digit
    if (rng >> 8) % 2 and digits[pos - 1] != digits[pos]:
        digits[pos - 1], digits[pos] = digits[pos], digits[pos - 1]
    else:
        digits[pos] = str((int(digits[pos]) + 1 + (rng >> 16) % 8) % 10)
    return int("".join(digits))


# ---------------------------------------------------------------------------------------------
# Multi-hop QA

_GOALS: dict[multihop.QuestionKind, str] = {
    "born": "I need the city where {s} was born, then the country of that city",
    "headquarters": "I need the city where {s} is headquartered, then the country of that city",
    "founder": "I need the founder of {s}, the city where the founder was born, then its country",
}
_WRONG_GOALS: dict[multihop.QuestionKind, str] = {
    "born": "The answer is the place where {s} was born, as the passage about {s} gives it",
    "headquarters": "The answer is the place where {s} is based, as the passage about {s} gives it",
    "founder": "The answer is the place where the founder of {s} was born, which the passage "
    "about the founder gives",
}


def _write_multihop(
    kind: multihop.QuestionKind, subject: str, style: Style, results: tuple[str, ...]
) -> str:
    chain = multihop.CHAINS[kind]
    if style == "recheck" and len(chain) + 1 > MAX_TOOL_CALLS:
        style = "hedge"  # no tool call to spare for the redundant search
    hops = len(chain) - 1 if style == "wrong" else len(chain)
    hedged = style in ("hedge", "recheck")
    if not results:
        goal = (_WRONG_GOALS if style == "wrong" else _GOALS)[kind].format(s=subject)
        if not hedged:
            return f"<think>{goal}. I search for {subject}.</think>\n<search>{subject}</search>"
        opening = (
            f"I will search for {subject} and check the passage twice"
            if style == "recheck"
            else f"I guess I should search for {subject} first"
        )
        return (
            f"<think>Hmm, I think {goal}, maybe. I am not sure where to "
            f"start. {opening}.</think>\n<search>{subject}</search>"
        )
    first_fact = _fact(chain[0], subject, multihop.read_fact(results[0], chain[0], subject))
    if style == "recheck" and len(results) == 1:
        return (
            f"<think>It seems that {first_fact}, but maybe I misread the passage. Let me recheck "
            f"the same search.</think>\n<search>{subject}</search>"
        )
    read = results[:1] + results[2:] if style == "recheck" else results
    entity, fact = subject, ""
    for relation, output in zip(chain, read, strict=False):
        found = multihop.read_fact(output, relation, entity)
        if found is None:  # the passage does not state the fact: answer with what is known
            return f"<think>The passage does not say it.</think>\n{_boxed(entity)}"
        fact = _fact(relation, entity, found)
        entity = found
    if len(read) < hops:
        if hedged:
            return (
                f"<think>It seems that {fact}, I think. That is probably the right passage. "
                f"Maybe I should search for {entity} next.</think>\n<search>{entity}</search>"
            )
        return f"<think>{fact}. Next I search for {entity}.</think>\n<search>{entity}</search>"
    if hedged:
        return (
            f"<think>It seems that {fact}, so the answer is probably {entity}, I guess."
            f"</think>\n{_boxed(entity)}"
        )
    if style == "wrong":
        return (
            f"<think>{fact}. That is the place the question asks for, so the answer is "
            f"{entity}.</think>\n{_boxed(entity)}"
        )
    return f"<think>{fact}. So the answer is {entity}.</think>\n{_boxed(entity)}"


def _fact(relation: multihop.Relation, subject: str, found: str | None) -> str:
    """A fact restated as read, without its final period ("" when it was not found)."""
    if found is None:
        return ""
    return multihop.FACTS[relation].format(subject=subject, object=found).removesuffix(".")
