"""The run directory's layout and its one "finished and inputs unchanged?" rule (run_dir.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import write_jsonl
from test_build import hard_case_rows, repair_rows  # rows as the repair stage writes them

from autotraj.config import ConfigError
from autotraj.io import DataError, write_manifest
from autotraj.run_dir import (
    check_same_inputs,
    finished_counts,
    load_hard_cases,
    load_repairs,
    record_path,
    require_file,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # every run_dir.RECORD_FILES entry
        ("queries", "synthesize/queries.jsonl"),
        ("trajectories", "synthesize/trajectories.jsonl"),
        ("scores", "score/scores.jsonl"),
        ("repairs", "repair/repairs.jsonl"),
        ("hard_cases", "repair/hard_cases.jsonl"),
        ("sft", "build/sft.jsonl"),
        ("preferences", "build/preferences.jsonl"),
    ],
)
def test_record_paths(tmp_path, name, expected):
    assert record_path(tmp_path, name) == tmp_path / expected


def test_require_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(DataError, match=r"no such file; run `autotraj score` first"):
        require_file(tmp_path / "scores.jsonl", "score")


def test_require_file_says_an_unfinished_stage_is_unfinished(tmp_path):
    (tmp_path / "scores.jsonl.partial").write_text("")
    with pytest.raises(DataError, match=r"the score stage is not finished"):
        require_file(tmp_path / "scores.jsonl", "score")


@pytest.fixture
def inputs(tmp_path):
    paths = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    for name, path in paths.items():
        path.write_text(f'{{"x": "{name}"}}\n')
    return paths


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "stage"


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of `data`, computed here rather than by autotraj."""
    return hashlib.sha256(data).hexdigest()


def test_a_fresh_folder_records_its_inputs(out_dir, inputs):
    check_same_inputs(out_dir, inputs)
    assert json.loads((out_dir / "inputs.json").read_text()) == {
        "a": sha256_hex(b'{"x": "a"}\n'),
        "b": sha256_hex(b'{"x": "b"}\n'),
    }


def test_the_same_inputs_pass(out_dir, inputs):
    check_same_inputs(out_dir, inputs)
    (out_dir / "out.jsonl").write_text("")
    check_same_inputs(out_dir, inputs)


def test_output_from_changed_inputs_is_refused_naming_them(out_dir, inputs):
    check_same_inputs(out_dir, inputs)
    (out_dir / "out.jsonl").write_text("")
    inputs["b"].write_text('{"x": "changed"}\n')
    with pytest.raises(ConfigError, match=r"different input files \(b changed\)"):
        check_same_inputs(out_dir, inputs)


def test_a_folder_without_output_takes_new_inputs(out_dir, inputs):
    check_same_inputs(out_dir, inputs)  # the stage then failed before writing anything
    inputs["a"].write_text('{"x": "fixed"}\n')
    check_same_inputs(out_dir, inputs)
    assert json.loads((out_dir / "inputs.json").read_text()) == {
        "a": sha256_hex(b'{"x": "fixed"}\n'),
        "b": sha256_hex(b'{"x": "b"}\n'),
    }


def test_a_folder_written_before_inputs_json_is_checked_by_its_manifest(out_dir, inputs):
    out_dir.mkdir()
    write_manifest(out_dir, stage="x", config={}, inputs=inputs, counts={"n": 1})
    check_same_inputs(out_dir, inputs)  # same inputs: accepted, inputs.json written
    (out_dir / "inputs.json").unlink()
    inputs["a"].write_text('{"x": "changed"}\n')
    with pytest.raises(ConfigError, match=r"\(a changed\)"):
        check_same_inputs(out_dir, inputs)


def test_an_absent_optional_input_that_appears_is_a_change(out_dir, inputs, tmp_path):
    optional = {**inputs, "c": tmp_path / "c.jsonl"}
    check_same_inputs(out_dir, optional)
    (out_dir / "out.jsonl").write_text("")
    optional["c"].write_text("{}\n")
    with pytest.raises(ConfigError, match=r"\(c changed\)"):
        check_same_inputs(out_dir, optional)


def test_finished_needs_the_manifest_and_every_output(out_dir, inputs):
    out_dir.mkdir()
    output = out_dir / "out.jsonl"
    assert finished_counts(out_dir, [output]) is None
    write_manifest(out_dir, stage="x", config={}, inputs=inputs, counts={"n": 1})
    assert finished_counts(out_dir, [output]) is None
    output.write_text("")
    assert finished_counts(out_dir, [output]) == {"n": 1}


def test_a_rejected_repair_in_repairs_jsonl_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "repairs.jsonl", hard_case_rows())
    with pytest.raises(DataError, match=r"repairs.jsonl:1: repair of q2/s1: not accepted"):
        load_repairs(path)


def test_an_accepted_repair_in_hard_cases_jsonl_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "hard_cases.jsonl", repair_rows())
    with pytest.raises(DataError, match=r"hard_cases.jsonl:1: repair of q1/s1: accepted"):
        load_hard_cases(path)


def test_two_hard_cases_of_one_original_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "hard_cases.jsonl", 2 * hard_case_rows())
    with pytest.raises(DataError, match=r"hard_cases.jsonl:2: duplicate original_id 'q2/s1'"):
        load_hard_cases(path)


def test_a_repair_row_reads_back_as_written(tmp_path):
    rows = repair_rows()
    repairs = load_repairs(write_jsonl(tmp_path / "repairs.jsonl", rows))
    assert [r.to_dict() for r in repairs.values()] == rows
    assert repairs["q1/s1"].how == "first_pass" and repairs["q1/s1"].repair_score == 0.97
