"""What the repairer model is shown: the per-label instructions, the worked repairs, the request
(question + the low-quality trajectory; never the gold answer).

Not here: generation and verification (repair.py, repair_verify.py).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from autotraj.config import ConfigError
from autotraj.records import (
    RepairLabel,
)
from autotraj.render import default_system_prompt

PROMPT_FILES: dict[RepairLabel, str] = {"AC-LQ": "repair_aclq.txt", "AW": "repair_aw.txt"}


@cache
def repair_instructions(label: RepairLabel) -> str:
    path = resources.files("autotraj") / "prompts" / PROMPT_FILES[label]
    return path.read_text(encoding="utf-8").strip()


@cache
def repair_examples(label: RepairLabel) -> tuple[tuple[str, str, str], ...]:
    """The worked repairs of `label`: (question, low-quality trajectory, clean repair)."""
    path = resources.files("autotraj") / "prompts" / "repair_examples.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return tuple((r["question"], r["trajectory"], r["repair"]) for r in rows if r["label"] == label)


def _repair_request(question: str, trajectory_text: str, label: RepairLabel) -> str:
    verdict = "the right" if label == "AC-LQ" else "a wrong"
    return (
        f"Question:\n{question}\n\n"
        f"The trajectory below reaches {verdict} final answer and is low quality:\n"
        f"=== TRAJECTORY START ===\n{trajectory_text.strip()}\n=== TRAJECTORY END ===\n\n"
        f"Write your own clean trajectory for the question now."
    )


def repair_messages(
    question: str,
    trajectory_text: str,
    label: RepairLabel,
    system_prompt: str | None = None,
    examples: int = 0,
) -> list[dict[str, str]]:
    """The repairer's conversation: instructions + protocol, `examples` worked repairs of the
    same label as earlier turns (request, then the clean trajectory with the results the
    environment gave), then question + trajectory.

    The gold answer is never an argument, so it cannot leak into the prompt.
    """
    protocol = default_system_prompt() if system_prompt is None else system_prompt
    shown = repair_examples(label)[:examples]
    if len(shown) < examples:
        raise ConfigError(
            f"repair.examples: only {len(shown)} worked {label} repairs in "
            f"prompts/repair_examples.jsonl, asked {examples}"
        )
    turns = [{"role": "system", "content": f"{repair_instructions(label)}\n\n{protocol}"}]
    for q, bad, good in shown:
        turns += [
            {"role": "user", "content": _repair_request(q, bad, label)},
            {"role": "assistant", "content": good},
        ]
    return [*turns, {"role": "user", "content": _repair_request(question, trajectory_text, label)}]
