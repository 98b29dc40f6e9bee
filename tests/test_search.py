"""Tests for autotraj/tools/search.py: BM25 index build/load/retrieval and the remote client."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl

from autotraj.io import DataError
from autotraj.tools.search import (
    EMPTY_QUERY_OUTPUT,
    NO_RESULT_OUTPUT,
    Bm25Search,
    Passage,
    RemoteSearch,
    build_index,
    format_passages,
    split_contents,
)
from autotraj.tools.tool import Tool, ToolInfraError

WIKI_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "wiki_mini.jsonl"
N_ROWS = 300


def _synthetic_rows(n: int) -> list[dict[str, str]]:
    """Passages with a shared filler vocabulary and two unique words each."""
    filler = [
        "river",
        "mountain",
        "city",
        "history",
        "people",
        "music",
        "school",
        "river",
        "war",
        "team",
    ]
    rows = []
    for i in range(n):
        words = [filler[(i * 7 + j) % len(filler)] for j in range(40)]
        words[5] = f"uniq{i}alpha"
        words[20] = f"uniq{i}beta"
        rows.append({"id": str(i), "title": f"Topic {i}", "text": " ".join(words)})
    return rows


@pytest.fixture(scope="module")
def corpus_rows() -> list[dict[str, Any]]:
    if WIKI_MINI.is_file():
        with WIKI_MINI.open(encoding="utf-8") as f:
            return [json.loads(line) for line in itertools.islice(f, N_ROWS)]
    return _synthetic_rows(N_ROWS)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, corpus_rows: list[dict[str, Any]]) -> Path:
    root = tmp_path_factory.mktemp("bm25")
    corpus = write_jsonl(root / "corpus.jsonl", corpus_rows)
    stats = build_index(corpus, root / "index")
    assert stats["count"] == len(corpus_rows)
    assert stats["seconds"] >= 0
    return root / "index"


@pytest.fixture(scope="module")
def search(index_dir: Path) -> Iterator[Bm25Search]:
    tool = Bm25Search(index_dir)
    yield tool
    tool.close()


def _distinctive_query(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The 6 words of a passage that occur in the fewest other passages."""

    def words(r: dict[str, Any]) -> set[str]:
        return set(re.findall(r"[a-z]{4,}", (r["title"] + " " + r["text"]).lower()))

    df = Counter(w for r in rows for w in words(r))
    return " ".join(sorted(words(row), key=lambda w: (df[w], w))[:6])


# --- building and loading -------------------------------------------------------------------------


def test_index_layout_and_meta(index_dir: Path, corpus_rows: list[dict[str, Any]]) -> None:
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["count"] == len(corpus_rows)
    assert len(meta["sha256"]) == 64
    assert meta["corpus"].endswith("corpus.jsonl")
    assert meta["tokenizer"]["stopwords"] == "en"
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_distinctive_words_find_their_passage(
    search: Bm25Search, corpus_rows: list[dict[str, Any]]
) -> None:
    sample = corpus_rows[::15]
    queries = [_distinctive_query(r, corpus_rows) for r in sample]
    results = search.retrieve(queries, k=1)
    assert [r[0].id for r in results] == [str(r["id"]) for r in sample]
    assert all(r[0].score > 0 for r in results)


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "in-memory"])
def test_reload_gives_same_results(index_dir: Path, search: Bm25Search, mmap: bool) -> None:
    queries = ["river valley school", "football scholarship", "capital city of France"]
    again = Bm25Search(index_dir, mmap=mmap)
    assert again.retrieve(queries, k=3) == search.retrieve(queries, k=3)
    again.close()


def test_batch_equals_one_at_a_time(search: Bm25Search, corpus_rows: list[dict[str, Any]]) -> None:
    queries = [r["title"] for r in corpus_rows[:20]]
    assert search.retrieve(queries, k=2) == [search.retrieve([q], k=2)[0] for q in queries]


def test_run_batch_output_format(index_dir: Path, corpus_rows: list[dict[str, Any]]) -> None:
    by_id = {str(r["id"]): r for r in corpus_rows}
    tool = Bm25Search(index_dir, top_k=2)
    assert isinstance(tool, Tool) and tool.name == "search"
    query = _distinctive_query(corpus_rows[0], corpus_rows) + " river school"
    [call] = tool.run_batch([query])
    [found] = tool.retrieve([query])
    assert call.status == "ok" and call.tool == "search" and call.input == query
    assert len(found) == 2
    expected = "\n\n".join(
        f'"{by_id[p.id]["title"]}"\n{by_id[p.id]["text"].strip()}' for p in found
    )
    assert call.output == expected
    assert call.output.startswith(f'"{corpus_rows[0]["title"]}"\n')
    tool.close()


def test_empty_and_unmatched_queries(search: Bm25Search) -> None:
    calls = search.run_batch(["", "   \n", "the of and", "zzqqxxjj", "football"])
    assert [c.status for c in calls] == ["error", "error", "ok", "ok", "ok"]
    assert calls[0].output == calls[1].output == EMPTY_QUERY_OUTPUT
    assert calls[2].output == calls[3].output == NO_RESULT_OUTPUT
    assert calls[4].output not in (NO_RESULT_OUTPUT, EMPTY_QUERY_OUTPUT)
    assert [c.input for c in calls] == ["", "   \n", "the of and", "zzqqxxjj", "football"]


