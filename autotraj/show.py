"""Show a run's trajectories in a terminal: `autotraj show RUN_DIR ID` and `--list`.

What it does: `render_show` returns one trajectory as text: its question, each segment (model
text, with tool-call inputs and the answer highlighted, and tool results marked as not trained),
each tool call with its status and latency, its quality score per component and partition label
(from score/scores.jsonl when present), with a tokenizer its trainable mask (render.py's, with
the masked spans marked), and, when it was repaired (repair/repairs.jsonl, hard_cases.jsonl),
the original beside its repair with the differences marked (side by side when `width` allows,
else one after the other). `render_list` returns the trajectory ids with label, score and repair
outcome. Colors are ANSI codes, only when `color=True`; without colors every mark is plain text.

Not here: writing to stdout (cli.py decides that, and whether stdout takes colors), the HTML
report (report/), tag spans and line/word diffs (markup.py, shared with the report), computing
scores or masks (quality.py, render.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import groupby, zip_longest
from pathlib import Path
from typing import Any

from autotraj.io import DataError
from autotraj.markup import diff_rows, tag_spans, word_diff
from autotraj.records import Trajectory
from autotraj.render import Tokenizer, render_trajectory
from autotraj.run_dir import RunFiles, read_run_files

log = logging.getLogger(__name__)

SIDE_BY_SIDE_MIN_WIDTH = 120  # two columns of >= 58 characters
MASK_OPEN, MASK_CLOSE = "[masked]", "[/masked]"
_ANSI = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
_SPAN_STYLE = {"code": ("yellow",), "search": ("yellow",), "answer": ("green", "bold")}
_LABEL_STYLE = {"HQ": "green", "AC-LQ": "yellow", "AW": "red"}
_STATUS_STYLE = {"ok": "green", "error": "red", "timeout": "yellow", "rejected": "yellow"}


@dataclass(frozen=True)
class Palette:
    """ANSI styling that is a no-op when disabled."""

    enabled: bool = False

    def paint(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles or not text:
            return text
        codes = ";".join(_ANSI[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def rule(self, title: str) -> str:
        return self.paint(f"── {title} ──", "bold")


def load_run(run_dir: str | Path) -> RunFiles:
    """The run's files; scores, repairs and hard cases are shown when present."""
    return read_run_files(run_dir, optional=frozenset({"scores", "repairs", "hard_cases"}))


# ---------------------------------------------------------------------------------------------
# One trajectory


def render_show(
    run_dir: str | Path,
    trajectory_id: str,
    *,
    tokenizer: str | Tokenizer | None = None,
    color: bool = False,
    width: int = 100,
) -> str:
    """One trajectory of a run as text (see the module docstring).

    `tokenizer`: a loaded tokenizer, or a model name/path / "embedded:<name>" to load one.
    """
    view = load_run(run_dir)
    p = Palette(color)
    trajectory = view.find(trajectory_id)
    question = _question(view, trajectory)
    parts = [
        _header(trajectory, question, view, p),
        _segments(trajectory, p),
        _tool_calls(trajectory, p),
        _scores(view, trajectory, p),
    ]
    if tokenizer is not None:
        parts.append(render_mask(_tokenizer(tokenizer), question, trajectory, p))
    parts += _repairs(view, trajectory, p, width)
    return "\n\n".join(parts) + "\n"


def _tokenizer(tokenizer: str | Tokenizer) -> Tokenizer:
    if not isinstance(tokenizer, str):
        return tokenizer
    from autotraj.models.loading import GeneratorConfig, load_tokenizer

    return load_tokenizer(GeneratorConfig(model=tokenizer))


def _question(view: RunFiles, trajectory: Trajectory) -> str:
    query = view.queries.get(trajectory.query_id)
    if query is None:
        raise DataError(f"trajectory {trajectory.id}: query {trajectory.query_id!r} not in the run")
    return query.question


def _header(trajectory: Trajectory, question: str, view: RunFiles, p: Palette) -> str:
    query = view.queries[trajectory.query_id]
    lines = [
        p.rule(f"trajectory {trajectory.id}"),
        f"query {query.id} ({query.kind}): {question}",
        f"gold: {' | '.join(query.answers)}",
        f"finish: {trajectory.finish_reason}"
        + (f" ({trajectory.error})" if trajectory.error else "")
        + f" · model {trajectory.provenance.model} ({trajectory.provenance.role})",
    ]
    if trajectory.parent_id is not None:
        lines.append(f"repair of: {trajectory.parent_id}")
    return "\n".join(lines)


def highlight(text: str, p: Palette) -> str:
    """Model text with tool-call inputs in yellow and the answer block in green."""
    if not p.enabled:
        return text
    return "".join(p.paint(piece, *_SPAN_STYLE.get(kind, ())) for kind, piece in tag_spans(text))


