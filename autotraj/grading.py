r"""Answer grading: is a trajectory's final answer correct? (METHOD.md section 4)

What it does:
- `math_equal(pred, gold)`: symbolic/numeric equivalence with math-verify (sympy underneath),
  after a light pre-normalization for the forms math-verify reads wrongly on its own (LaTeX
  thin spaces and digit-group separators, scientific and e-notation, mixed numbers, units with
  powers, a trailing backslash, `f(x) =` in front of an expression, degrees inside trigonometric
  functions), plus exact rules where a value is not a number: multiple-choice letters
  (`(B)` == `\text{(B)}` == `B`), word answers (`\text{Evelyn}` == `evelyn`) and clock times
  (`4:30` is not the ratio `2:15`). A gold written with the letter i is retried with i read as
  the imaginary unit. docs/grading.md lists every rule with the peer test case behind it.
- QA: the official rule of each benchmark (`QaRule`, chosen from `Query.source` by `qa_rule`):
  SQuAD v1.1's EM/F1, HotpotQA's (F1 is 0 when a yes/no/noanswer prediction or gold differs),
  or exact match over the aliases (the built-in multi-hop task). A QA answer is correct at
  EM or F1 >= 0.5 (the release's accuracy rule); under "exact" only at EM.
- `grade_answer` / `grade_trajectory` -> `Grade` for a `Query` of either kind, with a `checker`:
  "default" (the rules above), or the authors' own checkers reproduced from their public code
  (release_checker.py: "release" = answer_filter_both.py, "release_repair" = traj_utils.py).

An empty or missing prediction is never correct under the default checker.

Thread safety: math-verify's timeouts use `signal.alarm`, which only works in the main thread. We
pass a timeout in the main thread and none elsewhere (thread pools, async reward workers), so the
grader never raises there; off the main thread a pathological expression is not interrupted.

Not here: extracting tags (tags.py), scoring trajectory quality (quality.py), RL rewards
(rewards.py), reading benchmark files.
"""

from __future__ import annotations

import logging
import re
import string
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from autotraj import release_checker
from autotraj.records import Query
from autotraj.tags import extract_answer

log = logging.getLogger(__name__)

Checker = Literal["default", "release", "release_repair"]
QaRule = Literal["squad", "hotpot", "exact"]

# Seconds math-verify may spend parsing or comparing one expression (its own default is 5).
MATH_VERIFY_TIMEOUT_S = 5
# The release counted a QA answer correct at EM or token F1 >= 0.5 (METHOD.md section 4).
QA_F1_THRESHOLD = 0.5

# Which official QA rule grades a query, by a name found in `Query.source` (first match wins).
QA_RULES: tuple[tuple[str, QaRule], ...] = (
    ("builtin:multihop", "exact"),  # fixed aliases ("K", "Republic of K"): near misses are wrong
    ("hotpot", "hotpot"),  # hotpotqa/hotpot hotpot_evaluate_v1.py
    ("2wiki", "hotpot"),  # Alab-NII/2wikimultihop 2wikimultihop_evaluate_v1.1.py (from HotpotQA)
    ("musique", "squad"),  # StonyBrookNLP/musique metrics/answer.py (SQuAD's, via allennlp)
    ("squad", "squad"),  # SQuAD v1.1 evaluate-v1.1.py
)
# Anything else (Bamboogle, Tool-Star's QA mix, a user's file): HotpotQA's rule, which is
# FlashRAG's F1 for every dataset and the release's RL reward (re_search.py get_f1_score).
DEFAULT_QA_RULE: QaRule = "hotpot"

# The answer is wrapped as \boxed{...} before parsing, so the boxed form is looked at first.
_MV_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

