"""A cache of tool results in a sqlite file, wrapping any `Tool` (METHOD.md section 2).

`ToolCache(tool, path, settings)` is itself a Tool. Results are keyed by (tool name, normalized
input, settings string): `settings` should describe everything that changes the output (index
directory, top-k, timeouts, ...), so that changing a setting never replays a stale result.
`run_batch` answers hits from the file, sends all misses to the wrapped tool in one batch (each
distinct key once) and returns the calls in input order, each with the caller's own input text.

Only finished results are stored: status "ok" and "error" (the model's own mistakes are
deterministic); "timeout" and "rejected" are never cached, and a `ToolInfraError` from the
wrapped tool propagates with nothing stored. A hit comes back with `latency_s = 0.0`.

Normalization: search queries are stripped and their whitespace collapsed. Code is keyed by its
exact text: collapsing whitespace in Python would merge programs that differ in indentation.

sqlite (stdlib) makes the file safe to share between threads (one connection behind a lock) and
processes (sqlite's file locks, WAL journal, a busy timeout); a forked child opens its own
connection. Not here: eviction or size limits (delete the file to start afresh).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from autotraj.records import ToolCall, ToolName
from autotraj.tools.tool import Tool

log = logging.getLogger(__name__)

CACHED_STATUSES = ("ok", "error")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tool_results (
    tool TEXT NOT NULL,
    input TEXT NOT NULL,
    settings TEXT NOT NULL,
    output TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (tool, input, settings)
)
"""


def normalize_input(tool: str, text: str) -> str:
    """The cache key's form of a tool input.

    >>> normalize_input("search", "  capital of\\n  France ")
    'capital of France'
    >>> normalize_input("python", "if x:\\n    y()\\n")
    'if x:\\n    y()\\n'
    """
    if tool == "search":
        return " ".join(text.split())
    return text


class ToolCache:
    """Wrap `tool` so repeated (tool, input, settings) are answered from a sqlite file."""

    def __init__(
        self,
        tool: Tool,
        path: str | Path,
        settings: str = "",
        *,
        normalize: Callable[[str, str], str] = normalize_input,
        timeout_s: float = 60.0,
    ):
        self.tool = tool
        self.name: ToolName = tool.name
        self.path = Path(path)
        self.settings = settings
        self.normalize = normalize
        self.timeout_s = timeout_s  # how long to wait for another process's write lock
        self.hits = 0  # inputs answered from the file
        self.misses = 0  # inputs not in the file (a repeat within one batch is run once)
        self.executed = 0  # inputs sent to the wrapped tool
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection()  # fail now if the file is unusable

    def _connection(self) -> sqlite3.Connection:
        """The connection for this process (a connection must not cross a fork)."""
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            conn.commit()
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _lookup(self, keys: list[str]) -> dict[str, tuple[str, str]]:
        found: dict[str, tuple[str, str]] = {}
        with self._lock:
            conn = self._connection()
            for key in keys:
                row = conn.execute(
                    "SELECT output, status FROM tool_results WHERE tool=? AND input=? AND settings=?",
                    (self.name, key, self.settings),
                ).fetchone()
                if row is not None:
                    found[key] = (row[0], row[1])
        return found

    def _store(self, rows: list[tuple[str, ToolCall]]) -> None:
        with self._lock:
            conn = self._connection()
            with conn:  # one transaction
                conn.executemany(
                    "INSERT OR REPLACE INTO tool_results VALUES (?, ?, ?, ?, ?)",
                    [(self.name, k, self.settings, c.output, c.status) for k, c in rows],
                )

    def run_batch(self, inputs: Sequence[str]) -> list[ToolCall]:
        keys = [self.normalize(self.name, text) for text in inputs]
        cached = self._lookup(sorted(set(keys)))
        first_miss: dict[str, int] = {}  # key -> index of the input sent for it
        for i, key in enumerate(keys):
            if key not in cached and key not in first_miss:
                first_miss[key] = i
        fresh: dict[str, ToolCall] = {}
        if first_miss:
            calls = self.tool.run_batch([inputs[i] for i in first_miss.values()])
            if len(calls) != len(first_miss):
                raise RuntimeError(
                    f"{self.name}: {len(calls)} results for {len(first_miss)} inputs"
                )
            fresh = dict(zip(first_miss, calls, strict=True))
            self._store([(k, c) for k, c in fresh.items() if c.status in CACHED_STATUSES])
        out: list[ToolCall] = []
        for i, (text, key) in enumerate(zip(inputs, keys, strict=True)):
            if key in cached:
                output, status = cached[key]
                out.append(ToolCall(self.name, text, output, status, 0.0))  # type: ignore[arg-type]
            else:
                call = fresh[key]
                out.append(call if first_miss[key] == i else dataclasses.replace(call, input=text))
        hits = sum(key in cached for key in keys)
        with self._lock:
            self.hits += hits
            self.misses += len(keys) - hits
            self.executed += len(first_miss)
        log.debug("%s cache: %d hits, %d misses in this batch", self.name, hits, len(keys) - hits)
        return out

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "executed": self.executed}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
        self.tool.close()
