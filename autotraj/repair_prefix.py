"""Where the "continue" repair strategy cuts an original trajectory: after each tool result,
latest first, a flawed prefix cleaned by the first pass's whole-unit edit or skipped.

Not here: the continuation itself (repair.run_continue_round).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from autotraj.edits import edit
from autotraj.flaws import flaws
from autotraj.records import (
    Segment,
    Trajectory,
)


def cut_prefixes(original: Trajectory, hedging_words: Sequence[str]) -> list[Trajectory]:
    """Where the "continue" strategy cuts `original`: its prefixes ending right after a tool
    result, latest first. A prefix with a flaw (flaws.flaws) is cleaned by the first pass's
    whole-unit edit (edits.edit: hedging sentences and clauses, repeated steps); one that is
    still flawed, or that the edit cannot clean, is skipped, since every continuation of it
    would be rejected."""
    out: list[Trajectory] = []
    for i, segment in enumerate(original.segments):
        if segment.trainable:
            continue
        prefix = prefix_of(original, i + 1)
        if flaws(prefix, hedging_words, complete=False):
            edited = _edit_prefix(prefix, hedging_words)
            if edited is None or flaws(edited, hedging_words, complete=False):
                continue
            prefix = edited
        if all(p.text != prefix.text for p in out):
            out.append(prefix)
    return out[::-1]


_SENTINEL = Segment("<answer></answer>", True)


def _edit_prefix(prefix: Trajectory, hedging_words: Sequence[str]) -> Trajectory | None:
    """edits.edit on a prefix that ends with a tool result (edit expects a last model piece
    after the last result: an inert one is added for it and taken off again)."""
    edited = edit(
        dataclasses.replace(prefix, segments=(*prefix.segments, _SENTINEL)), hedging_words
    )
    if edited is None or edited.segments[-1] != _SENTINEL:
        return None
    return dataclasses.replace(edited, segments=edited.segments[:-1])


def prefix_of(original: Trajectory, keep: int) -> Trajectory:
    """The first `keep` segments of `original` and the tool calls whose results they hold."""
    segments = original.segments[:keep]
    results = sum(not s.trainable for s in segments)
    return dataclasses.replace(
        original,
        segments=segments,
        tool_calls=original.tool_calls[:results],
        finish_reason="length",
    )
