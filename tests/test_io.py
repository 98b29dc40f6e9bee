"""JSONL files: errors that name file and line, atomic writes, resumable output, manifests."""

from __future__ import annotations

import json

import pytest
import yaml

from autotraj.config import ConfigError
from autotraj.io import (
    DataError,
    ResumableJsonl,
    check_same_config,
    file_sha256,
    load_records,
    read_jsonl,
    relocatable,
    write_json_atomic,
    write_jsonl_atomic,
    write_manifest,
)
from autotraj.records import Query

ROWS = [
    {"id": "q1", "question": "What is 6*7?", "answers": ["42"], "kind": "math"},
    {"id": "q2", "question": "Capitale de la France ? é ü 数", "answers": ["Paris"], "kind": "qa"},
    {"id": "q3", "question": "line\nbreak \u2028 sep", "answers": [], "kind": "math"},
]


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "sub" / "dir" / "rows.jsonl"
    assert write_jsonl_atomic(path, iter(ROWS)) == 3
    assert [obj for _, obj in read_jsonl(path)] == ROWS
    assert [n for n, _ in read_jsonl(path)] == [1, 2, 3]
    assert len(path.read_text(encoding="utf-8").splitlines()) >= 3
    assert "数" in path.read_text(encoding="utf-8")  # not escaped
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temporary left


