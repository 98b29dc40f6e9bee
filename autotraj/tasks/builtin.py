"""The built-in tasks by name: query splits, the multi-hop corpus and its BM25 index.

Names (what `querysets.load_queries` accepts after "builtin:"): `arithmetic:train|test`,
`multihop:train|test` and `mixed:train|test` (the two interleaved, arithmetic first). Each task
has TRAIN_SIZE + TEST_SIZE questions from one seeded stream (seed 0): the first TRAIN_SIZE are
the train split, the rest the test split, and every question is distinct, so the splits are
disjoint by construction (checked when they are built). Query ids are `<task>-<split>-<index>`,
e.g. `arithmetic-train-17`; `mixed` holds both tasks' queries (twice the sizes) with their own
ids and sources.

`index_dir("multihop")` returns the BM25 index of the multi-hop corpus, building it on first use
under `$AUTOTRAJ_HOME/indexes/` (models/embedded.py's home and file lock) in a directory keyed
by the sha256 of the corpus, so a changed generator gets a fresh index and concurrent processes
build it once. `write_tasks(out_dir)` writes every split and the corpus as JSONL
(`autotraj tasks OUT_DIR`).

Not here: generating the questions (tasks/arithmetic.py, tasks/multihop.py) or solving them
(models/reference.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

from autotraj.io import DataError, write_jsonl_atomic
from autotraj.records import Query
from autotraj.tasks import arithmetic, multihop

log = logging.getLogger(__name__)

PREFIX = "builtin:"
TASKS = ("arithmetic", "multihop", "mixed")
SPLITS = ("train", "test")
TRAIN_SIZE = 600  # per task
TEST_SIZE = 200  # per task: 400 held-out items in all (the ablation uses 300+)
SEED = 0


@cache
def task_splits(task: str) -> dict[str, tuple[Query, ...]]:
    """{split: queries} of one task (see the module docstring)."""
    if task == "arithmetic":
        problems = arithmetic.make_problems(TRAIN_SIZE + TEST_SIZE, SEED)
        rows = [(p.question, (str(p.answer),), "math") for p in problems]
    elif task == "multihop":
        questions = multihop_world().questions
        rows = [(q.question, q.answers, "qa") for q in questions]
    elif task == "mixed":
        return {
            split: tuple(
                q
                for pair in zip(
                    task_splits("arithmetic")[split], task_splits("multihop")[split], strict=True
                )
                for q in pair
            )
            for split in SPLITS
        }
    else:
        raise DataError(f"unknown built-in task {task!r}; available: {', '.join(TASKS)}")
    splits = {"train": rows[:TRAIN_SIZE], "test": rows[TRAIN_SIZE:]}
    overlap = {r[0] for r in splits["train"]} & {r[0] for r in splits["test"]}
    if overlap:
        raise AssertionError(f"{task}: train and test share {len(overlap)} questions")
    return {
        split: tuple(
            Query(f"{task}-{split}-{i}", question, answers, kind, f"{PREFIX}{task}")
            for i, (question, answers, kind) in enumerate(split_rows)
        )
        for split, split_rows in splits.items()
    }


@cache
def multihop_world() -> multihop.World:
    return multihop.make_world(TRAIN_SIZE + TEST_SIZE, SEED)


def builtin_queries(name: str, split: str | None = None) -> tuple[Query, ...]:
    """The queries of "builtin:<task>:<split>" (or "builtin:<task>" with `split`, default train)."""
    task, _, named_split = name.removeprefix(PREFIX).partition(":")
    chosen = named_split or split or "train"
    if split is not None and named_split and split != named_split:
        raise DataError(f"{name}: split={split!r} contradicts the split in the name")
    if chosen not in SPLITS:
        raise DataError(f"{name}: unknown split {chosen!r}; use one of {', '.join(SPLITS)}")
    if task not in TASKS:
        raise DataError(f"{name}: unknown built-in task {task!r}; available: {', '.join(TASKS)}")
    return task_splits(task)[chosen]


def corpus_rows() -> list[dict[str, Any]]:
    """The multi-hop corpus as JSONL rows: id, title, text (one passage per entity)."""
    return [{"id": p.id, "title": p.title, "text": p.text} for p in multihop_world().passages]


def index_dir(name: str) -> Path:
    """The BM25 index of built-in corpus `name` ("multihop"), built under $AUTOTRAJ_HOME once."""
    from autotraj.models.embedded import _file_lock, autotraj_home
    from autotraj.tools.search import META_NAME, build_index

    if name != "multihop":
        raise DataError(f"unknown built-in corpus {name!r}; available: multihop")
    rows = corpus_rows()
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    root = autotraj_home() / "indexes"
    target = root / f"{name}-{digest}"
    if (target / META_NAME).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{target.name}.lock"):
        if not (target / META_NAME).is_file():  # nobody built it while we waited
            corpus = root / f"{name}-{digest}.corpus.jsonl"
            write_jsonl_atomic(corpus, rows)
            build_index(corpus, target)
            log.info("built the %s index (%d passages) in %s", name, len(rows), target)
    return target


def write_tasks(out_dir: str | Path) -> dict[str, int]:
    """Write `<task>-<split>.jsonl` for every task and split and `multihop-corpus.jsonl`."""
    out = Path(out_dir)
    counts = {}
    for task in TASKS:
        for split in SPLITS:
            rows = (q.to_dict() for q in task_splits(task)[split])
            counts[f"{task}-{split}"] = write_jsonl_atomic(out / f"{task}-{split}.jsonl", rows)
    counts["multihop-corpus"] = write_jsonl_atomic(out / "multihop-corpus.jsonl", corpus_rows())
    return counts
