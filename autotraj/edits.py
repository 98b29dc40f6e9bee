r"""Edits of a trajectory that keep what was right: whole hedging sentences out, repeated calls out.

A repair is an edit of the trajectory it repairs (METHOD.md section 6): it keeps the original's
correct steps and tool calls and fixes the flaw. This module holds the edits that need no model,
used by the repair stage's first pass and by the offline stand-in repairer
(models/reference_repairer.py), and the measures of how much of an original a repair keeps.

A trajectory is read as `Steps`: the pieces the model wrote (every piece but the last ends with
its tool call) and the tool results between them.

The edits, all by whole units, never by deleting a word from inside a clause:
- `clean_sentence`: a sentence loses a hedging clause it can lose and stay grammatical (a
  leading "Hmm," / "I think" / "It seems that", a trailing ", I guess?", an adverb right after an
  auxiliary: "is probably the" -> "is the"); if it still hedges, it goes whole.
- `clean_piece`: every `<think>` block of a piece, sentence by sentence; None when a block would
  be left empty (the edit does not apply; a model must rewrite it).
- `drop_repeated`: a step whose tool call repeats an earlier one goes whole: the piece that
  wrote it (its reasoning and the call) and the call's result.
Whatever an edit writes is checked with flaws.py by its caller; an edit never vouches for itself.

Measures (per accepted repair, reported per label by the repair stage):
- `calls_kept`: share of the original's distinct tool calls that the repair also makes;
- `similarity`: difflib's ratio between the word sequences the two trajectories' models wrote;
- `from_original`: share of the repair's words that the original's model wrote too (as a
  multiset): 1.0 for an edit that only removes, lower for new reasoning (a continuation, or a
  repairer that ignored the original and solved the question afresh).

Pure functions; no I/O, no model.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from autotraj.flaws import HEDGES, call_key, hedges
from autotraj.records import Segment, ToolCall, Trajectory
from autotraj.tags import find_tool_call

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_PUNCT = ".,;:?!\"'()"
_TAG = re.compile(r"</?[a-z]+>")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_RESULT_BLOCK = re.compile(r"\n<result>\n(.*?)\n</result>\n", re.DOTALL)

# Hedging clauses a sentence can lose and stay a sentence (ours).
_LEADING = re.compile(
    r"^(?:(?:hmm+|well|okay|oh)[,.!]?\s+)?"
    r"(?:(?:i think|i guess|i believe|i suppose|maybe|perhaps|probably)(?:\s+that)?,?\s+"
    r"|it seems that\s+)?",
    re.IGNORECASE,
)
_TRAILING = re.compile(
    r",\s*(?:i think|i guess|i believe|i suppose|maybe|perhaps|probably)\s*[.?!]$", re.IGNORECASE
)
_INNER_TAG = re.compile(r",\s*(?:i think|i guess|i believe|i suppose)\s*,", re.IGNORECASE)
# What cannot stand as a sentence on its own once the rest of it went.
_LONE = frozenset({"i", "it", "that", "this", "so", "and", "but", "or", "then", "well"})
_ADVERB_AFTER_AUX = re.compile(
    r"\b(is|are|was|were|be|will|would|should|can|could|has|have|had|do|does)\s+"
    r"(?:probably|perhaps|possibly|presumably|apparently)\s+",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Steps:
    """A trajectory as the model's pieces and the tool results between them.

    `results[i]` follows `pieces[i]`; `len(pieces) == len(results) + 1`.
    """

    pieces: tuple[str, ...]
    results: tuple[str, ...]

    def text(self) -> str:
        out = []
        for i, piece in enumerate(self.pieces):
            out.append(piece)
            if i < len(self.results):
                out.append(self.results[i])
        return "".join(out)


def steps_of_text(text: str) -> Steps:
    r"""Split a trajectory's text at its result blocks (`tags.result_text`'s shape).

    >>> steps_of_text("<code>x</code>\n<result>\n1\n</result>\n<answer>1</answer>").pieces
    ('<code>x</code>', '<answer>1</answer>')
    """
    parts = _RESULT_BLOCK.split(text)
    return Steps(tuple(parts[0::2]), tuple(f"\n<result>\n{r}\n</result>\n" for r in parts[1::2]))


def clean_sentence(sentence: str, phrases: Sequence[str] = HEDGES) -> str | None:
    """The sentence without its hedging clause, or None when it hedges through and through.

    >>> clean_sentence("Hmm, I think I need the city where Ada was born, maybe.")
    'I need the city where Ada was born.'
    >>> clean_sentence("That is probably the right passage.")
    'That is the right passage.'
    >>> clean_sentence("It seems fine, I guess, so I will go with 12.") is None
    True
    """
    if not hedges(sentence, phrases):
        return sentence
    edited = _TRAILING.sub(".", sentence.strip())
    edited = _INNER_TAG.sub(",", edited)
    edited = _ADVERB_AFTER_AUX.sub(r"\1 ", edited)
    edited = _LEADING.sub("", edited, count=1)
    edited = edited[:1].upper() + edited[1:]
    words = edited.rstrip(".?!,; ").split()
    if hedges(edited, phrases) or not words or (len(words) == 1 and words[0].lower() in _LONE):
        return None
    return edited


def clean_think(inner: str, phrases: Sequence[str] = HEDGES) -> str:
    """The sentences of a `<think>` block that survive `clean_sentence`, joined by spaces."""
    kept = [
        s for s in (clean_sentence(x, phrases) for x in _SENTENCE_END.split(inner.strip())) if s
    ]
    return " ".join(kept)


def clean_piece(piece: str, phrases: Sequence[str] = HEDGES) -> str | None:
    """`piece` with every `<think>` block cleaned; None if a block would be left empty."""
    emptied = False

    def clean(block: re.Match[str]) -> str:
        nonlocal emptied
        inner = clean_think(block.group(1), phrases)
        emptied = emptied or not inner
        return f"<think>{inner}</think>"

    out = _THINK.sub(clean, piece)
    return None if emptied else out


def drop_repeated(steps: Steps) -> tuple[Steps, list[int]]:
    """`steps` without the steps whose tool call repeats an earlier one, and the dropped call
    indices (the piece that wrote the call and the call's result go together)."""
    seen: set[tuple[str, str]] = set()
    pieces, results, dropped = [], [], []
    for i, result in enumerate(steps.results):
        call = find_tool_call(steps.pieces[i])
        key = call_key(call.tool, call.input) if call else None
        if key is not None and key in seen:
            dropped.append(i)
            continue
        if key is not None:
            seen.add(key)
        pieces.append(steps.pieces[i])
        results.append(result)
    pieces.append(steps.pieces[-1])
    return Steps(tuple(pieces), tuple(results)), dropped


def steps_of(trajectory: Trajectory) -> Steps | None:
    """The trajectory's steps, or None when its segments are not model/result alternating
    with one executed tool call per result (a rejected call, say: no edit applies)."""
    segments = trajectory.segments
    pattern = tuple(s.trainable for s in segments)
    if not segments or pattern != tuple(i % 2 == 0 for i in range(len(segments))):
        return None
    steps = Steps(tuple(s.text for s in segments[0::2]), tuple(s.text for s in segments[1::2]))
    if len(steps.results) != len(trajectory.tool_calls):
        return None
    return steps


def edit(trajectory: Trajectory, phrases: Sequence[str] = HEDGES) -> Trajectory | None:
    """The trajectory with repeated steps dropped and every `<think>` cleaned, or None if the
    edit does not apply or changes nothing. Text only: token ids are dropped (the renderer
    re-tokenizes), tool calls keep their recorded outputs (the caller re-runs them)."""
    steps = steps_of(trajectory)
    if steps is None:
        return None
    kept, dropped = drop_repeated(steps)
    pieces = [clean_piece(p, phrases) for p in kept.pieces]
    if any(p is None for p in pieces):
        return None
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        segments.append(Segment(str(piece), True))
        if i < len(kept.results):
            segments.append(Segment(kept.results[i], False))
    calls = tuple(c for i, c in enumerate(trajectory.tool_calls) if i not in dropped)
    if tuple(s.text for s in segments) == tuple(s.text for s in trajectory.segments):
        return None
    return dataclasses.replace(trajectory, segments=tuple(segments), tool_calls=calls)


# ---------------------------------------------------------------------------------------------
# How much of the original a repair keeps


def calls_kept(original: Sequence[ToolCall], repair: Sequence[ToolCall]) -> float | None:
    """Share of the original's distinct tool calls that the repair makes too; None without any.

    >>> a, b = ToolCall("search", "Ada", "x", "ok"), ToolCall("search", "Rome", "y", "ok")
    >>> calls_kept([a, a, b], [a])
    0.5
    """
    wanted = {call_key(c.tool, c.input) for c in original}
    if not wanted:
        return None
    made = {call_key(c.tool, c.input) for c in repair}
    return len(wanted & made) / len(wanted)


def similarity(original: str, repair: str) -> float:
    """difflib's ratio of the two word sequences (1.0: the same words in the same order).

    >>> similarity("a b c d", "a b d")
    0.8571428571428571
    """
    return difflib.SequenceMatcher(None, original.split(), repair.split(), autojunk=False).ratio()


def _words(text: str) -> list[str]:
    """Lowercased words without tags or surrounding punctuation (an edit may end a clause
    earlier, or start a sentence with what was its second word)."""
    return [w for w in (t.strip(_PUNCT).lower() for t in _TAG.sub(" ", text).split()) if w]


def from_original(original: str, repair: str) -> float:
    """Share of the repair's words the original has too (counted with multiplicity; case and
    punctuation around a word ignored).

    >>> from_original("Maybe it is 42, I think.", "It is 42.")
    1.0
    >>> from_original("it is 42", "the result is 42")
    0.5
    """
    words = _words(repair)
    if not words:
        return 1.0
    overlap = Counter(words) & Counter(_words(original))
    return sum(overlap.values()) / len(words)
