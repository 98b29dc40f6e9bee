r"""The offline stand-in repairer: it edits the trajectory it is shown, keeping the right steps.

The reference solver (reference.py) answers a repairer prompt through this module. A repair is
an edit of the low-quality trajectory in the prompt (METHOD.md section 6), not a new solution:

1. Read the trajectory between repair.py's markers and split it into steps (edits.Steps).
2. Drop the steps that repeat an earlier tool call, and clean every reasoning block by whole
   sentences and clauses (edits.clean_piece).
3. Keep the longest prefix of steps that is right: every tool call the task needs, in order
   (arithmetic: `print(<the question's expression>)`; multi-hop: a search for the next entity
   of the question's chain, read from the passages retrieved so far). For a correct original
   (AC-LQ) that is usually every step and its final answer too.
4. After that prefix, a wrong original (AW) gets what it lacked, written by the solver's clean
   style from the real tool results: the tool call that replaces a hand computation, the hop
   it stopped short of. The reasoning of the step where it went wrong is kept except the
   sentences that claim the wrong answer or a computation done by hand.

The prompt never holds the gold answer and neither does this module; it knows the built-in
tasks the way the solver does (`arithmetic.parse_question`, `multihop.parse_question`,
`multihop.read_fact`). A small share of repairs stay imperfect on purpose (`REPAIR_STYLES`:
"hedge" forgets to clean the reasoning, "unchanged" hands the original back) so that
verification has something to reject.

Every call returns the next piece of the repair (up to and including a tool call, or the final
answer); the rollout executes the calls for real. Stateless: a later call recovers the style
from the pieces already written.

Not here: choosing a style (reference.choose_style), checking the repair (repair.judge).
"""

from __future__ import annotations

import re
from typing import Literal

from autotraj.edits import Steps, clean_piece, drop_repeated, steps_of_text
from autotraj.models.generator import GeneratorError
from autotraj.tags import extract_answer, find_tool_call
from autotraj.tasks import arithmetic, multihop

RepairStyle = Literal["clean", "hedge", "unchanged"]
REPAIR_STYLE_NAMES: tuple[RepairStyle, ...] = ("clean", "hedge", "unchanged")
# About 10% of repairs stay imperfect so that verification visibly rejects some.
REPAIR_STYLES: tuple[tuple[RepairStyle, float], ...] = (
    ("clean", 0.9),
    ("hedge", 0.05),
    ("unchanged", 0.05),
)

_TRAJECTORY = re.compile(r"=== TRAJECTORY START ===\n(.*?)\n=== TRAJECTORY END ===", re.DOTALL)
_WRONG = "reaches a wrong final answer"
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
# Reasoning a wrong trajectory used in place of a tool: it goes with the wrong step.
_BY_HAND = re.compile(
    r"\b(?:by hand|in my head|mentally|without (?:running|using) (?:any )?(?:code|tools?|python))\b",
    re.IGNORECASE,
)


def original_of(user_turn: str) -> tuple[str, bool]:
    """(the trajectory to repair, whether the prompt calls its answer wrong) from repair.py's
    user turn."""
    match = _TRAJECTORY.search(user_turn)
    if match is None:
        raise GeneratorError("repairer prompt without its trajectory markers")
    return match.group(1), _WRONG in user_turn


def repair_piece(
    question: str,
    original: str,
    wrong: bool,
    style: RepairStyle,
    results: tuple[str, ...],
) -> str:
    """The next piece of the `style` repair of `original`, after tool outputs `results`."""
    from autotraj.models.reference import write  # the solver (reference imports this module)

    steps = steps_of_text(original)
    k = len(results)
    if style == "unchanged":
        if k >= len(steps.pieces):
            raise GeneratorError("the repair already used every step of the original")
        return steps.pieces[k]
    kept, _ = drop_repeated(steps)
    fixed = [_fix(p, wrong, style == "clean", original) for p in kept.pieces]
    good = _good_prefix(question, kept, fixed)
    if k < good:
        return str(fixed[k])
    if not wrong and good == len(kept.results) and fixed[-1] is not None:
        return fixed[-1]
    # Continue with the solver from the prefix; the step where the original went wrong gives
    # its sound reasoning to the first new piece.
    piece = write(question, "clean" if style == "clean" else "hedge", results)
    if k == good and fixed[good] is not None:
        piece = _merge(_sentences(fixed[good]), piece)
    return piece


