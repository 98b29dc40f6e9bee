"""Tests for autotraj/tools/cache.py: hits, misses, keys, what is (not) cached, sharing."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_jsonl

from autotraj.records import ToolCall, ToolName
from autotraj.tools.cache import ToolCache, normalize_input
from autotraj.tools.search import Bm25Search, build_index
from autotraj.tools.tool import Tool, ToolInfraError


class FakeTool:
    """Answers 'ok' (numbered, so a re-execution is visible), 'error' for 'bad*', 'timeout' for 'slow*'."""

    def __init__(self, name: ToolName = "search") -> None:
        self.name = name
        self.batches: list[list[str]] = []
        self.n = 0
        self.closed = False
        self.fail = False

    def run_batch(self, inputs: Sequence[str]) -> list[ToolCall]:
        if self.fail:
            raise ToolInfraError("backend down")
        self.batches.append(list(inputs))
        out = []
        for text in inputs:
            self.n += 1
            if text.startswith("bad"):
                out.append(ToolCall(self.name, text, "Error: bad", "error", 0.1))
            elif text.startswith("slow"):
                out.append(ToolCall(self.name, text, "timed out", "timeout", 5.0))
            else:
                out.append(
                    ToolCall(self.name, text, f"result {self.n} for {text.strip()}", "ok", 0.1)
                )
        return out

    def close(self) -> None:
        self.closed = True


def test_hits_misses_and_order(tmp_path: Path) -> None:
    tool = FakeTool()
    cache = ToolCache(tool, tmp_path / "c.sqlite", settings="k=1")
    assert isinstance(cache, Tool) and cache.name == "search"
    first = cache.run_batch(["a", "b"])
    assert [c.output for c in first] == ["result 1 for a", "result 2 for b"]
    second = cache.run_batch(["c", "b", "a", "d"])
    assert tool.batches == [["a", "b"], ["c", "d"]]  # only the misses, in one batch
    assert [c.input for c in second] == ["c", "b", "a", "d"]
    assert [c.output for c in second] == [
        "result 3 for c",
        "result 2 for b",
        "result 1 for a",
        "result 4 for d",
    ]
    assert second[1].latency_s == 0.0 and second[0].latency_s == 0.1
    assert cache.stats() == {"hits": 2, "misses": 4, "executed": 4}
    cache.close()
    assert tool.closed


def test_search_input_normalized_but_caller_text_kept(tmp_path: Path) -> None:
    tool = FakeTool()
    cache = ToolCache(tool, tmp_path / "c.sqlite")
    cache.run_batch(["capital of  France"])
    [hit] = cache.run_batch(["  capital\nof France \t"])
    assert (
        hit.input == "  capital\nof France \t" and hit.output == "result 1 for capital of  France"
    )
    assert len(tool.batches) == 1


def test_code_keyed_exactly() -> None:
    a = "if x:\n    f()\ng()"
    b = "if x:\n    f()\n    g()"
    assert normalize_input("python", a) != normalize_input("python", b)
    assert normalize_input("search", " a \n b ") == "a b"


def test_repeats_within_a_batch_run_once(tmp_path: Path) -> None:
    tool = FakeTool()
    cache = ToolCache(tool, tmp_path / "c.sqlite")
    calls = cache.run_batch(["q", "q ", "r", " q"])
    assert tool.batches == [["q", "r"]]
    assert [c.input for c in calls] == ["q", "q ", "r", " q"]
    assert calls[0].output == calls[1].output == calls[3].output == "result 1 for q"


def test_settings_and_tool_name_are_part_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    tool = FakeTool()
    ToolCache(tool, path, settings="top_k=1").run_batch(["q"])
    ToolCache(tool, path, settings="top_k=3").run_batch(["q"])
    python = FakeTool("python")
    ToolCache(python, path, settings="top_k=1").run_batch(["q"])
    assert tool.batches == [["q"], ["q"]] and python.batches == [["q"]]


def test_errors_cached_timeouts_not(tmp_path: Path) -> None:
    tool = FakeTool()
    cache = ToolCache(tool, tmp_path / "c.sqlite")
    first = cache.run_batch(["bad query", "slow query"])
    assert [c.status for c in first] == ["error", "timeout"]
    second = cache.run_batch(["bad query", "slow query"])
    assert [c.status for c in second] == ["error", "timeout"]
    assert tool.batches == [["bad query", "slow query"], ["slow query"]]
    assert cache.stats() == {"hits": 1, "misses": 3, "executed": 3}


def test_infra_error_propagates_and_caches_nothing(tmp_path: Path) -> None:
    tool = FakeTool()
    cache = ToolCache(tool, tmp_path / "c.sqlite")
    tool.fail = True
    with pytest.raises(ToolInfraError):
        cache.run_batch(["q"])
    tool.fail = False
    cache.run_batch(["q"])
    assert tool.batches == [["q"]] and cache.stats()["hits"] == 0


def test_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.sqlite"
    ToolCache(FakeTool(), path).run_batch(["q"])
    tool = FakeTool()
    [call] = ToolCache(tool, path).run_batch(["q"])
    assert call.output == "result 1 for q" and tool.batches == []


def test_threads_share_one_cache(tmp_path: Path) -> None:
    tool = FakeTool()
    cache = ToolCache(tool, tmp_path / "c.sqlite")

    def work(t: int) -> None:
        for i in range(20):
            cache.run_batch([f"q{i}", f"t{t}-{i}"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(work, t) for t in range(4)]:
            future.result()  # re-raises a worker's exception
    assert cache.hits + cache.misses == 4 * 20 * 2
    again = FakeTool()
    ToolCache(again, tmp_path / "c.sqlite").run_batch(
        [f"t{t}-{i}" for t in range(4) for i in range(20)]
    )
    assert again.batches == []


def _child(path: str, worker: int) -> None:
    cache = ToolCache(FakeTool(), path)
    for i in range(10):
        cache.run_batch([f"shared{i}", f"w{worker}-{i}"])
    cache.close()


def test_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    parent = ToolCache(FakeTool(), path)  # an open connection in the parent across the fork
    parent.run_batch(["parent"])
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(str(path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    tool = FakeTool()
    inputs = ["parent"] + [f"shared{i}" for i in range(10)]
    inputs += [f"w{w}-{i}" for w in range(3) for i in range(10)]
    ToolCache(tool, path).run_batch(inputs)
    assert tool.batches == []


def test_wraps_bm25_search(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": str(i), "title": f"T{i}", "text": f"word{i} common text"} for i in range(5)]
    write_jsonl(corpus, rows)
    build_index(corpus, tmp_path / "idx")
    cache = ToolCache(Bm25Search(tmp_path / "idx"), tmp_path / "c.sqlite", settings="bm25 top_k=1")
    first = cache.run_batch(["word3", ""])
    second = cache.run_batch(["word3 ", ""])
    assert first[0].output == second[0].output == '"T3"\nword3 common text'
    assert second[1].status == "error"
    assert cache.stats() == {"hits": 2, "misses": 2, "executed": 2}
    cache.close()
