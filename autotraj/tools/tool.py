"""The Tool protocol: run a batch of tool inputs concurrently, one `ToolCall` per input.

A tool failure the model caused (an exception in its code, a timeout, an empty query) is data: a
ToolCall with status error/timeout whose output the model will read. An infrastructure failure
(a retrieval server down after its retries, a sandbox pool that cannot start) raises
`ToolInfraError`; the rollout marks the affected trajectories `infra_error` instead of scoring them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from autotraj.records import ToolCall, ToolName


class ToolInfraError(RuntimeError):
    """A tool backend failed for reasons outside the model's control."""


@runtime_checkable
class Tool(Protocol):
    name: ToolName

    def run_batch(self, inputs: Sequence[str]) -> list[ToolCall]: ...

    def close(self) -> None: ...
