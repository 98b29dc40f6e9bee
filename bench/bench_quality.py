"""Quality scoring throughput: trajectories scored per second on one core.

Builds realistic synthetic trajectories (150-300 words: <think> reasoning with occasional hedging
and repeated phrases, one to three <code>/<search> calls with <result> blocks, an <answer>), in
groups of 2-4 per query, then times `score_group` over all groups in this one process (one
core), in CPU seconds of this process (`time.process_time`, so other load on the machine does not
count; wall-clock is printed too). Every dimension is computed on every call whatever the weights, so one config measures
them all; the second line scores model text only.

    python bench/bench_quality.py [--n 20000] [--seed 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time

from autotraj.quality import QualityConfig, score_group
from autotraj.records import Provenance, Segment, ToolCall, Trajectory

PROV = Provenance(model="bench", backend="scripted", temperature=0.3, top_p=0.9, max_new_tokens=0)
VOCAB = [
    "the",
    "we",
    "so",
    "then",
    "now",
    "first",
    "next",
    "compute",
    "value",
    "total",
    "number",
    "answer",
    "step",
    "equation",
    "solve",
    "check",
    "result",
    "gives",
    "sum",
    "product",
    "each",
    "per",
    "remaining",
    "half",
    "twice",
    "more",
    "less",
    "than",
    "equals",
    "therefore",
    "because",
    "since",
    "let",
    "x",
    "y",
    "n",
    "price",
    "cost",
    "hours",
    "minutes",
    "apples",
    "eggs",
    "dollars",
    "distance",
    "speed",
    "time",
    "rate",
    "city",
    "born",
    "director",
    "film",
    "river",
    "capital",
    "year",
    "population",
    "search",
    "query",
]
HEDGES = ("maybe", "perhaps", "probably", "seems", "might")
PHRASES = ("let me compute the total", "so the answer is", "we need to find the value")


def _words(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        if rng.random() < 0.08:
            out.extend(rng.choice(PHRASES).split())
        elif rng.random() < 0.01:
            out.append(rng.choice(HEDGES))
        else:
            out.append(rng.choice(VOCAB))
    return " ".join(out[:n])


def make_trajectory(rng: random.Random, tid: str, qid: str) -> Trajectory:
    n_calls = rng.randint(1, 3)
    budget = rng.randint(150, 300)
    per_piece = max(10, budget // (2 * n_calls + 2))
    segments, calls = [], []
    text = f"<think>{_words(rng, per_piece)}</think>\n"
    for i in range(n_calls):
        tool = rng.choice(("python", "search"))
        tag = "code" if tool == "python" else "search"
        body = f"print({rng.randint(1, 99)} * {i + 2})" if tool == "python" else _words(rng, 6)
        text += f"{_words(rng, per_piece)}\n<{tag}>\n{body}\n</{tag}>"
        segments.append(Segment(text=text, trainable=True, token_ids=tuple(range(len(text) // 4))))
        output = str(rng.randint(1, 999)) if tool == "python" else _words(rng, per_piece)
        status = "ok" if rng.random() < 0.9 else "error"
        result = f"\n<result>\n{output}\n</result>\n"
        segments.append(Segment(text=result, trainable=False, token_ids=(0,) * (len(result) // 4)))
        calls.append(ToolCall(tool=tool, input=body, output=output, status=status))
        text = ""
    text = (
        f"<think>{_words(rng, per_piece)}</think>\n<answer>\\boxed{{{rng.randint(1, 99)}}}</answer>"
    )
    segments.append(Segment(text=text, trainable=True, token_ids=tuple(range(len(text) // 4))))
    return Trajectory(
        id=tid,
        query_id=qid,
        segments=tuple(segments),
        tool_calls=tuple(calls),
        finish_reason="answer",
        provenance=PROV,
    )


def make_groups(n: int, seed: int) -> list[tuple[list[Trajectory], list[bool]]]:
    rng = random.Random(seed)
    groups, made, q = [], 0, 0
    while made < n:
        size = min(rng.randint(2, 4), n - made)
        trajs = [make_trajectory(rng, f"q{q}-{k}", f"q{q}") for k in range(size)]
        groups.append((trajs, [rng.random() < 0.6 for _ in trajs]))
        made, q = made + size, q + 1
    return groups


def rate(groups, cfg: QualityConfig, repeats: int) -> tuple[float, float, dict[str, int]]:
    """(trajectories per CPU second, per wall-clock second, label counts); best of `repeats`."""
    n = sum(len(t) for t, _ in groups)
    cpu, wall, labels = float("inf"), float("inf"), {}
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        scores = [s for trajs, ok in groups for s in score_group(trajs, ok, cfg)]
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
        labels = {k: sum(s.label == k for s in scores) for k in ("HQ", "AC-LQ", "AW")}
    return n / cpu, n / wall, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    groups = make_groups(args.n, args.seed)
    words = [len(t.text.split()) for trajs, _ in groups for t in trajs]
    print(
        f"{args.n} trajectories in {len(groups)} groups, "
        f"{min(words)}-{max(words)} words (mean {sum(words) / len(words):.0f})"
    )
    for name, cfg in (
        ("release weights, whole text", QualityConfig()),
        ("model text only", QualityConfig(exclude_tool_results=True)),
    ):
        per_cpu_s, per_wall_s, labels = rate(groups, cfg, args.repeats)
        print(
            f"{name:<28} {per_cpu_s:>8,.0f} trajectories/CPU-s "
            f"({per_wall_s:>7,.0f}/wall-s)  labels {labels}"
        )


if __name__ == "__main__":
    main()
