"""Query loading from every local format and the Hub (mocked), row errors, decontamination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from autotraj import querysets
from autotraj.io import DataError
from autotraj.querysets import (
    KNOWN_DATASETS,
    decontaminate,
    load_eval_hashes,
    load_queries,
    normalize_question,
    question_hash,
)
from autotraj.records import Query

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = sorted((SHARED_DATA / "benchmarks").glob("*.jsonl"))
needs_data = pytest.mark.skipif(not BENCHMARKS, reason="shared benchmark data not present")

ROWS = [
    {"id": "a", "question": "What is 2+3?", "answer": "5"},
    {"id": "b", "problem": "What is 6*7?", "answer": 42},
    {"id": "c", "question": "Who wrote Hamlet?", "answers": ["Shakespeare", "W. Shakespeare"]},
]


def check_rows(queries: list[Query]) -> None:
    assert [q.id for q in queries] == ["a", "b", "c"]
    assert queries[0] == Query("a", "What is 2+3?", ("5",), "math", queries[0].source)
    assert queries[1].question == "What is 6*7?" and queries[1].answers == ("42",)
    assert queries[2].answers == ("Shakespeare", "W. Shakespeare") and queries[2].kind == "qa"
    assert [q.kind for q in queries] == ["math", "math", "qa"]


# ---------------------------------------------------------------------------- local formats


def test_jsonl(tmp_path):
    queries = load_queries(str(write_jsonl(tmp_path / "mix.jsonl", ROWS)))
    check_rows(queries)
    assert queries[0].source == "mix"


def test_json_list_and_data_object(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "obj.json").write_text(json.dumps({"data": ROWS, "version": 1}))
    check_rows(load_queries(str(tmp_path / "list.json")))
    check_rows(load_queries(str(tmp_path / "obj.json")))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": "a", "question": "What is 2+3?", "answer": "5", "answers": None},
        {"id": "b", "question": "What is 6*7?", "answer": "42", "answers": None},
        {
            "id": "c",
            "question": "Who wrote Hamlet?",
            "answer": None,
            "answers": ["Shakespeare", "W. Shakespeare"],
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    check_rows(load_queries(str(tmp_path / "q.parquet")))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    queries = load_queries(str(tmp_path / "plain"))
    assert [q.id for q in queries] == ["plain-0", "plain-1", "plain-2", "plain-3"]
    assert queries[3].answers == ("4",) and queries[3].kind == "math"

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows[:3]), test=datasets.Dataset.from_list(rows[3:])
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(load_queries(str(tmp_path / "dict"))) == 1  # "test" by default
    assert len(load_queries(str(tmp_path / "dict"), split="train")) == 3
    with pytest.raises(DataError, match="pick a split"):
        load_queries(str(tmp_path / "dict"), split="validation")


def test_limit_kind_and_default_ids(tmp_path):
    rows = [{"question": f"q{i}?", "answer": "1"} for i in range(5)]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    queries = load_queries(str(path), limit=2, kind="qa")
    assert [q.id for q in queries] == ["gsm8k-0", "gsm8k-1"]
    assert {q.kind for q in queries} == {"qa"}
    assert load_queries(str(path), limit=0) == []


# ---------------------------------------------------------------------------- row mapping


def test_gsm8k_worked_answer_keeps_what_follows_the_marks(tmp_path):
    raw = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "How many clips?", "answer": raw}])
    (query,) = load_queries(str(path))
    assert query.answers == ("72",) and query.kind == "math"


def test_question_aliases(tmp_path):
    rows = [
        {alias: f"{alias} text?", "answer": "1", "id": alias} for alias in querysets.QUESTION_FIELDS
    ]
    queries = load_queries(str(write_jsonl(tmp_path / "q.jsonl", rows)))
    assert [q.question for q in queries] == [f"{a} text?" for a in querysets.QUESTION_FIELDS]


def test_answer_lists_are_aliases_and_make_qa(tmp_path):
    rows = [
        {"id": 1, "question": "Capital of France?", "golden_answers": ["Paris", "paris, France"]},
        {"id": 2, "question": "Largest planet?", "answers": ["Jupiter"]},
        {"id": 3, "question": "Solve x+1=2.", "answers": ["1"], "kind": "math"},  # our own output
    ]
    q1, q2, q3 = load_queries(str(write_jsonl(tmp_path / "qa.jsonl", rows)))
    assert q1.id == "1" and q1.answers == ("Paris", "paris, France") and q1.kind == "qa"
    assert q2.kind == "qa" and q3.kind == "math"


def test_query_records_round_trip(tmp_path):
    original = [
        Query("x", "Who?", ("A", "B"), "qa", "hotpotqa"),
        Query("y", "2+2?", ("4",), "math"),
    ]
    path = write_jsonl(tmp_path / "queries.jsonl", [q.to_dict() for q in original])
    loaded = load_queries(str(path))
    assert loaded[0] == original[0]
    assert loaded[1] == Query("y", "2+2?", ("4",), "math", "queries")


def test_toolstar_kind_from_ability_and_data_source(tmp_path):
    rows = [
        {"id": "t0", "question": "Find x if 2x=4.", "answer": "2", "ability": "math"},
        {"id": "t1", "question": "Who directed Alien?", "answer": "Ridley Scott", "ability": "qa"},
        {"id": "t2", "question": "Where was X born?", "answer": "Paris", "data_source": "hotpotqa"},
        {"id": "t3", "question": "Who is older?", "answer": "A", "ability": "multi-hop qa"},
        {"id": "t4", "question": "Compute 3^4.", "answer": "81", "data_source": "deepscaler_math"},
        {"id": "t5", "question": "Write code.", "answer": "ok", "ability": "code"},  # no kind named
    ]
    queries = load_queries(str(write_jsonl(tmp_path / "toolstar.jsonl", rows)))
    assert [q.kind for q in queries] == ["math", "qa", "qa", "qa", "math", "math"]
    assert queries[1].answers == ("Ridley Scott",)  # one gold string
    assert queries[2].source == "hotpotqa"
    assert {q.kind for q in load_queries(str(tmp_path / "toolstar.jsonl"), kind="qa")} == {"qa"}


@needs_data
def test_real_toolstar_file_kinds():
    queries = load_queries(str(SHARED_DATA / "train/toolstar_rl_val_180.jsonl"))
    rows = [json.loads(line) for line in (SHARED_DATA / "train/toolstar_rl_val_180.jsonl").open()]
    assert [q.kind for q in queries] == [r["ability"] for r in rows]


def test_blank_gold_answer_is_skipped_with_a_warning(tmp_path, caplog):
    rows = [
        {"id": "c", "question": "Construct an angle equal to a given angle.", "answer": " "},
        {"id": "d", "question": "Who?", "answers": ["", "Bob"]},
        {"id": "e", "question": "What is 1+1?", "answer": "2"},
    ]
    queries = load_queries(str(write_jsonl(tmp_path / "q.jsonl", rows)))
    assert [q.id for q in queries] == ["d", "e"] and queries[0].answers == ("Bob",)
    assert "q.jsonl:1" in caplog.text and "blank" in caplog.text


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "question": "q?", "answer": "1"', r"bad\.jsonl:3: malformed JSON"),
        ('{"id": "x", "answer": "1"}', r"bad\.jsonl:3: missing field 'question'"),
        ('{"id": "x", "question": "q?"}', r"bad\.jsonl:3: missing field 'answer'"),
        ('{"id": "x", "question": "", "answer": "1"}', r"bad\.jsonl:3: field 'question'"),
        ('{"id": "x", "question": "q?", "answers": "Paris"}', r"bad\.jsonl:3: field 'answers'"),
        ('{"id": "x", "question": "q?", "answer": {"v": 1}}', r"bad\.jsonl:3: field 'answer'"),
        ('{"id": [1], "question": "q?", "answer": "1"}', r"bad\.jsonl:3: field 'id'"),
        (
            '{"id": "x", "question": "q?", "answer": "1", "kind": "code"}',
            r"bad\.jsonl:3: field 'kind'",
        ),
        ('["not", "an", "object"]', r"bad\.jsonl:3: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok", "question": "q?", "answer": "1"})
    path.write_text(f"{good}\n\n{line}\n")  # the blank line still counts for line numbers
    with pytest.raises(DataError, match=message):
        load_queries(str(path))


def test_bad_rows_in_json_and_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad.json").write_text(json.dumps({"data": [ROWS[0], {"id": "z", "answer": "1"}]}))
    with pytest.raises(DataError, match=r"bad\.json: row 1: missing field 'question'"):
        load_queries(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text('[{"question": "q?",\n "answer": }]')
    with pytest.raises(DataError, match=r"broken\.json:2: malformed JSON"):
        load_queries(str(tmp_path / "broken.json"))
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(DataError, match="expected a list of objects"):
        load_queries(str(tmp_path / "scalar.json"))
    pq.write_table(
        pa.Table.from_pylist([{"question": "q?", "answer": None}]), tmp_path / "b.parquet"
    )
    with pytest.raises(DataError, match=r"b\.parquet: row 0: missing field 'answer'"):
        load_queries(str(tmp_path / "b.parquet"))


def test_duplicate_ids_raise(tmp_path):
    rows = [ROWS[0], ROWS[1], {**ROWS[2], "id": "a"}]
    with pytest.raises(
        DataError, match=r"dup\.jsonl:3: duplicate id 'a' \(first at .*dup\.jsonl:1\)"
    ):
        load_queries(str(write_jsonl(tmp_path / "dup.jsonl", rows)))


def test_missing_file_unknown_name_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.jsonl: no such file"):
        load_queries(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_queries("data/gsm8k_test.parquet")
    with pytest.raises(DataError, match="unknown query source 'gsm8k-test'") as e:
        load_queries("gsm8k-test")
    assert all(name in str(e.value) for name in KNOWN_DATASETS)
    (tmp_path / "q.csv").write_text("question,answer\nq?,1\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_queries(str(tmp_path / "q.csv"))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_queries(str(tmp_path / "q.csv"), kind="code")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the Hub (mocked)


class FakeHub:
    """Stands in for datasets.load_dataset and records how it was called."""

    def __init__(self, tables: dict[tuple[str, str | None, str | None], object]):
        self.tables = tables
        self.calls: list[tuple[str, str | None, str | None]] = []

    def __call__(self, path, name=None, split=None, **kwargs):
        self.calls.append((path, name, split))
        return self.tables[(path, name, split)]


def test_known_names_use_their_hub_path_config_split_and_mapping(monkeypatch):
    import datasets

    math500 = datasets.Dataset.from_list(
        [
            {
                "problem": "Compute $1+1$.",
                "solution": "...",
                "answer": "2",
                "unique_id": "test/x/1.json",
            }
        ]
    )
    hotpot = datasets.Dataset.from_list(
        [
            {
                "id": "5a8b",
                "question": "Who?",
                "golden_answers": ["Ann", "Anne"],
                "metadata": {"k": 1},
            }
        ]
    )
    gsm8k = datasets.Dataset.from_list([{"question": "How many?", "answer": "2+2=4\n#### 4"}])
    hub = FakeHub(
        {
            ("HuggingFaceH4/MATH-500", None, "test"): math500,
            ("RUC-NLPIR/FlashRAG_datasets", "hotpotqa", "dev"): hotpot,
            ("openai/gsm8k", "main", "train"): gsm8k,
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", hub)

    (m,) = load_queries("math500")
    assert m == Query("test/x/1.json", "Compute $1+1$.", ("2",), "math", "math500")
    (h,) = load_queries("hotpotqa")
    assert h == Query("5a8b", "Who?", ("Ann", "Anne"), "qa", "hotpotqa")
    (g,) = load_queries("gsm8k", split="train")
    assert g == Query("gsm8k-train-0", "How many?", ("4",), "math", "gsm8k-train")
    assert hub.calls == [
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("RUC-NLPIR/FlashRAG_datasets", "hotpotqa", "dev"),
        ("openai/gsm8k", "main", "train"),
    ]


def test_every_known_dataset_is_well_formed():
    for name, spec in KNOWN_DATASETS.items():
        assert "/" in spec.path and spec.kind in ("math", "qa"), name
        assert all(target in ("question", "answers", "answer", "id") for _, target in spec.rename)


def test_any_hub_id_with_config_and_dataset_dict(monkeypatch):
    import datasets

    table = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"query": "q1?", "answer": "1"}]),
        test=datasets.Dataset.from_list([{"query": "q2?", "answer": "2"}]),
    )
    hub = FakeHub({("someone/math-set", "hard", None): table})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    (q,) = load_queries("someone/math-set:hard")
    assert q.id == "math-set-hard-0" and q.question == "q2?"  # "test" chosen from the dict


def test_hub_unreachable_says_so_and_suggests_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="unreachable.*local") as e:
        load_queries("gsm8k")
    assert "openai/gsm8k" in str(e.value)

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'someone/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="could not load it from the Hugging Face Hub"):
        load_queries("someone/nothing")


# ---------------------------------------------------------------------------- decontamination


@pytest.mark.parametrize(
    ("question", "normalized"),
    [
        ("  What is\n 2+2 ?\t", "what is 2+2"),
        ("Who wrote \u201cHamlet\u201d, really?", 'who wrote "hamlet", really'),
        ("It\u2019s 5.", "it's 5"),
        ("...Hi!!", "hi"),
        ("Find $x$.", "find $x$"),  # $ is not punctuation
    ],
)
def test_normalize_question(question, normalized):
    assert normalize_question(question) == normalized


def test_question_hash_is_the_normalized_question_s():
    assert question_hash("What is 2+2?") == question_hash(" what  is 2+2 ")


def test_decontaminate_counts_and_validates():
    queries = [Query("1", "What is 2+2?", ("4",), "math"), Query("2", "Who?", ("A",), "qa")]
    kept, removed = decontaminate(queries, {question_hash("what is 2+2")})
    assert [q.id for q in kept] == ["2"] and removed == 1
    assert decontaminate(queries, []) == (queries, 0)
    with pytest.raises(ValueError, match="sha256 digests"):
        decontaminate(queries, ["What is 2+2?"])


@needs_data
def test_shipped_hashes_cover_every_benchmark_question():
    shipped = load_eval_hashes()
    expected = {question_hash(q.question) for path in BENCHMARKS for q in load_queries(str(path))}
    assert shipped == expected  # regenerate with bench/build_benchmark_hashes.py if this fails
    assert len(shipped) == 2644


def test_extra_sources_add_hashes(tmp_path):
    path = write_jsonl(
        tmp_path / "my_eval.jsonl", [{"question": "A private test question?", "answer": "1"}]
    )
    base = load_eval_hashes()
    extra = load_eval_hashes([str(path)])
    assert extra - base == {question_hash("A private test question?")}


@needs_data
def test_hotpotqa_train_sample_loses_every_benchmark_question():
    train = load_queries(str(SHARED_DATA / "train/hotpotqa_train_2000.jsonl"))
    kept, removed = decontaminate(train, load_eval_hashes())
    assert len(train) == 2000 and removed >= 200 and len(kept) == 2000 - removed
    bench = load_queries(str(SHARED_DATA / "benchmarks/hotpotqa.jsonl"))
    bench_norm = {normalize_question(q.question) for q in bench}
    assert not {normalize_question(q.question) for q in kept} & bench_norm
    assert removed == 200  # measured 2026-11-22: exactly the 200 benchmark questions


@needs_data
def test_toolstar_rl_overlaps_are_removed():
    train = load_queries(str(SHARED_DATA / "train/toolstar_rl_10k.jsonl"))
    assert len(train) == 9999  # one row has a blank gold answer (line 5956)
    kept, removed = decontaminate(train, load_eval_hashes())
    # measured 2026-11-22: the 5 HotpotQA overlaps; none of MATH-500 matches exactly (the ~49
    # MATH-test overlaps are outside the 500-question subset shipped here)
    assert removed == 5 and all(q.kind == "qa" for q in set(train) - set(kept))
