"""JSONL and JSON files that survive crashes, and the manifest every stage writes.

- `read_jsonl` yields (line number, parsed object) and raises `DataError` naming the file and
  line.
- `write_jsonl_atomic` / `write_json_atomic` write to a temporary file and rename it into place.
- `ResumableJsonl` appends finished records to `<name>.partial` (flushed and fsynced per batch);
  after a crash it drops a torn last line, reports which keys are done, and `finish()` renames the
  file to its final name. A finished stage is therefore either complete or resumable.
- `truncate_steps` cuts a step-keyed log (metrics.jsonl) back to the step a run resumes from.
- `write_manifest` records input hashes, counts, the resolved config, package versions, git SHA.
- `check_same_config` refuses to resume or reuse a stage folder written by a different config.

Not here: record types (records/), the run directory's layout (run_dir.py) or what a stage computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from autotraj.config import ConfigError


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, line and field."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-empty line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            if _SURROGATE_ESCAPE.search(line):
                _check_unicode(obj, f"{path}:{lineno}")
            yield lineno, obj


# A JSON escape of a UTF-16 surrogate; json.loads joins a valid pair and keeps a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(obj: Any, where: str) -> None:
    """Raise `DataError` if a string in `obj` holds a lone surrogate (not valid Unicode: no
    file or tokenizer can take it)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: a string holds a lone surrogate escape (U+{ord(e.object[e.start]):04X}): "
            f"not valid Unicode"
        ) from None


def load_records(path: str | Path, parse: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """Read a JSONL file of records, re-raising any field error with the file and line."""
    out = []
    for lineno, obj in read_jsonl(path):
        try:
            out.append(parse(obj))
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
    return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; return how many were written."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for row in rows:
            f.write(_dumps(row) + "\n")
            count += 1

    _atomic_write(Path(path), write)
    return count


def write_json_atomic(path: str | Path, obj: Any) -> None:
    _atomic_write(
        Path(path), lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    )


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text))


def drop_torn_tail(path: Path) -> None:
    """Cut an appended file after its last newline (a kill can leave half a line behind)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def truncate_steps(path: str | Path, last_step: int) -> None:
    """Keep the rows of a step-keyed JSONL log with `step <= last_step`, minus a torn last line.

    A run that resumes from the checkpoint of `last_step` logs the later steps again; without
    this they would appear twice.
    """
    path = Path(path)
    if not path.exists():
        return
    drop_torn_tail(path)
    rows = [row for _, row in read_jsonl(path)]
    if any(row.get("step", 0) > last_step for row in rows):
        write_jsonl_atomic(path, [row for row in rows if row.get("step", 0) <= last_step])


class ResumableJsonl:
    """Append-only output of a stage that can be interrupted at any point and resumed.

    `key` maps a written row to the unit of work it completes (e.g. its query id); `done` holds
    the keys already on disk. Rows are appended in batches, each flushed and fsynced, so a kill
    loses at most the batch being written (a torn last line is dropped on reopen).
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], str]):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.key = key
        self.done: dict[str, int] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            source = self.path
        elif self.partial.exists():
            self._drop_torn_tail()
            source = self.partial
        else:
            source = None
        if source is not None:
            for _, row in read_jsonl(source):
                k = key(row)
                self.done[k] = self.done.get(k, 0) + 1

    @property
    def finished(self) -> bool:
        return self.path.exists()

    def _drop_torn_tail(self) -> None:
        drop_torn_tail(self.partial)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        if self.finished:
            raise RuntimeError(f"{self.path}: already finished; nothing may be appended")
        rows = list(rows)  # iterated twice below: a generator would be spent after the first
        keys = [self.key(r) for r in rows]
        text = "".join(_dumps(r) + "\n" for r in rows)
        with self.partial.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for k in keys:
            self.done[k] = self.done.get(k, 0) + 1

    def finish(self) -> None:
        if self.finished:
            return
        if not self.partial.exists():
            self.partial.touch()
        os.replace(self.partial, self.path)


RUN_DIR = "<run_dir>"


def relocatable(value: Any, run_dir: str) -> Any:
    """`value` (dicts, lists, strings) with the run directory written as `<run_dir>`, in strings
    and dict keys, so that a run directory moved or copied elsewhere keeps its configs' identity
    (the pipeline's cache keys, the stages' resume checks)."""
    root = str(Path(run_dir))

    def fix(item: Any) -> Any:
        if isinstance(item, str):
            if item == root:
                return RUN_DIR
            return RUN_DIR + item[len(root) :] if item.startswith(root + "/") else item
        if isinstance(item, dict):
            return {fix(k): fix(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [fix(v) for v in item]
        return item

    return fix(value)


def _comparable(resolved_yaml: str) -> Any:
    data = yaml.safe_load(resolved_yaml)
    if isinstance(data, dict) and isinstance(data.get("run_dir"), str):
        return relocatable(data, data["run_dir"])
    return data


def check_same_config(out_dir: str | Path, resolved_yaml: str) -> None:
    """Save `resolved_yaml` as `<out_dir>/config.resolved.yaml`, or raise `ConfigError` if the
    folder already holds the output of a different config (resuming it would mix the two).

    Configs are compared with their `run_dir` written as `<run_dir>` (`relocatable`): a run
    directory moved elsewhere resumes. A folder holding nothing but the saved config (a run that
    failed on its input before writing anything) takes the new config: there is nothing to mix.
    """
    out_dir = Path(out_dir)
    saved = out_dir / "config.resolved.yaml"
    output = [p for p in out_dir.iterdir() if p != saved] if out_dir.is_dir() else []
    if (
        output
        and saved.exists()
        and _comparable(saved.read_text(encoding="utf-8")) != _comparable(resolved_yaml)
    ):
        raise ConfigError(
            f"{out_dir} holds output of a different config; use another run_dir "
            f"or delete that folder (compare {saved})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(resolved_yaml, encoding="utf-8")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def package_versions(
    names: Iterable[str] = ("autotraj", "torch", "transformers", "trl", "bm25s", "math-verify"),
) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(
    stage_dir: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str | Path],
    counts: dict[str, Any],
) -> dict[str, Any]:
    """Write `manifest.json` for a finished stage and return it."""
    manifest = {
        "stage": stage,
        "inputs": {
            name: {"path": str(p), "sha256": file_sha256(p)}
            for name, p in inputs.items()
            if Path(p).is_file()
        },
        "counts": counts,
        "config": config,
        "versions": package_versions(),
        "git_sha": _git_sha(),
    }
    write_json_atomic(Path(stage_dir) / "manifest.json", manifest)
    return manifest