_TEXT_CMD = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|textnormal|mathrm|mathbf|mathit|mathsf|mathcal"
    r"|mbox)\s*\{([^{}]*)\}"
)
_DIGIT_GROUP = re.compile(r"(?<=\d)(?:,\\!|\{,\})\s*(?=\d)")  # 10,\!080 and 14{,}916
_SPACING = re.compile(r"\\\\|\\[!,;: ]")  # a LaTeX row break `\\` is kept, thin spaces dropped
_DOUBLED_COMMAND = re.compile(r"(?<!\\)\\\\(?=[A-Za-z])")  # \\frac typed for \frac
# Number patterns are unambiguous (one way to match a digit run), so a failed match is linear.
_DECIMAL = r"(?:\d+(?:\.\d+)?|\.\d+)"
_NUMBER = r"[-+]?(?:\d(?:,?\d)*(?:\.\d+)?|\.\d+)"  # 1,000.5 or .5
_UNIT = r"[A-Za-z]{2,}\.?(?:\^\{?\d\}?)?"  # a unit word, maybe with a power: cm^2, sq.
# "18 dollars", "10 cm^2", "5 sq. ft": words apart by spaces, so matching stays linear
_NUMBER_WITH_UNITS = re.compile(rf"^({_NUMBER})\s*{_UNIT}(?:\s+{_UNIT})*\s*$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACE_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_E_NOTATION = re.compile(rf"^([-+]?{_DECIMAL})[eE]([-+]?\d+)$")
_TIMES_TEN = re.compile(
    rf"^([-+]?{_DECIMAL})\s*(?:\\times|\\cdot|\*)\s*10\s*\^\s*\{{?\s*([-+]?\d+)\s*\}}?$"
)
_MIXED_NUMBER = re.compile(r"^([-+]?\d+)\s+(\d+)\s*/\s*(\d+)$")
_FUNCTION_LHS = re.compile(r"^[A-Za-z]\s*\(\s*[A-Za-z]\s*\)\s*=")  # f(x) = ...
_TRIG = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)\b")
_DEGREES = re.compile(rf"(?<![\d.])({_DECIMAL})\s*\^\s*(?:\{{\s*\\circ\s*\}}|\\circ)")
_IMAGINARY = re.compile(r"(?<![\\A-Za-z])i(?![A-Za-z])")
_CLOCK = re.compile(r"^(\d{1,2}):([0-5]\d)\s*(?:([ap])\.?\s*m\.?)?$", re.IGNORECASE)
_CHOICE = re.compile(r"^\(?([A-E])\)?$")
_CHOICE_WITH_TEXT = re.compile(r"^\(?([A-E])\)?[.:]\s+\S")  # "C. x = 42"
_WORDS = re.compile(r"^[A-Za-z]{2,}(?:[ '-][A-Za-z]{2,})*$")  # letter runs of 2+: words
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one answer.

    `correct` follows the checker's rule for the query's kind. `em` and `f1` are the benchmark's
    official QA metrics against the gold aliases (in [0, 1]; `f1` under the query's `QaRule`); for
    math they are SQuAD's and only informational. `score` is the outcome in [0, 1] the RL reward
    uses: 1.0/0.0 for math and for the "exact" QA rule, the rule's F1 for "squad" and "hotpot".
    `extracted` is the answer the checker read (None when there was no answer to read).
    """

    correct: bool
    em: float
    f1: float
    score: float
    extracted: str | None


def _mv_timeout() -> int | None:
    """math-verify's signal.alarm timeout only works in the main thread: None elsewhere."""
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    return None


def _strip_spacing(s: str) -> str:
    r"""Thin spaces and digit-group separators out, `\\` row breaks and `\$` kept.

    >>> _strip_spacing(r"\begin{pmatrix} 9 \\ 4 \end{pmatrix}")
    '\\begin{pmatrix} 9 \\\\ 4 \\end{pmatrix}'
    >>> _strip_spacing(r"56,\!01,\!78\,000")
    '560178000'
    """
    s = _DIGIT_GROUP.sub("", s)
    return _SPACING.sub(lambda m: m.group() if m.group() == "\\\\" else "", s)


def _plain_number(s: str) -> str:
    r"""Number spellings math-verify misreads, rewritten; anything else unchanged.

    >>> [_plain_number(s) for s in ("1 000", "1.5e3", r"2.3 \times 10^{-3}", "3128 1/2")]
    ['1000', '1.5E3', '2.3E-3', '3128\\frac{1}{2}']
    """
    if _THOUSANDS.match(s) or _SPACE_THOUSANDS.match(s):  # math-verify joins only one group
        return s.replace(",", "").replace(" ", "")
    if m := _E_NOTATION.match(s) or _TIMES_TEN.match(s):  # "e" would be Euler's number
        return f"{m.group(1)}E{m.group(2)}"
    if m := _MIXED_NUMBER.match(s):
        return f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    if m := _NUMBER_WITH_UNITS.match(s):  # "18 dollars", "10 cm^2": the number is the answer
        return _plain_number(m.group(1))
    return s


def _prenormalize(answer: str) -> str:
    r"""Light clean-up math-verify needs help with; everything else is left to it.

    >>> _prenormalize(r"10,\!080.")
    '10080'
    >>> _prenormalize("18 dollars")
    '18'
    >>> _prenormalize("185\\")
    '185'
    """
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    s = _strip_spacing(s).replace("\\mbox", "\\text")
    if "\\begin" not in s:  # outside matrices `\\` only ever appears as a mistyped command
        s = _DOUBLED_COMMAND.sub(r"\\", s)
    s = s.rstrip("\\").strip()
    s = s.rstrip(".").strip() if not s.endswith("..") else s
    s = _FUNCTION_LHS.sub("", s).strip()  # "f(x) = 2x+3" is the expression 2x+3
    if _TRIG.search(s):  # degrees inside sin/cos/...: radians for sympy
        s = _DEGREES.sub(r"(\1\\pi/180)", s)
    return _plain_number(s)


def _plain_text(answer: str) -> str:
    r"""`\text{...}` unwrapped, `$`/`\$` dropped, whitespace collapsed; for the exact rules."""
    s = _TEXT_CMD.sub(r"\1", answer).replace("\\$", "").replace("$", "")
    return _SPACES.sub(" ", s).strip()


def _clock(s: str) -> tuple[int, int, str] | None:
    """(hours, minutes, am/pm) of a clock time like `4:30` or `4:30 p.m.`, else None."""
    m = _CLOCK.match(s)
    return (int(m.group(1)), int(m.group(2)), (m.group(3) or "").lower()) if m else None


def _exact_rule(p: str, g: str) -> bool | None:
    """The verdict of a rule for answers that are not numbers, or None to compare values."""
    pb, gb = _CHOICE.match(p), _CHOICE.match(g)
    if pb or gb:  # a multiple-choice letter only ever equals the same letter ("C" == "C. x = 42")
        pc, gc = pb or _CHOICE_WITH_TEXT.match(p), gb or _CHOICE_WITH_TEXT.match(g)
        return bool(pc and gc and pc.group(1) == gc.group(1))
    if _WORDS.match(p) or _WORDS.match(g):  # words are words: "yes", "Evelyn", "east"
        return p.lower() == g.lower()
    pt, gt = _clock(p), _clock(g)
    if pt and gt:  # two clock times: 4:30 is not the ratio 2:15
        return pt[:2] == gt[:2] and (pt[2] == gt[2] or not pt[2] or not gt[2])
    return True if p == g else None


@lru_cache(maxsize=4096)
def _parse_cached(answer: str, timeout: int | None) -> tuple[object, ...]:
    # math-verify catches its own parse errors (raise_on_error=False): a failure is an empty list,
    # logged by it at debug level. Memoized: gold answers are parsed once per process.
    return tuple(parse(f"\\boxed{{{answer}}}", _MV_CONFIG, parsing_timeout=timeout))


def _verify(p: str, g: str, timeout: int | None) -> bool:
    gold_parsed, pred_parsed = _parse_cached(g, timeout), _parse_cached(p, timeout)
    if not gold_parsed or not pred_parsed:
        log.debug("math-verify could not parse %r or %r: not equal", p, g)
        return False
    return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout)


