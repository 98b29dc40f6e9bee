"""The structure of trajectory text that both viewers mark up: tag spans and line/word diffs.

- `tag_spans` splits text into spans labelled by the innermost closed tag block holding them
  (think, code, search, result, answer; <python> counts as code) or "text" outside any block.
  An unclosed tag marks nothing, so half-written model output shows as plain text.
- `diff_rows` aligns the lines of two texts (an original and its repair).
- `word_diff` flags the words (tags, punctuation) that differ between two versions of a line.

Pure functions of strings; show.py paints them with ANSI colors, report/viewer.py turns them into
HTML. Not here: colors, escaping, reading runs.
"""

from __future__ import annotations

import difflib
import re
from itertools import pairwise, zip_longest
from typing import Literal

SpanKind = Literal["text", "think", "code", "search", "result", "answer"]
_BLOCK_TAG = re.compile(r"<(/?)(think|code|python|search|result|answer)>")
_KIND: dict[str, SpanKind] = {
    "think": "think",
    "code": "code",
    "python": "code",
    "search": "search",
    "result": "result",
    "answer": "answer",
}
_WORDS = re.compile(r"<[^>\s]+>|\w+|\s+|[^\w\s]")  # tags, words, spaces, punctuation


def _blocks(text: str) -> list[tuple[int, int, SpanKind]]:
    """(start, end, kind) of every closed block; a close tag drops the unclosed opens inside it."""
    blocks: list[tuple[int, int, SpanKind]] = []
    stack: list[tuple[str, int]] = []
    for m in _BLOCK_TAG.finditer(text):
        closing, tag = m.group(1), m.group(2)
        if not closing:
            stack.append((tag, m.start()))
            continue
        for depth in range(len(stack) - 1, -1, -1):
            if stack[depth][0] == tag:
                blocks.append((stack[depth][1], m.end(), _KIND[tag]))
                del stack[depth:]
                break
    return blocks


def tag_spans(text: str) -> list[tuple[SpanKind, str]]:
    """Consecutive (kind, text) pieces of `text`; joined they give `text` back.

    >>> tag_spans("<think>a <code>x</code></think>\\n<answer>1</answer>")
    [('think', '<think>a '), ('code', '<code>x</code>'), ('think', '</think>'), ('text', '\\n'), ('answer', '<answer>1</answer>')]
    """
    blocks = _blocks(text)
    cuts = sorted({0, len(text), *(b[0] for b in blocks), *(b[1] for b in blocks)})
    spans: list[tuple[SpanKind, str]] = []
    for start, end in pairwise(cuts):
        # Closed blocks nest, so the innermost holder of a piece is the one that starts last.
        holders = [b for b in blocks if b[0] <= start and end <= b[1]]
        kind: SpanKind = max(holders)[2] if holders else "text"
        if spans and spans[-1][0] == kind:
            spans[-1] = (kind, spans[-1][1] + text[start:end])
        else:
            spans.append((kind, text[start:end]))
    return spans


def diff_rows(a: str, b: str) -> list[tuple[str, str | None, str | None]]:
    """Aligned lines of two texts: (" " same, "|" changed, "<" only in a, ">" only in b, a, b).

    >>> diff_rows("x\\ny", "x\\nz")
    [(' ', 'x', 'x'), ('|', 'y', 'z')]
    """
    a_lines, b_lines = a.expandtabs().splitlines(), b.expandtabs().splitlines()
    rows: list[tuple[str, str | None, str | None]] = []
    matcher = difflib.SequenceMatcher(None, a_lines, b_lines, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            rows += [(" ", x, y) for x, y in zip(a_lines[i1:i2], b_lines[j1:j2], strict=True)]
            continue
        for x, y in zip_longest(a_lines[i1:i2], b_lines[j1:j2]):
            rows.append(
                ("|" if x is not None and y is not None else "<" if y is None else ">", x, y)
            )
    return rows


def word_diff(a: str, b: str) -> tuple[list[tuple[bool, str]], list[tuple[bool, str]]]:
    """Both versions of a line as (differs, text) pieces: True marks removed words in `a` and
    added words in `b`; empty pieces are left out.

    >>> word_diff("the answer is 5", "the answer is 6")
    ([(False, 'the answer is '), (True, '5')], [(False, 'the answer is '), (True, '6')])
    """
    a_words, b_words = _WORDS.findall(a), _WORDS.findall(b)
    a_out: list[tuple[bool, str]] = []
    b_out: list[tuple[bool, str]] = []
    matcher = difflib.SequenceMatcher(None, a_words, b_words, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        old, new = "".join(a_words[i1:i2]), "".join(b_words[j1:j2])
        if old:
            a_out.append((op != "equal", old))
        if new:
            b_out.append((op != "equal", new))
    return a_out, b_out
