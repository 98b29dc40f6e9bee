"""Stage metrics: one JSON object per line in `metrics.jsonl`, names as `stage/group/name`.

TensorBoard / Weights & Biases trackers are adapters added by the training stages; every stage
that generates or trains (synthesize, repair, eval, sft, rm, rl) writes metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