def math_equal(pred: str | None, gold: str) -> bool:
    r"""Whether `pred` is mathematically equivalent to `gold` (both LaTeX or plain answers).

    >>> math_equal(r"\frac{1}{2}", "0.5")
    True
    >>> math_equal("1,000", "1000")
    True
    >>> math_equal("[1,3)", "(1,3)")
    False
    >>> math_equal("i(2-i)", "1+2i")
    True
    >>> math_equal("", "0")
    False
    """
    if pred is None or not pred.strip() or not gold.strip():
        return False
    p, g = _prenormalize(pred), _prenormalize(gold)
    if not p:
        return False
    verdict = _exact_rule(_plain_text(p), _plain_text(g))
    if verdict is not None:
        return verdict
    timeout = _mv_timeout()
    if _verify(p, g, timeout):
        return True
    if _IMAGINARY.search(g):  # a gold written with i is a complex number: i is the unit
        return _verify(_IMAGINARY.sub("I", p), _IMAGINARY.sub("I", g), timeout)
    return False


# ---------------------------------------------------------------------------------------------
# QA: SQuAD's normalization, and each benchmark's official EM / F1


_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = frozenset({"yes", "no", "noanswer"})  # HotpotQA's special answers


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace.

    >>> normalize_answer("The  Big Apple!")
    'big apple'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str | None, golds: Sequence[str]) -> bool:
    """Normalized exact match against any alias; an empty prediction never matches.

    >>> exact_match("new york city", ["NYC", "New York City"])
    True
    """
    if pred is None:
        return False
    p = normalize_answer(pred)
    return bool(p) and any(p == normalize_answer(g) for g in golds)


