r"""Answer grading: is a trajectory's final answer correct? (METHOD.md section 4)

What it does:
- `math_equal(pred, gold)`: symbolic/numeric equivalence with math-verify (sympy underneath),
  after a light pre-normalization for the few forms math-verify needs help with ("18 dollars",
  a trailing period, `\!` thin spaces, `\mbox`), plus two exact rules: multiple-choice letters
  (`(B)` == `\text{(B)}` == `B`) and word answers (`\text{Evelyn}` == `evelyn`, `Yes` == `yes`),
  which are compared as normalized strings, never as products of symbols.
- QA: `normalize_answer` (SQuAD), `exact_match` and `token_f1` over all gold aliases, and the
  accuracy rule (EM or F1 >= 0.5, the release's).
- `grade_answer` / `grade_trajectory` -> `Grade` for a `Query` of either kind, with a `checker`:
  "default" (the rules above) or "release" (the authors' rules, reproduced so their numbers can be
  compared, defects included: see `release_correct` and docs/grading.md).

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

from autotraj.records import Query
from autotraj.tags import extract_answer

log = logging.getLogger(__name__)

Checker = Literal["default", "release"]

# Seconds math-verify may spend parsing or comparing one expression (its own default is 5).
MATH_VERIFY_TIMEOUT_S = 5
# The release counted a QA answer correct at EM or token F1 >= 0.5 (METHOD.md section 4).
QA_F1_THRESHOLD = 0.5

# The answer is wrapped as \boxed{...} before parsing, so the boxed form is looked at first.
_MV_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|textrm)\s*\{([^{}]*)\}")
_THIN_SPACES = re.compile(r"\\[!,;: ]")
_THOUSANDS_THIN = re.compile(r",\\!\s*")  # "11,\! 111": a thousands separator in LaTeX
_NUMBER_WITH_WORDS = re.compile(r"^([-+]?(?:\d[\d,]*)?\.?\d+)\s*([A-Za-z]{2,}\.?\s*)+$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE = re.compile(r"^\(?([A-E])\)?$")
_WORDS = re.compile(r"^[A-Za-z]{2,}(?:[ '-][A-Za-z]{2,})*$")  # letter runs of 2+: words
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one answer.

    `correct` follows the checker's rule for the query's kind. `em` and `f1` are always the SQuAD
    string metrics against the gold aliases (in [0, 1]); for math they are informational (the
    release's RL outcome used token F1 even on math, METHOD.md section 10). `extracted` is the
    answer the checker read (None when there was no boxed answer).
    """

    correct: bool
    em: float
    f1: float
    extracted: str | None


def _mv_timeout() -> int | None:
    """math-verify's signal.alarm timeout only works in the main thread: None elsewhere."""
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    return None


def _prenormalize(answer: str) -> str:
    r"""Light clean-up math-verify needs help with; everything else is left to it.

    >>> _prenormalize(r"10,\!080.")
    '10080'
    >>> _prenormalize("18 dollars")
    '18'
    """
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    s = _THIN_SPACES.sub("", _THOUSANDS_THIN.sub(",", s)).replace("\\mbox", "\\text")
    s = s.rstrip(".").strip() if not s.endswith("..") else s
    if _THOUSANDS.match(s):  # "11,111,111,100": math-verify only joins a single group
        s = s.replace(",", "")
    words = _NUMBER_WITH_WORDS.match(s)
    if words:  # "18 dollars", "5 apples": the number is the answer
        s = words.group(1)
    return s


def _plain_text(answer: str) -> str:
    r"""`\text{...}` unwrapped, `$`/`\$` dropped, whitespace collapsed; for the exact rules."""
    s = _TEXT_CMD.sub(r"\1", answer).replace("\\$", "").replace("$", "")
    return _SPACES.sub(" ", s).strip()


@lru_cache(maxsize=4096)
def _parse_cached(answer: str, timeout: int | None) -> tuple[object, ...]:
    # math-verify catches its own parse errors (raise_on_error=False): a failure is an empty list,
    # logged by it at debug level. Memoized: gold answers are parsed once per process.
    return tuple(parse(f"\\boxed{{{answer}}}", _MV_CONFIG, parsing_timeout=timeout))


def math_equal(pred: str | None, gold: str) -> bool:
    r"""Whether `pred` is mathematically equivalent to `gold` (both LaTeX or plain answers).

    >>> math_equal(r"\frac{1}{2}", "0.5")
    True
    >>> math_equal("1,000", "1000")
    True
    >>> math_equal("[1,3)", "(1,3)")
    False
    >>> math_equal("", "0")
    False
    """
    if pred is None or not pred.strip() or not gold.strip():
        return False
    p, g = _prenormalize(pred), _prenormalize(gold)
    if not p:
        return False
    pt, gt = _plain_text(p), _plain_text(g)
    pc, gc = _CHOICE.match(pt), _CHOICE.match(gt)
    if pc or gc:  # a multiple-choice letter only ever equals the same letter
        return bool(pc and gc and pc.group(1) == gc.group(1))
    if _WORDS.match(pt) or _WORDS.match(gt):  # words are words: "yes", "Evelyn", "east"
        return pt.lower() == gt.lower()
    if pt == gt:
        return True
    timeout = _mv_timeout()
    gold_parsed, pred_parsed = _parse_cached(g, timeout), _parse_cached(p, timeout)
    if not gold_parsed or not pred_parsed:
        log.debug("math-verify could not parse %r or %r: not equal", pred, gold)
        return False
    return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout)


