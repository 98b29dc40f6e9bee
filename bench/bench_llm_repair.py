"""Acceptance of a real LLM repairer per strategy and label, and seconds per repair.

Takes a run directory whose synthesize and score stages are done (for instance by
`autotraj run --config configs/cpu_llm_repair.yaml 'stages=[synthesize,score]'`) and runs the
real repair stage on copies of it, once per variant, with the repairer of the config's `repair`
section loaded once and shared:

- `release`: the release prompt (instructions + protocol + the trajectory), greedy, 1 attempt;
- `small`: the same plus 2 worked repairs of the label, the turn started with "<think>" and any
  preamble dropped (repair.examples / prefill / strip_preamble);
- `continue`: the original cut after a tool result (latest first) and continued,
  `continue_samples` samples per cut (strategy "continue").

The first pass is off in every variant, so the model alone is measured. Prints one row per
variant and label and writes them to `<out>/llm_repair.json`.

    python bench/bench_llm_repair.py --config configs/cpu_llm_repair.yaml --run-dir RUN \
        --out /tmp/llm-repair [--variants release small continue]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from autotraj.config import load_config
from autotraj.io import load_records
from autotraj.models.loading import load_generator
from autotraj.pipeline import PipelineConfig, stage_config
from autotraj.records import Repair
from autotraj.repair import RepairConfig, run_repair
from autotraj.tools.toolbox import close_tools, open_tools

VARIANTS = {
    "release": {"strategy": "rewrite", "examples": 0, "prefill": "", "strip_preamble": False},
    "small": {"strategy": "rewrite", "examples": 2, "prefill": "<think>", "strip_preamble": True},
    "continue": {"strategy": "continue"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, help="synthesize and score done here")
    parser.add_argument("--out", required=True, help="a fresh folder for the variants' runs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    pipeline = load_config(PipelineConfig, args.config, [f"run_dir={args.run_dir}"])
    base: RepairConfig = stage_config(pipeline, "repair")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generator = load_generator(base.generator, role="repairer")
    print(f"repairer loaded in {time.perf_counter() - start:.1f} s")
    tools = open_tools(base.tools)
    rows = []
    try:
        for name in args.variants:
            run_dir = out / name
            shutil.rmtree(run_dir, ignore_errors=True)
            for stage in ("synthesize", "score"):
                shutil.copytree(Path(args.run_dir) / stage, run_dir / stage)
            fields = {**base.__dict__, **VARIANTS[name], "run_dir": str(run_dir)}
            cfg = RepairConfig(**{**fields, "first_pass": False})
            began = time.perf_counter()
            counts = run_repair(cfg, generator, tools)
            seconds = time.perf_counter() - began
            rows.extend(variant_rows(name, run_dir, counts, seconds))
            for row in rows[-2:]:
                print(json.dumps(row), flush=True)
    finally:
        close_tools(dict(tools))
    (out / "llm_repair.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("| variant | label | accepted | seconds per repair | model attempts | reasons |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['label']} | {r['accepted']} / {r['to_repair']} | "
            f"{r['seconds_per_repair']:.1f} | {r['attempts']} | {r['reasons']} |"
        )


def variant_rows(name: str, run_dir: Path, counts: dict, seconds: float) -> list[dict]:
    repair_dir = run_dir / "repair"
    done = [
        *load_records(repair_dir / "repairs.jsonl", Repair.from_dict),
        *load_records(repair_dir / "hard_cases.jsonl", Repair.from_dict),
    ]
    total = max(1, len(done))
    rows = []
    for label in ("AC-LQ", "AW"):
        mine = [r for r in done if r.label == label]
        reasons: dict[str, int] = {}
        for r in mine:
            for a in (*r.rejected, r.final):
                if not a.accepted:
                    kind = a.reason.split(":")[0] if a.reason.startswith("flaw") else a.reason
                    kind = kind if not kind.startswith("S ") else "S too low"
                    reasons[kind] = reasons.get(kind, 0) + 1
        rows.append(
            {
                "variant": name,
                "label": label,
                "to_repair": len(mine),
                "accepted": sum(r.accepted for r in mine),
                "attempts": sum(1 + len(r.rejected) for r in mine),
                "seconds_per_repair": seconds / total,
                "seconds": seconds,
                "reasons": dict(sorted(reasons.items())),
            }
        )
    return rows


if __name__ == "__main__":
    main()