def test_top_k_larger_than_corpus(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", _synthetic_rows(3))
    build_index(corpus, tmp_path / "idx")
    tool = Bm25Search(tmp_path / "idx", top_k=10)
    [found] = tool.retrieve(["uniq1alpha river"])
    assert found[0].id == "1" and len(found) == 3
    tool.close()


def test_flashrag_contents_corpus(tmp_path: Path) -> None:
    rows = _synthetic_rows(30)
    flash = [
        {"id": r["id"], "contents": (f'"{r["title"]}"' if i % 2 else r["title"]) + "\n" + r["text"]}
        for i, r in enumerate(rows)
    ]
    corpus = write_jsonl(tmp_path / "flash.jsonl", flash)
    build_index(corpus, tmp_path / "idx")
    tool = Bm25Search(tmp_path / "idx")
    results = tool.retrieve(["uniq7alpha uniq7beta", "uniq8beta"])
    assert [r[0] for r in results][0] == Passage(
        "7", "Topic 7", rows[7]["text"], results[0][0].score
    )
    assert results[1][0].title == "Topic 8"
    [call] = tool.run_batch(["uniq8alpha"])
    assert call.output == f'"Topic 8"\n{rows[8]["text"]}'
    tool.close()


def test_split_contents() -> None:
    assert split_contents('"A "quoted" title"\nbody\nmore') == ('A "quoted" title', "body\nmore")
    assert split_contents("Plain\nbody") == ("Plain", "body")
    assert split_contents("no newline here") == ("", "no newline here")


def test_format_passages() -> None:
    assert format_passages([]) == NO_RESULT_OUTPUT
    assert format_passages([Passage("1", "T", "x"), Passage("2", "", "y")]) == '"T"\nx\n\ny'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"title": "t", "text": "x"}', "missing field 'id'"),
        ('{"id": "3", "title": "t"}', "missing field 'text'"),
        ('{"id": "3", "title": "t", "text": 5}', "field 'text' must be a string"),
        ('{"id": "3", "title": 7, "text": "x"}', "field 'title' must be a string"),
        ('{"id": "3", "contents": ["x"]}', "field 'contents' must be a string"),
        ('{"id": "3", "title": "t", "text": "  "}', "field 'text' has no text"),
        ('{"id": [3], "text": "x"}', "field 'id' must be"),
        ('{"id": "3", "text": "x"', "malformed JSON"),
    ],
)
def test_malformed_corpus_names_file_line_field(tmp_path: Path, line: str, message: str) -> None:
    good = [json.dumps(r) for r in _synthetic_rows(2)]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join([*good, line]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"bad.jsonl:3: {message}")):
        build_index(corpus, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # temp dir cleaned up


def test_existing_index_needs_overwrite(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", _synthetic_rows(5))
    build_index(corpus, tmp_path / "idx")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_index(corpus, tmp_path / "idx")
    write_jsonl(corpus, _synthetic_rows(7))
    assert build_index(corpus, tmp_path / "idx", overwrite=True)["count"] == 7
    reloaded = Bm25Search(tmp_path / "idx")
    assert reloaded.count == 7
    reloaded.close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an autotraj index"):
        build_index(corpus, tmp_path / "other", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "idx", "other"]


def stem_corpus(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "title": "Running", "text": "She runs marathons and running races."},
            {"id": "b", "title": "Cooking", "text": "He cooks pasta for dinner."},
        ],
    )


def test_stemmer_matches_word_forms(tmp_path: Path) -> None:
    pytest.importorskip("Stemmer")  # PyStemmer is optional
    build_index(stem_corpus(tmp_path), tmp_path / "idx", stemmer="english")
    tool = Bm25Search(tmp_path / "idx")
    assert tool.settings.stemmer == "english"
    assert tool.retrieve(["runner run"])[0][0].id == "a"  # "run" matches the stem of "runs"
    assert tool.retrieve(["cooked"])[0][0].id == "b"
    tool.close()


def test_without_pystemmer_a_stemmer_is_refused_and_plain_indexes_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "Stemmer", None)  # `import Stemmer` raises ImportError
    corpus = stem_corpus(tmp_path)
    with pytest.raises(ImportError, match="pip install PyStemmer"):
        build_index(corpus, tmp_path / "idx", stemmer="english")
    assert not (tmp_path / "idx").exists()
    build_index(corpus, tmp_path / "idx")  # no stemmer: nothing to import
    tool = Bm25Search(tmp_path / "idx")
    assert tool.settings.stemmer is None
    assert tool.retrieve(["runs"])[0][0].id == "a"
    assert tool.retrieve(["cooked"]) == [[]]  # whole words only: "cooked" is not "cooks"
    tool.close()
    meta_path = tmp_path / "idx" / "meta.json"  # an index someone built with the stemmer
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["stemmer"] = "english"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ImportError, match="the 'english' stemmer: install it"):
        Bm25Search(tmp_path / "idx")  # refused on load, not at the first query