def _f1(pred: str, gold: str, rule: QaRule) -> float:
    if rule == "hotpot" and (pred in _YES_NO or gold in _YES_NO) and pred != gold:
        return 0.0  # hotpot_evaluate_v1.py: a yes/no answer is right or wrong, never partial
    pred_tokens, gold_tokens = pred.split(), gold.split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(pred: str | None, golds: Sequence[str], rule: QaRule = "squad") -> float:
    """Token F1 in [0, 1] under a benchmark's rule, the max over aliases; 0.0 for an empty
    prediction. "squad" (and "exact", which only reports it) is SQuAD v1.1's; "hotpot" is 0
    when the prediction or the gold is yes/no/noanswer and they differ.

    >>> qa_f1("yes, it is", ["yes"]), qa_f1("yes, it is", ["yes"], "hotpot")
    (0.5, 0.0)
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    return max((_f1(p, normalize_answer(g), rule) for g in golds), default=0.0)


def token_f1(pred: str | None, golds: Sequence[str]) -> float:
    """SQuAD token F1 in [0, 1], the max over aliases; 0.0 for an empty prediction.

    >>> round(token_f1("Frank Lowy AC", ["Frank Lowy"]), 3)
    0.8
    """
    return qa_f1(pred, golds, "squad")


def qa_correct(em: bool | float, f1: float) -> bool:
    """The release's QA accuracy rule: exact match or F1 >= 0.5 (METHOD.md section 4)."""
    return bool(em) or f1 >= QA_F1_THRESHOLD


def qa_rule(query: Query) -> QaRule:
    """The official QA rule of the benchmark a query comes from (`QA_RULES`, by `query.source`).

    >>> qa_rule(Query(id="q", question="?", answers=("x",), kind="qa", source="hotpotqa"))
    'hotpot'
    """
    source = query.source.lower()
    return next((rule for name, rule in QA_RULES if name in source), DEFAULT_QA_RULE)


def grade_qa(pred: str | None, golds: Sequence[str], rule: QaRule) -> Grade:
    """EM, F1, correctness and RL score of a QA answer under one rule (see `Grade`).

    >>> grade_qa("Republic of X", ["K", "Republic of K"], "exact").correct
    False
    """
    em = exact_match(pred, golds)
    f1 = qa_f1(pred, golds, rule)
    if rule == "exact":
        return Grade(correct=em, em=float(em), f1=f1, score=float(em), extracted=pred)
    return Grade(correct=qa_correct(em, f1), em=float(em), f1=f1, score=f1, extracted=pred)


# ---------------------------------------------------------------------------------------------
# Grades


def grade_answer(answer: str | None, query: Query, checker: Checker = "default") -> Grade:
    """Grade an already extracted answer against `query.answers` (see `Grade`).

    Math: default = `math_equal` against any gold. QA: the query's `qa_rule`. The release
    checkers (release_checker.py) decide `correct` their way; EM/F1/score stay the default's.
    An empty answer is never correct under "default".

    >>> q = Query(id="q", question="?", answers=("72",), kind="math")
    >>> grade_answer("72.0", q).correct
    True
    """
    if not query.answers:
        raise ValueError(f"query {query.id}: no gold answers to grade against")
    if checker not in ("default", "release", "release_repair"):
        raise ValueError(
            f"unknown checker {checker!r}; expected 'default', 'release' or 'release_repair'"
        )
    if query.kind == "qa":
        grade = grade_qa(answer, query.answers, qa_rule(query))
    else:
        em = float(exact_match(answer, query.answers))
        correct = any(math_equal(answer, g) for g in query.answers)
        f1 = token_f1(answer, query.answers)
        grade = Grade(correct=correct, em=em, f1=f1, score=float(correct), extracted=answer)
    if checker == "default":
        return grade
    release_answer = "" if answer is None else answer
    if checker == "release":
        correct = release_checker.filter_correct(release_answer, query.answers[0], query.kind)
    else:
        correct = release_checker.repair_correct(release_answer, query.answers[0])
    return Grade(correct, grade.em, grade.f1, grade.score, answer)


def grade_trajectory(text: str, query: Query, checker: Checker = "default") -> Grade:
    r"""Extract the final answer from a trajectory's text and grade it.

    "default" reads the last balanced `\boxed{}` of the last `<answer>` block (tags.extract_answer);
    "release" reads the release's way (release_checker.filter_extract); "release_repair" hands the
    whole text to the release's repair check (release_checker.repair_correct).

    >>> q = Query(id="q", question="?", answers=("0.5",), kind="math")
    >>> grade_trajectory(r"<think>half</think><answer>\boxed{\dfrac{1}{2}}</answer>", q).correct
    True
    """
    if checker == "release":
        return grade_answer(release_checker.filter_extract(text, query.kind), query, checker)
    if checker == "release_repair":
        graded = grade_answer(release_checker.repair_extract(text), query, "default")
        correct = release_checker.repair_correct(text, query.answers[0])
        return Grade(correct, graded.em, graded.f1, graded.score, graded.extracted)
    return grade_answer(extract_answer(text), query, checker)
