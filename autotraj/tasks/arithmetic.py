"""Arithmetic word problems whose numbers are too large to work out without running code.

`make_problems(count, seed)` draws `count` distinct problems from a seeded stream: a template
(`TEMPLATES`: a story with one or two operations on multi-digit numbers) and its numbers. Each
problem carries its question (numbers written with thousands separators, "48,213"), the
expression it asks for ("48213 * 7906 - 1250") and the gold answer, an integer computed here with
exact integer arithmetic. `parse_question(question)` inverts the templates: it recovers the
expression and the template's one-line plan from a question's text, which is all the reference
solver (models/reference.py) reads; the gold answer never leaves this module through it.

Determinism: only `random.Random(seed)` draws (randrange, randint) are used, so the problems are
the same on every run and Python version.

Not here: splitting into train and test or building `Query` records (tasks/builtin.py).
"""

from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass
from functools import cache

_SLOT = re.compile(r"\{([abc])\}")
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


@dataclass(frozen=True)
class Template:
    """A word problem with slots {a}, {b}, {c} and the expression over them that answers it.

    `ranges` gives each slot's inclusive range; for "a // b" the drawn `a` is the quotient and the
    question shows a * b, so every division is exact. `plan` is one sentence saying how the
    answer follows from the quantities (what a careful solver would think).
    """

    question: str
    expression: str
    plan: str
    ranges: tuple[tuple[str, int, int], ...]


TEMPLATES: tuple[Template, ...] = (
    Template(
        "A warehouse holds {a} crates with {b} bolts each; {c} bolts are lost. "
        "How many bolts remain?",
        "a * b - c",
        "The bolts left are the crates times the bolts per crate, minus the lost bolts",
        (("a", 10_000, 99_999), ("b", 1_000, 9_999), ("c", 100, 9_999)),
    ),
    Template(
        "A factory makes {a} widgets per day. How many widgets does it make in {b} days?",
        "a * b",
        "The total is the daily output times the number of days",
        (("a", 10_000, 99_999), ("b", 100, 999)),
    ),
    Template(
        "A library has {a} shelves holding {b} books each, and it receives {c} more books. "
        "How many books does it have now?",
        "a * b + c",
        "The books are the shelves times the books per shelf, plus the new books",
        (("a", 1_000, 9_999), ("b", 100, 999), ("c", 1_000, 99_999)),
    ),
    Template(
        "A farm packs {a} eggs into cartons of {b} eggs each. How many full cartons does it fill?",
        "a // b",
        "The cartons are the eggs divided by the eggs per carton",
        (("a", 10_000, 99_999), ("b", 12, 999)),
    ),
    Template(
        "A ship carries {a} containers weighing {b} kilograms each and unloads {c} of the "
        "containers. How many kilograms of cargo remain on board?",
        "(a - c) * b",
        "The containers still on board are the loaded ones minus the unloaded ones, times the "
        "weight of one container",
        (("a", 10_000, 99_999), ("b", 1_000, 9_999), ("c", 1_000, 9_999)),
    ),
    Template(
        "A rail line sells {a} tickets a day at {b} cents each. How many cents does it take in "
        "over {c} days?",
        "a * b * c",
        "The takings are the tickets per day times the price times the number of days",
        (("a", 1_000, 9_999), ("b", 100, 999), ("c", 100, 999)),
    ),
    Template(
        "A mine produced {a} tons of ore last year and {b} tons this year, and it has sold {c} "
        "tons. How many tons does it still hold?",
        "a + b - c",
        "The ore left is the two years of output added together, minus the ore sold",
        (("a", 1_000_000, 9_999_999), ("b", 1_000_000, 9_999_999), ("c", 100_000, 999_999)),
    ),
    Template(
        "A school district buys {a} laptops at {b} dollars each and gets a discount of {c} "
        "dollars on the whole order. How many dollars does it pay?",
        "a * b - c",
        "The bill is the laptops times the price per laptop, minus the discount",
        (("a", 1_000, 9_999), ("b", 100, 2_999), ("c", 10_000, 99_999)),
    ),
)


@dataclass(frozen=True)
class Problem:
    question: str
    expression: str  # with the numbers filled in, e.g. "48213 * 7906 - 1250"
    answer: int
    template: int  # index into TEMPLATES


def evaluate(expression: str) -> int:
    """Exact value of an integer expression of + - * // and parentheses.

    >>> evaluate("(48213 - 1250) * 7906")
    371289478
    """
    return _eval_node(ast.parse(expression, mode="eval").body)


def _eval_node(node: ast.expr) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
    raise ValueError(f"not an integer expression of + - * //: {ast.unparse(node)!r}")


def fill(template: Template, values: dict[str, int]) -> tuple[str, str]:
    """(question, expression) of a template with its slots filled in."""
    shown = dict(values)
    if "//" in template.expression:  # exact division: the question shows the dividend
        shown["a"] = values["a"] * values["b"]
    question = template.question.format(**{k: f"{v:,}" for k, v in shown.items()})
    return question, _substitute(template.expression, shown)


def _substitute(expression: str, values: dict[str, int]) -> str:
    return re.sub(r"\b([abc])\b", lambda m: str(values[m.group(1)]), expression)


def make_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems from the stream seeded by `seed` (same on every run)."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < count:
        index = rng.randrange(len(TEMPLATES))
        template = TEMPLATES[index]
        values = {slot: rng.randint(low, high) for slot, low, high in template.ranges}
        question, expression = fill(template, values)
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(question, expression, evaluate(expression), index))
    return problems


@cache
def _question_patterns() -> tuple[re.Pattern[str], ...]:
    patterns = []
    for template in TEMPLATES:
        parts = _SLOT.split(template.question)  # text, slot, text, slot, ..., text
        regex = "".join(
            re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\d{{1,3}}(?:,\d{{3}})*)"
            for i, part in enumerate(parts)
        )
        patterns.append(re.compile(rf"^\s*{regex}\s*$"))
    return tuple(patterns)


@dataclass(frozen=True)
class ParsedProblem:
    """What a reader of the question knows: the expression to compute and the plan sentence."""

    expression: str
    plan: str


def parse_question(question: str) -> ParsedProblem | None:
    """Read an arithmetic question back into its expression; None if no template matches.

    >>> parse_question("A factory makes 12,345 widgets per day. How many widgets does it make "
    ...                "in 678 days?").expression
    '12345 * 678'
    """
    for template, pattern in zip(TEMPLATES, _question_patterns(), strict=True):
        match = pattern.match(question)
        if match:
            shown = {k: int(v.replace(",", "")) for k, v in match.groupdict().items()}
            return ParsedProblem(_substitute(template.expression, shown), template.plan)
    return None
