"""The tag grammar of a tool-integrated trajectory (METHOD.md section 1).

Tags: <think>, <code> (or <python>), <search>, <result> (written by the environment only) and
<answer> holding one \\boxed{}. This module finds the tool call a generation stopped at, formats
tool results, extracts the final answer and checks the format rule that the RL reward gates on.
All functions are pure and never raise on model output: malformed text yields None or an
invalid FormatCheck with the reasons.

Not here: deciding whether an answer is correct (grading.py) or running tools (tools/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autotraj.records import ToolName

# Opening tag -> tool. <python> is accepted because Tool-Star data uses it (METHOD.md section 1).
TOOL_TAGS: dict[str, ToolName] = {"code": "python", "python": "python", "search": "search"}
TOOL_STOPS: tuple[str, ...] = tuple(f"</{tag}>" for tag in TOOL_TAGS)
ANSWER_STOP = "</answer>"
# Generation stops at a closed tool call (to run it) or a closed answer (nothing may follow it).
STOP_STRINGS: tuple[str, ...] = (*TOOL_STOPS, ANSWER_STOP)

_TAG = re.compile(r"<(/?)(think|code|python|search|result|answer)>")


@dataclass(frozen=True)
class PendingCall:
    """A tool call found at the end of a generated piece of text."""

    tool: ToolName
    input: str


def find_tool_call(text: str) -> PendingCall | None:
    """The tool call that `text` ends with (the last closing tool tag), if it is well formed.

    >>> find_tool_call("<think>add</think>\\n<code>\\nprint(1+1)\\n</code>")
    PendingCall(tool='python', input='print(1+1)')
    >>> find_tool_call("no opening tag </code>") is None
    True
    """
    best: tuple[int, str] | None = None
    for tag in TOOL_TAGS:
        pos = text.rfind(f"</{tag}>")
        if pos >= 0 and (best is None or pos > best[0]):
            best = (pos, tag)
    if best is None:
        return None
    close_pos, tag = best
    open_pos = text.rfind(f"<{tag}>", 0, close_pos)
    if open_pos < 0:
        return None
    content = text[open_pos + len(tag) + 2 : close_pos]
    return PendingCall(tool=TOOL_TAGS[tag], input=content.strip())


def result_text(output: str) -> str:
    """The environment's reply to a tool call, as appended to the trajectory.

    A literal result tag inside the tool output is defused so the block stays well formed.
    """
    safe = output.replace("<result>", "<\\result>").replace("</result>", "<\\/result>")
    return f"\n<result>\n{safe}\n</result>\n"


def _outside_results(text: str) -> list[tuple[int, str]]:
    """(offset, piece) for each stretch of `text` outside closed <result>...</result> blocks.

    Scans left to right like a non-greedy regex would, but in linear time (a regex rescans to
    the end of the text for every unclosed <result>).
    """
    pieces, pos = [], 0
    while (start := text.find("<result>", pos)) >= 0:
        end = text.find("</result>", start + len("<result>"))
        if end < 0:
            break
        pieces.append((pos, text[pos:start]))
        pos = end + len("</result>")
    pieces.append((pos, text[pos:]))
    return pieces


def _answer_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last closed <answer> block outside tool results."""
    pieces = _outside_results(text)
    for k in range(len(pieces) - 1, -1, -1):
        end = pieces[k][1].rfind("</answer>")
        if end < 0:
            continue
        for j in range(k, -1, -1):
            offset, piece = pieces[j]
            start = piece.rfind("<answer>", 0, end if j == k else len(piece))
            if start >= 0:
                return offset + start + len("<answer>"), pieces[k][0] + end
        return None
    return None


def answer_block(text: str) -> str | None:
    """Content of the last closed <answer>...</answer> block outside tool results, or None.

    Tool results inside the block are left out.
    """
    span = _answer_span(text)
    if span is None:
        return None
    return "".join(piece for _, piece in _outside_results(text[span[0] : span[1]]))


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} in `text`, with balanced braces, or None.

    >>> last_boxed(r"so \boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    >>> last_boxed(r"\boxed{unclosed") is None
    True
    """
    start, limit = text.rfind("\\boxed{"), len(text)
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        while i < limit:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len("\\boxed{") : i]
            i += 1
        # The braces after `start` never balance, so an earlier \boxed{ that is still open when
        # it reaches `start` never closes either: scanning up to `start` suffices (linear time).
        limit = start
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    r"""The final answer: the last \boxed{} inside the last <answer> block (METHOD.md section 4).

    >>> extract_answer(r"<answer>\boxed{72}</answer>")
    '72'
    """
    span = _answer_span(text)
    if span is None:
        return None
    # Search the model's own text only, so the answer is always a substring of `text`.
    for _, piece in reversed(_outside_results(text[span[0] : span[1]])):
        boxed = last_boxed(piece)
        if boxed is not None:
            return boxed.strip()
    return None


@dataclass(frozen=True)
class FormatCheck:
    valid: bool
    reasons: tuple[str, ...]


def check_format(text: str, answer: bool = True) -> FormatCheck:
    """The release's format rule (METHOD.md section 10), with the reasons it fails.

    Valid iff: <think> and </think> counts are equal and >= 1; <answer> ... </answer> present in
    order with \\boxed{ inside; every <search>/<code>/<python> is closed and followed by a
    <result>...</result> block. `answer=False` leaves out the answer rule: the check for a
    trajectory cut before its answer (a prefix to continue from).
    """
    reasons: list[str] = []
    outside = "<result></result>".join(piece for _, piece in _outside_results(text))
    opens, closes = outside.count("<think>"), outside.count("</think>")
    if opens < 1 or opens != closes:
        reasons.append(f"think tags unbalanced or missing ({opens} open, {closes} close)")
    if answer:
        block = answer_block(text)
        if block is None:
            reasons.append("no closed <answer> block")
        elif "\\boxed{" not in block:
            reasons.append("no \\boxed{ inside <answer>")
    tags = [(m.group(1) == "/", m.group(2)) for m in _TAG.finditer(outside)]
    for i, (closing, name) in enumerate(tags):
        if closing or name not in TOOL_TAGS:
            continue
        nxt = tags[i + 1 : i + 4]
        if not nxt or nxt[0] != (True, name):
            reasons.append(f"<{name}> not closed")
        elif nxt[1:] != [(False, "result"), (True, "result")]:
            reasons.append(f"<{name}> call not followed by a <result> block")
    return FormatCheck(valid=not reasons, reasons=tuple(reasons))
