"""The Python tool: run model-written snippets in an isolated pool of pre-started workers.

`PythonSandbox.run_batch(codes)` returns one `ToolCall` per snippet, run concurrently across
the workers. Each worker (sandbox_worker.py) has math, numpy (as np) and sympy imported and
forks one child per snippet, so every call starts from the same fresh state in ~4 ms instead of
~450 ms for a new interpreter importing sympy. Protections, strongest the host permits (the
active set is logged once and available as `PythonSandbox.isolation`):

- wall-clock limit (timeout_s): the worker kills the child's process group and every leftover
  descendant (it is their subreaper); the parent kills the worker if it stops answering;
- rlimits: CPU seconds, address space (memory_mb on top of the preloaded prelude), processes,
  file size, open files, no core dumps;
- no network: a network namespace without interfaces (as root, or via a user namespace);
- filesystem: in a mount namespace, a private root holding only the system directories (/usr,
  /lib, /bin, /dev, /proc, ...) and the interpreter's standard library and site-packages, all
  read-only, plus a throwaway working directory on a small tmpfs, deleted after the call: the
  project, the run directory, home directories, /etc and /tmp are not there to read or write;
- an unprivileged uid per worker, a scrubbed environment (PATH, HOME, TMPDIR, LANG and one-thread
  BLAS settings only), stdout captured and capped (first and last MiB), stderr discarded.

Output follows the release: stdout, then `Error: <Type>: <message>` when the snippet failed,
cut to the first 200 + "..." + last 200 characters when longer than max_output_chars (400).
A snippet's failure is data (status error or timeout); a pool that cannot start raises
`ToolInfraError`.

Not here: caching of results (tools/cache.py), the tool-call loop (rollout.py), seccomp
filtering of syscalls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autotraj.records import ToolCall, ToolStatus
from autotraj.tools import sandbox_worker
from autotraj.tools.tool import ToolInfraError

log = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(sandbox_worker.__file__)
_STARTUP_TIMEOUT_S = 60.0  # importing sympy takes ~0.5 s on an idle core; leave room for load
_SLACK_S = 2.0  # past timeout_s + this, the parent gives up on a worker and replaces it
_WORKER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    # One BLAS thread: forking a process with a live thread pool deadlocks BLAS in the child.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_logged_isolation: set[str] = set()
_logged_lock = threading.Lock()


def truncate_output(text: str, max_chars: int = 400) -> str:
    """The release's rule: text longer than `max_chars` becomes first half + "..." + last half.

    >>> truncate_output("a" * 300 + "b" * 300)[195:210]
    'aaaaa...bbbbbbb'
    >>> len(truncate_output("x" * 401))
    403
    """
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "..." + text[len(text) - half :]


def format_output(stdout: str, error: str, max_chars: int = 400) -> str:
    """stdout (trailing newlines dropped), then `Error: <Type>: <message>` on its own line.

    >>> format_output("3\\n", "ZeroDivisionError: division by zero")
    '3\\nError: ZeroDivisionError: division by zero'
    >>> format_output("6\\n", "")
    '6'
    >>> format_output("", "")
    ''
    """
    text = stdout.rstrip("\n")
    if error:
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"Error: {error}"
    return truncate_output(text, max_chars)


def describe_isolation(iso: dict[str, Any]) -> str:
    uid = "unprivileged-uid" if iso.get("uid") is not None else "same-uid"
    return f"network={iso['network']} filesystem={iso['filesystem']} {uid}"


def _kill_uid(uid: int) -> None:
    """Kill every process running as `uid` (a dead worker's leftover snippet processes)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue


class _Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.scratch = tempfile.mkdtemp(prefix="autotraj-sandbox-")
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in kill()
        self.buffer = bytearray()
        self.isolation: dict[str, Any] = {}
        self.killed = False
        config = dict(cfg, scratch=self.scratch)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER_SCRIPT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=dict(_WORKER_ENV, HOME=self.scratch),
            close_fds=True,
        )

    def handshake(self, deadline: float) -> None:
        msg = self._read(deadline)
        if msg is None or not msg.get("ready"):
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            detail = self.stderr.read().decode("utf-8", "replace")[-2000:]
            self.kill()
            raise ToolInfraError(f"python sandbox worker failed to start: {detail or 'no output'}")
        self.isolation = msg["isolation"]

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """Next message, or None on end of file or at the deadline."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        header = sandbox_worker._HEADER
        while True:
            if len(self.buffer) >= header.size:
                size = header.unpack_from(self.buffer)[0]
                if len(self.buffer) >= header.size + size:
                    body = bytes(self.buffer[header.size : header.size + size])
                    del self.buffer[: header.size + size]
                    return json.loads(body)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buffer += chunk

    def _write(self, data: bytes, deadline: float) -> bool:
        """Send a request; False if the worker does not take it before the deadline."""
        fd = self.proc.stdin.fileno()  # type: ignore[union-attr]
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                return False
            view = view[os.write(fd, view[: select.PIPE_BUF]) :]
        return True

    def run(self, code: str, timeout_s: float, max_chars: int) -> ToolCall:
        start = time.monotonic()
        deadline = start + timeout_s + _SLACK_S
        child_pid = None
        try:
            sent = self._write(sandbox_worker.encode_message({"code": code}), deadline)
            started = self._read(deadline) if sent else None
            child_pid = started["pid"] if started else None
            result = self._read(deadline) if started else None
        except OSError:  # broken pipe: the worker died between calls
            result = None
        latency = time.monotonic() - start
        if result is None:
            status: ToolStatus = "timeout" if time.monotonic() >= deadline else "error"
            error = (
                f"TimeoutError: execution exceeded the {timeout_s:g} s time limit"
                if status == "timeout"
                else "SandboxError: the sandbox worker died while running this code"
            )
            log.warning("python sandbox worker %d lost (%s); replacing it", self.proc.pid, status)
            self.kill(child_pid)
            return ToolCall("python", code, format_output("", error, max_chars), status, latency)
        output = format_output(result["stdout"], result["error"], max_chars)
        return ToolCall("python", code, output, result["status"], latency)

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.poll() is None

    def kill(self, child_pid: int | None = None) -> None:
        if self.killed:
            return
        self.killed = True
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child_pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.isolation.get("uid") is not None:
            _kill_uid(self.isolation["uid"])
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.stderr.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _shutdown(workers: list[_Worker], executor: ThreadPoolExecutor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)
    for worker in workers:
        worker.kill()
    workers.clear()


class PythonSandbox:
    """A pool of isolated Python workers; implements the Tool protocol (`name = "python"`)."""

    name = "python"

    def __init__(
        self,
        *,
        workers: int | None = None,  # None: one per CPU core
        timeout_s: float = 5.0,  # release: 5 s wall clock
        memory_mb: int = 1024,  # address space a snippet may add to the preloaded prelude
        cpu_seconds: int = 10,
        max_processes: int = 32,
        max_file_mb: int = 10,
        max_output_chars: int = 400,  # release: cut to first 200 + "..." + last 200
    ) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self._cfg = {
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "cpu_seconds": cpu_seconds,
            "max_processes": max_processes,
            "max_file_mb": max_file_mb,
        }
        self._pool: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="python-sandbox")
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._executor)
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        try:
            started = [_Worker(self._cfg) for _ in range(self.workers)]
            self._pool.extend(started)
            for worker in started:
                worker.handshake(deadline)
        except (OSError, ToolInfraError) as e:
            self.close()
            raise ToolInfraError(f"python sandbox pool could not start: {e}") from e
        for worker in started:
            self._idle.put(worker)
        self.isolation = describe_isolation(started[0].isolation)
        self._log_isolation(started[0].isolation)

    def _log_isolation(self, iso: dict[str, Any]) -> None:
        with _logged_lock:
            if self.isolation in _logged_isolation:
                return
            _logged_isolation.add(self.isolation)
        weak = (
            iso["network"] not in ("netns", "userns+netns")
            or iso["filesystem"] != "private-root"
            or iso["uid"] is None
        )
        level = logging.WARNING if weak else logging.INFO
        log.log(
            level, "python sandbox isolation: %s%s", self.isolation, " (weaker)" if weak else ""
        )

    def _replace(self, worker: _Worker) -> _Worker:
        fresh = _Worker(self._cfg)
        try:
            fresh.handshake(time.monotonic() + _STARTUP_TIMEOUT_S)
        except ToolInfraError:
            fresh.kill()
            raise
        self._pool[self._pool.index(worker)] = fresh
        return fresh

    def _run_one(self, code: str) -> ToolCall:
        worker = self._idle.get()
        try:
            if not worker.alive:
                worker.kill()
                worker = self._replace(worker)
            return worker.run(code, self.timeout_s, self.max_output_chars)
        finally:
            self._idle.put(worker)

    def submit(self, code: str) -> Future[ToolCall]:
        """Queue one snippet for the next free worker; its ToolCall arrives in the future."""
        if not self._finalizer.alive:
            raise ToolInfraError("python sandbox is closed")
        return self._executor.submit(self._run_one, code)

    def run_batch(self, inputs: Sequence[str]) -> list[ToolCall]:
        """Run every snippet (concurrently across workers); one ToolCall per input, in order."""
        futures = [self.submit(code) for code in inputs]
        return [future.result() for future in futures]

    def run(self, code: str) -> ToolCall:
        return self.run_batch([code])[0]

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_file(path: str | Path, **sandbox_kwargs: Any) -> dict[str, Any]:
    """Run one snippet file through the rollout sandbox; the ToolCall as a dict."""
    code = Path(path).read_text(encoding="utf-8")
    sandbox_kwargs.setdefault("workers", 1)
    with PythonSandbox(**sandbox_kwargs) as sandbox:
        return sandbox.run(code).to_dict()