def piece_matches(
    question: str, original: str, wrong: bool, pieces: tuple[str, ...], results: tuple[str, ...]
) -> RepairStyle | None:
    """The style whose repair wrote `pieces` (after `results`), or None."""
    for style in REPAIR_STYLE_NAMES:
        if all(
            repair_piece(question, original, wrong, style, results[:i]) == piece
            for i, piece in enumerate(pieces)
        ):
            return style
    return None


def _good_prefix(question: str, kept: Steps, cleaned: list[str | None]) -> int:
    """How many leading steps of `kept` make the right tool call with clean reasoning."""
    expected = _expected_calls(question, kept)
    good = 0
    for i in range(len(kept.results)):
        call = find_tool_call(kept.pieces[i])
        if cleaned[i] is None or call is None or i >= len(expected):
            break
        if (call.tool, call.input) != expected[i]:
            break
        good += 1
    return good


def _expected_calls(question: str, kept: Steps) -> list[tuple[str, str]]:
    """The calls the task needs, as far as the retrieved passages let the solver know them."""
    problem = arithmetic.parse_question(question)
    if problem is not None:
        return [("python", f"print({problem.expression})")]
    parsed = multihop.parse_question(question)
    if parsed is None:
        raise GeneratorError(
            f"the reference repairer only repairs the built-in tasks: {question[:80]!r}"
        )
    kind, subject = parsed
    calls, entity = [], subject
    for relation, result in zip(multihop.CHAINS[kind], (*kept.results, None), strict=False):
        calls.append(("search", entity))
        if result is None:
            break
        found = multihop.read_fact(_inner(result), relation, entity)
        if found is None:
            break
        entity = found
    return calls[: len(multihop.CHAINS[kind])]


def _inner(result_block: str) -> str:
    return result_block.removeprefix("\n<result>\n").removesuffix("\n</result>\n")


def _fix(piece: str, wrong: bool, clean: bool, original: str) -> str | None:
    """A step of the original as the repair keeps it: its reasoning cleaned (when `clean`) and,
    for a wrong original, without the sentences that claim an answer or a computation done by
    hand. None when a reasoning block would be left empty (the step is not kept)."""
    text = clean_piece(piece) if clean else piece
    if text is None or not wrong:
        return text
    bad_answer = extract_answer(original) or ""
    emptied = False

    def sound(block: re.Match[str]) -> str:
        nonlocal emptied
        kept = [
            s
            for s in _sentences(block.group(0))
            if "answer" not in s.lower()
            and not _BY_HAND.search(s)
            and not (bad_answer and bad_answer in s and not _read_from_results(s, original))
        ]
        emptied = emptied or not kept
        return f"<think>{' '.join(kept)}</think>"

    text = _THINK.sub(sound, text)
    return None if emptied else text


def _sentences(piece: str) -> list[str]:
    """The sentences of the `<think>` blocks of `piece`."""
    return [s for b in _THINK.findall(piece) for s in _SENTENCE_END.split(b.strip()) if s]


def _read_from_results(sentence: str, original: str) -> bool:
    """A sentence that restates a retrieved passage's fact (the passage holds it verbatim)."""
    results = steps_of_text(original).results
    return any(sentence.rstrip(".") in _inner(r) for r in results)


def _merge(sentences: list[str], piece: str) -> str:
    """`piece` with `sentences` it does not already say put first in its reasoning."""
    match = _THINK.search(piece)
    if match is None or not sentences:
        return piece
    inner = match.group(1)
    new = [s for s in sentences if s not in inner]
    if not new:
        return piece
    merged = " ".join([*new, inner])
    return piece[: match.start(1)] + merged + piece[match.end(1) :]