def test_read_skips_blank_lines_and_counts_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\r\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"a": 1}\n{"a": \n', ":2: malformed JSON"),
        ('{"a": 1}\n\n{"a" 1}\n', ":3: malformed JSON"),
        ('{"a": 1}\n[1, 2]\n', ":2: expected a JSON object, got list"),
        ('"text"\n', ":1: expected a JSON object, got str"),
        ("null\n", ":1: expected a JSON object, got NoneType"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert str(path) + fragment in str(info.value)


def test_read_error_for_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        list(read_jsonl(path))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(read_jsonl(path))
    with pytest.raises(DataError, match="nope.jsonl"):
        load_records(path, Query.from_dict)
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(tmp_path))  # a directory is not a data file


def test_load_records_parses_rows(tmp_path):
    path = tmp_path / "queries.jsonl"
    write_jsonl_atomic(path, ROWS)
    queries = load_records(path, Query.from_dict)
    assert [q.id for q in queries] == ["q1", "q2", "q3"]
    assert queries[1] == Query(id="q2", question=ROWS[1]["question"], answers=("Paris",), kind="qa")


def test_load_records_reraises_record_errors_with_file_and_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    bad = dict(ROWS[1], kind="weird")
    write_jsonl_atomic(path, [ROWS[0], bad, ROWS[2]])
    with pytest.raises(DataError) as info:
        load_records(path, Query.from_dict)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    assert "query q2" in message and "'kind'" in message and "'weird'" in message


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, ROWS)
    before = path.read_bytes()

    def rows_then_crash():
        yield {"id": "new1"}
        yield {"id": "new2"}
        raise RuntimeError("generator died mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        write_jsonl_atomic(path, rows_then_crash())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_atomic_write_of_an_unserialisable_row_keeps_nothing(tmp_path):
    path = tmp_path / "rows.jsonl"
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"ok": 1}, {"bad": object()}])
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic(tmp_path):
    path = tmp_path / "a" / "x.json"
    write_json_atomic(path, {"b": [1, 2], "é": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": [1, 2], "é": "ü"}
    write_json_atomic(path, [1])
    assert json.loads(path.read_text(encoding="utf-8")) == [1]


# ---------------------------------------------------------------- ResumableJsonl


def by_query(row):
    return row["query_id"]


def rows_for(query_id, n=2):
    return [{"id": f"{query_id}/s{k}", "query_id": query_id} for k in range(n)]


def test_resumable_append_and_finish(tmp_path):
    path = tmp_path / "out" / "trajectories.jsonl"
    out = ResumableJsonl(path, key=by_query)
    assert out.done == {} and not out.finished
    out.append(rows_for("q1"))
    out.append(r for r in rows_for("q2", 3))  # a generator works too
    out.append([])
    assert out.done == {"q1": 2, "q2": 3}
    partial = path.with_name("trajectories.jsonl.partial")
    assert partial.is_file() and not path.exists()
    out.finish()
    assert out.finished and path.is_file() and not partial.exists()
    assert [obj["id"] for _, obj in read_jsonl(path)] == [
        "q1/s0", "q1/s1", "q2/s0", "q2/s1", "q2/s2",
    ]  # fmt: skip
    out.finish()  # idempotent


def test_resume_after_a_crash_drops_the_torn_line(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    out = ResumableJsonl(path, key=by_query)
    out.append(rows_for("q1"))
    out.append(rows_for("q2"))
    partial = path.with_name(path.name + ".partial")
    with partial.open("a", encoding="utf-8") as f:  # killed in the middle of a batch
        f.write(json.dumps(rows_for("q3")[0]) + "\n")
        f.write('{"id": "q3/s1", "query_')
    del out

    again = ResumableJsonl(path, key=by_query)
    assert again.done == {"q1": 2, "q2": 2, "q3": 1}
    assert partial.read_bytes().endswith(b"\n")
    todo = [q for q in ("q1", "q2", "q3", "q4") if again.done.get(q, 0) < 2]
    assert todo == ["q3", "q4"]
    again.append(rows_for("q3")[1:])
    again.append(rows_for("q4"))
    assert again.done == {"q1": 2, "q2": 2, "q3": 2, "q4": 2}
    again.finish()
    ids = [obj["id"] for _, obj in read_jsonl(path)]
    assert ids == [f"q{i}/s{k}" for i in range(1, 5) for k in range(2)]
    assert len(ids) == len(set(ids))


def test_resume_when_only_a_torn_line_was_written(tmp_path):
    path = tmp_path / "t.jsonl"
    path.with_name("t.jsonl.partial").write_text('{"query_id": "q', encoding="utf-8")
    out = ResumableJsonl(path, key=by_query)
    assert out.done == {}
    out.append(rows_for("q1", 1))
    out.finish()
    assert [obj for _, obj in read_jsonl(path)] == rows_for("q1", 1)


def test_a_finished_file_reports_done_and_refuses_appends(tmp_path):
    path = tmp_path / "t.jsonl"
    out = ResumableJsonl(path, key=by_query)
    out.append(rows_for("q1", 3))
    out.finish()
    before = path.read_bytes()

    reopened = ResumableJsonl(path, key=by_query)
    assert reopened.finished
    assert reopened.done == {"q1": 3}
    with pytest.raises(RuntimeError, match="already finished"):
        reopened.append(rows_for("q2"))
    assert path.read_bytes() == before
    assert not path.with_name("t.jsonl.partial").exists()


def test_finish_with_nothing_written_leaves_an_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    ResumableJsonl(path, key=by_query).finish()
    assert path.read_bytes() == b""
    assert ResumableJsonl(path, key=by_query).done == {}


def test_a_failing_key_writes_nothing(tmp_path):
    path = tmp_path / "t.jsonl"
    out = ResumableJsonl(path, key=by_query)
    with pytest.raises(KeyError):
        out.append([{"query_id": "q1"}, {"no_key": 1}])
    assert out.done == {}
    assert ResumableJsonl(path, key=by_query).done == {}


# ---------------------------------------------------------------- manifest


def test_write_manifest(tmp_path):
    data = tmp_path / "queries.jsonl"
    write_jsonl_atomic(data, ROWS)
    stage_dir = tmp_path / "run" / "synthesize"
    manifest = write_manifest(
        stage_dir,
        stage="synthesize",
        config={"generator": {"temperature": 0.3}, "n": 2},
        inputs={"queries": data, "model": "Qwen/not-a-file"},
        counts={"queries": 3, "trajectories": 6},
    )
    on_disk = json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert manifest["stage"] == "synthesize"
    assert manifest["inputs"]["queries"] == {"path": str(data), "sha256": file_sha256(data)}
    assert "model" not in manifest["inputs"]  # not a file: nothing to hash
    assert manifest["counts"] == {"queries": 3, "trajectories": 6}
    assert manifest["config"] == {"generator": {"temperature": 0.3}, "n": 2}
    assert {"autotraj", "torch", "transformers"} <= set(manifest["versions"])
    assert all(isinstance(v, str) for v in manifest["versions"].values())
    assert isinstance(manifest["git_sha"], str) and manifest["git_sha"]


def test_file_sha256(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    path.write_bytes(b"abd")
    assert file_sha256(path) != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_config_in_a_moved_run_directory_is_the_same_config(tmp_path):
    def resolved(run_dir, lr=1e-3):
        data = {"run_dir": run_dir, "model": f"{run_dir}/sft/model", "lr": lr, "tag": "runs"}
        return yaml.safe_dump(data, sort_keys=True)

    out = tmp_path / "stage"
    check_same_config(out, resolved("runs/a"))
    (out / "output.jsonl").write_text("{}\n")
    check_same_config(out, resolved("/data/b"))  # moved: accepted, and saved as it is now
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["run_dir"] == "/data/b"
    with pytest.raises(ConfigError, match="different config"):
        check_same_config(out, resolved("/data/b", lr=2e-3))
    # only the run directory itself or paths below it are rewritten: "runs/ab" is not in "runs/a"
    assert relocatable(["runs/a", "runs/a/x", "runs/ab", {"runs/a/k": 1}], "runs/a/") == [
        "<run_dir>",
        "<run_dir>/x",
        "runs/ab",
        {"<run_dir>/k": 1},
    ]