def _segments(trajectory: Trajectory, p: Palette) -> str:
    lines = [p.rule(f"segments ({len(trajectory.segments)})")]
    for i, segment in enumerate(trajectory.segments):
        tokens = f", {len(segment.token_ids)} tokens" if segment.token_ids else ""
        if segment.trainable:
            lines.append(p.paint(f"[{i}] model text (trained{tokens})", "dim"))
            lines.append(highlight(segment.text.strip("\n"), p))
        else:
            lines.append(p.paint(f"[{i}] tool result (not trained{tokens})", "dim"))
            lines.append(p.paint(segment.text.strip("\n"), "cyan", "dim"))
    return "\n".join(lines)


def _indent(label: str, text: str) -> str:
    pad = " " * len(label)
    body = text.splitlines() or [""]
    return "\n".join([label + body[0], *(pad + line for line in body[1:])])


def _tool_calls(trajectory: Trajectory, p: Palette) -> str:
    lines = [p.rule(f"tool calls ({len(trajectory.tool_calls)})")]
    for i, call in enumerate(trajectory.tool_calls, start=1):
        status = p.paint(call.status, _STATUS_STYLE[call.status])
        lines.append(f"{i}. {call.tool} {status} {call.latency_s:.2f} s")
        lines.append(p.paint(_indent("   input:  ", call.input), "yellow"))
        lines.append(p.paint(_indent("   output: ", call.output), "cyan"))
    return "\n".join(lines)