# ---------------------------------------------------------------------------------------------
# QA: SQuAD metrics

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


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


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str | None, golds: Sequence[str]) -> float:
    """SQuAD token F1 in [0, 1], the max over aliases; 0.0 for an empty prediction.

    >>> round(token_f1("Frank Lowy AC", ["Frank Lowy"]), 3)
    0.8
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred).split()
    if not p:
        return 0.0
    return max((_f1(p, normalize_answer(g).split()) for g in golds), default=0.0)


def qa_correct(em: bool | float, f1: float) -> bool:
    """The release's QA accuracy rule: exact match or F1 >= 0.5 (METHOD.md section 4)."""
    return bool(em) or f1 >= QA_F1_THRESHOLD


# ---------------------------------------------------------------------------------------------
# The release's checker, reproduced with its defects (docs/grading.md explains the reading)

# The release's non-greedy extraction: `\frac{1}{2}` is cut to `\frac{1`.
_RELEASE_BOXED = re.compile(r"\\boxed\{(.*?)\}", re.DOTALL)
_RELEASE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_RELEASE_STRIP = re.compile(r"[\s$]+")


def release_extract(text: str) -> str | None:
    r"""The release's extraction: the last non-greedy `\boxed{...}` match in the whole text.

    >>> release_extract(r"<answer>\boxed{\frac{1}{2}}</answer>")
    '\\frac{1'
    """
    matches = _RELEASE_BOXED.findall(text)
    return matches[-1] if matches else None


def _release_numbers(s: str) -> frozenset[float]:
    return frozenset(float(n) for n in _RELEASE_NUMBER.findall(s))


def release_match(pred: str, gold: str) -> bool:
    """The release's math rule on one gold: substring either way, or the same set of numbers.

    Both sides are lowercased with whitespace and `$` removed. Defects (kept on purpose): an
    empty prediction is a substring of every gold; a one-letter gold matches any prediction
    containing that letter (`d` in `\\dfrac`); numbers are compared as sets, ignoring order.

    >>> release_match("", "42")
    True
    """
    p = _RELEASE_STRIP.sub("", pred.lower())
    g = _RELEASE_STRIP.sub("", gold.lower())
    if p in g or g in p:
        return True
    pn = _release_numbers(p)
    return bool(pn) and pn == _release_numbers(g)


def release_correct(text: str, golds: Sequence[str]) -> bool:
    r"""The release's math correctness on a whole response: non-greedy extraction + match.

    No `\boxed{` at all is wrong (the release gated on it); anything else goes to
    `release_match`, false positives included:

    >>> release_correct(r"<answer>\boxed{\frac{1}{3}}</answer>", [r"\frac{1}{2}"])
    True
    """
    pred = release_extract(text)
    return pred is not None and any(release_match(pred, g) for g in golds)


# ---------------------------------------------------------------------------------------------
# Grades


def grade_answer(answer: str | None, query: Query, checker: Checker = "default") -> Grade:
    """Grade an already extracted answer against `query.answers` (see `Grade`).

    Math: default = `math_equal` against any gold; release = `release_match`. QA: EM or F1 >= 0.5
    for both checkers. An empty answer is never correct under "default".

    >>> q = Query(id="q", question="?", answers=("72",), kind="math")
    >>> grade_answer("72.0", q).correct
    True
    """
    if not query.answers:
        raise ValueError(f"query {query.id}: no gold answers to grade against")
    em = exact_match(answer, query.answers)
    f1 = token_f1(answer, query.answers)
    if query.kind == "qa":
        correct = qa_correct(em, f1)
    elif checker == "release":
        correct = answer is not None and any(release_match(answer, g) for g in query.answers)
    elif checker == "default":
        correct = any(math_equal(answer, g) for g in query.answers)
    else:
        raise ValueError(f"unknown checker {checker!r}; expected 'default' or 'release'")
    return Grade(correct=correct, em=float(em), f1=f1, extracted=answer)


def grade_trajectory(text: str, query: Query, checker: Checker = "default") -> Grade:
    r"""Extract the final answer from a trajectory's text and grade it.

    "default" reads the last balanced `\boxed{}` of the last `<answer>` block (tags.extract_answer);
    "release" reads the last non-greedy `\boxed{...}` match anywhere in the text.

    >>> q = Query(id="q", question="?", answers=("0.5",), kind="math")
    >>> grade_trajectory(r"<think>half</think><answer>\boxed{\dfrac{1}{2}}</answer>", q)
    Grade(correct=True, em=0.0, f1=0.0, extracted='\\dfrac{1}{2}')
    """
    if checker == "release":
        return grade_answer(release_extract(text), query, checker)
    return grade_answer(extract_answer(text), query, checker)
