"""The search tool: a local BM25 retriever (bm25s) and a client for a remote retrieval server.

- `build_index(corpus, out_dir)` reads a JSONL corpus (`id` plus `title` + `text`, or FlashRAG's
  `contents` = '"Title"\\ntext'), tokenizes it with bm25s (lowercase, English stopwords, optional
  Snowball stemmer from PyStemmer) and writes, atomically, a directory holding the bm25s index,
  the passages (`passages.jsonl` + byte offsets) and `meta.json` (corpus path and sha256, count,
  tokenizer settings). `autotraj index CORPUS OUT_DIR` calls it.
- `Bm25Search(index_dir)` loads such a directory (memory-mapped) and answers a whole batch of
  queries in one call; `RemoteSearch(url)` asks a FlashRAG / Search-R1 style server, batching the
  queries into few requests and retrying timeouts, connection errors, 5xx and malformed answers
  with exponential backoff before raising `ToolInfraError`.
- Both are `Tool`s named "search": `run_batch(queries)` returns one `ToolCall` per query whose
  output is what the model reads: each passage as `"Title"\\ntext`, passages separated by a blank
  line (METHOD.md section 2; release: top-1 passage). An empty query is the model's mistake and
  comes back as status "error"; a query that matches nothing is status "ok" with a short notice.

Not here: dense retrieval (the release's e5 server is reached through `RemoteSearch`), caching
(cache.py), deciding when the model may search (rollout.py). The corpus is not checked for
duplicate ids (doing so for the 21M-passage dump would cost gigabytes of memory).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from autotraj.io import DataError, file_sha256, read_jsonl, write_json_atomic
from autotraj.records import ToolCall, ToolName
from autotraj.tools.tool import ToolInfraError

log = logging.getLogger(__name__)

INDEX_FORMAT = "autotraj-bm25/1"
META_NAME = "meta.json"
PASSAGES_NAME = "passages.jsonl"
OFFSETS_NAME = "passages.offsets.npy"
BM25_SUBDIR = "bm25"
EMPTY_QUERY_OUTPUT = "Error: empty search query."
NO_RESULT_OUTPUT = "No passage matched the query."


@dataclass(frozen=True)
class Passage:
    """One retrieved passage; `score` is the retriever's (BM25 or the server's; 0.0 if unknown)."""

    id: str
    title: str
    text: str
    score: float = 0.0

    def render(self) -> str:
        """The passage as the model sees it: `"Title"\\ntext` (just the text when untitled)."""
        return f'"{self.title}"\n{self.text}' if self.title else self.text


def format_passages(passages: Sequence[Passage]) -> str:
    """What the model reads for one query: rendered passages separated by a blank line.

    >>> format_passages([Passage("1", "Paris", "Capital of France."), Passage("2", "", "x")])
    '"Paris"\\nCapital of France.\\n\\nx'
    """
    if not passages:
        return NO_RESULT_OUTPUT
    return "\n\n".join(p.render() for p in passages)


def split_contents(contents: str) -> tuple[str, str]:
    """Split FlashRAG's `contents` ('"Title"\\ntext' or 'Title\\ntext') into (title, text).

    Without a newline the whole string is the text and the title is empty.

    >>> split_contents('"Paris"\\nThe capital of France.')
    ('Paris', 'The capital of France.')
    """
    head, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents.strip()
    title = head.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, rest.strip()


def _passage_from_row(row: dict[str, Any], where: str) -> Passage:
    """Parse one corpus row; raise DataError naming `where` (file:line) and the field."""
    if "id" not in row:
        raise DataError(f"{where}: missing field 'id'")
    pid = row["id"]
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise DataError(f"{where}: field 'id' must be a string or integer")
    if "text" in row:
        title, text = row.get("title", ""), row["text"]
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' must be a string")
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'text' must be a string")
        field = "text"
    elif "contents" in row:
        if not isinstance(row["contents"], str):
            raise DataError(f"{where}: field 'contents' must be a string")
        title, text = split_contents(row["contents"])
        field = "contents"
    else:
        raise DataError(f"{where}: missing field 'text' (with 'title') or 'contents'")
    if not text.strip():
        raise DataError(f"{where}: field '{field}' has no text")
    return Passage(id=str(pid), title=title.strip(), text=text.strip())


# --- tokenization -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSettings:
    """How passages and queries are split into terms; stored in meta.json, reused at query time."""

    lower: bool = True
    pattern: str = r"(?u)\b\w\w+\b"  # bm25s' default (scikit-learn's CountVectorizer pattern)
    stopwords: str = "en"  # bm25s' English list
    stemmer: str | None = None  # a Snowball language for PyStemmer ("english"), or None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerSettings:
        return cls(**{k: data[k] for k in ("lower", "pattern", "stopwords", "stemmer")})


def _stem_function(language: str | None) -> Callable[[str], str] | None:
    if language is None:
        return None
    try:
        import Stemmer  # PyStemmer: optional, only for indexes built with a stemmer
    except ImportError as e:
        raise ImportError(
            f"this index uses the '{language}' stemmer: install it with `pip install PyStemmer`"
        ) from e
    return Stemmer.Stemmer(language).stemWord


def _tokenizer(settings: TokenizerSettings) -> Any:
    """A fresh bm25s Tokenizer (it keeps a vocabulary, so one per build or per query batch)."""
    from bm25s.tokenization import Tokenizer

    return Tokenizer(
        lower=settings.lower,
        splitter=settings.pattern,
        stopwords=settings.stopwords,
        stemmer=_stem_function(settings.stemmer),
    )


def _index_text(p: Passage) -> str:
    return f"{p.title}\n{p.text}" if p.title else p.text  # the title is searchable too


# --- building -----------------------------------------------------------------------------------


def build_index(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    stemmer: str | None = None,
    overwrite: bool = False,
    chunk_size: int = 10_000,
) -> dict[str, Any]:
    """Index a JSONL corpus with BM25 into `out_dir`; return {count, seconds, vocab_size, ...}.

    The directory is built beside `out_dir` and renamed into place, so `out_dir` is either a
    whole index or absent. An existing index there is replaced only with `overwrite=True`.
    Passage texts stream to disk while they are read; only token ids stay in memory.
    """
    import bm25s

    t0 = time.perf_counter()
    corpus, out_dir = Path(corpus), Path(out_dir)
    _check_target(out_dir, overwrite)
    settings = TokenizerSettings(stemmer=stemmer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the index is an ordinary shared directory
        tokenizer = _tokenizer(settings)
        token_ids: list[array] = []
        offsets = array("q", [0])
        chunk: list[str] = []
        with (tmp / PASSAGES_NAME).open("wb") as f:
            for lineno, row in read_jsonl(corpus):
                p = _passage_from_row(row, f"{corpus}:{lineno}")
                line = json.dumps(
                    {"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False
                )
                f.write(line.encode("utf-8") + b"\n")
                offsets.append(f.tell())
                chunk.append(_index_text(p))
                if len(chunk) >= chunk_size:
                    token_ids.extend(_tokenize_ids(tokenizer, chunk))
                    chunk = []
                    log.info("tokenized %d passages", len(token_ids))
            token_ids.extend(_tokenize_ids(tokenizer, chunk))
        count = len(token_ids)
        if count == 0:
            raise DataError(f"{corpus}: no passages")
        np.save(tmp / OFFSETS_NAME, np.frombuffer(offsets, dtype=np.int64))
        vocab = tokenizer.get_vocab_dict()
        retriever = bm25s.BM25()  # bm25s defaults: Lucene BM25, k1=1.5, b=0.75
        retriever.index(
            bm25s.tokenization.Tokenized(ids=token_ids, vocab=vocab), show_progress=False
        )
        del token_ids
        retriever.save(str(tmp / BM25_SUBDIR), show_progress=False)
        seconds = time.perf_counter() - t0
        meta = {
            "format": INDEX_FORMAT,
            "corpus": str(corpus.resolve()),
            "sha256": file_sha256(corpus),
            "count": count,
            "vocab_size": len(vocab),
            "tokenizer": asdict(settings),
            "bm25": {"method": retriever.method, "k1": retriever.k1, "b": retriever.b},
            "bm25s_version": bm25s.__version__,
            "build_seconds": round(seconds, 3),
        }
        write_json_atomic(tmp / META_NAME, meta)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    log.info("indexed %d passages from %s into %s in %.1f s", count, corpus, out_dir, seconds)
    return {
        "count": count,
        "seconds": round(seconds, 3),
        "vocab_size": len(vocab),
        "stemmer": stemmer,
        "out_dir": str(out_dir),
    }


def _tokenize_ids(tokenizer: Any, texts: list[str]) -> list[array]:
    """Token ids per passage as compact int32 arrays (half the memory of lists of ints)."""
    stream = tokenizer.streaming_tokenize(texts, update_vocab=True)
    return [array("i", ids) for ids in stream]


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Fail before the (possibly hours-long) build if `out_dir` cannot be replaced afterwards."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not (out_dir / META_NAME).is_file():
        raise FileExistsError(
            f"{out_dir}: exists and is not an autotraj index; refusing to replace"
        )
    if not overwrite:
        raise FileExistsError(f"{out_dir}: an index already exists (pass overwrite=True)")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    _check_target(out_dir, overwrite)
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- local retrieval ----------------------------------------------------------------------------


class _PassageStore:
    """Random access to passages.jsonl through its byte offsets, both memory-mapped."""

    def __init__(self, index_dir: Path, count: int):
        self.offsets = np.load(index_dir / OFFSETS_NAME, mmap_mode="r")
        if len(self.offsets) != count + 1:
            raise DataError(
                f"{index_dir / OFFSETS_NAME}: {len(self.offsets) - 1} offsets, meta says {count}"
            )
        self._file = (index_dir / PASSAGES_NAME).open("rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def get(self, i: int, score: float) -> Passage:
        row = json.loads(self._map[int(self.offsets[i]) : int(self.offsets[i + 1])])
        return Passage(id=row["id"], title=row["title"], text=row["text"], score=score)

    def close(self) -> None:
        self._map.close()
        self._file.close()


class Bm25Search:
    """Local BM25 search over a directory written by `build_index` (Tool protocol)."""

    name: ToolName = "search"

    def __init__(
        self, index_dir: str | Path, top_k: int = 1, *, mmap: bool = True, n_threads: int = 0
    ):
        import bm25s

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.index_dir = Path(index_dir)
        self.top_k = top_k  # release: top-1 passage
        self.n_threads = n_threads  # bm25s threads per batch; 0 = in the calling thread
        meta_path = self.index_dir / META_NAME
        if not meta_path.is_file():
            raise DataError(
                f"{self.index_dir}: not an index directory (no {META_NAME}); build it with `autotraj index`"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != INDEX_FORMAT:
            raise DataError(
                f"{meta_path}: format {self.meta.get('format')!r}, expected {INDEX_FORMAT!r}"
            )
        self.settings = TokenizerSettings.from_dict(self.meta["tokenizer"])
        _stem_function(self.settings.stemmer)  # fail now, not at the first query
        self.count = int(self.meta["count"])
        self._bm25 = bm25s.BM25.load(
            str(self.index_dir / BM25_SUBDIR), mmap=mmap, show_progress=False
        )
        self._vocab = self._bm25.vocab_dict
        self._passages = _PassageStore(self.index_dir, self.count)
        log.info("loaded BM25 index %s (%d passages)", self.index_dir, self.count)

    def retrieve(self, queries: Sequence[str], k: int | None = None) -> list[list[Passage]]:
        """Top-k passages for each query, best first; [] for a query with no indexed term."""
        k = min(k or self.top_k, self.count)
        tokens = _tokenizer(self.settings).tokenize(
            list(queries), update_vocab=True, return_as="string", show_progress=False
        )
        known = [[t for t in q if t and t in self._vocab] for q in tokens]
        todo = [i for i, q in enumerate(known) if q]
        results: list[list[Passage]] = [[] for _ in queries]
        if not todo:
            return results
        docs, scores = self._bm25.retrieve(
            [known[i] for i in todo], k=k, show_progress=False, n_threads=self.n_threads
        )
        for row, i in enumerate(todo):
            results[i] = [
                self._passages.get(int(d), float(s))
                for d, s in zip(docs[row], scores[row], strict=True)
                if s > 0  # zero: no query term occurs in it, so the order would be arbitrary
            ]
        return results

    def run_batch(self, inputs: Sequence[str]) -> list[ToolCall]:
        return _run_search(self.retrieve, inputs, self.top_k)

    def close(self) -> None:
        self._passages.close()


def _run_search(
    retrieve: Callable[[Sequence[str], int], list[list[Passage]]], inputs: Sequence[str], k: int
) -> list[ToolCall]:
    """Shared by both backends: empty queries are errors, the others are retrieved in one batch."""
    t0 = time.perf_counter()
    todo = [i for i, q in enumerate(inputs) if q.strip()]
    found = retrieve([inputs[i].strip() for i in todo], k) if todo else []
    latency = (time.perf_counter() - t0) / max(len(inputs), 1)  # the batch's time, shared evenly
    out = [ToolCall("search", q, EMPTY_QUERY_OUTPUT, "error", 0.0) for q in inputs]
    for i, passages in zip(todo, found, strict=True):
        out[i] = ToolCall("search", inputs[i], format_passages(passages), "ok", latency)
    return out


# --- remote retrieval ---------------------------------------------------------------------------


class _MalformedResponse(ValueError):
    pass


def _passage_from_item(item: Any) -> Passage:
    """One result item: {"document": {...}, "score": s} or the document itself."""
    if not isinstance(item, dict):
        raise _MalformedResponse(f"result item is {type(item).__name__}, expected an object")
    doc, score = item, item.get("score", 0.0)
    if isinstance(item.get("document"), dict):
        doc = item["document"]
    if isinstance(doc.get("contents"), str):
        title, text = split_contents(doc["contents"])
    elif isinstance(doc.get("text"), str):
        title, text = str(doc.get("title", "")), doc["text"]
    else:
        raise _MalformedResponse("document has neither 'contents' nor 'text'")
    if not isinstance(score, (int, float)):
        raise _MalformedResponse(f"score is {type(score).__name__}, expected a number")
    return Passage(id=str(doc.get("id", "")), title=title, text=text, score=float(score))


def parse_server_response(data: Any, n_queries: int, k: int) -> list[list[Passage]]:
    """Parse a retrieval server's JSON answer; raise ValueError when it has the wrong shape."""
    if not isinstance(data, dict) or not isinstance(data.get("result"), list):
        raise _MalformedResponse("expected an object with a 'result' list")
    result = data["result"]
    if len(result) != n_queries:
        raise _MalformedResponse(f"{len(result)} result lists for {n_queries} queries")
    out = []
    for items in result:
        if not isinstance(items, list):
            raise _MalformedResponse(f"result entry is {type(items).__name__}, expected a list")
        out.append([_passage_from_item(it) for it in items[:k]])
    return out