def test_missing_index_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an index directory"):
        Bm25Search(tmp_path)


# --- remote client --------------------------------------------------------------------------------

Action = Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def ok(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    result = [
        [
            {
                "document": {"id": f"{q}-{j}", "contents": f'"Title {q}"\nText {j} about {q}.'},
                "score": 1.0 - j / 10,
            }
            for j in range(req["topk"])
        ]
        for q in req["queries"]
    ]
    _reply(handler, 200, json.dumps({"result": result}).encode())


def bare_documents(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    result = [
        [{"id": "d1", "title": "T", "text": f"about {q}"}, {"contents": "C\nbody"}]
        for q in req["queries"]
    ]
    _reply(handler, 200, json.dumps({"result": result}).encode())


def server_error(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    _reply(handler, 500, b"internal error")


def bad_request(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    _reply(handler, 400, b"bad request")


def garbage(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    _reply(handler, 200, b"{not json at all")


def wrong_shape(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    _reply(handler, 200, json.dumps({"result": []}).encode())


def slow(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    time.sleep(1.0)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        ok(handler, req)  # the client has usually given up waiting by now, as it should


class FakeServer:
    """A retrieval server on 127.0.0.1 that answers each request with the next scripted action."""

    def __init__(self) -> None:
        self.script: list[Action] = []
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                action = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                action(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/retrieve"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer()
    yield s
    s.close()


def _client(server: FakeServer, **kw: Any) -> RemoteSearch:
    kw = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, **kw}
    return RemoteSearch(server.url, **kw)


def test_remote_success_batches_queries(server: FakeServer) -> None:
    server.script = [ok]
    client = _client(server, top_k=2, max_batch=2)
    assert isinstance(client, Tool) and client.name == "search"
    calls = client.run_batch(["alpha", "", "beta", "gamma"])
    assert [r["queries"] for r in server.requests] == [["alpha", "beta"], ["gamma"]]
    assert all(r["topk"] == 2 and r["return_scores"] is True for r in server.requests)
    assert [c.status for c in calls] == ["ok", "error", "ok", "ok"]
    assert calls[1].output == EMPTY_QUERY_OUTPUT
    assert (
        calls[0].output
        == '"Title alpha"\nText 0 about alpha.\n\n"Title alpha"\nText 1 about alpha.'
    )
    [found] = client.retrieve(["delta"], k=1)
    assert found == [Passage("delta-0", "Title delta", "Text 0 about delta.", 1.0)]
    client.close()


def test_remote_accepts_bare_documents(server: FakeServer) -> None:
    server.script = [bare_documents]
    client = _client(server, top_k=2)
    [found] = client.retrieve(["q"])
    assert found == [Passage("d1", "T", "about q", 0.0), Passage("", "C", "body", 0.0)]
    client.close()


def test_remote_retries_500_then_succeeds(server: FakeServer) -> None:
    server.script = [server_error, server_error, ok]
    client = _client(server, max_retries=2)
    [call] = client.run_batch(["alpha"])
    assert call.status == "ok" and "about alpha" in call.output
    assert len(server.requests) == 3 and client.attempts == 3
    client.close()


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (garbage, "malformed response"),
        (wrong_shape, "malformed response"),
        (server_error, "HTTP 500"),
    ],
)
def test_remote_gives_up_after_retries(server: FakeServer, action: Action, message: str) -> None:
    server.script = [action]
    client = _client(server, max_retries=3)
    with pytest.raises(ToolInfraError, match=message) as e:
        client.run_batch(["alpha"])
    assert server.url in str(e.value) and "4 attempts" in str(e.value)
    assert len(server.requests) == 4  # the first attempt and 3 retries
    client.close()


def test_remote_timeout_retried_then_raises(server: FakeServer) -> None:
    server.script = [slow]
    client = _client(server, timeout_s=0.2, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(ToolInfraError, match="timed out") as e:
        client.run_batch(["alpha"])
    assert server.url in str(e.value)
    assert client.attempts == 2 and len(server.requests) == 2
    assert time.perf_counter() - t0 < 1.5
    client.close()


def test_remote_client_error_not_retried(server: FakeServer) -> None:
    server.script = [bad_request]
    client = _client(server, max_retries=3)
    with pytest.raises(ToolInfraError, match="HTTP 400"):
        client.run_batch(["alpha"])
    assert len(server.requests) == 1
    client.close()


def test_remote_connection_refused() -> None:
    s = FakeServer()
    url = s.url
    s.close()
    client = RemoteSearch(url, max_retries=1, backoff_s=0.01, timeout_s=1.0)
    with pytest.raises(ToolInfraError, match="connection error") as e:
        client.run_batch(["alpha"])
    assert url in str(e.value) and client.attempts == 2
    client.close()


def test_remote_backoff_grows(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("autotraj.tools.search.time.sleep", waits.append)
    server.script = [server_error]
    client = _client(server, max_retries=4, backoff_s=0.5, max_backoff_s=1.5)
    with pytest.raises(ToolInfraError):
        client.run_batch(["alpha"])
    assert waits == [0.5, 1.0, 1.5, 1.5]
    client.close()
