"""The built-in tasks: determinism, disjoint splits, correct golds, the corpus and its index."""

from __future__ import annotations

import json
import re

import pytest

from autotraj.cli import main
from autotraj.io import DataError
from autotraj.querysets import load_queries
from autotraj.tasks import arithmetic, builtin, multihop
from autotraj.tools.search import Bm25Search
from autotraj.tools.toolbox import PythonToolConfig, SearchToolConfig, ToolsConfig, open_tools


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh $AUTOTRAJ_HOME for this module (the index is built there)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("autotraj-home")
        mp.setenv("AUTOTRAJ_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def index(home):
    return builtin.index_dir("multihop")


def test_generators_are_deterministic():
    assert arithmetic.make_problems(50, seed=0) == arithmetic.make_problems(50, seed=0)
    assert arithmetic.make_problems(50, seed=0) != arithmetic.make_problems(50, seed=1)
    assert multihop.make_world(40, seed=0) == multihop.make_world(40, seed=0)
    assert multihop.make_world(40, seed=0) != multihop.make_world(40, seed=1)


@pytest.mark.parametrize(
    ("name", "index", "qid", "question", "answers"),
    [
        (
            "builtin:arithmetic:train",
            0,
            "arithmetic-train-0",
            "A mine produced 8,056,020 tons of ore last year and 1,679,215 tons this year, and "
            "it has sold 371,493 tons. How many tons does it still hold?",
            ("9363742",),
        ),
        (
            "builtin:multihop:test",
            1,
            "multihop-test-1",
            "In which country was Thaubeszol Krezilteis born?",
            ("Keilfenland", "Republic of Keilfenland"),
        ),
    ],
)
def test_first_queries_are_pinned(name, index, qid, question, answers):
    """Same questions on every run and Python version (random.Random draws only)."""
    query = builtin.builtin_queries(name)[index]
    assert (query.id, query.question, query.answers) == (qid, question, answers)


@pytest.mark.parametrize("task", ["arithmetic", "multihop", "mixed"])
def test_splits_have_fixed_sizes_and_are_disjoint(task):
    splits = builtin.task_splits(task)
    factor = 2 if task == "mixed" else 1
    assert len(splits["train"]) == factor * builtin.TRAIN_SIZE
    assert len(splits["test"]) == factor * builtin.TEST_SIZE
    train = {q.question for q in splits["train"]}
    test = {q.question for q in splits["test"]}
    assert len(train) == len(splits["train"]) and len(test) == len(splits["test"])
    assert not train & test


def test_load_queries_accepts_builtin_names():
    queries = load_queries("builtin:arithmetic:test", limit=3)
    assert [q.id for q in queries] == [f"arithmetic-test-{i}" for i in range(3)]
    assert all(q.kind == "math" and q.source == "builtin:arithmetic" for q in queries)
    mixed = load_queries("builtin:mixed:train", limit=4)
    assert [q.kind for q in mixed] == ["math", "qa", "math", "qa"]
    assert [q.id for q in mixed][:2] == ["arithmetic-train-0", "multihop-train-0"]
    assert load_queries("builtin:multihop", split="test")[0].id == "multihop-test-0"
    with pytest.raises(DataError, match="unknown built-in task"):
        load_queries("builtin:chess:train")
    with pytest.raises(DataError, match="unknown split"):
        load_queries("builtin:arithmetic:dev")


def test_arithmetic_golds_recomputed_from_the_question():
    for query in builtin.builtin_queries("builtin:arithmetic:train"):
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\d|\d", query.question)]
        assert len(numbers) >= 2 and min(numbers) >= 12 and max(numbers) >= 1_000, query.id
        parsed = arithmetic.parse_question(query.question)
        assert parsed is not None, query.id
        assert 1 <= sum(parsed.expression.count(op) for op in ("+", "- ", "*", "//")) <= 2
        assert str(eval(parsed.expression)) == query.answers[0], query.id  # plain Python
        assert int(query.answers[0]) >= 10_000  # too large to guess


def test_multihop_golds_follow_the_corpus_facts():
    world = builtin.multihop_world()
    by_title = {p.title: p.text for p in world.passages}
    assert len(by_title) == len(world.passages)  # one passage per entity, unique names
    suffixes = set(multihop._COMPANY_SUFFIXES)
    words = [w for p in world.passages for w in p.title.split() if w not in suffixes]
    assert len(words) == len(set(words))  # every invented word is used once
    for query in builtin.builtin_queries("builtin:multihop:train"):
        kind, entity = multihop.parse_question(query.question)
        for relation in multihop.CHAINS[kind]:
            entity = multihop.read_fact(by_title[entity], relation, entity)
            assert entity is not None, query.id
        assert query.answers == (entity, f"Republic of {entity}")
        assert f"Republic of {entity}" in by_title[entity]


def test_bm25_top1_finds_every_entity_by_name(index):
    world = builtin.multihop_world()
    search = Bm25Search(index, top_k=1)
    try:
        found = search.retrieve([p.title for p in world.passages])
    finally:
        search.close()
    hits = sum(bool(r) and r[0].id == p.id for p, r in zip(world.passages, found, strict=True))
    assert hits == len(world.passages)  # docs/tasks.md: 100% top-1 hit rate


def test_index_is_built_once_and_reused(index, home):
    meta = index / "meta.json"
    before = meta.stat().st_mtime_ns
    assert builtin.index_dir("multihop") == index
    assert meta.stat().st_mtime_ns == before
    assert index.parent == home / "indexes"
    tools = open_tools(
        ToolsConfig(
            python=PythonToolConfig(workers=1),
            search=SearchToolConfig(backend="bm25", index_dir="builtin:multihop"),
        )
    )
    try:
        [call] = tools["search"].run_batch([builtin.multihop_world().passages[0].title])
        assert call.status == "ok" and "is a country" in call.output
    finally:
        for tool in tools.values():
            tool.close()


def test_cli_writes_splits_and_corpus(tmp_path, capsys):
    assert main(["tasks", str(tmp_path)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["arithmetic-train"] == 600 and counts["multihop-test"] == builtin.TEST_SIZE
    assert load_queries(str(tmp_path / "multihop-test.jsonl"))[0].id == "multihop-test-0"
    rows = [json.loads(line) for line in (tmp_path / "multihop-corpus.jsonl").open()]
    assert len(rows) == counts["multihop-corpus"] and set(rows[0]) == {"id", "title", "text"}
