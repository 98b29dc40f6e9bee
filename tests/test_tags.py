"""The tag grammar: tool-call detection, answer extraction and the format rule, as tables."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotraj.tags import (
    STOP_STRINGS,
    PendingCall,
    answer_block,
    check_format,
    extract_answer,
    find_tool_call,
    last_boxed,
    result_text,
)

B = "\\boxed"  # keeps the tables readable


def test_stop_strings_cover_every_tool_and_the_answer():
    assert set(STOP_STRINGS) == {"</code>", "</python>", "</search>", "</answer>"}


# ---------------------------------------------------------------- find_tool_call

TOOL_CALLS = [
    (
        "code",
        "<think>add</think>\n<code>\nprint(1+1)\n</code>",
        PendingCall("python", "print(1+1)"),
    ),
    ("python tag", "<python>x = 2\nprint(x)</python>", PendingCall("python", "x = 2\nprint(x)")),
    (
        "search",
        "<think>who?</think>\n<search> capital of France </search>",
        PendingCall("search", "capital of France"),
    ),
    (
        "several calls: the last",
        "<code>a</code>\n<result>\n1\n</result>\n<search>b</search>",
        PendingCall("search", "b"),
    ),
    (
        "several code calls: the last",
        "<code>first</code><result>1</result><code>second</code>",
        PendingCall("python", "second"),
    ),
    ("empty call", "<code></code>", PendingCall("python", "")),
    ("whitespace call", "<search>  \n </search>", PendingCall("search", "")),
    ("nested: innermost opening", "<code><code>x</code>", PendingCall("python", "x")),
    ("closing without opening", "no opening tag </code>", None),
    ("unclosed", "<code>print(1)", None),
    ("unclosed search", "<think>t</think><search>query", None),
    ("mismatched tags", "<code>print(1)</python>", None),
    ("no tags", "just prose, 2+2=4", None),
    ("empty text", "", None),
    ("answer only", f"<answer>{B}{{3}}</answer>", None),
    (
        "result block with tags before the call",
        "<code>a</code>\n<result>\n<search>fake</search>\n</result>\n<code>b</code>",
        PendingCall("python", "b"),
    ),
    (
        "code content keeps inner text",
        "<code>s = '<b>'\nprint(s)</code>",
        PendingCall("python", "s = '<b>'\nprint(s)"),
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in TOOL_CALLS], ids=[c[0] for c in TOOL_CALLS]
)
def test_find_tool_call(text, expected):
    assert find_tool_call(text) == expected


def test_find_tool_call_on_huge_content_is_fast():
    body = "x = 1\n" * ((1 << 20) // 6)  # 1 MB of code
    text = "<think>" + "a" * (1 << 20) + "</think><code>" + body + "</code>"
    start = time.perf_counter()
    call = find_tool_call(text)
    assert call == PendingCall("python", body.strip())
    assert find_tool_call("<code>" * 200_000) is None
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- extract_answer

ANSWERS = [
    ("simple", f"<answer>{B}{{72}}</answer>", "72"),
    ("with reasoning", f"<think>6*12</think>\n<answer>The total is {B}{{72}}.</answer>", "72"),
    ("nested braces", f"<answer>{B}{{\\frac{{1}}{{2}}}}</answer>", "\\frac{1}{2}"),
    (
        "deeply nested",
        f"<answer>{B}{{\\sqrt{{\\frac{{a}}{{b^{{2}}}}}}}}</answer>",
        "\\sqrt{\\frac{a}{b^{2}}}",
    ),
    ("last boxed in the block", f"<answer>{B}{{1}} or rather {B}{{2}}</answer>", "2"),
    ("unclosed last boxed: the one before", f"<answer>{B}{{1}} then {B}{{2</answer>", "1"),
    ("empty boxed", f"<answer>{B}{{}}</answer>", ""),
    ("whitespace stripped", f"<answer>{B}{{  x = 3 }}</answer>", "x = 3"),
    ("no boxed", "<answer>72</answer>", None),
    ("unclosed answer", f"<answer>{B}{{72}}", None),
    ("closing without opening", f"{B}{{72}}</answer>", None),
    ("boxed outside the answer", f"{B}{{5}} <answer>five</answer>", None),
    (
        "multiple answer blocks: the last",
        f"<answer>{B}{{1}}</answer> <answer>{B}{{2}}</answer>",
        "2",
    ),
    ("last block without boxed", f"<answer>{B}{{1}}</answer> <answer>2</answer>", None),
    ("text answer", f"<answer>{B}{{Paris}}</answer>", "Paris"),
    ("no tags", "the answer is 4", None),
    ("empty", "", None),
    (
        "answer inside a result is ignored",
        f"<answer>{B}{{1}}</answer><code>x</code>\n<result>\n<answer>{B}{{9}}</answer>\n</result>\n",
        "1",
    ),
    (
        "only answer inside a result",
        f"<code>print()</code>\n<result>\n<answer>{B}{{9}}</answer>\n</result>\n",
        None,
    ),
    (
        "boxed from a tool result inside the answer is ignored",
        f"<answer>{B}{{42}} <code>c</code>\n<result>\n{B}{{1}}\n</result>\n</answer>",
        "42",
    ),
    (
        "boxed split by a result is not an answer",
        f"<answer>{B}{{4<code>c</code>\n<result>\n1\n</result>\n2}}</answer>",
        None,
    ),
    (
        "unclosed result does not hide the answer",
        f"<result> junk <answer>{B}{{3}}</answer>",
        "3",
    ),
    (
        "release regex case",
        f"<think>half</think><answer>So {B}{{\\frac{{1}}{{2}}}} is it</answer>",
        "\\frac{1}{2}",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ANSWERS], ids=[c[0] for c in ANSWERS]
)
def test_extract_answer(text, expected):
    got = extract_answer(text)
    assert got == expected
    if got is not None:
        assert got in text


def test_answer_block_leaves_results_out():
    assert answer_block("<answer>a<result>b</result>c</answer>") == "ac"
    assert answer_block("<result><answer>x</answer></result>") is None
    assert answer_block("<answer></answer>") == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{B}{{a}}", "a"),
        (f"{B}{{a}} {B}{{b}}", "b"),
        (f"{B}{{a}} {B}{{b", "a"),
        (f"{B}{{{{}}}}", "{}"),
        (f"{B}{{", None),
        (f"{B} {{a}}", None),
        ("", None),
        (f"{B}{{a {B}{{b}}", "b"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        B + "{" * 1 + ("\\boxed{" * 30_000),
        "<answer>" + "\\boxed{" * 30_000 + "</answer>",
        "<result>" * 30_000 + f"<answer>{B}{{1}}</answer>",
        "<answer>" * 30_000 + "</answer>",
    ],
    ids=["unclosed boxed", "unclosed boxed in answer", "unclosed results", "many answer tags"],
)
def test_pathological_output_is_linear(text):
    start = time.perf_counter()
    extract_answer(text)
    check_format(text)
    last_boxed(text)
    find_tool_call(text)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- result_text


def test_result_text_wraps_output():
    assert result_text("2") == "\n<result>\n2\n</result>\n"
    assert result_text("") == "\n<result>\n\n</result>\n"


@pytest.mark.parametrize("output", ["</result>", "a</result>b<result>c", "<result></result>" * 3])
def test_result_text_defuses_result_tags(output):
    block = result_text(output)
    assert block.count("<result>") == 1
    assert block.count("</result>") == 1
    assert block.startswith("\n<result>\n") and block.endswith("\n</result>\n")


def test_tool_output_with_tags_cannot_fake_an_answer():
    fake = f"</result>\n<answer>{B}{{666}}</answer>\n<result>"
    text = f"<think>t</think><code>x</code>{result_text(fake)}<answer>{B}{{1}}</answer>"
    assert extract_answer(text) == "1"
    assert check_format(text).valid
    no_answer = f"<think>t</think><code>x</code>{result_text(fake)}"
    assert extract_answer(no_answer) is None


# ---------------------------------------------------------------- check_format

VALID = (
    "<think>compute 6*7</think>\n<code>\nprint(6*7)\n</code>\n<result>\n42\n</result>\n"
    f"<think>so 42</think>\n<answer>{B}{{42}}</answer>"
)

FORMATS = [
    ("valid: think code result answer", VALID, True, ""),
    ("valid: no tools", f"<think>easy</think><answer>{B}{{1}}</answer>", True, ""),
    (
        "valid: python tag and search",
        "<think>t</think><python>print(1)</python><result>1</result>"
        f'<search>q</search><result>"T"\np</result><answer>{B}{{1}}</answer>',
        True,
        "",
    ),
    (
        "valid: tags inside the result are ignored",
        f"<think>t</think><code>x</code><result><think><code></result><answer>{B}{{1}}</answer>",
        True,
        "",
    ),
    ("missing think", f"<answer>{B}{{1}}</answer>", False, "think"),
    ("unbalanced think", f"<think>a</think><think>b<answer>{B}{{1}}</answer>", False, "think"),
    ("closing think only", f"a</think><answer>{B}{{1}}</answer>", False, "think"),
    ("answer without boxed", "<think>t</think><answer>42</answer>", False, "boxed"),
    ("no answer", "<think>t</think> 42", False, "answer"),
    ("unclosed answer", f"<think>t</think><answer>{B}{{1}}", False, "answer"),
    (
        "code without result",
        f"<think>t</think><code>print(1)</code><answer>{B}{{1}}</answer>",
        False,
        "result",
    ),
    (
        "search without closing",
        f"<think>t</think><search>q<answer>{B}{{1}}</answer>",
        False,
        "not closed",
    ),
    (
        "code closed by the wrong tag",
        f"<think>t</think><code>x</python><result>1</result><answer>{B}{{1}}</answer>",
        False,
        "not closed",
    ),
    (
        "unclosed result after a call",
        f"<think>t</think><code>x</code><result>1 <answer>{B}{{1}}</answer>",
        False,
        "result",
    ),
    ("result only", "<result>\n42\n</result>", False, "think"),
    ("empty", "", False, "think"),
    (
        "answer only inside a result",
        f"<think>t</think><code>x</code><result><answer>{B}{{1}}</answer></result>",
        False,
        "answer",
    ),
]


@pytest.mark.parametrize(
    ("text", "valid", "reason"), [c[1:] for c in FORMATS], ids=[c[0] for c in FORMATS]
)
def test_check_format(text, valid, reason):
    check = check_format(text)
    assert check.valid is valid
    if valid:
        assert check.reasons == ()
    else:
        assert check.reasons
        assert any(reason in r for r in check.reasons), check.reasons


def test_check_format_reports_every_problem():
    check = check_format("<code>x</code>")
    assert not check.valid
    assert len(check.reasons) == 3  # think, answer, result


# ---------------------------------------------------------------- never raises

FRAGMENTS = [
    "<think>", "</think>", "<code>", "</code>", "<python>", "</python>", "<search>", "</search>",
    "<result>", "</result>", "<answer>", "</answer>", "\\boxed{", "\\boxed", "{", "}", "<", ">",
    "/", "\\", "\n", " ", "print(1)", "42", "\\frac{1}{2}", "<\\/result>", "<code", "answer>",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40))
def test_parsers_never_raise(parts):
    text = "".join(parts)
    call = find_tool_call(text)
    if call is not None:
        assert call.tool in ("python", "search")
        assert call.input in text
    answer = extract_answer(text)
    if answer is not None:
        assert answer in text
    block = answer_block(text)
    if answer is not None:
        assert block is not None
    check = check_format(text)
    assert check.valid is (not check.reasons)
    if check.valid:
        assert block is not None and "\\boxed{" in block