def _scores(view: RunFiles, trajectory: Trajectory, p: Palette) -> str:
    row = view.scores.get(trajectory.id)
    repair = next((r for r in view.repairs.values() if r.trajectory.id == trajectory.id), None)
    if row is None and repair is not None:
        return "\n".join(
            [
                p.rule("score"),
                f"accepted repair ({repair.how}) of {repair.original_id} "
                f"[{p.paint(repair.label, _LABEL_STYLE[repair.label])}]: "
                f"S {repair.original_score:.3f} -> {repair.repair_score:.3f}",
            ]
        )
    if row is None:
        return p.rule("score") + "\nnot scored (no score/scores.jsonl row)"
    q = row.quality
    grade = [f"correct {'yes' if q.correct else 'no'}"]
    grade += [f"{k} {v:.3f}" for k, v in (("em", row.em), ("f1", row.f1)) if v is not None]
    if row.extracted is not None:
        grade.append(f"extracted {row.extracted!r}")
    lines = [
        p.rule("score"),
        f"label {p.paint(q.label, _LABEL_STYLE[q.label], 'bold')} · S {q.score:.3f} · "
        + " · ".join(grade),
        *(f"  {name:<14}{value:.3f}" for name, value in q.components),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The trainable mask


def render_mask(tokenizer: Tokenizer, question: str, trajectory: Trajectory, p: Palette) -> str:
    """Token counts trainable vs masked, and the reply with masked spans marked."""
    rendered = render_trajectory(tokenizer, question, trajectory)
    reply = list(
        zip(
            rendered.input_ids[rendered.prompt_length :],
            rendered.trainable[rendered.prompt_length :],
            strict=True,
        )
    )
    trained = sum(flag for _, flag in reply)
    pieces = []
    for flag, run in groupby(reply, key=lambda pair: pair[1]):
        text = tokenizer.decode([i for i, _ in run], skip_special_tokens=False)
        pieces.append(text if flag else p.paint(f"{MASK_OPEN}{text}{MASK_CLOSE}", "cyan", "dim"))
    counts = (
        f"prompt {rendered.prompt_length} tokens (masked) · reply {len(reply)} tokens: "
        f"{trained} trainable, {len(reply) - trained} masked"
    )
    return "\n".join([p.rule("trainable mask"), counts, "".join(pieces)])


# ---------------------------------------------------------------------------------------------
# Repairs and their diffs


def _repairs(view: RunFiles, trajectory: Trajectory, p: Palette, width: int) -> list[str]:
    """A diff section for every repair of `trajectory`, or for the original it repairs."""
    original_id = trajectory.parent_id if trajectory.id not in view.trajectories else trajectory.id
    original = view.trajectories.get(original_id or "")
    if original is None:
        return []
    sections = []
    accepted = view.repairs.get(original.id)
    if accepted is not None:
        title = (
            f"accepted repair {accepted.trajectory.id} ({accepted.how}, {accepted.label}): "
            f"S {accepted.original_score:.3f} -> {accepted.repair_score:.3f}"
        )
        sections.append(_diff_section(title, original, accepted.trajectory, p, width))
    for case in view.hard_cases:
        if case.original_id != original.id:
            continue
        title = f"rejected repair ({case.reason})"
        sections.append(_diff_section(title, original, case.trajectory, p, width))
    return sections


def _diff_section(
    title: str, original: Trajectory, repair: Trajectory, p: Palette, width: int
) -> str:
    rows = diff_rows(original.text, repair.text)
    changed = sum(tag != " " for tag, _, _ in rows)
    head = f"{p.rule(title)}\n{changed} of {len(rows)} lines differ"
    if width >= SIDE_BY_SIDE_MIN_WIDTH:
        body = side_by_side(rows, original.id, repair.id, width, p)
    else:
        body = one_after_other(rows, original.id, repair.id, p)
    return f"{head}\n{body}"


def word_marks(a: str, b: str, p: Palette) -> tuple[str, str]:
    """Two versions of a line with the words (tags, punctuation) that differ marked:
    [-removed-] and {+added+}, or red and green with colors.

    >>> word_marks("the answer is 5", "the answer is 6", Palette())
    ('the answer is [-5-]', 'the answer is {+6+}')
    """
    a_pieces, b_pieces = word_diff(a, b)
    return _marked(a_pieces, p, "red", "[-{}-]"), _marked(b_pieces, p, "green", "{{+{}+}}")


def _marked(pieces: list[tuple[bool, str]], p: Palette, color: str, plain: str) -> str:
    """The pieces joined, the differing ones painted (colors) or wrapped in `plain` (no colors)."""
    if p.enabled:
        return "".join(
            p.paint(text, color, "bold") if differs else text for differs, text in pieces
        )
    return "".join(plain.format(text) if differs else text for differs, text in pieces)


def one_after_other(
    rows: list[tuple[str, str | None, str | None]], a_id: str, b_id: str, p: Palette
) -> str:
    """The original (- marks its lines the repair lacks), then the repair (+ marks new lines)."""
    left, right = [p.rule(f"original {a_id}")], [p.rule(f"repair {b_id}")]
    for tag, a, b in rows:
        if tag == "|":
            a, b = word_marks(a or "", b or "", p)
        if a is not None:
            left.append(("  " if tag == " " else p.paint("- ", "red")) + a)
        if b is not None:
            right.append(("  " if tag == " " else p.paint("+ ", "green")) + b)
    return "\n".join(left + right)


def _chunks(line: str | None, size: int) -> list[str]:
    if line is None:
        return [""]
    return [line[i : i + size] for i in range(0, max(len(line), 1), size)]


def side_by_side(
    rows: list[tuple[str, str | None, str | None]], a_id: str, b_id: str, width: int, p: Palette
) -> str:
    """Two columns (original | repair); long lines wrap; the middle column holds the row's tag."""
    col = (width - 3) // 2
    lines = [p.paint(f"{'original ' + a_id:<{col}}   {'repair ' + b_id}"[:width], "bold")]
    for tag, a, b in rows:
        left, right = _chunks(a, col), _chunks(b, col)
        for i, (x, y) in enumerate(zip_longest(left, right, fillvalue="")):
            x = x.ljust(col)
            if tag in "|<" and a is not None:
                x = p.paint(x, "red")
            if tag in "|>" and b is not None:
                y = p.paint(y, "green")
            lines.append(f"{x} {tag if i == 0 else ' '} {y}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The list


def render_list(run_dir: str | Path, *, label: str | None = None, color: bool = False) -> str:
    """One line per candidate trajectory: id, label, score, correct, repair outcome."""
    view = load_run(run_dir)
    p = Palette(color)
    rows = [_list_row(view, t) for t in view.trajectories.values()]
    if label is not None:
        rows = [r for r in rows if r[1] == label]
    header = ("id", "label", "score", "correct", "repair")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        p.paint(
            "  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0], strict=True)).rstrip(),
            "bold",
        )
    ]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)]
        cells[1] = p.paint(cells[1], _LABEL_STYLE.get(row[1], "dim"))
        lines.append("  ".join([*cells, row[4]]).rstrip())
    lines.append(_list_summary(rows, label))
    return "\n".join(lines) + "\n"


def _list_row(view: RunFiles, trajectory: Trajectory) -> tuple[str, str, str, str, str]:
    row = view.scores.get(trajectory.id)
    repair = view.repairs.get(trajectory.id)
    hard = [c.reason for c in view.hard_cases if c.original_id == trajectory.id]
    outcome = ""
    if repair is not None:
        outcome = f"accepted: {repair.trajectory.id} ({repair.how}, S {repair.repair_score:.3f})"
    elif hard:
        outcome = "rejected: " + "; ".join(hard)
    if row is None:
        return (trajectory.id, "-", "-", "-", outcome)
    q = row.quality
    return (trajectory.id, q.label, f"{q.score:.3f}", "yes" if q.correct else "no", outcome)


def _list_summary(rows: list[tuple[str, ...]], label: str | None) -> str:
    counts: dict[str, Any] = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    scope = f" labelled {label}" if label else ""
    return f"{len(rows)} trajectories{scope}" + (f" ({parts})" if parts else "")
