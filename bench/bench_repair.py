"""Repair stage throughput: batched repairs (one rollout per chunk) vs one repair at a time.

Builds a throwaway run directory holding N real GSM8K training questions, each with a
deliberately wrong trajectory (a code call that adds 7 to the gold answer, and that wrong sum
as the boxed answer), scores it (all AW), then runs the real repair stage twice on the same
repairer and tools: `chunk=N` (every repair of the chunk in one batched rollout) and `chunk=1`
(the one-at-a-time loop). Greedy decoding, first pass off (AW trajectories never take it).
Prints repairs/minute, generated tokens/second and tool calls for both, and the ratio.

    python bench/bench_repair.py [--n 16] [--max-new-tokens 192]
    python bench/bench_repair.py --base-url http://127.0.0.1:8000/v1 --model NAME [--tokenizer T]

With `--base-url`, the repairer is an OpenAI-compatible endpoint (api_mode completions) with
N requests in flight; the prompts are rendered with `--tokenizer` (default: the embedded
model's).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from autotraj.io import load_records
from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_generator
from autotraj.querysets import load_queries
from autotraj.records import Provenance, Repair, Segment, ToolCall, Trajectory
from autotraj.repair import RepairConfig, run_repair
from autotraj.rollout import RolloutConfig
from autotraj.score import ScoreConfig, run_score
from autotraj.tags import result_text
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "gsm8k_train.jsonl"
POLICY = Provenance(model="bench", backend="none", temperature=0.3, top_p=0.9, max_new_tokens=0)


def wrong_trajectory(query_id: str, gold: str) -> Trajectory:
    wrong = str(int(float(gold.replace(",", ""))) + 7)
    code = f"print({gold} + 7)"
    return Trajectory(
        id=f"{query_id}/s0",
        query_id=query_id,
        segments=(
            Segment(
                f"<think>I add the numbers in the question.</think>\n<code>\n{code}\n</code>", True
            ),
            Segment(result_text(wrong), False),
            Segment(
                f"<think>The total is {wrong}.</think>\n<answer>\\boxed{{{wrong}}}</answer>", True
            ),
        ),
        tool_calls=(ToolCall(tool="python", input=code, output=wrong, status="ok"),),
        finish_reason="answer",
        provenance=POLICY,
    )


def make_run(run_dir: Path, source: str, n: int) -> None:
    queries = load_queries(source, limit=n)
    synth = run_dir / "synthesize"
    synth.mkdir(parents=True)
    with (synth / "queries.jsonl").open("w") as f:
        f.writelines(json.dumps(q.to_dict()) + "\n" for q in queries)
    with (synth / "trajectories.jsonl").open("w") as f:
        f.writelines(
            json.dumps(wrong_trajectory(q.id, q.answers[0]).to_dict()) + "\n" for q in queries
        )
    run_score(ScoreConfig(run_dir=str(run_dir)))


def generated(run_dir: Path, tokenizer: Any) -> tuple[int, int]:
    """(model-written tokens, tool calls) over every repair attempt written by the stage."""
    tokens = calls = 0
    for name in ("repairs", "hard_cases"):
        for repair in load_records(run_dir / "repair" / f"{name}.jsonl", Repair.from_dict):
            for attempt in (*repair.rejected, repair.final):
                text = attempt.trajectory.model_text
                tokens += len(tokenizer.encode(text, add_special_tokens=False))
                calls += len(attempt.trajectory.tool_calls)
    return tokens, calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16, help="repairs (and the batched chunk size)")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--queries", default=str(DATA))
    parser.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model name (with --base-url)")
    parser.add_argument("--tokenizer", default=EMBEDDED_MODEL, help="tokenizer (with --base-url)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.base_url:
        gen_cfg = GeneratorConfig(
            backend="openai",
            base_url=args.base_url,
            model=args.model,
            tokenizer=args.tokenizer,
            api_mode="completions",
            batch_size=args.n,
        )
    else:
        gen_cfg = GeneratorConfig(batch_size=args.n)
    generator = load_generator(gen_cfg, role="repairer")
    tools = open_tools(ToolsConfig())
    settings = RolloutConfig(
        temperature=0.0, max_new_tokens=args.max_new_tokens, max_response_tokens=args.max_new_tokens
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm_dir = Path(tmp) / "warm-up"
        make_run(warm_dir, args.queries, 2)
        warm_settings = RolloutConfig(temperature=0.0, max_new_tokens=8, max_response_tokens=8)
        warm = RepairConfig(run_dir=str(warm_dir), rollout=warm_settings, first_pass=False)
        run_repair(warm, generator, tools)
        for label, chunk in (("batched", args.n), ("one at a time", 1)):
            run_dir = Path(tmp) / f"chunk{chunk}"
            make_run(run_dir, args.queries, args.n)
            cfg = RepairConfig(
                run_dir=str(run_dir),
                generator=gen_cfg,
                rollout=settings,
                chunk=chunk,
                first_pass=False,
            )
            start = time.perf_counter()
            counts = run_repair(cfg, generator, tools)
            seconds = time.perf_counter() - start
            tokens, calls = generated(run_dir, generator.tokenizer)
            per_min = 60 * args.n / seconds
            rows.append(
                (label, seconds, per_min, tokens / seconds, calls, counts["accepted"]["AW"])
            )
    close_tools(tools)
    print(
        f"{args.n} AW repairs, greedy, <= {args.max_new_tokens} new tokens, "
        f"repairer {generator.name} ({generator.backend})"
    )
    print(
        f"{'mode':<14} {'seconds':>8} {'repairs/min':>12} {'gen tok/s':>10} "
        f"{'tool calls':>10} {'accepted':>9}"
    )
    for label, seconds, per_min, tok_s, calls, accepted in rows:
        print(f"{label:<14} {seconds:8.1f} {per_min:12.2f} {tok_s:10.1f} {calls:10d} {accepted:9d}")
    print(f"speed-up (batched / one at a time): {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
