r"""The authors' answer checkers, reproduced from their public code so their numbers can be compared.

Source: GSYY0607/AutoTraj_code (read 2026-12), AutoTraj/trajectory_generate/. Two checkers:

- `filter_correct` / `filter_extract` ("release" checker): `answer_filter_both.py`, the script
  that splits candidates into correct and wrong and prints each test set's accuracy. Extraction:
  the last `<answer>...</answer>` block (none: the empty string), in it the last non-greedy
  `\boxed{...}` (also a bare `ed{...}`), else the whole block. The gold is the release's gold
  string: the first alias wrapped in braces (its `*_qa_pairs*.json` files hold `"{gold}"`), read up
  to its first `}`. Math: equal after deleting LaTeX commands, braces and spaces; or the same
  count of numbers, equal after sorting (|a - b| <= 1e-6); or the same set of comma/space
  separated items. QA: case-insensitive equality, or token F1 >= 0.5 (articles removed before
  punctuation, the release's order; no yes/no rule).
- `repair_correct` ("release_repair" checker): `traj_utils.is_answer_correct`, which the repair
  scripts (repair_correct_low_quality.py, repair_wrong_low_quality.py) apply to the whole
  repaired text: the content of the last non-greedy `{...}` anywhere in the text (no braces: the
  whole text), compared as numbers after deleting every character but digits, `.` and `-`, and
  when that fails, as strings: equal, or the prediction a substring of the gold.

Defects kept on purpose (each a row of tests/data/grader_cases.jsonl or a test): `\frac{1}{3}`
matches `\frac{1}{2}` (both cut to `\frac{1`); any number-free prediction matches any number-free
math gold (`east` vs `west`: zero numbers each); numbers are compared as sorted lists, so
`(2,1)` matches `(1,2)`; an answer block without a box counts; for QA only the first alias is
used; under `repair_correct` an empty text (or one whose last braces are empty) is a substring
of every gold, and `\frac{3}{2}` matches `\frac{1}{2}` (both read as `2`).

Not here: the default grader (grading.py), which is what autotraj trains and reports with.
"""

from __future__ import annotations

import re
import string
from collections import Counter

# answer_filter_both.py
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"(?:\\?boxed|ed)\{(.*?)\}", re.DOTALL)
_CORE = re.compile(r"(?:\\?boxed|ed)?\{(.*?)\}", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[a-zA-Z]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ITEM_SEPARATOR = re.compile(r"[,\s]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
NUMBER_TOLERANCE = 1e-6  # release: tol=1e-6 (math), < 1e-6 (traj_utils)
QA_F1_THRESHOLD = 0.5  # release: f1_threshold=0.5

# traj_utils.py
_ANY_BRACES = re.compile(r"\{(.*?)\}")
_NOT_NUMERIC = re.compile(r"[^\d.-]")


def filter_extract(text: str, kind: str = "math") -> str | None:
    r"""The release's prediction: last `<answer>` block, then its last `\boxed{...}` (non-greedy).

    For QA it also takes the first `{...}` of that, as the release does. None without a block.

    >>> filter_extract(r"<answer>So \boxed{\frac{1}{2}}</answer>")
    '\\frac{1'
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if not blocks:
        return None
    boxes = _BOXED.findall(blocks[-1])
    pred = boxes[-1].strip() if boxes else blocks[-1].strip()
    return _core(pred) if kind == "qa" else pred


def _core(s: str) -> str:
    m = _CORE.search(s)
    return m.group(1).strip() if m else s.strip()


def _without_latex(s: str) -> str:
    return _LATEX_COMMAND.sub("", s).replace("{", "").replace("}", "").replace(" ", "")


def _items(s: str) -> set[str]:
    return {x.strip().lower() for x in _ITEM_SEPARATOR.split(s) if x}


def _math_match(pred: str, gold: str) -> bool:
    if _without_latex(pred) == _without_latex(gold):
        return True
    gold_numbers = sorted(float(n) for n in _NUMBER.findall(gold))
    pred_numbers = sorted(float(n) for n in _NUMBER.findall(pred))
    if len(gold_numbers) == len(pred_numbers) and all(
        abs(a - b) <= NUMBER_TOLERANCE for a, b in zip(gold_numbers, pred_numbers, strict=True)
    ):
        return True  # also when neither has a number
    return _items(gold) == _items(pred)


def _normalize(s: str) -> str:
    s = _ARTICLES.sub(" ", s.lower())  # the release removes articles before punctuation
    return " ".join("".join(ch for ch in s if ch not in _PUNCT).split())


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if not p or not g or same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def filter_correct(pred: str, gold: str, kind: str) -> bool:
    r"""answer_filter_both.py on an extracted prediction (`filter_extract`) and one gold string.

    >>> filter_correct(r"\frac{1", r"\frac{1}{2}", "math")  # \frac{1}{3} cut short, as released
    True
    >>> filter_correct(r"\text{east}", r"\text{west}", "math")  # no numbers on either side
    True
    """
    gold_core = _core("{" + gold + "}")
    if kind == "qa":
        if pred.strip().lower() == gold_core.strip().lower():
            return True
        return _f1(pred, gold_core) >= QA_F1_THRESHOLD
    return _math_match(pred, gold_core)


def _last_braces(text: str) -> str:
    matches = _ANY_BRACES.findall(text)
    return matches[-1].strip() if matches else text.strip()


def repair_extract(text: str) -> str | None:
    """What traj_utils.is_answer_correct reads from a text: its last `{...}` (None if none)."""
    matches = _ANY_BRACES.findall(text)
    return matches[-1].strip() if matches else None


def repair_correct(text: str, gold: str) -> bool:
    r"""traj_utils.is_answer_correct(gold, text): the release's repair acceptance check.

    >>> repair_correct(r"<answer>\boxed{1,000}</answer>", "1000")
    True
    >>> repair_correct("", "72")  # the empty string is a substring of every gold
    True
    """
    gold_answer = _last_braces("{" + gold + "}")
    answer = _last_braces(text)
    try:
        gold_number = float(_NOT_NUMERIC.sub("", gold_answer))
        number = float(_NOT_NUMERIC.sub("", answer))
    except ValueError:  # not numbers: string equality, or the answer inside the gold
        return gold_answer == answer or answer in gold_answer
    return abs(gold_number - number) < NUMBER_TOLERANCE