class RemoteSearch:
    """Client for a FlashRAG / Search-R1 style retrieval server (Tool protocol).

    POST `url` with {"queries": [...], "topk": k, "return_scores": true}; the answer is
    {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}, one list per query.
    """

    name: ToolName = "search"

    def __init__(
        self,
        url: str,
        top_k: int = 1,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_batch: int = 64,
    ):
        if top_k < 1 or max_batch < 1 or max_retries < 0:
            raise ValueError("top_k and max_batch must be >= 1 and max_retries >= 0")
        self.url = url
        self.top_k = top_k  # release: top-1 passage
        self.timeout_s = timeout_s
        self.max_retries = max_retries  # retries after the first attempt
        self.backoff_s = backoff_s  # waits backoff_s, 2*backoff_s, 4*backoff_s, ... (capped)
        self.max_backoff_s = max_backoff_s
        self.max_batch = max_batch
        self.attempts = 0  # HTTP requests sent, retries included
        self._client = httpx.Client(timeout=timeout_s)

    def retrieve(self, queries: Sequence[str], k: int | None = None) -> list[list[Passage]]:
        k = k or self.top_k
        out: list[list[Passage]] = []
        for start in range(0, len(queries), self.max_batch):
            out.extend(self._post(list(queries[start : start + self.max_batch]), k))
        return out

    def _post(self, queries: list[str], k: int) -> list[list[Passage]]:
        payload = {"queries": queries, "topk": k, "return_scores": True}
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                wait = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                log.warning(
                    "search server %s: %s; retry %d in %.1f s", self.url, last_error, attempt, wait
                )
                time.sleep(wait)
            self.attempts += 1
            try:
                resp = self._client.post(self.url, json=payload)
            except httpx.TimeoutException as e:
                last_error = f"timed out after {self.timeout_s} s ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last_error = f"connection error ({type(e).__name__}: {e})"
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:  # our request is wrong: retrying will not help
                raise ToolInfraError(
                    f"search server {self.url}: HTTP {resp.status_code}: {resp.text[:200]}"
                )
            try:
                return parse_server_response(resp.json(), len(queries), k)
            except ValueError as e:  # JSONDecodeError and _MalformedResponse
                last_error = f"malformed response ({e})"
        raise ToolInfraError(
            f"search server {self.url} failed after {self.max_retries + 1} attempts; last error: {last_error}"
        )

    def run_batch(self, inputs: Sequence[str]) -> list[ToolCall]:
        return _run_search(self.retrieve, inputs, self.top_k)

    def close(self) -> None:
        self._client.close()
