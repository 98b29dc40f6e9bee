"""SFT speed on the embedded model: our SFT step vs TRL's plain SFTTrainer, and MFU.

Measures, in one process:
1. this machine's matmul peak (2048 x 2048, fp32 and bf16, `--threads` threads);
2. our SFT step (`autotraj.train.sft.build_trainer`: pre-tokenized trajectories rendered by
   render_trajectory, tool results masked) on realistic tool trajectories (~300 tokens);
3. TRL's plain SFTTrainer on the same trajectories given as conversational prompt/completion
   text (TRL tokenizes; loss on the whole completion), same model, batch, max_length, precision,
   steps.
Prints seconds per optimizer step (median over the steps after the first), tokens/s and model
FLOP utilization 6 * params * tokens/s against the measured bf16 peak, and the ratio
ours / TRL (target <= 1.1).

    .venv/bin/python bench/bench_sft.py --steps 5 --batch 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_tokenizer
from autotraj.records import Provenance, Segment, ToolCall, Trajectory
from autotraj.render import chat_messages
from autotraj.train.batches import sft_example
from autotraj.train.sft import SftConfig, build_trainer, load_causal_lm

PROV = Provenance(model="bench", backend="scripted", temperature=0.3, top_p=0.9, max_new_tokens=512)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of an n x n matmul loop."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def trajectory(i: int) -> tuple[str, Trajectory]:
    """A realistic two-call math trajectory (question, trajectory)."""
    a, b, c = 17 + i, 230 + 7 * i, 3 + i % 5
    question = (
        f"A warehouse ships {a} crates a day for {c} weeks. Each crate holds {b} parts, and one "
        f"part in forty is rejected at inspection. How many parts pass inspection in total?"
    )
    total = a * 7 * c * b
    passed = total - total // 40
    segments = (
        Segment(
            f"<think>Total parts are crates per day times days times parts per crate: "
            f"{a} * 7 * {c} * {b}. Then remove one fortieth of them.</think>\n"
            f"<code>\ntotal = {a} * 7 * {c} * {b}\nprint(total, total // 40)\n</code>",
            True,
        ),
        Segment(f"\n<result>\n{total} {total // 40}\n</result>\n", False),
        Segment(
            f"<think>{total} parts, {total // 40} rejected. Check the subtraction.</think>\n"
            f"<code>\nprint({total} - {total // 40})\n</code>",
            True,
        ),
        Segment(f"\n<result>\n{passed}\n</result>\n", False),
        Segment(f"<think>{passed} parts pass.</think>\n<answer>\\boxed{{{passed}}}</answer>", True),
    )
    calls = (ToolCall("python", "", "", "ok"), ToolCall("python", "", "", "ok"))
    return question, Trajectory(f"b{i}", f"q{i}", segments, calls, "answer", PROV)


class StepTimer:
    """Wall time of each optimizer step (a TrainerCallback built lazily)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def run(trainer, timer) -> dict[str, float]:
    trainer.train()
    steps = timer.times[1:] or timer.times
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    per_step = statistics.median(steps)
    return {"s_per_step": per_step, "tokens_per_step": tokens / len(timer.times)}


def ours(cfg: SftConfig, tokenizer, items) -> dict[str, float]:
    examples = [sft_example(tokenizer, t.id, q, t, max_length=cfg.max_length) for q, t in items]
    timer = StepTimer()
    return run(build_trainer(cfg, tokenizer, examples, [timer]), timer)


def trl_plain(cfg: SftConfig, tokenizer, items, out_dir: str) -> dict[str, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = {
        "prompt": [chat_messages(q) for q, _ in items],
        "completion": [[{"role": "assistant", "content": t.text}] for _, t in items],
    }
    args = SFTConfig(
        output_dir=out_dir,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=1,
        max_length=cfg.max_length,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=cfg.seed,
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=load_causal_lm(cfg.model, tokenizer.pad_token_id),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    return run(trainer, timer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-gc", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--trl-first", action="store_true", help="run TRL's plain trainer first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"load average at start: {os.getloadavg()}")
    peaks = {
        name: matmul_peak(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(f"matmul 2048: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    tokenizer = load_tokenizer(GeneratorConfig(model=EMBEDDED_MODEL))
    items = [trajectory(i) for i in range(args.batch * args.steps)]
    lengths = [len(sft_example(tokenizer, t.id, q, t).input_ids) for q, t in items]
    print(f"{len(items)} trajectories, {statistics.mean(lengths):.0f} tokens on average")
    params = sum(p.numel() for p in load_causal_lm(EMBEDDED_MODEL, None).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SftConfig(
            run_dir=tmp,
            model=EMBEDDED_MODEL,
            learning_rate=5e-5,
            max_steps=args.steps,
            per_device_batch_size=args.batch,
            effective_batch_size=args.batch,
            max_length=args.max_length,
            bf16=True,
            gradient_checkpointing=not args.no_gc,
            logging_steps=1,
            save_steps=10_000,
            use_cpu=True,
        )
        runs = {
            "ours": lambda: ours(cfg, tokenizer, items),
            "trl": lambda: trl_plain(cfg, tokenizer, items, str(Path(tmp) / "trl")),
        }
        order = ("trl", "ours") if args.trl_first else ("ours", "trl")
        results = {name: runs[name]() for name in order}
    for name, r in results.items():
        tps = r["tokens_per_step"] / r["s_per_step"]
        mfu = 6 * params * tps / (peaks["bf16"] * 1e9)
        print(
            f"{name:5s}: {r['s_per_step']:.2f} s/step, {r['tokens_per_step']:.0f} tokens/step, "
            f"{tps:.0f} tokens/s, MFU {100 * mfu:.1f}% of the bf16 peak"
        )
    ratio = results["ours"]["s_per_step"] / results["trl"]["s_per_step"]
    print(f"ours / TRL plain s/step ratio: {ratio:.3f} (target <= 1.1)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
