"""Tool configuration and the function that opens the configured tools for a stage.

`open_tools(cfg)` returns {tool name: Tool}; the caller closes them (`close_tools`). Search is
optional: without an index or a URL the rollout tells the model the tool is not available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autotraj.records import ToolName
from autotraj.tools.tool import Tool


@dataclass(frozen=True)
class PythonToolConfig:
    workers: int = 0  # 0: one per CPU core
    timeout_s: float = 5.0  # release: 5 s wall clock
    memory_mb: int = 1024
    max_output_chars: int = 400  # release: longer output cut to first 200 + "..." + last 200


@dataclass(frozen=True)
class SearchToolConfig:
    backend: Literal["none", "bm25", "remote"] = "none"
    # bm25: a directory built by `autotraj index`, or "builtin:multihop" (the built-in task's
    # corpus, indexed under $AUTOTRAJ_HOME on first use: tasks/builtin.py)
    index_dir: str = ""
    url: str = ""  # remote: a FlashRAG/Search-R1 style retrieval endpoint
    top_k: int = 1  # release: top-1 passage
    timeout_s: float = 30.0
    max_retries: int = 3


@dataclass(frozen=True)
class ToolsConfig:
    python: PythonToolConfig = PythonToolConfig()
    search: SearchToolConfig = SearchToolConfig()
    cache_path: str = ""  # a sqlite file caching tool results by (tool, input, settings); "" = off


def open_tools(cfg: ToolsConfig) -> dict[ToolName, Tool]:
    """Start the configured tools (the sandbox pool starts its workers here)."""
    from autotraj.tools.python_sandbox import PythonSandbox

    tools: dict[ToolName, Tool] = {}
    py = cfg.python
    tools["python"] = PythonSandbox(
        workers=py.workers or None,
        timeout_s=py.timeout_s,
        memory_mb=py.memory_mb,
        max_output_chars=py.max_output_chars,
    )
    search = cfg.search
    if search.backend == "bm25":
        from autotraj.tools.search import Bm25Search

        index_dir = search.index_dir
        if index_dir.startswith("builtin:"):
            from autotraj.tasks.builtin import index_dir as builtin_index_dir

            index_dir = str(builtin_index_dir(index_dir.removeprefix("builtin:")))
        tools["search"] = Bm25Search(index_dir, top_k=search.top_k)
    elif search.backend == "remote":
        from autotraj.tools.search import RemoteSearch

        tools["search"] = RemoteSearch(
            search.url,
            top_k=search.top_k,
            timeout_s=search.timeout_s,
            max_retries=search.max_retries,
        )
    if cfg.cache_path:
        from autotraj.tools.cache import ToolCache

        tools = {
            name: ToolCache(tool, cfg.cache_path, settings=repr(getattr(cfg, name)))
            for name, tool in tools.items()
        }
    return tools


def close_tools(tools: dict[ToolName, Tool]) -> None:
    for tool in tools.values():
        tool.close()
