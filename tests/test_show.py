"""`autotraj show`: segments, tool calls, scores, the trainable mask, repair diffs, --list."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from test_build import hard_case_rows, write_run  # the build tests' hand-made run

from autotraj.cli import main
from autotraj.show import (
    MASK_CLOSE,
    MASK_OPEN,
    Palette,
    diff_rows,
    render_list,
    render_show,
    word_marks,
)

ANSI = "\x1b["


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run")


def test_show_prints_segments_tool_calls_and_scores(run_dir):
    out = render_show(run_dir, "q1/s1")
    assert "query q1 (math): What is 2*3?" in out
    assert "[1] tool result (not trained)" in out and "[0] model text (trained)" in out
    assert "1. python ok 0.05 s" in out
    assert "input:  print(2*3)" in out and "output: 6" in out
    assert "label AC-LQ · S 0.700 · correct yes · em 1.000" in out
    assert "confidence    0.000" in out
    assert ANSI not in out


def test_colors_only_when_asked(run_dir):
    out = render_show(run_dir, "q1/s0", color=True)
    assert "\x1b[33m<code>\nprint(2*3)\n</code>\x1b[0m" in out  # tool input in yellow
    assert "\x1b[32;1m<answer>" in out  # answer in green
    assert "\x1b[36;2m<result>" in out  # tool result dim cyan


def test_mask_marks_tool_results(run_dir, tokenizer):
    out = render_show(run_dir, "q1/s0", tokenizer=tokenizer)
    # char-level tokenizer: one token per character; the result segment is 14 characters
    result = "\n<result>\n6\n</result>\n"
    assert f"{MASK_OPEN}{result}{MASK_CLOSE}" in out
    model = len("<think>multiply</think>\n<code>\nprint(2*3)\n</code>") + len(
        "<think>ok</think>\n<answer>\\boxed{6}</answer>"
    )
    assert f"{model + 1} trainable, {len(result)} masked" in out  # + the end-of-turn token
    assert out.count(MASK_OPEN) == 1


def test_repair_diff_side_by_side_and_one_after_other(run_dir):
    wide = render_show(run_dir, "q1/s1", width=160)
    assert "accepted repair q1/s1/r (first_pass, AC-LQ): S 0.700 -> 0.970" in wide
    assert "1 of 9 lines differ" in wide
    changed = next(line for line in wide.splitlines() if " | " in line and "<think>" in line)
    assert "maybe multiply" in changed.split(" | ")[0] and "<think>multiply" in changed
    narrow = render_show(run_dir, "q1/s1", width=80)
    assert "- <think>[-maybe -]multiply[-, probably-]</think>" in narrow
    assert "+ <think>multiply</think>" in narrow
    assert narrow.index("── original q1/s1 ──") < narrow.index("── repair q1/s1/r ──")


def test_show_a_repair_and_a_hard_case(run_dir):
    out = render_show(run_dir, "q2/s0/r", width=80)
    assert "repair of: q2/s0" in out
    assert "accepted repair (model) of q2/s0 [AW]: S 0.900 -> 0.930" in out
    assert "[-21-]" in out and "{+20+}" in out
    hard = render_show(run_dir, "q2/s1", width=80)
    assert "rejected repair (wrong answer)" in hard and "{+18+}" in hard
    with pytest.raises(ValueError, match="not in this run"):
        render_show(run_dir, "q9/s9")


def test_show_without_score_and_repair_files(run_dir):
    for name in ("score/scores.jsonl", "repair/repairs.jsonl", "repair/hard_cases.jsonl"):
        (run_dir / name).unlink()
    out = render_show(run_dir, "q1/s1")
    assert "not scored" in out and "repair" not in out.split("── score")[1]


def test_list_with_label_filter(run_dir):
    out = render_list(run_dir)
    assert out.splitlines()[0].split() == ["id", "label", "score", "correct", "repair"]
    assert "accepted: q1/s1/r (first_pass, S 0.970)" in out
    assert "rejected: wrong answer" in out
    assert out.rstrip().endswith("5 trajectories (AC-LQ 1, AW 2, HQ 2)")
    aw = render_list(run_dir, label="AW")
    assert "q2/s0" in aw and "q1/s0" not in aw and "2 trajectories labelled AW" in aw


def test_diff_helpers():
    assert diff_rows("a\nb\nc", "a\nc\nd") == [
        (" ", "a", "a"),
        ("<", "b", None),
        (" ", "c", "c"),
        (">", None, "d"),
    ]
    assert word_marks("x y", "x z", Palette(True)) == (
        "x \x1b[31;1my\x1b[0m",
        "x \x1b[32;1mz\x1b[0m",
    )


def test_cli_round_trip(run_dir, tiny_model_dir, capsys):
    assert (
        main(["show", str(run_dir), "q1/s1", "--no-color", "--tokenizer", str(tiny_model_dir)]) == 0
    )
    out = capsys.readouterr().out
    assert "1. python ok" in out and MASK_OPEN in out and "accepted repair q1/s1/r" in out
    assert ANSI not in out
    assert main(["show", str(run_dir), "--list", "--label", "HQ"]) == 0
    assert "2 trajectories labelled HQ" in capsys.readouterr().out
    assert main(["show", str(run_dir), "nope"]) == 2
    assert "not in this run" in capsys.readouterr().err


def test_malformed_hard_case_names_file_and_line(run_dir):
    (row,) = hard_case_rows()
    del row["reason"]
    write_jsonl(run_dir / "repair/hard_cases.jsonl", [row])
    with pytest.raises(ValueError, match=r"hard_cases.jsonl:1: repair of q2/s1: .*'reason'"):
        render_show(run_dir, "q2/s1")
