"""Grader tables (real-looking model outputs), the release checker's defects, benchmark golds."""

from __future__ import annotations

import doctest
import functools
import importlib.util
import sys
import threading
from pathlib import Path

import pytest

from autotraj import grading
from autotraj.grading import (
    Grade,
    exact_match,
    grade_answer,
    grade_trajectory,
    math_equal,
    normalize_answer,
    qa_correct,
    release_correct,
    release_extract,
    release_match,
    token_f1,
)
from autotraj.records import Query

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"


def math_query(*golds: str) -> Query:
    return Query(id="m", question="?", answers=golds, kind="math")


def qa_query(*golds: str) -> Query:
    return Query(id="q", question="?", answers=golds, kind="qa")


def answer(boxed: str) -> str:
    return f"<think>Done.</think>\n<answer>\\boxed{{{boxed}}}</answer>"


# (prediction, gold, equal?)
MATH_TABLE = [
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
    (r"\tfrac12", r"\frac{1}{2}", True),
    (r"\frac{1}{3}", r"\frac{1}{2}", False),
    ("[1,3)", "[1,3)", True),
    ("(1,3)", "[1,3)", False),
    (r"\left[ 1, 3 \right)", "[1,3)", True),
    (r"(-\infty, 0]", r"(-\infty,0]", True),
    ("(3,4]", "[3,4]", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    ("(6,31,-1)", "(6, 31, -1)", True),
    ("(2,1)", "(1,2)", False),
    ("1,000", "1000", True),
    ("1000", "1,000", True),
    ("1,450,000", "1450000", True),
    ("11111111100", r"11,\! 111,\! 111,\! 100", True),
    (r"10,\!080", "10080", True),
    (r"\$18", "18", True),
    ("18 dollars", "18", True),
    ("$18$", "18", True),
    (r"\$32,\!348", "32348", True),
    (r"18\text{ cm}", "18", True),
    (r"864 \mbox{ inches}^2", "864", True),
    (r"5.4 \text{ cents}", "5.4", True),
    (r"90^\circ", "90", True),
    ("18.", "18", True),
    ("19", "18", False),
    (r"50\%", "50", True),
    (r"50\%", "0.5", True),
    ("yes", "Yes", True),
    (r"\text{yes}", "yes", True),
    ("no", "yes", False),
    ("sey", "yes", False),  # math-verify alone reads both as the product e*s*y
    ("(B)", r"\text{(B)}", True),
    ("B", r"\text{(B)}", True),
    (r"\textbf{(B)}", "B", True),
    ("B", r"\text{(C)}", False),
    ("Evelyn", r"\text{Evelyn}", True),
    (r"\text{east}", r"\text{west}", False),
    ("x=5", "5", True),
    ("p-q", "p - q", True),
    ("q-p", "p - q", False),
    (r"3\sqrt{2}", r"\sqrt{18}", True),
    (r"\frac{9}{5}", r"1\frac{4}{5}", True),
    (r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}", True),
    ("", "0", False),
    ("   ", "0", False),
    (None, "0", False),
]


@pytest.mark.parametrize(("pred", "gold", "equal"), MATH_TABLE)
def test_math_equal_table(pred, gold, equal):
    assert math_equal(pred, gold) is equal


@pytest.mark.parametrize(
    ("text", "extracted"),
    [
        (r"<answer>\boxed{\frac{1}{2}}</answer>", r"\frac{1}{2}"),
        (r"<answer>\boxed{1} then \boxed{\sqrt{\frac{a}{b}}}</answer>", r"\sqrt{\frac{a}{b}}"),
        (r"<answer>\boxed{3}</answer> <answer>\boxed{4}</answer>", "4"),
        (r"\boxed{7} outside any answer block", None),
        ("<answer>42</answer>", None),
        (r"<answer>\boxed{}</answer>", ""),
        (r"<answer>\boxed{unclosed</answer>", None),
    ],
)
def test_extraction_nested_and_last(text, extracted):
    assert grade_trajectory(text, math_query("0")).extracted == extracted


def test_empty_and_missing_answers_never_correct():
    for text in (r"<answer>\boxed{}</answer>", "<answer></answer>", "no answer at all"):
        assert not grade_trajectory(text, math_query("0")).correct
        assert not grade_trajectory(text, qa_query("")).correct
    assert not exact_match("", [""])
    assert token_f1("the", ["the"]) == 0.0  # normalizes to nothing


def test_grade_math_any_gold_and_record():
    grade = grade_trajectory(answer(r"\dfrac{1}{2}"), math_query("7", "0.5"))
    assert grade == Grade(correct=True, em=0.0, f1=0.0, extracted=r"\dfrac{1}{2}")
    wrong = grade_trajectory(answer("0.6"), math_query("0.5"))
    assert not wrong.correct and wrong.extracted == "0.6"


# (prediction, golds, em, f1, correct)
QA_TABLE = [
    ("New York City", ["the five boroughs", "New York City", "NYC"], 1.0, 1.0, True),
    ("the Big Apple!", ["Big Apple"], 1.0, 1.0, True),
    ("Frank Lowy", ["Frank Lowy"], 1.0, 1.0, True),
    # precision 2/3, recall 1 -> F1 0.8
    ("Sir Frank Lowy", ["Frank Lowy"], 0.0, 0.8, True),
    # best alias: "Washington" -> p 1/3, r 1 -> F1 0.5 (>= 0.5 counts)
    ("Washington state capital", ["District of Columbia", "Washington"], 0.0, 0.5, True),
    # "1.95 m" -> tokens [195, m]; "195 cm" -> [195, cm]: p 1/2 r 1/2 -> F1 0.5
    ("1.95 cm", ["1.95 m"], 0.0, 0.5, True),
    # p 1/4, r 1/2 -> F1 1/3
    ("Emperor of the Song dynasty", ["Emperor Zhaozong"], 0.0, 1 / 3, False),
    ("Titan IIIC", ["Titan IIIE"], 0.0, 0.5, True),
    ("Paris", ["London"], 0.0, 0.0, False),
    ("", ["London"], 0.0, 0.0, False),
]


@pytest.mark.parametrize(("pred", "golds", "em", "f1", "correct"), QA_TABLE)
def test_qa_table(pred, golds, em, f1, correct):
    grade = grade_trajectory(answer(pred), qa_query(*golds))
    assert grade.em == em
    assert grade.f1 == pytest.approx(f1)
    assert grade.correct is correct
    assert qa_correct(grade.em, grade.f1) is correct


def test_normalize_answer_squad():
    assert normalize_answer("  The Eiffel-Tower, an icon. ") == "eiffeltower icon"
    assert normalize_answer("A") == ""


def test_unknown_checker_and_no_golds_raise():
    with pytest.raises(ValueError, match="checker"):
        grade_answer("1", math_query("1"), checker="lenient")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no gold"):
        grade_answer("1", math_query())


def test_grader_safe_in_threads():
    results: list[bool] = []

    def work():
        results.append(math_equal(r"\frac{1}{4}", "0.25"))
        results.append(math_equal(r"\sqrt{2}", "1.5"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [True, False]


def test_doctests():
    failures, tried = doctest.testmod(grading)
    assert tried > 10 and failures == 0


# ---------------------------------------------------------------------------------------------
# The release checker: its reading and its documented false positives / negatives


def test_release_extraction_is_non_greedy_last_match():
    assert release_extract(r"\boxed{\frac{1}{2}}") == r"\frac{1"
    assert release_extract(r"\boxed{1} and \boxed{2}") == "2"
    assert release_extract("no box") is None


@pytest.mark.parametrize(
    ("text", "gold", "why"),
    [
        (answer(r"\frac{1}{3}"), r"\frac{1}{2}", r"both cut to \frac{1, a substring of the gold"),
        (answer(r"\frac{1}{2}"), r"\frac{1}{3}", r"same: \frac{1 is inside \frac{1}{3}"),
        (answer(""), "42", "an empty prediction is a substring of every gold"),
        (answer(r"\dfrac{3}{4}"), "D", r"the letter d is inside \dfrac (cut to \dfrac{3)"),
        (answer(r"\text{(B) or D}"), "D", "the gold letter appears anywhere in the prediction"),
        (answer("(2,1)"), "(1,2)", "numbers compared as sets"),
        (answer("4"), "14", "4 is a substring of 14"),
        (r"<answer>\boxed{5}</answer> ... \boxed{3}", "3", "last box anywhere, not in <answer>"),
    ],
)
def test_release_false_positives(text, gold, why):
    assert release_correct(text, [gold]), why
    assert not grade_trajectory(text, math_query(gold)).correct, why


def test_release_false_negatives_and_agreements():
    # 0.5 vs 1/2: neither a substring nor the same numbers -> the release says wrong.
    assert not release_correct(answer("0.5"), [r"\frac{1}{2}"])
    assert grade_trajectory(answer("0.5"), math_query(r"\frac{1}{2}")).correct
    # No box at all is wrong under both.
    assert not release_correct("<answer>42</answer>", ["42"])
    assert release_match("72", "72")
    q = math_query("72")
    assert grade_trajectory(answer("72"), q, checker="release").correct
    assert grade_trajectory(answer(""), q, checker="release").correct  # the release's defect
    assert not grade_trajectory(answer(""), q).correct


def test_release_checker_on_qa_uses_non_greedy_extraction():
    q = qa_query("Frank Lowy")
    assert grade_trajectory(answer("Frank Lowy"), q, checker="release").correct
    assert not grade_trajectory(answer(""), q, checker="release").correct


# ---------------------------------------------------------------------------------------------
# Every benchmark gold against itself and against a genuinely different gold


@functools.cache
def _grade_gold_module():
    spec = importlib.util.spec_from_file_location("grade_gold", ROOT / "bench" / "grade_gold.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


# Pairs the grader calls equal although their gold strings differ, checked by hand: legitimate.
LEGITIMATE_COINCIDENCES = {("math500-22", "math500-23")}  # "5" vs "x=5"


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="shared benchmark data not present")
@pytest.mark.parametrize(
    "name",
    [
        "gsm8k_test",
        "math500",
        "aime24",
        "aime25",
        "amc23",
        "hotpotqa",
        "2wiki",
        "musique",
        "bamboogle",
    ],
)
def test_benchmark_golds_self_and_cross(name):
    report = _grade_gold_module().gold_report(BENCHMARKS / f"{name}.jsonl")
    assert report.self_failures == ()
    assert report.self_ok == report.items > 0
    assert report.cross_pairs == report.items
    assert set(report.cross_correct) <= LEGITIMATE_COINCIDENCES
