"""`autotraj <command>`: parse arguments, load the config, call the stage. No logic lives here.

Stage commands take `--config FILE.yaml` and dotted `key=value` overrides
(defaults < file < command line); `--dry-run` prints the resolved config and exits. A stage
command given a pipeline config (configs/cpu.yaml) reads its own section of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from autotraj.config import ConfigError, load_config, load_stage_config, to_dict
from autotraj.io import DataError
from autotraj.records import LABELS


def _synthesize() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.synthesize import SynthesizeConfig, run_synthesize

    return SynthesizeConfig, run_synthesize


def _score() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.score import ScoreConfig, run_score

    return ScoreConfig, run_score


def _repair() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.repair import RepairConfig, run_repair

    return RepairConfig, run_repair


def _build() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.build import BuildConfig, run_build

    return BuildConfig, run_build


def _sft() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.train.sft import SftConfig, run_sft

    return SftConfig, run_sft


def _rm() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.train.reward_model import RmConfig, run_rm

    return RmConfig, run_rm


def _rl() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.train.grpo import RlConfig, run_rl

    return RlConfig, run_rl


def _eval() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.evaluate import EvalConfig, run_eval

    return EvalConfig, run_eval


def _run() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.pipeline import PipelineConfig, run_pipeline

    return PipelineConfig, run_pipeline


def _ablate() -> tuple[type, Callable[[Any], Any]]:
    from autotraj.ablate import AblateConfig, run_ablation

    return AblateConfig, run_ablation


# stage name -> (help, loader of (config class, run function)); imports stay lazy so that
# `autotraj --help` does not import torch.
STAGES: dict[str, tuple[str, Callable[[], tuple[type, Callable[[Any], Any]]]]] = {
    "synthesize": (
        "sample N candidate trajectories per training query, with real tools",
        _synthesize,
    ),
    "score": (
        "grade and score every candidate; label it HQ / AC-LQ / AW",
        _score,
    ),
    "repair": (
        "repair AC-LQ and AW trajectories with the repairer model; keep verified repairs",
        _repair,
    ),
    "build": (
        "build the SFT set (HQ + accepted repairs) and the preference set (repair > original)",
        _build,
    ),
    "sft": (
        "fine-tune the policy on the SFT set (tool results masked); full or LoRA",
        _sft,
    ),
    "rm": (
        "train the trajectory reward model on the preference set (Bradley-Terry)",
        _rm,
    ),
    "rl": (
        "GRPO on the policy with multi-turn tool rollouts and the composite reward",
        _rl,
    ),
    "eval": (
        "evaluate a model on benchmarks with the training rollout loop and tools (greedy)",
        _eval,
    ),
    "run": (
        "the whole pipeline in one run directory; finished stages are skipped",
        _run,
    ),
    "ablate": (
        "variants of the method side by side (SFT data, RL reward, a floor) with intervals",
        _ablate,
    ),
}


def _run_stage(name: str, args: argparse.Namespace) -> int:
    config_cls, run = STAGES[name][1]()
    if name in ("run", "ablate"):
        cfg = load_config(config_cls, args.config, args.overrides)
    else:  # a stage reads its section of a pipeline config, or a file of its own
        cfg = load_stage_config(config_cls, name, args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    result = run(cfg)
    if name == "run":
        table = result.get("eval", {}).pop("table", None)
    else:
        table = result.pop("table", None) if name == "ablate" else None
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if table:
        sys.stdout.write(f"\n{table}\n")
    return 0


def _index(args: argparse.Namespace) -> int:
    from autotraj.tools.search import build_index

    stats = build_index(args.corpus, args.out_dir, stemmer=args.stemmer, overwrite=args.overwrite)
    sys.stdout.write(json.dumps(stats, indent=2) + "\n")
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from autotraj.tools.python_sandbox import run_file

    result = run_file(args.file, timeout_s=args.timeout_s)
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


def _show(args: argparse.Namespace) -> int:
    import shutil

    from autotraj.show import render_list, render_show

    color = sys.stdout.isatty() and not args.no_color
    if args.list:
        text = render_list(args.run_dir, label=args.label, color=color)
    elif args.trajectory_id is None:
        raise ConfigError("show: give a TRAJECTORY_ID or --list")
    else:
        width = shutil.get_terminal_size().columns
        text = render_show(
            args.run_dir, args.trajectory_id, tokenizer=args.tokenizer, color=color, width=width
        )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from autotraj.report import write_report

    path = write_report(args.run_dir, args.out, max_trajectories=args.max_trajectories)
    sys.stdout.write(f"{path}\n")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from autotraj.tasks.builtin import write_tasks

    counts = write_tasks(args.out_dir)
    sys.stdout.write(json.dumps(counts, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autotraj", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p = sub.add_parser(
        "index", help="build a BM25 index from a JSONL corpus (id, title, text|contents)"
    )
    p.add_argument("corpus")
    p.add_argument("out_dir")
    p.add_argument(
        "--stemmer", default=None, help="e.g. 'english' (needs PyStemmer); default: none"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing index")
    p = sub.add_parser(
        "sandbox", help="run one Python file in the rollout sandbox; print the result as JSON"
    )
    p.add_argument("file")
    p.add_argument("--timeout-s", type=float, default=5.0, help="wall-clock limit (release: 5 s)")
    p = sub.add_parser(
        "show", help="print one trajectory: segments, tool calls, scores, mask, repair diff"
    )
    p.add_argument("run_dir")
    p.add_argument("trajectory_id", nargs="?", help="a trajectory or repair id")
    p.add_argument("--list", action="store_true", help="list trajectory ids with label and score")
    p.add_argument("--label", choices=LABELS, help="with --list: only this label")
    p.add_argument(
        "--tokenizer", help="model name/path or 'embedded:smollm2-135m-instruct': show the mask"
    )
    p.add_argument("--no-color", action="store_true", help="no ANSI colors")
    p = sub.add_parser(
        "report", help="write one self-contained HTML report: results, plots, trajectory viewer"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="the HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument(
        "--max-trajectories",
        type=int,
        help="candidates embedded in the viewer (whole queries, in file order; default 5000)",
    )
    p = sub.add_parser(
        "tasks", help="write the built-in tasks' splits and multi-hop corpus as JSONL files"
    )
    p.add_argument("out_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command in STAGES:
            return _run_stage(args.command, args)
        commands = {
            "index": _index,
            "sandbox": _sandbox,
            "show": _show,
            "report": _report,
            "tasks": _tasks,
        }
        return commands[args.command](args)
    except (ConfigError, DataError) as e:
        sys.stderr.write(f"autotraj {args.command}: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
